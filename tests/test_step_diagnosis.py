"""Loops counted in optimizer steps: a loop that calls only watch() and step(loss) is diagnosed in
windows of steps while it runs, keeps a bounded memory, and `diagnose` tells its story again from the
summaries the monitor logged."""

import json
import math
import pickle
import shutil

import pytest
import torch
from conftest import load_events, readme_python, run_script
from torch import nn

from gradwatch import TrainingMonitor
from gradwatch.cli import main as diagnose_main
from gradwatch.diagnosis import MAX_HISTORY, indented, thinned
from gradwatch.diagnosis import run as diagnosis_run
from gradwatch.steps import MAX_PENDING
from gradwatch.summary import SUMMARIES


def data(seed=0, rows=4096):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 20, generator=generator)
    y = (x @ torch.randn(20, 10, generator=generator)).argmax(1)
    return x, y


def mlp():
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def warmup_cosine(optimizer, steps, warmup=100):
    def factor(step):
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run(log_dir, steps, optimizer="adamw", lr=1e-3, boost_at=(), boost=100.0, clip=None, seed=0,
        stats_every=10, during=None, monitor=None, resume=None):  # fmt: skip
    """A loop without epochs: `steps` optimizer steps under warmup and cosine decay, the learning
    rate `boost` times higher for 3 steps from each step of `boost_at` (loss spikes);
    `during(monitor, step, states)` is called after each step, states() giving what a checkpoint
    holds, which `resume` takes. Returns the monitor, closed."""
    torch.manual_seed(seed)
    model = mlp()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    schedule = warmup_cosine(opt, steps)
    x, y = data(seed)
    monitor = monitor or TrainingMonitor(log_dir, stats_every=stats_every)
    generator = torch.Generator().manual_seed(seed)
    parts = {"model": model, "opt": opt, "schedule": schedule, "monitor": monitor}
    for name, state in (resume or {}).items():
        parts[name].load_state_dict(state) if name != "generator" else generator.set_state(state)
    monitor.watch(model, opt)

    def states():
        return {"generator": generator.get_state(), **{n: p.state_dict() for n, p in parts.items()}}

    for step in range(monitor.steps + 1, steps + 1):
        rows = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
        boosted = any(start <= step < start + 3 for start in boost_at)
        for group in opt.param_groups if boosted else ():
            group["lr"] *= boost
        opt.step()
        for group in opt.param_groups if boosted else ():
            group["lr"] /= boost
        schedule.step()
        monitor.step(loss, grad_norm=norm, max_norm=clip)
        if during:
            during(monitor, step, states)
    monitor.close()
    return monitor


def rules(findings):
    return [f.rule for f in findings]


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(optimizer="sgd", lr=0.05, clip=1.0), dict(seed=1, stats_every=50)],
    ids=["adamw", "sgd-clipped", "adamw-seed-1-default-cadence"],
)
def test_a_healthy_run_counted_in_steps_gets_no_finding(tmp_path, settings):
    monitor = run(tmp_path, 3000, **settings)
    assert len(monitor.diagnosis.history) >= 4  # it was diagnosed, window after window
    assert monitor.findings == []
    assert json.loads((tmp_path / "diagnosis.json").read_text())["findings"] == []


def test_a_divergence_is_found_while_the_loop_runs(tmp_path):
    """The urgent findings come at the reading that shows them, not at an epoch's end that never
    comes: diagnosis.json holds the divergence a few steps after the loss rose."""
    seen = {}

    def during(monitor, step, states):
        if "diverging" in rules(monitor.findings) and not seen:
            seen["step"] = step
            seen["saved"] = json.loads((tmp_path / "diagnosis.json").read_text())["findings"]

    monitor = run(tmp_path, 1200, optimizer="sgd", lr=0.05, boost_at=[600], boost=300.0, during=during)
    assert 600 <= seen["step"] <= 620  # found at the first reading after the loss rose
    assert [f["rule"] for f in seen["saved"]] == ["diverging"]
    finding = next(f for f in monitor.findings if f.rule == "diverging")
    assert finding.unit == "steps" and 600 <= finding.step <= 610
    assert str(finding).startswith(f"[diverging] steps {finding.step}-")  # no epoch in a loop without them
    texts = load_events(tmp_path / "steps").Tensors("diagnosis/text_summary")  # the Text tab, by steps
    told = {event.step: event.tensor_proto.string_val[0].decode() for event in texts}
    assert min(told) == 260 and told[260] == "No findings." and "[diverging]" in told[610]  # 610: the reading after


