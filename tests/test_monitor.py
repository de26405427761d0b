"""TrainingMonitor's events read back with TensorBoard's reader, and its statistics against plain torch."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import load_events

from gradwatch import TrainingMonitor, gradient_flow, parameter_statistics
from gradwatch.sink import EventSink


def test_log_parameters_writes_both_tags_and_skips_missing_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)  # frozen: no gradient
    model(torch.randn(16, 8)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    with TrainingMonitor(tmp_path) as monitor:
        monitor.log_parameters(model, 0)
    events = load_events(tmp_path)
    tags = set(events.Tags()["histograms"])
    assert tags == {
        "0.weight_data",
        "0.bias_data",
        "2.weight_data",
        "2.bias_data",
        "0.weight_grad",
        "0.bias_grad",
        "2.weight_grad",
    }
    stored = events.Histograms("2.weight_data")[0].histogram_value
    counts, _ = np.histogram(model[2].weight.detach().numpy(), bins=np.concatenate([[stored.min], stored.bucket_limit]))
    assert list(stored.bucket) == counts.tolist() and stored.num == 8
    assert [e.value for e in events.Scalars("nonfinite/0.weight_grad")] == [1.0]


def test_monitor_rejects_bad_bins(tmp_path):
    with pytest.raises(ValueError, match="bins"):
        TrainingMonitor(tmp_path, bins=0)


def test_a_writer_reopened_within_the_same_second_keeps_earlier_events(tmp_path):
    model = nn.Linear(2, 2)
    for epoch in range(3):  # three monitors, as a run stopped and resumed twice in quick succession
        with TrainingMonitor(tmp_path, purge_epoch=epoch or None) as monitor:
            monitor.watch(model).epoch_end(epoch, {"loss": float(epoch)})
    events = load_events(tmp_path)
    assert [e.step for e in events.Histograms("weight_data")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == [0.0, 1.0, 2.0]


def test_parameter_statistics_and_gradient_flow_match_plain_torch():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 5))
    model(torch.randn(16, 300, generator=g)).square().mean().backward()
    stats = parameter_statistics(model)
    names, means, maxes = gradient_flow(model)
    assert names == ["0.weight", "2.weight"]
    for name, p in model.named_parameters():
        assert stats[name]["max_abs_weight"] == pytest.approx(p.detach().abs().max().item(), rel=1e-6)
        assert stats[name]["weight_norm"] == pytest.approx(p.detach().norm().item(), rel=1e-5)
        assert stats[name]["grad_norm"] == pytest.approx(p.grad.norm().item(), rel=1e-5)
    for name, mean, peak in zip(names, means, maxes):
        grad = dict(model.named_parameters())[name].grad
        assert mean == pytest.approx(grad.abs().mean().item(), rel=1e-5)
        assert peak == pytest.approx(grad.abs().max().item(), rel=1e-6)
    named = list(model.named_parameters())  # what the monitor keeps from watch(): the same figures
    assert parameter_statistics(named) == stats and gradient_flow(named) == (names, means, maxes)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    assert math.isnan(parameter_statistics(model)["0.weight"]["max_abs_weight"])


def test_epoch_end_before_watch_says_what_to_do(tmp_path):
    with TrainingMonitor(tmp_path) as unwatched, pytest.raises(RuntimeError, match=r"watch\(model\)"):
        unwatched.epoch_end(0, {"loss": 1.0})


def test_update_ratio_is_the_steps_change_over_the_weight(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrainingMonitor(tmp_path, stats_every=2).watch(model, optimizer) as monitor:
        for step in range(6):  # the snapshot buffers are reused from one statistics step to the next
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            optimizer.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            optimizer.step()
            monitor.step()
            if step % 2 == 1:
                for name, p in model.named_parameters():
                    expected = (p.detach() - before[name]).norm() / p.detach().norm()
                    logged = monitor.diagnosis.records[-1][name]["update_ratio"]
                    assert logged == pytest.approx(expected.item(), rel=1e-5)
        assert len(monitor.diagnosis.records) == 4  # steps 1 and 2 (the first after watch()), 4 and 6


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_statistics_and_histograms_of_other_precisions(dtype, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    model(torch.randn(4, 6, dtype=dtype)).square().mean().backward()
    stats = parameter_statistics(model)
    for name, p in model.named_parameters():
        assert stats[name]["weight_norm"] == pytest.approx(p.detach().double().norm().item(), rel=1e-6)
        assert stats[name]["grad_norm"] == pytest.approx(p.grad.double().norm().item(), rel=1e-6)
    with TrainingMonitor(tmp_path).watch(model) as monitor:
        monitor.epoch_end(0, {})
    assert len(load_events(tmp_path).Histograms("2.weight_grad")) == 1


def test_frozen_sparse_and_empty_parameters(tmp_path):
    torch.manual_seed(0)
    embedding, linear = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)
    model = nn.ModuleDict({"embedding": embedding, "linear": linear})
    model.register_parameter("empty", nn.Parameter(torch.empty(0)))
    linear.bias.requires_grad_(False)
    linear(embedding(torch.tensor([1, 3]))).sum().backward()
    optimizer = torch.optim.SGD(embedding.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path, stats_every=1).watch(model, optimizer) as monitor:
        optimizer.step()
        assert monitor.step() == []
        monitor.epoch_end(0, {})
    stats = monitor.diagnosis.records[-1] if monitor.diagnosis.records else parameter_statistics(model)
    assert stats["embedding.weight"]["grad_norm"] == pytest.approx(embedding.weight.grad.to_dense().norm().item())
    assert "grad_norm" not in stats["linear.bias"] and stats["empty"]["weight_norm"] == 0.0
    tags = set(load_events(tmp_path).Tags()["histograms"])
    assert {"embedding.weight_grad", "linear.weight_grad", "linear.bias_data"} <= tags
    assert "linear.bias_grad" not in tags and "empty_data" not in tags


def test_include_and_exclude_choose_the_histograms_but_the_statistics_cover_every_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path, stats_every=1, include=["2.*"], exclude=["*.bias"]).watch(model, optimizer) as m:
        model(torch.randn(16, 8)).sum().backward()
        optimizer.step()
        m.step()
        m.epoch_end(0, {})
    histograms = set(load_events(tmp_path).Tags()["histograms"])
    assert histograms == {"2.0.weight_data", "2.0.weight_grad", "2.1.weight_data", "2.1.weight_grad"}
    statistics = {tag for tag in load_events(tmp_path / "steps").Tags()["scalars"] if tag.startswith("grad_norm/")}
    assert statistics == {f"grad_norm/{name}" for name, _ in model.named_parameters()} | {"grad_norm/total"}
    with pytest.raises(TypeError, match="glob patterns"):
        TrainingMonitor(tmp_path, include="2.*")  # a string, not a list of patterns


def test_a_wrapped_model_is_watched_under_its_own_names(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with TrainingMonitor(tmp_path).watch(nn.DataParallel(torch.compile(model, backend="eager"))) as monitor:
        assert monitor.model is model  # so the tags are "0.weight_data", not "module._orig_mod.0.weight_data"


def test_group_depth_puts_each_modules_histograms_in_a_section_that_diagnose_still_reads(tmp_path):
    from gradwatch.cli import classify

    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    model(torch.randn(16, 8)).sum().backward()
    with TrainingMonitor(tmp_path, group_depth=1) as monitor:
        monitor.log_parameters(model, 0)
    tags = set(load_events(tmp_path).Tags()["histograms"])
    assert {"0/0.weight_data", "0/0.bias_grad", "2/2.0.weight_grad", "2/2.1.bias_data"} <= tags and len(tags) == 12
    assert classify("2/2.1.bias_data") == ("weight", "2.1.bias")
    assert classify("layer4/layer4.2.conv3.weight_grad") == ("grad", "layer4.2.conv3.weight")


def test_the_default_statistics_cadence_follows_the_first_epoch_and_survives_a_resume(tmp_path):
    model = nn.Linear(4, 2)
    with TrainingMonitor(tmp_path / "a").watch(model) as monitor:
        assert monitor.stats_every == 50
        monitor.epoch_end(0, {})  # no step yet: nothing to go by
        assert monitor.stats_every == 50
        for _ in range(960):
            model(torch.randn(3, 4)).sum().backward()
            monitor.step()
        monitor.epoch_end(1, {})
        assert monitor.stats_every == 60  # 16 readings in an epoch of 960 steps
        state = monitor.state_dict()
    with TrainingMonitor(tmp_path / "b").watch(model) as resumed:
        assert resumed.load_state_dict(state).stats_every == 60
    with TrainingMonitor(tmp_path / "c", stats_every=5).watch(model) as given:
        assert given.load_state_dict(state).stats_every == 5  # a cadence given explicitly wins


def test_the_default_cadence_is_kept_across_a_resume_in_the_first_epoch_and_its_switch_keeps_the_next_reading(
    tmp_path,
):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train(monitor, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(3, 4)).sum().backward()
            optimizer.step()
            monitor.step()

    with TrainingMonitor(tmp_path / "a").watch(model, optimizer) as monitor:
        train(monitor, 500)  # stopped within the first epoch
        state = monitor.state_dict()
    with TrainingMonitor(tmp_path / "b", start_step=500).watch(model, optimizer) as resumed:
        resumed.load_state_dict(state)
        train(resumed, 460)
        resumed.epoch_end(0, {})
        assert resumed.stats_every == 60  # the whole first epoch's 960 steps / 16, not the 460 since the resume
    with TrainingMonitor(tmp_path / "c").watch(model, optimizer) as monitor:
        train(monitor, 99)
        monitor.epoch_end(0, {})  # a short epoch: every 50 steps still, and step 100 is one of them
        train(monitor, 1)
        assert "update_ratio" in monitor.state_dict()["records"][0]["weight"]


def test_the_state_is_the_union_of_the_parts_and_a_loaded_one_sets_where_each_axis_goes_on(tmp_path):
    """state_dict() gathers each part's own keys; load_state_dict() alone resumes: the step count goes on, and each
    step axis is rewritten from just after the checkpoint, with no purge argument computed by the caller."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch(monitor, number):
        for _ in range(4):
            optimizer.zero_grad()
            loss = model(torch.randn(3, 4)).square().mean()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        monitor.epoch_end(number, {"train/loss": float(number)})

    with TrainingMonitor(tmp_path, stats_every=2).watch(model, optimizer) as monitor:
        epoch(monitor, 0)
        epoch(monitor, 1)
        state = monitor.state_dict()
        parts = [monitor.losses, monitor.clipping, monitor.cadence, monitor.diagnosis, monitor.sink]
        keys = [key for part in parts for key in part.state_dict()]
        assert len(keys) == len(set(keys)) and set(state) == {"steps", "skipped_steps", *keys}
        epoch(monitor, 2)  # then lost: the process dies before its checkpoint
    with TrainingMonitor(tmp_path, stats_every=2).watch(model, optimizer) as resumed:
        resumed.load_state_dict(state)
        assert resumed.steps == 8 and len(resumed.diagnosis.history) == 2
        assert resumed.sink.purge == {False: 2, True: 9}  # (epoch axis, step axis): what each writer purges
        epoch(resumed, 2)
        with pytest.raises(RuntimeError, match="before the first step"):
            resumed.load_state_dict(state)  # too late: the event files are open
    assert [e.step for e in load_events(tmp_path).Scalars("train/loss")] == [1, 2, 3]
    # every 2 steps, and the first two after each watch(): 1 and 2, 9 and 10
    assert [e.step for e in load_events(tmp_path / "steps").Scalars("loss")] == [1, 2, 4, 6, 8, 9, 10, 12]
    starts = [event.step for event in raw_events(tmp_path / "steps") if event.HasField("session_log")]
    assert starts == [9]  # the resumed writer's purge, which TensorBoard's loaders honour


