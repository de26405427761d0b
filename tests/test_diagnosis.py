"""Each rule against a real training run that goes wrong in that way, and a healthy run that stays clean."""

import json
import math
import textwrap
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from conftest import load_events, readme_python

from gradwatch import Finding, Thresholds, TrainingMonitor, diagnose
from gradwatch.diagnosis import output_bias_skew, record, story
from gradwatch.summary import EpochSummary

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(autouse=True)
def seeded():
    """Models are built before train() seeds: start every test from the same random state, whatever ran before."""
    torch.manual_seed(0)


def make_data(noise=0.0, n=512, features=20, seed=0):
    """A 4-class problem with a linear rule (the same for every seed); `noise` of the labels are replaced at random."""
    rule = torch.randn(features, len(CLASSES), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ rule).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    return x, torch.where(flip, torch.randint(0, len(CLASSES), (n,), generator=g), y)


def mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, len(CLASSES)))


def deep_sigmoid(depth=8):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(20, 20), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(20, len(CLASSES)))


def train(model, log_dir, lr, epochs=6, weight_decay=0.0, noise=0.0, groups=None, batch=32, n=512, nan_at=None,
          momentum=0.9, clip=None, **options):  # fmt: skip
    """An ordinary training loop with the monitor's three calls, validating on clean data of the same rule; returns
    (all findings, urgent ones from step())."""
    torch.manual_seed(0)
    x, y = make_data(noise, n)
    valid_x, valid_y = make_data(0.0, 256, seed=1)
    optimizer = torch.optim.SGD(groups or model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    urgent = []
    with TrainingMonitor(log_dir, **{"stats_every": 4, **options}).watch(model, optimizer) as monitor:
        for epoch in range(epochs):
            for i in range(0, len(x), batch):
                inputs = (
                    x[i : i + batch] if monitor.steps + 1 != nan_at else torch.full_like(x[i : i + batch], math.nan)
                )
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(inputs), y[i : i + batch])
                loss.backward()
                norm = nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
                optimizer.step()
                urgent += monitor.step(loss, grad_norm=norm, max_norm=clip)
            with torch.no_grad():
                train_out, valid_out = model(x), model(valid_x)
            predicted = valid_out.argmax(1)
            recall = [((predicted == c) & (valid_y == c)).sum().item() / (valid_y == c).sum().item() for c in range(4)]
            metrics = {"train/loss": nn.functional.cross_entropy(train_out, y).item()}
            metrics["train/accuracy"] = (train_out.argmax(1) == y).float().mean().item()
            metrics["valid/loss"] = nn.functional.cross_entropy(valid_out, valid_y).item()
            metrics["valid/accuracy"] = (predicted == valid_y).float().mean().item()
            monitor.epoch_end(epoch, metrics, classes=CLASSES, recall=recall)
    return monitor.findings, urgent


def rules(findings):
    return {f.rule for f in findings}


def test_a_healthy_run_has_no_finding(tmp_path):
    findings, urgent = train(mlp(), tmp_path, lr=0.02, weight_decay=5e-4, noise=0.2, epochs=10)
    assert findings == [] and urgent == []
    assert json.loads((tmp_path / "diagnosis.json").read_text())["findings"] == []
    events = load_events(tmp_path)
    assert [e.step for e in events.Images("gradient_flow")] == list(range(1, 11))
    texts = events.Tensors("diagnosis/text_summary")  # one message a step, the same Summary each time
    assert [(t.step, t.tensor_proto.string_val[0]) for t in texts] == [(step, b"No findings.") for step in range(1, 11)]


def test_deep_sigmoid_network_has_vanishing_gradients(tmp_path):
    findings, _ = train(deep_sigmoid(), tmp_path, lr=0.05, epochs=2)
    vanishing = [f for f in findings if f.rule == "vanishing_gradients"]
    assert vanishing and vanishing[0].parameters[0] == "0.weight"
    assert vanishing[0].evidence["ratio_first_to_last"] < Thresholds().vanishing_ratio
    assert "residual" in vanishing[0].suggestion
    assert "not_learning" in rules(findings)  # the early layers hardly move either


def test_learning_rate_far_too_high_explodes(tmp_path):
    findings, _ = train(mlp(), tmp_path, lr=2.0, epochs=6)
    assert {"exploding_gradients", "moving_too_fast"} <= rules(findings)
    exploding = next(f for f in findings if f.rule == "exploding_gradients")
    assert exploding.evidence["factor"] >= Thresholds().exploding_factor


def test_nonfinite_gradients_are_reported_at_once_and_at_the_epoch(tmp_path):
    findings, urgent = train(mlp(), tmp_path, lr=50.0, epochs=2)
    assert urgent and urgent[0].rule == "nonfinite_gradients"
    assert "nonfinite_gradients" in rules(findings)
    nonfinite = next(f for f in findings if f.rule == "nonfinite_gradients")
    assert all(0 < share <= 1 for share in nonfinite.evidence["nonfinite_share"].values())