SPIKES_AT = [800, 1500]


@pytest.fixture(scope="module")
def spiked(tmp_path_factory):
    """A loop with two bursts of a learning rate 100 times higher, read at every step: (the closed
    monitor, its run folder, the count of loss_spikes findings after each step)."""
    folder = tmp_path_factory.mktemp("spiked") / "run"
    counts = []

    def during(monitor, step, states):
        counts.append(rules(monitor.findings).count("loss_spikes"))

    return run(folder, 3000, boost_at=SPIKES_AT, stats_every=1, during=during), folder, counts


def test_loss_spikes_are_one_finding_with_their_count_and_the_layers_that_jumped_first(spiked):
    monitor, _, counts = spiked
    spikes_at = SPIKES_AT
    found = [f for f in monitor.findings if f.rule == "loss_spikes"]
    assert len(found) == 1 and found[0].evidence["count"] == 2
    assert max(counts) == 1 and counts.index(1) < 1500  # told during the run, before the second spike
    peaks = [spike["peak_step"] for spike in found[0].evidence["spikes"]]
    assert [start <= peak <= start + 10 for start, peak in zip(spikes_at, peaks)] == [True, True]
    moved = found[0].evidence["moved_first"]
    assert spikes_at[0] <= moved["step"] <= spikes_at[0] + 2  # the boosted steps' own update ratios
    assert all(ratios["update_ratio"] > 10 for ratios in moved["layers"].values())
    assert f"at step {moved['step']}" in found[0].message and "2 times" in found[0].message
    assert monitor.findings[0].rule == "loss_spikes"  # told first: the loss's rise follows from it


def test_memory_and_state_stay_flat_as_the_steps_grow(tmp_path, monkeypatch):
    """With the history held to 4 summaries (128 by default, which takes 32,000 steps to reach:
    bench/memory.py measures a million), its state is as large at step 4,000 as at 2,000."""
    monkeypatch.setattr(diagnosis_run, "MAX_HISTORY", 4)
    monkeypatch.setattr(diagnosis_run, "RECENT", 2)
    sizes = {}
    windows = []

    def during(monitor, step, states):
        windows.append(len(monitor.diagnosis.history))
        if step in (2000, 4000):
            sizes[step] = len(pickle.dumps(monitor.state_dict()))
            assert len(monitor.diagnosis.records) <= 32

    monitor = run(tmp_path, 4000, optimizer="sgd", lr=0.05, stats_every=4, during=during)
    assert max(windows) == 4 and monitor.diagnosis.history[0].step == 256  # the first one stays
    assert sizes[4000] < 1.1 * sizes[2000]
    lines = (tmp_path / SUMMARIES).read_text().splitlines()
    assert len(lines) == 4000 // 256 + 2  # every window logged: 16 readings and 256 steps, close()'s, the end


def test_thinning_keeps_the_first_and_the_latest_and_halves_the_middle():
    items = list(range(MAX_HISTORY + 1))
    kept = thinned(items, MAX_HISTORY, 32)
    assert kept[0] == 0 and kept[-32:] == items[-32:]
    assert kept[1:-32] == items[2:-32:2]
    assert thinned(items[:10], MAX_HISTORY, 32) == items[:10]


def test_a_window_needs_enough_readings_and_steps(tmp_path):
    every_step = run(tmp_path / "a", 600, stats_every=1)
    assert [s.step for s in every_step.diagnosis.history] == [256, 512, 600]  # 600: at close()
    given = run(
        tmp_path / "b", 600, stats_every=50, monitor=TrainingMonitor(tmp_path / "b", stats_every=50, diagnose_every=4)
    )
    assert [s.step for s in given.diagnosis.history] == [300, 600]
    with pytest.raises(ValueError, match="diagnose_every"):
        TrainingMonitor(tmp_path / "c", diagnose_every=-1)