@pytest.mark.monitor_failures
def test_the_guard_is_public_and_keeps_a_failure_from_ending_the_run(tmp_path, capsys):
    with TrainingMonitor(tmp_path) as monitor:
        for _ in range(2):
            with monitor.guard("a callback's own measurement"):
                raise ZeroDivisionError("a norm of zero")
    assert capsys.readouterr().err.count("gradwatch: a callback's own measurement failed (ZeroDivisionError") == 1
    assert (tmp_path / "gradwatch-errors.log").read_text().count("ZeroDivisionError: a norm of zero") == 2


@pytest.mark.monitor_failures
def test_the_guard_never_raises_whatever_its_error_log_can_do(tmp_path, capsys, monkeypatch):
    """A full disk fails the error log too: one line says so, and the run goes on."""

    def full(text):
        raise OSError(28, "No space left on device")

    with TrainingMonitor(tmp_path) as monitor:
        monkeypatch.setattr(monitor.sink, "error", full)
        for _ in range(3):
            with monitor.guard("the statistics"):
                raise ValueError("a bad value")
    err = capsys.readouterr().err
    assert err.count("gradwatch: the statistics failed (ValueError: a bad value)") == 1
    assert err.count("gradwatch-errors.log (OSError: [Errno 28] No space left on device); tracebacks are not") == 1