def test_weights_growing_without_decay_and_not_with_it(tmp_path):
    """A small noisy training set that the model overfits (the validation loss rises): the tutorial's story."""
    overfit = dict(lr=0.1, epochs=12, noise=0.2, n=128, batch=16)
    findings, _ = train(mlp(), tmp_path / "plain", **overfit)
    growing = [f for f in findings if f.rule == "weights_growing"]
    assert growing and growing[0].parameters == ["2.weight"]
    assert growing[0].evidence["max_abs_weight"] > Thresholds().weight_max_abs
    assert "--layer-wd 2.weight=" in growing[0].suggestion

    model = mlp()  # acting on the finding: weight decay for that layer
    groups = [
        {"params": [p for n, p in model.named_parameters() if n != "2.weight"]},
        {"params": [model[2].weight], "weight_decay": 5e-2},
    ]
    findings, _ = train(model, tmp_path / "decayed", groups=groups, **overfit)
    assert not [f for f in findings if f.rule == "weights_growing" and f.parameters == ["2.weight"]]


def test_skewed_output_bias_is_reported_with_the_class_recall(tmp_path):
    model = mlp()
    with torch.no_grad():
        model[2].bias[2] = -8.0  # class 'c' is then almost never predicted
    findings, _ = train(model, tmp_path, lr=0.01, epochs=2)
    skew = [f for f in findings if f.rule == "output_bias_skew"]
    assert skew and skew[0].parameters == ["2.bias[2]"] and skew[0].evidence["class"] == "c"
    assert skew[0].evidence["validation_recall"] < 0.2
    assert "recall" in skew[0].message


def test_a_learning_rate_far_too_small_is_not_learning(tmp_path):
    findings, _ = train(mlp(), tmp_path / "small", lr=1e-6, epochs=2)
    assert rules(findings) == {"not_learning"} and findings[0].parameters == ["0.weight"]

    # so small that float32 cannot hold the steps: the weights do not change at all, which is the cause
    findings, _ = train(mlp(), tmp_path / "lost", lr=1e-9, epochs=2)
    first = first_problem(findings)
    assert first.rule == "updates_rounded_away" and first.step == 1 and first.evidence["dtypes"] == ["float32"]
    assert first.evidence["rounded"]["0.weight"]["unchanged_share"] > 0.99 and len(first.parameters) == 4
    assert "larger learning rate" in first.suggestion
    assert {f.rule for f in findings if f.cause} == {"not_updated", "not_learning"}


def test_steps_rounded_away_in_some_layers_only_point_at_their_gradients(tmp_path):
    """Gradients that vanish before the first layers of a deep sigmoid network round their steps
    away in float32 while the last layers learn: a larger learning rate is not what the facts show."""
    torch.manual_seed(0)
    findings, _ = train(deep_sigmoid(), tmp_path, lr=0.05, epochs=2)
    rounded = next(f for f in findings if f.rule == "updates_rounded_away")
    assert "0.weight" in rounded.parameters and "16.weight" not in rounded.parameters
    assert "larger learning rate" not in rounded.suggestion and "Gradients charts" in rounded.suggestion
    assert "vanishing_gradients" in rules(findings)