def test_diagnose_tells_the_live_story_of_a_step_run(spiked, capsys):
    monitor, folder, _ = spiked
    assert diagnose_main([str(folder), "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)["run"]
    assert replayed == [f.to_json() for f in monitor.findings] != []
    assert diagnose_main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run: 3000 steps, 6 parameters, diagnosed as the monitor did; 1 problem")
    assert indented(monitor.story()) in out


def test_a_resumed_step_run_keeps_the_summaries_up_to_its_state(tmp_path):
    """Stopped at step 1100, after a spike was found, and resumed from the state saved at step 600:
    the summaries logged after 600 are dropped, and the run ends with the uninterrupted one's
    summaries and findings."""
    saved = {}

    def during(monitor, step, states):
        if step == 600:
            saved.update(pickle.loads(pickle.dumps(states())))
        if step == 1100:
            assert "loss_spikes" in rules(monitor.findings)
            raise KeyboardInterrupt

    whole = run(tmp_path / "whole", 1500, boost_at=[800], stats_every=5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", 1500, boost_at=[800], stats_every=5, during=during)
    resumed = run(tmp_path / "cut", 1500, boost_at=[800], stats_every=5, resume=saved,
                  monitor=TrainingMonitor(tmp_path / "cut", stats_every=5))  # fmt: skip
    cut, whole_lines = ([json.loads(line) for line in (tmp_path / folder / SUMMARIES).read_text().splitlines()]
                        for folder in ("cut", "whole"))  # fmt: skip
    # the summaries, then the run's end: the interrupted run's end (at step 1100) is dropped with what followed 600
    steps = [[line.get("summary", line.get("ended"))["step"] for line in lines] for lines in (cut, whole_lines)]
    assert steps[0] == steps[1] and [*cut[-1]][0] == "ended" and all("summary" in line for line in cut[:-1])
    assert [f.rule for f in resumed.findings] == [f.rule for f in whole.findings]
    assert rules(whole.findings)[0] == "loss_spikes"


def test_a_long_first_epoch_is_diagnosed_in_windows_then_by_its_epochs(tmp_path):
    """Windows of steps stand in for the first epoch until it ends; then the epochs make the
    summaries, and what the windows found is kept, as found in epoch 1."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data()
    monitor = TrainingMonitor(tmp_path, stats_every=10).watch(model, opt)
    units = []
    for epoch in range(2):
        for i in range(0, len(x) - 8, 8):  # 511 steps an epoch
            loss = nn.functional.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
            risen = epoch == 0 and 300 <= i // 8 < 340  # a loss 1000x higher for 40 steps (one batch's is not)
            monitor.step(loss * (1000 if risen else 1))
            units.append([s.unit for s in monitor.diagnosis.history])
        monitor.epoch_end(epoch, {"train/loss": loss.item()})
    monitor.close()
    assert units[300] == ["steps"]  # the first window, at step 256
    assert [s.unit for s in monitor.diagnosis.history] == ["epoch", "epoch"]
    found = {f.rule: f for f in monitor.findings}
    assert found["diverging"].epoch == 0 and found["diverging"].unit == "epoch"
    assert str(found["diverging"]).startswith("[diverging] epoch 1")


def test_the_readme_snippet_runs_as_printed(tmp_path):
    (tmp_path / "snippet.py").write_text(readme_python("### Loops counted in steps"))
    result = run_script(tmp_path / "snippet.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "Result" / "my-steps" / SUMMARIES).read_text().splitlines()
    assert [json.loads(line)["summary"]["step"] for line in lines[:-1]] == [800, 1600, 2000]
    assert json.loads(lines[-1])["ended"] == {"epoch": 2, "step": 2000}  # the run's end, at close()
    assert result.stdout.strip() == "No findings." or result.stdout.startswith(("Problem", "Note"))


def damaged(path, number, raw):
    """The file at `path` with its line `number` (from 1) replaced by the bytes `raw`."""
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = raw + b"\n"
    path.write_bytes(b"".join(lines))


def test_a_damaged_summary_line_is_left_out_with_one_warning(spiked, tmp_path, capsys):
    """A byte that is not UTF-8, or a line of another shape: the other lines tell the story, and
    one warning names the file and the lines (not the last line, which a kill cuts short)."""
    monitor, folder, _ = spiked
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    last = len((copy / SUMMARIES).read_bytes().splitlines())
    damaged(copy / SUMMARIES, 2, b'{"summary": {"step": 5\xff}}')
    damaged(copy / SUMMARIES, 3, b"[1, 2]")
    assert diagnose_main([str(copy), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"warning: {copy / SUMMARIES}: line 2, 3 not a summary (damaged); left out\n"
    assert "loss_spikes" in [f["rule"] for f in json.loads(captured.out)["run"]]
    damaged(copy / SUMMARIES, last, b'{"summary": {"step": 3000')  # cut short by a kill: silently
    assert diagnose_main([str(copy)]) == 0
    assert capsys.readouterr().err.count("\n") == 1


def test_a_run_resumed_over_a_damaged_summary_line_keeps_writing_summaries(tmp_path):
    saved = {}

    def during(monitor, step, states):
        if step == 600:
            saved.update(pickle.loads(pickle.dumps(states())))

    run(tmp_path, 900, during=during)
    damaged(tmp_path / SUMMARIES, 1, b"\xff\xfe not a summary")
    run(tmp_path, 1500, resume=saved, monitor=TrainingMonitor(tmp_path, stats_every=10))
    lines = [json.loads(line) for line in (tmp_path / SUMMARIES).read_text().splitlines()]
    steps = [line["summary"]["step"] for line in lines if "summary" in line]
    assert steps == [520, 780, 1040, 1300, 1500]  # 260, damaged, dropped; the resumed run's own after 600


def test_statistics_once_per_epoch_in_a_loop_without_epochs_is_read_and_holds_few_losses(tmp_path):
    """stats_every=0 reads at each epoch_end; a loop that never calls it is read every 1,000 steps
    instead (and diagnosed in windows of those readings), and never holds more than MAX_PENDING
    losses on their device (it held every step's loss: 38 MB at 50,000 steps)."""
    held = []

    def during(monitor, step, states):
        held.append(len(monitor.losses.pending))

    monitor = run(tmp_path / "a", 4000, stats_every=0, during=during,
                  monitor=TrainingMonitor(tmp_path / "a", stats_every=0, diagnose_every=2))  # fmt: skip
    assert max(held) < MAX_PENDING <= 1000 and held[998] == 997  # (steps 1 and 2 were read)
    assert [s.step for s in monitor.diagnosis.history] == [2000, 4000]
    far = run(tmp_path / "b", 2500, stats_every=100_000, during=during)
    assert max(held) < MAX_PENDING and len(far.losses.end_epoch()) >= 2  # windows closed early

    cadence = TrainingMonitor(tmp_path / "c", stats_every=0).cadence
    assert cadence.stats_due(1000) and not cadence.stats_due(999)
    cadence.logged_epoch = 0  # an epoch ended: statistics at epoch_end alone
    assert not cadence.stats_due(1000)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_healthy_regression_on_batches_of_four_is_not_told_as_diverging(tmp_path, seed):
    """The MSE of 4 samples swings well above the first batch's by chance: the level of the loss over 8 steps or
    more is what rises or not (both seeds were told "the training loss rose ... the learning rate is too high")."""
    torch.manual_seed(seed)
    x = torch.randn(2000, 8)
    y = x @ torch.randn(8, 1) + 0.5 * torch.randn(2000, 1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with TrainingMonitor(tmp_path, stats_every=10).watch(model, opt) as monitor:
        for epoch in range(3):
            for i in range(0, 2000, 4):
                loss = nn.functional.mse_loss(model(x[i : i + 4]), y[i : i + 4])
                opt.zero_grad()
                loss.backward()
                opt.step()
                monitor.step(loss)
            monitor.epoch_end(epoch, {"train/loss": loss.item()})
    assert monitor.findings == []