def test_diagnosis_json_is_replaced_whole(tmp_path, monkeypatch, capsys):
    """The findings file is written beside the old one and renamed over it: a write that fails midway leaves the
    old file as it was, and no temporary file behind."""
    with TrainingMonitor(tmp_path) as monitor:
        monitor.sink.save_json("diagnosis.json", [{"rule": "old"}])
        assert json.loads((tmp_path / "diagnosis.json").read_text()) == [{"rule": "old"}]
        assert not (tmp_path / "diagnosis.json.tmp").exists()

        def fails_midway(value, fh, **kwargs):
            fh.write('[{"rule": "ne')
            raise OSError(28, "No space left on device")

        real_open = open

        def fills_up(path, mode="r", *args, **kwargs):  # the disk fills up midway through the write
            fh = real_open(path, mode, *args, **kwargs)
            if str(path).endswith(".tmp"):
                fh.write('[{"rule": "ne')
                fh.close()
                raise OSError(28, "No space left on device")
            return fh

        monkeypatch.setattr("builtins.open", fills_up)
        monitor.sink.save_json("diagnosis.json", [{"rule": "new"}])  # said in one line, not raised
        monkeypatch.undo()
    assert json.loads((tmp_path / "diagnosis.json").read_text()) == [{"rule": "old"}]
    assert not (tmp_path / "diagnosis.json.tmp").exists()
    assert capsys.readouterr().err.count("diagnosis.json: cannot be written (No space left on device)") == 1