def test_findings_go_to_json_text_tab_and_console_once(tmp_path):
    model = deep_sigmoid(depth=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = make_data()
    reported = []
    with TrainingMonitor(tmp_path, stats_every=2).watch(model, optimizer) as monitor:
        for epoch in range(3):
            for i in range(0, 128, 32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
                optimizer.step()
                monitor.step()
            reported.append(monitor.epoch_end(epoch, {}))
    saved = json.loads((tmp_path / "diagnosis.json").read_text())["findings"]
    schema = {"id", "rule", "parameters", "epoch", "last_epoch", "step", "evidence", "message", "suggestion", "cause"}
    assert set(saved[0]) == schema | {"severity", "harmless", "unit", "last_step", "part"}
    assert [Finding.from_json(item) for item in saved] == monitor.findings
    keys = [f.key for epoch_findings in reported for f in epoch_findings]
    assert reported[0] and len(keys) == len(set(keys)) == len(monitor.findings)  # each finding begins once
    vanishing = next(f for f in monitor.findings if f.rule == "vanishing_gradients")
    assert (vanishing.epoch, vanishing.last_epoch) == (0, 2)  # one entry for the three epochs it held
    texts = load_events(tmp_path).Tensors("diagnosis/text_summary")
    assert [t.step for t in texts] == [1, 2, 3] and b"vanishing_gradients" in texts[0].tensor_proto.string_val[0]

    # a resumed monitor keeps what came before the epoch it rewrites
    resumed = TrainingMonitor(tmp_path, purge_epoch=2)
    assert {f.epoch for f in resumed.findings} == {0} and max(f.last_epoch for f in resumed.findings) == 1
    resumed.close()


def test_a_resumed_monitor_diagnoses_as_if_the_run_had_never_stopped(tmp_path):
    """weights_growing compares with the first epoch and three epochs back: a monitor that forgot the epochs
    before a stop would stay silent; with its state_dict saved in the checkpoint it finds what an unbroken run finds."""
    x, y = make_data()

    def run(log_dir, stop_at=None, state=None):
        """Six epochs; with stop_at alone, stop after that step and return the monitor's saved state; with
        state too, replay the training up to that step unwatched and go on with a new monitor given the state."""
        torch.manual_seed(0)
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        monitor = TrainingMonitor(log_dir, stats_every=4).watch(model, optimizer) if state is None else None
        step = 0
        for epoch in range(6):
            for i in range(0, len(x), 32):
                step += 1
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
                optimizer.step()
                if monitor:
                    monitor.step()
                if step == stop_at and state is None:  # the first process: save the state, as a checkpoint does
                    torch.save(monitor.state_dict(), log_dir / "state.pt")
                    monitor.close()
                    return torch.load(log_dir / "state.pt", weights_only=True)
                if step == stop_at:  # the resumed process
                    monitor = TrainingMonitor(
                        log_dir, stats_every=4, purge_epoch=epoch, purge_step=step + 1, start_step=step
                    ).watch(model, optimizer)
                    if state:
                        monitor.load_state_dict(state)
            if monitor:
                monitor.epoch_end(epoch, {})
        monitor.close()
        return monitor.findings

    unbroken = run(tmp_path / "unbroken")
    assert "weights_growing" in rules(unbroken)
    stop_at = 3 * 16 + 6  # epoch 4 (index 3), 6 steps in: between two statistics logs
    state = run(tmp_path / "resumed", stop_at=stop_at)
    assert state["steps"] == stop_at and len(state["history"]) == 3 and len(state["records"]) == 1
    assert run(tmp_path / "resumed", stop_at=stop_at, state=state) == unbroken
    saved = json.loads((tmp_path / "resumed" / "diagnosis.json").read_text())["findings"]
    assert [Finding.from_json(item) for item in saved] == unbroken
    forgetful = run(tmp_path / "forgetful", stop_at=stop_at, state={})  # resumed without the state
    assert "weights_growing" not in rules(forgetful)
    with pytest.raises(ValueError, match="lacks 'findings', 'history'"):
        TrainingMonitor(tmp_path / "bad").load_state_dict({"steps": 1, "skipped_steps": 0, "records": []})


def test_statistics_are_logged_per_step(tmp_path):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    x, y = make_data()
    losses, hidden = [], {}
    model[1].register_forward_hook(lambda module, inputs, output: hidden.update(output=output.detach()))
    with TrainingMonitor(tmp_path, stats_every=3).watch(model, optimizer) as monitor:
        for i in range(0, 320, 32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            loss.backward()
            before = model[0].weight.detach().clone()
            optimizer.step()
            if monitor.steps + 1 == 9:
                expected_ratio = ((model[0].weight - before).norm() / model[0].weight.norm()).item()
                expected_norm = model[0].weight.grad.norm().item()
                expected_zero_share = (model[0].weight.grad == 0).float().mean().item()
                expected_dead = 1 - (hidden["output"] > 0).any(0).float().mean().item()
            losses.append(loss.item())
            monitor.step(loss)
            # kept on the device until a statistics log (steps 1 and 2, the first after watch(), and every 3)
            assert len(monitor.losses.pending) == (monitor.steps % 3 if monitor.steps > 2 else 0)
        monitor.state_dict()  # a checkpoint mid-window logs the window so far (step 10)
    events = load_events(tmp_path / "steps")
    assert [e.step for e in events.Scalars("update_ratio/0.weight")] == [1, 2, 3, 6, 9]
    assert events.Scalars("update_ratio/0.weight")[-1].value == pytest.approx(expected_ratio, rel=1e-4)
    assert events.Scalars("grad_norm/0.weight")[-1].value == pytest.approx(expected_norm, rel=1e-4)
    assert events.Scalars("grad_zero_share/0.weight")[-1].value == pytest.approx(expected_zero_share)
    assert events.Scalars("dead_share/1")[-1].value == pytest.approx(expected_dead)  # the ReLU after layer 0
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (step, pytest.approx(sum(losses[since:step]) / (step - since)))
        for since, step in ((0, 1), (1, 2), (2, 3), (3, 6), (6, 9))
    ] + [(10, pytest.approx(losses[9]))]
    tags = set(events.Tags()["scalars"])
    assert {"weight_norm/0.weight", "max_abs_weight/2.bias", "grad_norm/total", "update_ratio/max"} <= tags
    assert not any(tag.startswith("nonfinite_share/") for tag in tags)  # all finite: not charted
    assert not any(tag.startswith("unchanged_share/") for tag in tags)  # every value moved: not charted


def test_watch_validates_and_unwatch_removes_its_hook(tmp_path):
    model, optimizer = mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1)
    with TrainingMonitor(tmp_path) as monitor:
        with pytest.raises(TypeError, match="torch.nn.Module"):
            monitor.watch("model")
        with pytest.raises(RuntimeError, match="watch"):
            monitor.step()
        monitor.watch(model, optimizer)
        assert len(optimizer._optimizer_step_pre_hooks) == 1
        monitor.unwatch()
        monitor.unwatch()
        assert len(optimizer._optimizer_step_pre_hooks) == 0
    with pytest.raises(ValueError, match="stats_every"):
        TrainingMonitor(tmp_path, stats_every=-1)
    with pytest.raises(TypeError, match="Thresholds"):
        TrainingMonitor(tmp_path, thresholds={"bias_z": 3})


def test_thresholds_are_configurable_by_name():
    assert Thresholds().replace({"bias_z": "2.5"}).bias_z == 2.5
    with pytest.raises(ValueError, match="unknown threshold 'bias'; known: vanishing_ratio"):
        Thresholds().replace({"bias": 1})


def test_bias_rule_with_identical_biases_but_one():
    bias = {"name": "fc.bias", "values": [0.0, 0.0, 0.0, 3.0], "classes": CLASSES, "recall": [1.0, 1.0, 1.0, 0.2]}
    findings = output_bias_skew([EpochSummary(0, 10, output_bias=bias)], Thresholds())
    assert len(findings) == 1 and findings[0].evidence["class"] == "d" and math.isinf(findings[0].evidence["robust_z"])
    bias["recall"] = [1.0, 1.0, 1.0, 0.9]  # the skew costs that class nothing: no finding
    assert output_bias_skew([EpochSummary(0, 10, output_bias=bias)], Thresholds()) == []
    bias["recall"] = [1.0, 1.0, 1.0, 0.2]
    even = {**bias, "values": [0.0, 0.0, 0.0, 0.0]}
    history = [EpochSummary(0, 10, output_bias=even), EpochSummary(1, 20, output_bias=bias)]
    assert output_bias_skew(history, Thresholds()) == []  # one epoch of skew: the noise of training
    history.append(EpochSummary(2, 30, output_bias=bias))
    assert [f.evidence["class"] for f in output_bias_skew(history, Thresholds())] == ["d"]  # two: a finding


def grad_norm_logged(log_dir, name="grad_norm/0.weight"):
    return [e.value for e in load_events(log_dir / "steps").Scalars(name)]


def amp_run(log_dir, scale, clip=None, steps=3):
    """`steps` steps of the small MLP under a CPU GradScaler of initial scale `scale` (None: none), clipping at
    `clip` after unscale_ as README's snippet does; returns the closed monitor."""
    x, y = make_data()
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    with TrainingMonitor(log_dir, stats_every=1).watch(model, optimizer) as monitor:
        for i in range(0, 32 * steps, 32):
            optimizer.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])).backward()
            norm = None
            if clip:
                scaler.unscale_(optimizer)
                norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)  # unscale_ (unless done), then step
            scaler.update()
            assert monitor.step(grad_norm=norm, max_norm=clip) == []
        monitor.epoch_end(0, {})
    return monitor


