"""The diagnose command on logs written by this project, by tensorboardX and by torch.utils.tensorboard."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, run_script
from tensorboardX import SummaryWriter as TensorboardXWriter
from test_diagnosis import deep_sigmoid, make_data, mlp, train
from torch.utils.tensorboard import SummaryWriter as TorchWriter

from gradwatch import cli as diagnose
from gradwatch import diagnosis


def log_with(writer, model, epochs, weight_tag, grad_tag, lr=0.05):
    """A plain loop logging with writer.add_histogram under the given tag conventions, once per epoch."""
    x, y = make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for i in range(0, 256, 32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            optimizer.step()
        for name, param in model.named_parameters():
            writer.add_histogram(weight_tag.format(name), param.detach().numpy(), epoch)
            writer.add_histogram(grad_tag.format(name), param.grad.numpy(), epoch)
    writer.close()


def rules(report, run):
    return {finding["rule"] for finding in report[run]}


def test_diagnose_reads_every_writer_and_convention(tmp_path, capsys):
    torch.manual_seed(0)
    train(deep_sigmoid(), tmp_path / "logs" / "monitor", lr=0.05, epochs=2)  # this project: <name>_data/_grad
    log_with(TensorboardXWriter(str(tmp_path / "logs" / "tutorial")), deep_sigmoid(), 2, "{}_data", "{}_grad")
    log_with(TorchWriter(str(tmp_path / "logs" / "torch")), deep_sigmoid(), 2, "weights/{}", "gradients/{}")
    log_with(TensorboardXWriter(str(tmp_path / "logs" / "healthy")), mlp(), 3, "parameters/{}", "grad/{}", lr=0.02)
    assert diagnose.main([str(tmp_path / "logs"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for run in ("monitor", "tutorial", "torch"):
        assert "vanishing_gradients" in rules(report, run), run
        vanishing = next(f for f in report[run] if f["rule"] == "vanishing_gradients")
        assert vanishing["parameters"][0] == "0.weight"
    assert report["healthy"] == []
    assert diagnose.main([str(tmp_path / "logs" / "torch")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("torch: 2 logged steps, 18 parameters; 1 problem\n  Problem, epoch 1-2") and "0.weight" in out
    assert diagnose.main([str(tmp_path / "logs" / "healthy")]) == 0
    assert capsys.readouterr().out == "healthy: 3 logged steps, 4 parameters; healthy\n"


def test_diagnose_explains_what_it_cannot_read(tmp_path, capsys):
    assert diagnose.main([str(tmp_path)]) == 1
    assert "no event files" in capsys.readouterr().err
    assert diagnose.main([str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err

    writer = TensorboardXWriter(str(tmp_path / "other"))
    writer.add_histogram("activations/relu1", torch.randn(100).numpy(), 0)
    writer.add_scalar("learning_rate", 1.0, 0)
    writer.close()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "events.out.tfevents.1.host").write_bytes(b"\x00garbage" * 50)
    result = run_script("diagnose.py", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr  # runs it could not read: never exit 0
    assert (
        "other: no weight or gradient histograms and no loss or accuracy scalars recognised among 1 histogram "
        "tags (e.g. activations/relu1)" in result.stdout
    )
    assert "broken: no readable event in its event files (corrupt, or not TensorBoard event files)\n" in result.stdout
    assert "healthy" not in result.stdout  # what could not be examined is not called healthy


def test_a_truncated_event_file_is_read_up_to_where_it_breaks(tmp_path, capsys):
    log_with(TensorboardXWriter(str(tmp_path / "run")), deep_sigmoid(), 3, "{}_data", "{}_grad")
    event_file = next((tmp_path / "run").glob("events.out.tfevents.*"))
    data = event_file.read_bytes()
    event_file.write_bytes(data[: int(len(data) * 0.8)])  # as a writer killed mid-record leaves it
    assert diagnose.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run: ") and "steps" in out and "gradients of 0.weight" in out


def test_diagnose_checks_thresholds_as_train_does(tmp_path, capsys):
    refused = (
        ("bias", "unknown threshold 'bias'"),
        ("bias_z", "expected NAME=VALUE with a number"),
        ("bias_z=nan", "bias_z must be a finite number, got 'nan'"),
        ("bias_z=inf", "bias_z must be a finite number, got 'inf'"),
        ("stuck_epochs=2.5", "stuck_epochs must be a whole number, 0 or more, got '2.5'"),
        ("stuck_epochs=-1", "stuck_epochs must be a whole number, 0 or more, got '-1'"),
    )
    for bad, message in refused:
        with pytest.raises(SystemExit) as exit_info:
            diagnose.main([str(tmp_path), "--threshold", bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_lasting_finding_is_one_entry_with_its_first_and_last_step(tmp_path, capsys):
    torch.manual_seed(0)
    log_with(TensorboardXWriter(str(tmp_path / "run")), deep_sigmoid(), 4, "{}_data", "{}_grad")
    assert diagnose.main([str(tmp_path / "run"), "--json"]) == 0
    listed = [f for f in json.loads(capsys.readouterr().out)["run"] if f["rule"] == "vanishing_gradients"]
    assert [(f["epoch"], f["last_epoch"]) for f in listed] == [(1, 4)]  # counted from 1
    assert diagnose.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("Problem, epoch 1-4") == 1 and "gradients of 0.weight" in out


def test_loss_and_accuracy_scalars_under_common_tags_tell_the_story(tmp_path, capsys):
    """Scalars alone, as a Lightning or Hugging Face loop logs them: a loss per step that jumps and a validation
    accuracy per epoch at chance; with the number of classes, the diagnosis names the divergence first."""
    writer = TensorboardXWriter(str(tmp_path / "diverged"))
    for step in range(1, 41):
        writer.add_scalar("train_loss", 1.4 if step < 10 else 60.0 + step, step)
        if step % 10 == 0:
            writer.add_scalar("val_acc", 0.25, step)
    writer.close()
    assert diagnose.main([str(tmp_path / "diverged"), "--classes", "4", "--json"]) == 0
    findings = json.loads(capsys.readouterr().out)["diverged"]
    assert findings[0]["rule"] == "diverging" and findings[0]["step"] == 10
    assert findings[0]["evidence"]["peak"] == 70.0 and findings[0]["cause"] is None  # as first found
    assert diagnose.main([str(tmp_path / "diverged"), "--classes", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "diverged: 4 logged steps, 0 parameters; 1 problem\n  Problem, epoch 1-4, steps 10-40: the training"
    )


def test_a_runs_step_axis_folder_is_part_of_the_run(tmp_path, capsys):
    """The monitor writes <run>/steps beside the run's epoch events; diagnose reports the run once."""
    train(mlp(), tmp_path / "logs" / "run", lr=0.02, epochs=2, hist_every=2)
    assert (tmp_path / "logs" / "run" / "steps").is_dir()
    assert diagnose.main([str(tmp_path / "logs")]) == 0
    assert capsys.readouterr().out == "run: 2 epochs, 4 parameters, diagnosed as the monitor did; healthy\n"