def raw_events(folder):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for path in sorted(folder.glob("events.out.tfevents.*")):
        yield from EventFileLoader(str(path)).Load()


@pytest.mark.monitor_failures
def test_a_scalar_that_is_not_one_number_is_left_out_and_the_rest_kept(tmp_path, capsys):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scalars = {
        "train/loss": "1.5",
        "train/accuracy": 0.5,
        "none": None,
        "three": torch.ones(3),
        "one": torch.tensor(2.0),
    }
    with TrainingMonitor(tmp_path).watch(model, optimizer) as monitor:
        for epoch in range(2):
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
            monitor.step()
            monitor.epoch_end(epoch, scalars)
    assert set(load_events(tmp_path).Tags()["scalars"]) >= {"train/accuracy", "one"}
    assert not {"train/loss", "none", "three"} & set(load_events(tmp_path).Tags()["scalars"])
    assert monitor.diagnosis.history[-1].metrics == {"train_accuracy": 0.5}  # the epoch's summary is kept
    err = capsys.readouterr().err
    assert err.count("gradwatch: the scalar train/loss failed (ValueError: '1.5' (str) is not one number") == 1
    assert err.count("is not one number; left out, the other scalars kept") == 3  # one line per tag, once


@pytest.mark.monitor_failures
def test_parameters_that_cannot_be_measured_are_named_once_and_the_others_diagnosed(tmp_path, capsys):
    """Integer, bool, complex and meta parameters (quantised codes, masks, lazily built layers) have no
    floating-point values to bin: one line names them at watch(), and every other parameter is measured."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    odd = {"codes": torch.zeros(3, dtype=torch.int8), "mask": torch.ones(3, dtype=torch.bool),
           "phase": torch.ones(3, dtype=torch.complex64), "lazy": torch.empty(3, device="meta")}  # fmt: skip
    for name, value in odd.items():
        model.register_parameter(name, nn.Parameter(value, requires_grad=False))
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    optimizer.add_param_group({"params": model[2].parameters()})
    with TrainingMonitor(tmp_path, stats_every=1).watch(model, optimizer) as monitor:
        for epoch in range(2):
            for _ in range(3):
                optimizer.zero_grad()
                model(torch.randn(8, 4)).sum().backward()
                optimizer.step()
                monitor.step()
            monitor.epoch_end(epoch, {"train/loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("gradwatch: not measured:") == 1 and "failed" not in err
    assert (
        "codes (torch.int8), mask (torch.bool), phase (torch.complex64), lazy (torch.float32, on the meta device)"
        in err
    )
    assert "the other 4 parameters are measured.\n" in err  # the line said whole
    assert set(monitor.diagnosis.history[-1].layers) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "0.weight_grad" in load_events(tmp_path).Tags()["histograms"]


def test_shares_of_non_finite_values_are_charted_from_their_first_reading_that_is_not_zero(tmp_path):
    sink = EventSink(str(tmp_path), flush_secs=30, purge_epoch=None, purge_step=None)
    for step, (a, b) in enumerate([(0.0, 0.0), (0.5, 0.0), (0.0, 0.0)], start=1):
        sink.scalars({"nonfinite_share/a": a, "nonfinite_share/b": b, "grad_norm/a": 1.0}, step, per_step=True)
    sink.close()
    events = load_events(tmp_path / "steps")
    assert "nonfinite_share/b" not in events.Tags()["scalars"]  # zero all along: never charted
    assert [(e.step, e.value) for e in events.Scalars("nonfinite_share/a")] == [(2, 0.5), (3, 0.0)]  # then kept
    assert [e.step for e in events.Scalars("grad_norm/a")] == [1, 2, 3]


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: "garbage", "the state is a str, not a dict"),
        (lambda s: {**s, "steps": "7"}, "the state['steps'] is a str where an int belongs"),
        (lambda s: {**s, "steps": -3}, "the state['steps'] is -3, below 0"),
        (lambda s: {**s, "history": [{"epoch": 0}]}, "the state['history'][0] lacks 'step'"),
        (lambda s: {**s, "history": [{"epoch": 0, "step": "x"}]}, "the state['history'][0]['step'] is a str where"),
        (lambda s: {**s, "windows": [{}]}, "the state['windows'][0] lacks 'first', 'step', 'mean', 'max'"),
        (lambda s: {**s, "findings": [{"rule": "x"}]}, "not a TrainingMonitor state (KeyError: "),
        (lambda s: {**s, "facts": {"model": "x"}}, "the state['facts']['model'] is a str where a dict belongs"),
    ],
)
def test_a_state_of_other_values_is_refused_by_name_and_the_monitor_stays_as_it_was(tmp_path, change, words):
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path / "a").watch(model, optimizer) as monitor:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
            monitor.step(torch.tensor(1.0))
        saved = monitor.state_dict()
    with TrainingMonitor(tmp_path / "b").watch(model, optimizer) as fresh:
        with pytest.raises(ValueError, match="not a TrainingMonitor state") as raised:
            fresh.load_state_dict(change(saved))
        assert words in str(raised.value)
        assert fresh.steps == 0 and fresh.diagnosis.history == []  # nothing of it was loaded
        assert fresh.load_state_dict(saved).steps == 3  # the monitor's own state loads as before


@pytest.mark.monitor_failures  # the failing reading, on purpose
@pytest.mark.parametrize("enabled", [True, False])
def test_a_reading_pauses_the_garbage_collector_and_leaves_it_as_it_was(tmp_path, monkeypatch, enabled):
    """Python's cyclic collector is off while a reading builds its objects (with thousands of tensors they set off
    full collections), and afterwards as the user had it, also where the reading fails."""
    import gc

    import gradwatch.monitor as monitor_module

    seen = []
    real = monitor_module.parameter_statistics

    def reading(*args, **kwargs):
        seen.append(gc.isenabled())
        if len(seen) == 2:
            raise RuntimeError("a reading that fails")
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "parameter_statistics", reading)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (gc.enable if enabled else gc.disable)()
    try:
        with TrainingMonitor(tmp_path, stats_every=1) as monitor:
            monitor.watch(model, optimizer)
            for _ in range(3):
                optimizer.zero_grad()
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                optimizer.step()
                monitor.step(loss)
                assert gc.isenabled() is enabled
            monitor.epoch_end(0, {"loss": loss.item()})
            assert gc.isenabled() is enabled
    finally:
        gc.enable()
    assert seen == [False, False, False]
    assert "a reading that fails" in (tmp_path / "gradwatch-errors.log").read_text()


def test_the_runs_end_is_written_once_however_often_close_is_called(tmp_path):
    """close() says the run ended: one `ended` line after the epochs' summaries, also when called again (a `with`
    block around a loop that closes the monitor itself)."""
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path).watch(model, optimizer) as monitor:
        for epoch in range(2):
            for _ in range(3):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(3, (8,)))
                loss.backward()
                optimizer.step()
                monitor.step(loss)
            monitor.epoch_end(epoch, {})
        monitor.close()
    lines = [json.loads(line) for line in (tmp_path / "gradwatch-summaries.jsonl").read_text().splitlines()]
    assert [[*line][0] for line in lines] == ["summary", "summary", "ended"]
    assert lines[-1]["ended"] == {"epoch": 1, "step": 6}