def test_under_amp_the_monitor_sees_unscaled_gradients_and_skips_overflowed_steps(tmp_path):
    norms = {}
    for scale in (None, 2.0**16):
        amp_run(tmp_path / str(scale), scale)
        norms[scale] = grad_norm_logged(tmp_path / str(scale))
    assert norms[2.0**16] == pytest.approx(norms[None], rel=1e-5)

    monitor = amp_run(tmp_path / "overflow", math.inf, steps=1)  # the gradients overflow: GradScaler skips the step
    assert monitor.skipped_steps == 1
    assert [e.value for e in load_events(tmp_path / "overflow" / "steps").Scalars("amp/skipped_steps")] == [1.0]


def test_under_gradient_accumulation_the_accumulated_gradient_is_logged_once_per_step(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    x, y = make_data()
    expected = []
    with TrainingMonitor(tmp_path, stats_every=1).watch(model, optimizer) as monitor:
        for i in range(0, 128, 64):
            optimizer.zero_grad()
            for j in (i, i + 32):  # two micro-batches per optimizer step
                (nn.functional.cross_entropy(model(x[j : j + 32]), y[j : j + 32]) / 2).backward()
            expected.append(model[0].weight.grad.norm().item())
            optimizer.step()
            monitor.step()
    assert grad_norm_logged(tmp_path) == pytest.approx(expected, rel=1e-5)


def _ddp_worker(rank, world_size, log_dir, port):
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        model = nn.parallel.DistributedDataParallel(mlp())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        x, y = make_data(seed=rank)  # each rank its own shard; DDP averages the gradients
        with TrainingMonitor(log_dir, stats_every=1).watch(model, optimizer) as monitor:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            optimizer.step()
            monitor.step()
            monitor.epoch_end(0, {"rank": float(rank)})
            assert monitor.is_writer == (rank == 0)
    finally:
        torch.distributed.destroy_process_group()


def test_only_rank_0_writes_under_torch_distributed(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path), port), nprocs=2)
    events = load_events(tmp_path)
    assert [e.value for e in events.Scalars("rank")] == [0.0]  # rank 1 wrote nothing
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert (tmp_path / "diagnosis.json").is_file()
    assert len(load_events(tmp_path / "steps").Scalars("grad_norm/0.weight")) == 1  # DDP unwrapped


def test_the_readme_example_runs(tmp_path, monkeypatch):
    first = readme_python("## Three ways to use it")
    second = readme_python("## The API")  # in docs/library.md: saved, then resumed
    loop = first[first.index("        for inputs, labels in data:") : first.index("\nprint(")]  # the elided loop
    second = second.replace("        ...", textwrap.indent(textwrap.dedent(loop), "        "))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(first, "README.md", "exec"), namespace)
    assert isinstance(json.loads((tmp_path / "Result" / "my-loop" / "diagnosis.json").read_text())["findings"], list)
    assert len(load_events(tmp_path / "Result" / "my-loop").Histograms("0.weight_grad")) == 5
    exec(compile(second, "README.md", "exec"), namespace)  # saved, then resumed for two more epochs
    steps = [e.step for e in load_events(tmp_path / "Result" / "my-loop").Histograms("0.weight_grad")]
    assert steps == list(range(1, 8))  # epochs 1 to 7
    assert namespace["monitor"].steps == 7 * 50