def test_diagnose_follows_links_reads_an_event_file_and_says_what_it_lacks(tmp_path, capsys, monkeypatch):
    """A run reached through a symlinked folder is found (a link loop ends); an event file stands for its run;
    with --json, stdout holds only the JSON of the runs read; a closed pipe ends quietly; without TensorBoard's
    reader, one line names the install."""
    log_with(TensorboardXWriter(str(tmp_path / "real" / "run")), mlp(), 2, "{}_data", "{}_grad")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "linked").symlink_to(tmp_path / "real" / "run", target_is_directory=True)
    (tmp_path / "real" / "run" / "loop").symlink_to(tmp_path / "real", target_is_directory=True)
    assert diagnose.main([str(tmp_path / "logs")]) == 0
    assert capsys.readouterr().out.startswith("linked: 2 logged steps")
    event_file = next((tmp_path / "real" / "run").glob("events.out.tfevents.*"))
    assert diagnose.main([str(event_file), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["run"]

    (tmp_path / "logs" / "broken").mkdir()
    (tmp_path / "logs" / "broken" / "events.out.tfevents.1.host").write_bytes(b"\x00garbage" * 50)
    assert diagnose.main([str(tmp_path / "logs"), "--json"]) == 1
    captured = capsys.readouterr()
    assert list(json.loads(captured.out)) == ["linked"] and captured.err.startswith("broken: no readable event")

    piped = subprocess.run(
        f"{sys.executable} diagnose.py {tmp_path / 'logs'} --json | true",  # the reader is gone before it writes
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert piped.stderr.startswith("broken: no readable event") and "Traceback" not in piped.stderr

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real_find_spec(name)
    )
    assert diagnose.main([str(tmp_path / "logs")]) == 1
    assert (
        capsys.readouterr().err
        == "error: diagnose reads event files with TensorBoard's reader: pip install tensorboard\n"
    )


def foreign_log(folder, steps, loss, clipped_share=None, vanishing=False, epoch_scalar=False):
    """A log as another loop writes it: `loss(step)` every step, weight and gradient histograms every
    10 steps (the first layer's gradients 1e-6 of the last one's with `vanishing`), clip/* scalars
    where given, and Lightning's `epoch` scalar (100 steps an epoch)."""
    writer = TensorboardXWriter(str(folder))
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        writer.add_scalar("train_loss", loss(step), step)
        if epoch_scalar:
            writer.add_scalar("epoch", (step - 1) // 100, step)
        if clipped_share is not None:
            writer.add_scalar("clip/grad_norm", 5.0 + torch.rand(1, generator=generator).item(), step)
            writer.add_scalar("clip/clipped_share", clipped_share, step)
        if step % 10 == 0:
            for layer, scale in (("0", 1e-6 if vanishing else 1.0), ("1", 1.0)):
                writer.add_histogram(f"weights/{layer}.weight", torch.randn(64, generator=generator).numpy(), step)
                grad = torch.randn(64, generator=generator) * 1e-2 * scale
                writer.add_histogram(f"gradients/{layer}.weight", grad.numpy(), step)
    writer.close()


def test_logs_of_other_loops_are_read_with_their_clipping_first_loss_and_units(tmp_path, capsys):
    """Without the monitor's summaries: clip/* is read (clipping every step while the loss does not fall
    is named); the first loss is the first step's where the loss is logged every step (a rise from 1.0 to
    1.6 diverges, though ln 10 is 2.3); epochs are counted by Lightning's `epoch` scalar."""
    foreign_log(tmp_path / "clipped", 60, lambda step: 2.0 + 0.01 * (step % 7), clipped_share=1.0)
    foreign_log(tmp_path / "rose", 60, lambda step: 1.0 if step < 20 else 1.6, epoch_scalar=True)
    foreign_log(tmp_path / "calm", 60, lambda step: 1.0 / step, clipped_share=0.1)
    assert diagnose.main([str(tmp_path), "--json", "--classes", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "mostly_clipped" in rules(report, "clipped") and "mostly_clipped" not in rules(report, "calm")
    assert [f["rule"] for f in report["rose"]][:1] == ["diverging"]
    assert report["rose"][0]["evidence"]["first_loss"] == 1.0
    assert diagnose.main([str(tmp_path / "rose"), "--classes", "10"]) == 0
    assert capsys.readouterr().out.startswith("rose: 6 logged steps (to step 60, epoch 0), 2 parameters;")


def test_vanishing_gradients_without_evidence_of_a_cause_is_a_symptom(tmp_path, capsys):
    """Vanishing gradients in logs that show no activations and no loss graph (written without
    gradwatch): no check of a cause holds, so the finding names none and says what to check, in
    order, whatever the loss did; in particular, it never suggests a larger learning rate, which
    nothing here shows to be the cause (the suggestion it made before, in the log whose loss fell)."""
    foreign_log(tmp_path / "rose", 60, lambda step: 2.0 if step < 20 else 2.4, vanishing=True)
    foreign_log(tmp_path / "fell", 60, lambda step: 2.0 - step / 100, vanishing=True)
    assert diagnose.main([str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    found = {run: next(f for f in report[run] if f["rule"] == "vanishing_gradients") for run in report}
    for finding in found.values():
        assert finding["evidence"]["cause"] is None and finding["evidence"]["causes_held"] == []
        assert finding["suggestion"].startswith("check, in this order: saturated sigmoid or tanh units")
        assert "larger learning rate" not in finding["suggestion"]


SUITE_SAMPLE = ["lr_high_2", "nan_injected", "clipped_lr_high", "dead_relus", "default"]


def test_diagnose_names_the_live_monitors_first_problem_on_a_sample_of_the_suite(tmp_path, capsys):
    """Runs of bench/diagnosis_suite.py (4 epochs each): diagnose on each folder gives back the live
    monitor's findings, the same first problem, causes and suggestions, and the same story."""
    sys.path.insert(0, str(ROOT / "bench"))
    import diagnosis_suite as suite

    from data import CIFAR10_MEAN, CIFAR10_STD, build_loaders

    loaders = build_loaders(ROOT / "Data", 16, 0, torch.device("cpu"), 0, "yes", CIFAR10_MEAN, CIFAR10_STD)
    runs = {**suite.FAULTS, "default": ("healthy", set(), {})}
    firsts = {}
    for name in SUITE_SAMPLE:
        live = suite.train(tmp_path / name, loaders[0], loaders[1], loaders[2], 4, **runs[name][-1])
        assert diagnose.main([str(tmp_path / name), "--json"]) == 0
        replayed = json.loads(capsys.readouterr().out)[name]
        assert replayed == [f.to_json() for f in live], name
        assert diagnose.main([str(tmp_path / name)]) == 0
        told = capsys.readouterr().out
        assert diagnosis.indented(diagnosis.story(live)) in told if live else told.endswith("; healthy\n")
        first = suite.first_problem(live)
        firsts[name] = first.rule if first else None
    named = {"lr_high_2": "diverging", "nan_injected": "diverging", "clipped_lr_high": "mostly_clipped"}
    assert firsts == {**named, "dead_relus": "dead_units", "default": None}  # the suite's causes


@pytest.mark.parametrize("moment", ["loading", "reading"])
def test_ctrl_c_stops_the_diagnose_command_quietly_while_it_starts_or_reads(tmp_path, moment):
    """The console script, interrupted while its modules load (0.1 s in; its first run is told at about 0.2 s on
    an idle machine) or once it has told the first of 40 runs: status 130, no traceback."""
    for run in range(40):
        foreign_log(tmp_path / "logs" / f"run{run}", 60, lambda step: 2.0 - step / 100)
    command = [str(Path(sys.executable).parent / "diagnose"), str(tmp_path / "logs")]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each run's line reaches the pipe as it is told
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    if moment == "loading":
        time.sleep(0.1)
    else:
        assert process.stdout.readline().startswith("run0: ")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_summaries_that_cannot_be_replayed_leave_the_event_files_to_tell_the_run(tmp_path, capsys):
    torch.manual_seed(0)
    train(deep_sigmoid(), tmp_path / "run", lr=0.05, epochs=2)
    capsys.readouterr()  # what the live monitor printed
    summaries = tmp_path / "run" / "gradwatch-summaries.jsonl"
    lines = len(summaries.read_text().splitlines())
    summaries.write_bytes(b'{"summary": {"unit": 7}}\n' * lines)  # every line JSON of the right shape, no summary
    assert diagnose.main([str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: {summaries}: not read (TypeError: ") and captured.err.count("\n") == 1
    assert captured.out.startswith("run: 2 epochs, 32 steps, 18 parameters; 1 problem\n  Problem, epoch 1-2")


def without_root_powers():
    """The command prefix under which this process's permissions are checked as any user's: root's
    powers to read anything dropped (setpriv), or none for another user; skips where neither holds."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, and no setpriv to drop the power to read anything")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_a_run_that_cannot_be_read_is_said_and_fails_the_command(tmp_path):
    torch.manual_seed(0)
    for run in ("a", "b", "c"):
        train(mlp(), tmp_path / "runs" / run, lr=0.02, epochs=2)
    (tmp_path / "runs" / "b").chmod(0)
    for event_file in (tmp_path / "runs" / "c").glob("events.out.tfevents.*"):
        event_file.chmod(0)
    prefix = without_root_powers()
    try:
        every = subprocess.run([*prefix, sys.executable, "diagnose.py", str(tmp_path / "runs")], cwd=ROOT,
                               capture_output=True, text=True)  # fmt: skip
        one = subprocess.run([*prefix, sys.executable, "diagnose.py", str(tmp_path / "runs" / "b")], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
    finally:
        (tmp_path / "runs" / "b").chmod(0o755)
    assert every.returncode == 1 and every.stdout.startswith("a: 2 epochs") and "\nb" not in every.stdout
    warnings = every.stderr.splitlines()
    assert warnings[0] == f"warning: {tmp_path / 'runs' / 'b'}: cannot be read (Permission denied); left out"
    assert warnings[1].startswith(f"warning: {tmp_path / 'runs' / 'c'}: cannot be read (Permission denied: events.")
    assert len(warnings) == 2 and "Traceback" not in every.stderr
    assert one.returncode == 1 and one.stderr.splitlines() == [
        f"warning: {tmp_path / 'runs' / 'b'}: cannot be read (Permission denied); left out",
        f"error: {tmp_path / 'runs' / 'b'}: nothing in it could be read; read access to it is needed",
    ]
