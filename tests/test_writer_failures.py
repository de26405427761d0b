"""The event writer failing under the monitor: its thread dead (an error writing, a full disk), and the monitor
used after close(). Training goes on and ends; nothing hangs; one line says what happened. And train.py's
checkpoints on a disk that fills up."""

import json
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from conftest import ROOT, run_script

from gradwatch import TrainingMonitor

# the model, optimizer and data of the scripts below, which run in a process of their own
SETUP = """
import sys, torch
sys.path.insert(0, {root!r})
from gradwatch import TrainingMonitor
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
"""

LOOP = (
    SETUP
    + """monitor = TrainingMonitor(sys.argv[1], stats_every=1, hist_every=1, flush_secs=1).watch(model, optimizer)
for epoch in range(3):
    for i in range(100):
        if {break_at} == monitor.steps:  # the writer thread's next write fails, as on a full disk
            def full(*args, **kwargs):
                raise OSError(28, "No space left on device")
            for writer in monitor.sink.writers.values():
                writer.file_writer.event_writer._ev_writer.write_event = full
        rows = slice(i % 8 * 32, i % 8 * 32 + 32)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    monitor.epoch_end(epoch, {{"train/loss": loss.item()}})
monitor.close()
print("trained", monitor.steps, "steps")
"""
)


def run_loop(tmp_path, log_dir, break_at):
    script = tmp_path / "loop.py"
    script.write_text(LOOP.format(root=str(ROOT), break_at=break_at))
    return subprocess.run([sys.executable, str(script), str(log_dir)], capture_output=True, text=True, timeout=240)


@contextmanager
def small_disk(folder, size):
    """A tmpfs of `size` mounted at `folder` for the with block; the test is skipped where this process may not
    mount one."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_dead_event_writer_neither_hangs_nor_ends_the_run(tmp_path):
    """tensorboardX's writer thread dies on the error and its queue then blocks every later write for ever: the
    monitor sees the thread gone, says so once and writes no more events, and the loop trains to its end."""
    result = run_loop(tmp_path, tmp_path / "run", break_at=20)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 300 steps" in result.stdout
    assert result.stderr.count("gradwatch: the event writer stopped") == 1, result.stderr[-2000:]
    assert "free space, then resume from the last checkpoint" in result.stderr


@pytest.mark.monitor_failures
def test_a_full_disk_neither_hangs_nor_ends_the_run(tmp_path):
    """The same on a real full disk: a 256 kB tmpfs, skipped where this process may not mount one."""
    with small_disk(tmp_path / "disk", "256k") as disk:
        result = run_loop(tmp_path, disk / "run", break_at=-1)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained 300 steps" in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gradwatch: {disk / 'run'}"), result.stderr[-3000:]
    assert "cannot be written (No space left on device); nothing more is written to" in lines[0]


FILLS_UP = (
    SETUP
    + """monitor = TrainingMonitor(sys.argv[1], stats_every=10).watch(model, optimizer)
for epoch in range(3):
    for i in range(40):
        rows = slice(i % 8 * 32, i % 8 * 32 + 32)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    monitor.epoch_end(epoch, {{"train/loss": loss.item()}})
    if epoch == 0:  # another program fills the disk
        monitor.flush()
        try:
            with open(sys.argv[2], "wb") as filler:
                while True:
                    filler.write(bytes(4096))
                    filler.flush()
        except OSError:
            pass
monitor.close()
print("trained", monitor.steps, "steps")
"""
)


@pytest.mark.monitor_failures
def test_a_disk_that_fills_up_leaves_every_file_as_it_was(tmp_path):
    """Epoch 1's files are written; then the disk fills up: one line says so, no traceback (tensorboardX's thread
    and its exit hook print none), and gradient_flow.png, diagnosis.json and the summaries are epoch 1's, whole,
    with no temporary file left (the picture was rewritten in place and left empty)."""
    script = tmp_path / "fills.py"
    script.write_text(FILLS_UP.format(root=str(ROOT)))
    with small_disk(tmp_path / "disk", "2m") as disk:
        run = disk / "run"
        result = subprocess.run([sys.executable, str(script), str(run), str(disk / "filler")], capture_output=True,
                                text=True, timeout=240)  # fmt: skip
        kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert result.returncode == 0 and "trained 120 steps" in result.stdout, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "cannot be written (No space left on device)" in lines[0], result.stderr[-3000:]
    assert not [name for name in kept if name.endswith(".tmp")]
    assert kept["gradient_flow.png"].startswith(b"\x89PNG") and len(kept["gradient_flow.png"]) > 1000
    assert json.loads(kept["diagnosis.json"])["facts"]
    lines = [json.loads(line) for line in kept["gradwatch-summaries.jsonl"].splitlines()]
    assert [line["summary"]["epoch"] for line in lines if "summary" in line] == [0]


def test_what_is_logged_after_close_is_not_written(tmp_path, capsys):
    model = torch.nn.Linear(4, 2)
    monitor = TrainingMonitor(tmp_path).watch(model)
    monitor.epoch_end(0, {"train/loss": 1.0})
    monitor.close()
    files = sorted(tmp_path.rglob("events.out.tfevents.*"))
    monitor.epoch_end(1, {"train/loss": 0.5})  # a loop that goes on after close()
    monitor.log_parameters(model, 2)
    assert sorted(tmp_path.rglob("events.out.tfevents.*")) == files  # no new event file
    assert capsys.readouterr().err.count("what is logged after close() is not written") == 1
    monitor.close()  # twice: safe


@pytest.mark.monitor_failures
def test_train_py_on_a_disk_that_fills_up_stops_with_one_line_and_resumes_elsewhere(tmp_path):
    """A 1.4 MB tmpfs holds the first epoch's best.pt and last.pt, not the second's: train.py stops with one line
    naming the checkpoint and what to do, no traceback, no half-written file, and the last.pt it kept resumes."""
    kept = tmp_path / "kept"
    with small_disk(tmp_path / "disk", "1400k") as disk:
        result = run_script("train.py", "--log-dir", disk, "--run-name", "r", "--epochs", "3")
        shutil.copytree(disk / "r", kept / "r")  # what the full disk holds, moved to one with room
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"/r/(last|best)\.pt: cannot be written \(the disk is full\)", errors[0])
    assert f"then resume with: python train.py --resume {disk / 'r'}" in errors[0]
    assert not list(kept.rglob("*.tmp"))
    saved = torch.load(kept / "r" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["batches_done"] == 0
    result = run_script("train.py", "--resume", kept / "r", "--epochs", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(kept / "r" / "last.pt", weights_only=True)["epoch"] == 3