def test_rules_read_zero_and_missing_statistics_without_raising():
    """Every number a rule reads can be zero, NaN or missing: a first layer with exactly zero gradients is
    reported as vanishing, never divided by."""
    layers = {
        "0.weight": {"grad_rms": 0.0, "weight_norm": 0.0, "max_abs_weight": 0.0, "update_ratio": math.nan},
        "1.weight": {"grad_rms": 1e-3, "weight_norm": 1.0, "max_abs_weight": 0.5, "update_ratio": 1e-3},
        "1.bias": {},
    }
    summary = {"epoch": 0, "step": 10, "layers": layers, "total_grad_norm_max": 0.0, "total_grad_norm_median": 0.0}
    findings = diagnose([summary, {**summary, "epoch": 1}, {"epoch": 2, "step": 30}])
    assert findings == []  # the last summary has no layers: nothing to see
    findings = diagnose([summary, {**summary, "epoch": 1}])
    vanishing = [f for f in findings if f.rule == "vanishing_gradients"]
    assert vanishing and "are zero, against those of the last layer 1.weight" in vanishing[0].message


def first_problem(findings):
    return next(f for f in findings if f.cause is None and f.severity == "warning")


def test_initial_weights_far_too_large_give_a_high_first_loss(tmp_path):
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50)
    findings, _ = train(model, tmp_path, lr=0.01, epochs=2)
    first = first_problem(findings)
    assert first.rule == "high_initial_loss" and first.step == 1
    assert first.evidence["first_loss"] > Thresholds().initial_loss_factor * math.log(4)
    assert first.evidence["cause"] == "initialisation"  # the loss's graph read the weights' gain at the first step
    assert first.suggestion.startswith("initialise the weights as torch.nn does")


def test_a_diverging_run_tells_one_story_that_lowers_the_learning_rate(tmp_path):
    """The loss jumps in the first steps; what follows is told as its consequence, and nothing suggests a larger
    learning rate."""
    findings, _ = train(mlp(), tmp_path, lr=5.0, epochs=4)
    first = first_problem(findings)
    assert first.rule == "diverging" and first.epoch == 0 and first.step < 16
    assert first.evidence["peak"] > Thresholds().diverging_factor * first.evidence["first_loss"]
    assert "lower the learning rate at least ten times (to 0.5 or less, a tenth of the 5 set)" in first.suggestion
    consequences = [f for f in findings if f.cause]
    assert consequences and all(f.suggestion is None for f in consequences)
    assert {"exploding_gradients", "moving_too_fast"} <= rules(consequences)
    assert not any("larger learning rate" in (f.suggestion or "") for f in findings)
    story = (tmp_path / "diagnosis.json").read_text()
    assert json.loads(story)["findings"][0]["rule"] == "diverging"


def test_a_nan_batch_is_a_non_finite_loss_that_did_not_rise_first(tmp_path):
    findings, urgent = train(mlp(), tmp_path, lr=0.05, epochs=3, nan_at=20)
    first = first_problem(findings)
    assert (first.rule, first.step) == ("diverging", 20) and "without rising first" in first.message
    assert "check the data" in first.suggestion
    assert urgent and urgent[0].rule == "nonfinite_gradients"
    assert next(f for f in findings if f.rule == "nonfinite_gradients").cause == "diverging"


def vae_findings(log_dir, std=None, scale=1.0, lr=1e-3):
    """A variational autoencoder's loop (MSE and a KL term with exp(log_var), Adam at `lr`) for one epoch of 8
    steps: its weights drawn at `std` where given, its log_var scaled by `scale`; the monitor's findings."""
    torch.manual_seed(0)
    encoder, decoder = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 8)), nn.Linear(4, 20)
    model = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    for weight in (p for p in model.parameters() if std and p.dim() > 1):
        nn.init.normal_(weight, 0.0, std)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, _ = make_data(0.0, 256)
    with TrainingMonitor(log_dir, stats_every=4).watch(model, optimizer) as monitor:
        for i in range(0, len(x), 32):
            mu, log_var = encoder(x[i : i + 32]).chunk(2, dim=1)
            log_var = scale * log_var
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
            kl = -0.5 * (1 + log_var - mu**2 - log_var.exp()).sum(1).mean()
            loss = nn.functional.mse_loss(decoder(z), x[i : i + 32]) + 1e-3 * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        monitor.epoch_end(0, {})
    return monitor.findings


@pytest.mark.parametrize("std, scale, cause", [(10.0, 1.0, "initialisation"), (None, 1e3, None)])
def test_a_loss_nan_at_its_first_batch_on_finite_data_is_an_overflow(tmp_path, std, scale, cause):
    """A variational autoencoder's loss is NaN at its first batch, before any update, on a batch of finite values.
    With weights drawn at std 10, the loss's graph read their gain: the initialisation is named. At torch.nn's
    scale, with the KL term overflowing on its own (log_var's scale far too large), no cause is named, and the
    forward pass and the loss are what to check: neither the data nor the learning rate."""
    first = first_problem(vae_findings(tmp_path, std, scale))
    assert (first.rule, first.step, first.evidence["cause"]) == ("diverging", 1, cause)
    assert "before any update, on a first batch of finite values" in first.message
    if cause:
        assert "far too large" in first.message and first.suggestion.startswith("initialise the weights as")
    else:
        assert "far too large" not in first.message and "check the forward pass and the loss" in first.suggestion


def test_a_loss_nan_right_after_steps_that_blew_the_weights_up_names_the_rate(tmp_path):
    """Adam at 100: the first step moves every weight by 100, the KL term overflows by step 3, with no level that
    rose before it. The first steps' update ratios, not a bad batch, say why: the learning rate is named."""
    first = first_problem(vae_findings(tmp_path, lr=100.0))
    assert first.rule == "diverging" and first.step <= 3 and "without rising first" in first.message
    assert first.evidence["first_pace"] > Thresholds().update_fast and "cause" not in first.evidence
    assert "the learning rate is too high" in first.message and "lower the learning rate" in first.suggestion


def test_a_large_negative_bias_kills_the_relus(tmp_path):
    model = mlp()
    nn.init.constant_(model[0].bias, -10.0)
    findings, _ = train(model, tmp_path, lr=0.05, epochs=2)
    first = first_problem(findings)
    assert first.rule == "dead_units" and first.parameters == ["0"] and first.evidence["dead_share"]["0"] == 1.0
    assert {f.rule for f in findings if f.cause == "dead_units"} >= {"vanishing_gradients", "not_learning"}


def test_large_weights_saturate_tanh_layers(tmp_path):
    layers = []
    for _ in range(4):
        layers += [nn.Linear(20, 20), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(20, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    findings, _ = train(model, tmp_path, lr=0.01, epochs=2)
    saturated = next(f for f in findings if f.rule == "saturated")
    assert set(saturated.parameters) == {"0", "2", "4", "6"}
    assert all(share >= Thresholds().saturated_share for share in saturated.evidence["saturated_share"].values())


def test_a_learning_rate_far_too_small_is_stuck_and_the_story_raises_it(tmp_path):
    findings, _ = train(mlp(), tmp_path, lr=1e-9, epochs=6, thresholds=Thresholds(stuck_epochs=3))
    assert first_problem(findings).rule == "updates_rounded_away"  # float32 loses steps of 1e-9
    stuck = next(f for f in findings if f.rule == "stuck")
    assert stuck.cause.startswith("updates_rounded_away") and stuck.evidence["since_epoch"] == 0
    assert stuck.last_epoch == 5
    assert not any("lower" in (f.suggestion or "") for f in findings)


def test_labels_that_do_not_match_the_inputs_do_not_generalise(tmp_path):
    """Random training labels, a network large enough to memorise them, validation on the true labels."""
    model = nn.Sequential(nn.Linear(20, 512), nn.ReLU(), nn.Linear(512, 4))
    findings, _ = train(model, tmp_path, lr=0.05, epochs=8, noise=1.0)
    first = first_problem(findings)
    assert first.rule == "no_generalisation"
    assert first.evidence["train_accuracy"] >= 0.25 + Thresholds().generalisation_gap
    assert first.evidence["valid_accuracy"] <= 0.25 + Thresholds().chance_margin
    assert next(f for f in findings if f.rule == "overfitting").cause == "no_generalisation"


def test_a_small_noisy_training_set_overfits(tmp_path):
    model = nn.Sequential(nn.Linear(20, 512), nn.ReLU(), nn.Linear(512, 4))
    findings, _ = train(model, tmp_path, lr=0.05, epochs=20, noise=0.2, n=128, batch=16)
    overfitting = next(f for f in findings if f.rule == "overfitting")
    assert overfitting.cause is None and "best.pt" in overfitting.suggestion
    assert overfitting.evidence["gap"] >= Thresholds().overfit_gap


def test_a_loss_that_bounces_without_falling_oscillates(tmp_path):
    findings, _ = train(mlp(), tmp_path, lr=0.5, epochs=10)
    oscillating = next(f for f in findings if f.rule == "oscillating")
    losses = oscillating.evidence["train_losses"]
    assert len(losses) == Thresholds().oscillation_epochs and oscillating.evidence["swing"] > 0.2 * min(losses)
    # the loss fell in epoch 1 (so the large steps of then were learning), then rose above where it was: the
    # learning rate is named first, and what follows (the steps, the bouncing) is told as its consequence
    assert first_problem(findings).rule == "diverging" and oscillating.cause is not None
    assert "lower the learning rate" in first_problem(findings).suggestion


def test_a_run_stuck_while_its_weights_move_points_at_the_labels(tmp_path):
    """Random labels and a network too small to memorise them: the loss stays at ln C although the weights move, so
    the learning rate is not the suspect."""
    model = nn.Sequential(nn.Linear(20, 4), nn.ReLU(), nn.Linear(4, 4))
    thresholds = Thresholds(stuck_epochs=3, chance_margin=0.2)  # its validation classes are not balanced
    findings, _ = train(model, tmp_path, lr=0.05, epochs=6, noise=1.0, thresholds=thresholds)
    stuck = first_problem(findings)
    assert stuck.rule == "stuck" and stuck.evidence["weights_move"]
    assert stuck.evidence["update_ratio"] >= Thresholds().stuck_moving_ratio
    assert "labels match the images" in stuck.suggestion and "will not help" in stuck.suggestion


def clipped_epochs(losses, share=1.0, lr=2.0):
    """Epoch summaries of a run clipped at 0.1 on `share` of its steps, with these training losses."""
    clipping = dict(max_norm=0.1, steps=16, clipped_share=share, grad_norm_median=2.0, grad_norm_p90=3.0)
    return [
        EpochSummary(epoch, 16 * (epoch + 1), first_loss=1.4, lr=lr, clipping=clipping, metrics={"train_loss": loss})
        for epoch, loss in enumerate(losses)
    ]


def test_clipping_most_steps_is_a_learning_rate_too_high_in_disguise_when_the_loss_stops_falling(tmp_path):
    history = clipped_epochs([1.0, 0.9, 0.95])  # no new low in the last epoch
    [finding] = diagnose(history)
    assert finding.rule == "mostly_clipped" and finding.evidence["clipped_share"] == 1.0
    in_effect = 2.0 * 0.1 / 2.0  # each step scaled by max_norm / its norm
    assert f"makes the learning rate of 2 about {in_effect:.2g} in effect" in finding.message
    assert finding.suggestion.startswith(f"lower the learning rate to about {in_effect:.2g}")
    assert "threshold to about 3" in finding.suggestion
    assert diagnose(clipped_epochs([1.0, 0.9, 0.95], share=0.5)) == []  # clipping half the steps is fine
    assert diagnose(clipped_epochs([1.0, 0.9, 0.8])) == []  # the loss still falls: clipping does its job

    # a real run clipped on every step whose loss falls all along: no finding about the clipping
    findings, _ = train(mlp(), tmp_path / "tight", lr=2.0, clip=0.1, epochs=2)
    assert "mostly_clipped" not in {f.rule for f in findings}
    share = [e.value for e in load_events(tmp_path / "tight").Scalars("clip/clipped_share")]
    assert len(share) == 2 and min(share) > 0.5

    findings, _ = train(mlp(), tmp_path / "loose", lr=0.02, clip=0.7, weight_decay=5e-4, noise=0.2, epochs=10)
    assert findings == []  # the healthy run, clipped at its larger norms only
    share = [e.value for e in load_events(tmp_path / "loose").Scalars("clip/clipped_share")]
    assert len(share) == 10 and 0 < max(share) <= Thresholds().clipped_share


def test_clipping_under_amp_logs_the_unscaled_norm_and_leaves_skipped_steps_out(tmp_path):
    """The loop of README's clipping snippet: unscale_, clip, step; a step GradScaler skips is not counted."""
    logged = {}
    for scale in (None, 2.0**16, math.inf):
        monitor = amp_run(tmp_path / str(scale), scale, clip=0.5, steps=1 if scale == math.inf else 3)
        logged[scale] = load_events(tmp_path / str(scale) / "steps").Tags()["scalars"], monitor.diagnosis.history[0]
    steps = {scale: load_events(tmp_path / str(scale) / "steps") for scale in (None, 2.0**16)}
    norms = {scale: [e.value for e in events.Scalars("clip/grad_norm")] for scale, events in steps.items()}
    assert len(norms[None]) == 3 and norms[2.0**16] == pytest.approx(norms[None], rel=1e-5)
    assert logged[2.0**16][1].clipping["clipped_share"] == logged[None][1].clipping["clipped_share"]
    tags, summary = logged[math.inf]  # overflowed: skipped, and its infinite norm is not a clipped step
    assert "amp/skipped_steps" in tags and "clip/grad_norm" not in tags and summary.clipping == {}


def test_the_clipping_share_survives_a_resume_within_the_epoch(tmp_path):
    model = nn.Linear(4, 2)
    with TrainingMonitor(tmp_path / "a", stats_every=100).watch(model) as monitor:
        for norm in (2.0, 2.0, 0.1, 0.1):
            monitor.step(grad_norm=norm, max_norm=1.0)
        state = monitor.state_dict()
        with pytest.raises(ValueError, match="pass grad_norm and max_norm together"):
            monitor.step(grad_norm=1.0)
    with TrainingMonitor(tmp_path / "b", stats_every=100, start_step=4).watch(model) as monitor:
        monitor.load_state_dict(state)
        for norm in (0.1, 0.1):
            monitor.step(grad_norm=torch.tensor(norm), max_norm=1.0)
        monitor.epoch_end(0, {})
    assert [e.value for e in load_events(tmp_path / "b").Scalars("clip/clipped_share")] == [pytest.approx(2 / 6)]


def test_the_readme_clipping_example_runs_and_names_the_learning_rate_in_effect(tmp_path, monkeypatch, capsys):

    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python("### Gradient clipping"), "README.md", "exec"), {})
    story = capsys.readouterr().out
    assert "[mostly_clipped]" not in story and "gradient clipping at 0.1 scaled down 100%" in story
    assert "makes the learning rate of 0.5 about 0.0" in story  # 0.5 x 0.1 / a median norm near 1
    steps = load_events(tmp_path / "Result" / "clipped" / "steps")
    assert [e.value for e in steps.Scalars("clip/clipped")] == [1.0] * 5  # steps 1, 2, 50, 100, 150


def test_recipes_that_look_like_faults_stay_clean():
    """An annealed schedule's last epochs move the weights little; weights that grow while the validation loss is
    at its best are learning: neither is a finding. The same statistics at a full learning rate, or with the
    validation loss well above its best, are."""
    layers = {"fc.weight": {"update_ratio": 1e-8, "weight_norm": 1.0}}
    annealed = [
        EpochSummary(e, 10 * (e + 1), layers=layers, lr=lr, loop={"lr_first": 0.1}) for e, lr in enumerate([0.1, 1e-4])
    ]
    assert "not_learning" not in {f.rule for f in diagnose(annealed)}
    annealed[-1].lr = 0.1
    assert "not_learning" in {f.rule for f in diagnose(annealed)}

    def growing(valid_losses):
        return [
            EpochSummary(
                e, 10 * (e + 1), layers={"fc.weight": {"max_abs_weight": 0.5 * (e + 1)}}, metrics={"valid_loss": v}
            )  # fmt: skip
            for e, v in enumerate(valid_losses)
        ]

    assert diagnose(growing([1.0, 0.9, 0.8, 0.7, 0.6])) == []  # still improving on new data
    [finding] = diagnose(growing([1.0, 0.9, 0.8, 0.9, 1.0]))
    assert finding.rule == "weights_growing" and finding.parameters == ["fc.weight"]


def test_strong_weight_decay_speaks_without_a_first_loss():
    """A loop that gives step() no loss, only the epoch's metrics: the rule compares with ln C and says so."""
    loop = {"weight_decay": 0.5, "weight_norm_first": 2.0}
    history = [
        EpochSummary(
            e,
            10 * (e + 1),
            num_classes=4,
            metrics={"train_loss": 1.39, "train_accuracy": 0.25},
            loop={**loop, "weight_norm": 2.0 / 10 ** (e + 1)},
        )  # fmt: skip
        for e in range(3)
    ]
    findings = [f for f in diagnose(history) if f.rule == "strong_weight_decay"]
    assert len(findings) == 1 and "near 1.39 (ln 4, an untrained model's; 1.39 now)" in findings[0].message


def told(history):
    """The findings of `history` as the live monitor records them, epoch after epoch."""
    findings = []
    for epoch in range(len(history)):
        findings, _ = record(findings, diagnose(history[: epoch + 1]), epoch)
    return findings


def test_dead_units_the_model_learns_without_are_a_note_until_it_stops_learning():
    """Most of a layer silent while the loss falls and the accuracy rises: capacity lost, a note. Once the model
    is back near its untrained loss, the same units are a warning."""
    relu = {"1": {"layer": "0", "kind": "relu", "share": 0.8, "never_fired": 0.8}}

    def epochs(*losses_and_accuracies):
        return [
            EpochSummary(e, 10 * (e + 1), num_classes=4, activations=relu,
                         metrics={"train_loss": loss, "valid_accuracy": accuracy})
            for e, (loss, accuracy) in enumerate(losses_and_accuracies)
        ]  # fmt: skip

    [finding] = told(epochs((0.6, 0.8), (0.5, 0.85)))
    assert finding.rule == "dead_units" and finding.harmless and finding.severity == "note"
    assert "learns on the units left" in finding.message
    assert story([finding]).startswith(
        "Note, epoch 1-2"
    ) and "If that matters: check, in this order: the learning" in story([finding])
    [finding] = told(epochs((0.6, 0.8), (1.38, 0.25)))  # it stopped learning
    assert finding.severity == "warning" and not finding.harmless
    [finding] = told(epochs((1.38, 0.25), (0.5, 0.85)))  # dead before it learnt anything: a warning
    assert finding.severity == "warning"


def test_units_silent_in_a_slow_start_that_fire_again_were_not_dead():
    """Most of a layer silent in the first epoch, while the loss is still at ln 4 (a slow start): a warning while
    it lasts, a note once the units fire again, however the loss does then."""
    silent = {"1": {"layer": "0", "kind": "relu", "share": 0.8, "never_fired": 0.8}}
    firing = {"1": {"layer": "0", "kind": "relu", "share": 0.1, "never_fired": 0.0}}
    runs = [
        EpochSummary(e, 10 * (e + 1), num_classes=4, activations=units,
                     metrics={"train_loss": loss, "valid_accuracy": accuracy})
        for e, (units, loss, accuracy) in enumerate([(silent, 1.38, 0.25), (silent, 1.37, 0.26), (firing, 0.5, 0.85)])
    ]  # fmt: skip
    [finding] = told(runs[:2])
    assert finding.rule == "dead_units" and finding.severity == "warning"
    [finding] = told(runs)
    assert finding.severity == "note" and finding.last_epoch == 1
    assert "It ended after epoch 2: its units fired again: silent for a while, not dead." in story([finding])


def test_a_validation_loss_that_comes_back_to_a_new_best_was_noise_not_overfitting():
    """Weights growing while the validation loss rose: a warning while it stays above its best (also when one
    epoch comes back near it), a note once the validation loss makes a new best."""

    def growing(valid_losses):
        return [
            EpochSummary(e, 10 * (e + 1), layers={"fc.weight": {"max_abs_weight": 0.5 * (e + 1)}},
                         metrics={"valid_loss": v})
            for e, v in enumerate(valid_losses)
        ]  # fmt: skip

    [finding] = told(growing([1.0, 0.9, 0.8, 1.0, 0.85]))  # came back near the best, not below it
    assert finding.rule == "weights_growing" and finding.severity == "warning" and finding.last_epoch == 4
    [finding] = told(growing([1.0, 0.9, 0.8, 1.0, 0.85, 0.5]))
    assert finding.severity == "note" and finding.last_epoch == 4
    assert "It ended after epoch 5: the validation loss made a new best" in story([finding])


def test_a_note_explains_no_later_problem():
    """Overfitting after weights that grew, then stopped being a problem, is a problem of its own."""
    grew = Finding("weights_growing", ["fc.weight"], 3, 40, {}, "grew", None, last_epoch=4)
    overfit = Finding("overfitting", [], 6, 70, {}, "overfits", None)
    findings, _ = record([grew], [overfit], 6)
    assert [f.severity for f in findings] == ["note", "warning"]
    assert findings[1].cause is None
    findings, _ = record([replace(grew, last_epoch=6)], [overfit], 6)  # both hold: one story
    assert findings[1].cause == "weights_growing:fc.weight"
