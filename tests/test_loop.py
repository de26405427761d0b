"""The loop checks: each everyday bug of a PyTorch training loop, on a small real run that has it, is named for
what it is; the same run without the bug, and the recipes that look like it (frozen layers, gradient accumulation,
a scheduler stepped per batch on purpose, softmax then NLL), get no such finding."""

import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from test_diagnosis import CLASSES, make_data

from gradwatch import Thresholds, TrainingMonitor, diagnose
from gradwatch.summary import SUMMARIES, EpochSummary

LOOP_RULES = {
    "not_in_optimizer",
    "no_gradient",
    "eval_mode",
    "gradients_not_cleared",
    "softmax_before_loss",
    "lr_collapsed",
    "unshuffled",
}


def mlp(dropout=0.0):
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, len(CLASSES)))


def run(log_dir, model=None, epochs=4, lr=0.1, params=None, zero_grad=True, accumulate=1, eval_after=False,
        loss_fn=F.cross_entropy, scheduler=None, order=None, noise=0.0, weight_decay=0.0, late_step=False,
        n=512):  # fmt: skip
    """A training loop with the monitor's calls and one bug switched on by its argument; returns the findings."""
    torch.manual_seed(0)
    model = model or mlp()
    x, y = make_data(noise, n)
    valid_x, valid_y = make_data(0.0, 256, seed=1)
    if order == "sorted":
        keep = torch.argsort(y, stable=True)
        x, y = x[keep], y[keep]
    optimizer = torch.optim.SGD(params or model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = scheduler(optimizer) if scheduler else None
    with TrainingMonitor(log_dir, stats_every=4).watch(model, optimizer) as monitor:
        for epoch in range(epochs):
            for i in range(0, len(x), 16):
                loss = loss_fn(model(x[i : i + 16]), y[i : i + 16])
                (loss / accumulate).backward()
                if (i // 16 + 1) % accumulate:
                    continue
                optimizer.step()
                if late_step:
                    optimizer.zero_grad()
                monitor.step(loss)
                if zero_grad and not late_step:
                    optimizer.zero_grad()
                if schedule:
                    schedule.step()
            with torch.no_grad():
                model.eval()
                train_accuracy = (model(x).argmax(1) == y).float().mean().item()
                valid_accuracy = (model(valid_x).argmax(1) == valid_y).float().mean().item()
            if not eval_after:
                model.train()
            metrics = {"train/accuracy": train_accuracy, "valid/accuracy": valid_accuracy}
            monitor.epoch_end(epoch, metrics, classes=CLASSES)
    return monitor.findings


def first(findings):
    return next((f for f in findings if f.cause is None and f.severity == "warning"), None)


def rules(findings):
    return {f.rule for f in findings}


def test_a_layer_left_out_of_the_optimizer_is_named_and_frozen_layers_are_not(tmp_path):
    model = mlp()
    findings = run(tmp_path / "left_out", model, params=model[3].parameters())
    finding = first(findings)
    assert finding.rule == "not_in_optimizer" and finding.parameters == ["0.weight", "0.bias"]
    assert "model.parameters()" in finding.suggestion and "requires_grad=False" in finding.suggestion
    assert all(f.cause == finding.id for f in findings if f.rule == "not_learning")

    model = mlp()
    model[0].requires_grad_(False)  # a frozen layer, rightly not in the optimizer
    findings = run(tmp_path / "frozen", model, params=model[3].parameters())
    assert not rules(findings) & LOOP_RULES and first(findings) is None


def test_a_cut_graph_is_named_by_the_parameters_that_get_no_gradient(tmp_path):
    model = mlp()
    model[1].register_forward_hook(lambda module, inputs, output: output.detach())  # features.detach()
    finding = first(run(tmp_path / "detached", model))
    assert finding.rule == "no_gradient" and finding.parameters == ["0.weight", "0.bias"]
    assert ".detach()" in finding.suggestion and "graph is cut" in finding.message

    findings = run(tmp_path / "late", late_step=True)  # monitor.step() after zero_grad(): nothing to read
    finding = first(findings)
    assert finding.rule == "no_gradient" and finding.parameters == []
    assert finding.suggestion.startswith("call monitor.step() after optimizer.step() and before")


def test_a_model_left_in_eval_mode_is_named_when_it_has_dropout_or_batchnorm(tmp_path):
    findings = run(tmp_path / "dropout", mlp(dropout=0.3), eval_after=True)
    finding = first(findings)
    assert finding.rule == "eval_mode" and finding.epoch == 1  # validation left it in eval mode after epoch 1
    assert finding.suggestion.startswith("call model.train()")
    # no dropout or BatchNorm: eval mode trains the same, and nothing is said
    assert "eval_mode" not in rules(run(tmp_path / "plain", mlp(), eval_after=True))
    assert "eval_mode" not in rules(run(tmp_path / "train_mode", mlp(dropout=0.3)))


def test_gradients_never_cleared_are_named_before_the_divergence_they_cause(tmp_path):
    findings = run(tmp_path / "never", zero_grad=False, lr=0.05)
    finding = first(findings)
    assert finding.rule == "gradients_not_cleared" and finding.epoch == 0
    assert finding.evidence["not_cleared"] == finding.evidence["checks"] >= 1
    assert "optimizer.zero_grad()" in finding.suggestion
    assert all(f.cause for f in findings if f.rule in ("diverging", "exploding_gradients", "moving_too_fast"))
    # gradient accumulation clears them every 4 batches, once per optimizer step: no finding
    assert "gradients_not_cleared" not in rules(run(tmp_path / "accumulate", accumulate=4))


def test_softmax_before_cross_entropy_is_named_and_softmax_then_nll_is_not(tmp_path):
    findings = run(tmp_path / "softmax", nn.Sequential(mlp(), nn.Softmax(-1)), lr=0.5, epochs=3)
    finding = first(findings)
    assert finding.rule == "softmax_before_loss" and "log-softmax" in finding.suggestion
    # the loss's graph shows it at the first step, with the module that applies it and the line of the loss
    assert finding.step == 1 and finding.evidence["module"] == "1" and finding.evidence["squash"] == "softmax"
    assert "in module `1`, called at tests/test_loop.py:" in finding.message
    # without the graph (logs read by diagnose), the outputs and the loss tell it
    lines = (tmp_path / "softmax" / SUMMARIES).read_text().splitlines()
    history = [json.loads(line)["summary"] for line in lines if "summary" in json.loads(line)]
    for summary in history:
        summary["loop"].pop("graph")
    finding = next(f for f in diagnose(history) if f.rule == "softmax_before_loss")
    floor = math.log(math.e + len(CLASSES) - 1) - 1  # the lowest cross-entropy of a one-hot probability row
    assert finding.evidence["loss_floor"] >= floor - 1e-6

    def nll_of_log(probabilities, labels):  # softmax, then the log: the model's output is probabilities, rightly
        return F.nll_loss(probabilities.clamp(min=1e-9).log(), labels)

    findings = run(tmp_path / "nll", nn.Sequential(mlp(), nn.Softmax(-1)), lr=0.5, epochs=3, loss_fn=nll_of_log)
    assert "softmax_before_loss" not in rules(findings)


def test_a_scheduler_stepped_every_batch_is_named_and_a_per_step_cosine_is_not(tmp_path):
    def step_lr(optimizer):  # meant for epochs, stepped every batch: 0.1 ** 16 after an epoch
        return torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.1)

    findings = run(tmp_path / "collapsed", scheduler=step_lr)
    finding = first(findings)
    assert finding.rule == "lr_collapsed" and finding.epoch == 1
    assert finding.evidence["peak"] == 0.1 and finding.evidence["after_first_epoch"] < 1e-3
    assert "once per epoch" in finding.suggestion
    assert all(f.cause for f in findings if f.rule in ("not_learning", "stuck"))

    def cosine(optimizer):  # over the run's 128 steps, stepped every batch as it is meant to be
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 128)

    assert "lr_collapsed" not in rules(run(tmp_path / "cosine", scheduler=cosine))


def test_training_data_sorted_by_class_is_named_and_shuffled_data_are_not(tmp_path):
    findings = run(tmp_path / "sorted", order="sorted", epochs=3)
    finding = first(findings)
    assert finding.rule == "unshuffled" and len(finding.evidence["classes"]) >= 3
    assert "shuffle=True" in finding.suggestion
    assert "unshuffled" not in rules(run(tmp_path / "shuffled", epochs=3))
    # a model that ignores its input gives one class to every row too, with the loss of an untrained model
    assert "unshuffled" not in rules(run(tmp_path / "lr_low", epochs=3, lr=1e-6))


def test_noisy_labels_are_named_when_validation_beats_training_for_epochs(tmp_path):
    findings = run(tmp_path / "noisy", noise=0.6, lr=0.05, epochs=4, n=2048)  # 45% of the labels wrong
    finding = first(findings)
    assert finding.rule == "noisy_labels"
    assert finding.evidence["valid_accuracy"] - finding.evidence["train_accuracy"] >= Thresholds().noisy_gap
    assert "noisy_labels" not in rules(run(tmp_path / "clean", lr=0.05, epochs=4, n=2048))


def test_strong_weight_decay_is_named_for_what_it_is(tmp_path):
    findings = run(tmp_path / "decay", weight_decay=0.5, lr=0.1, epochs=6)
    finding = first(findings)
    assert finding.rule == "strong_weight_decay" and finding.evidence["weight_decay"] == 0.5
    assert "smaller than 0.5" in finding.suggestion
    start, now = finding.evidence["weight_norms"]
    assert now < start / 2
    assert all(f.cause for f in findings if f.rule in ("moving_too_fast", "stuck", "dead_units"))
    assert "strong_weight_decay" not in rules(run(tmp_path / "usual", weight_decay=5e-4, lr=0.1, epochs=6))


def test_stuck_reads_the_run_own_first_loss_without_classes():
    """Any loss function: without classes, stuck compares the loss with its own first value, not ln C."""

    def epochs(losses):
        return [EpochSummary(e, 10 * (e + 1), first_loss=0.25, metrics={"train_loss": v}) for e, v in enumerate(losses)]

    [finding] = diagnose(epochs([0.25, 0.24, 0.25, 0.24, 0.25]))
    assert finding.rule == "stuck" and "its first value" in finding.message and "0.25" in finding.message
    assert diagnose(epochs([0.25, 0.2, 0.15, 0.1, 0.05])) == []


def test_a_unit_is_dead_only_if_it_stays_silent_on_every_batch_read_in_the_epoch(tmp_path):
    """Sparse units fire on some batches only: each batch alone shows half the units silent, the epoch none; an
    epoch of one batch shows unit 1 silent throughout."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [torch.tensor([[1.0, -1.0]] * 4), torch.tensor([[-1.0, 1.0]] * 4)]  # unit 0 fires, then unit 1
    with TrainingMonitor(tmp_path, stats_every=1).watch(model, optimizer) as monitor:
        for epoch, epoch_batches in enumerate([batches, batches[:1]]):
            for x in epoch_batches:
                optimizer.zero_grad()
                F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
                optimizer.step()
                monitor.step()
            relu = monitor.diagnosis.records[-1]["activations"]["1"]
            assert relu["share"] == 0.5  # this batch: one unit of two silent
            assert relu["never_fired"] == (0.0 if epoch == 0 else 0.5)  # the epoch so far
            monitor.epoch_end(epoch, {})
            assert ("dead_units" in rules(monitor.findings)) == (epoch == 1)  # unit 1 silent all of epoch 2
            assert monitor.diagnosis.history[-1].activations["1"]["never_fired"] == relu["never_fired"]


def test_an_empty_batch_and_a_sparse_gradient_leave_the_loop_checks_quiet(tmp_path, capsys):
    """The monitor's hooks run inside the user's forward and backward passes: nothing there may raise."""
    model = nn.Sequential(nn.EmbeddingBag(10, 4, mode="sum", sparse=True), nn.ReLU(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path, stats_every=1).watch(model, optimizer) as monitor:
        for rows in (4, 0, 4, 4):
            tokens = torch.randint(0, 10, (rows, 3))
            optimizer.zero_grad()
            outputs = model(tokens)  # an empty batch's forward pass runs the hooks too
            loss = F.cross_entropy(outputs, torch.zeros(rows, dtype=torch.long)) if rows else None
            if loss is not None:
                loss.backward()
            optimizer.step()
            monitor.step(loss)
        monitor.epoch_end(0, {})
    assert "failed" not in capsys.readouterr().err  # no hook, rule or statistic failed
    assert monitor.diagnosis.history[0].loop["clearing_checks"] >= 1  # the dense Linear was the probe


def ten_classes(log_dir, loss_fn, epochs=2, accumulate=1, objective=None):
    """A 10-class problem (a linear rule on 20 features) trained with `loss_fn`; returns the findings."""
    torch.manual_seed(0)
    x = torch.randn(640, 20)
    y = (x @ torch.randn(20, 10)).argmax(1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    names = [str(i) for i in range(10)]
    with TrainingMonitor(log_dir, stats_every=4).watch(model, optimizer, objective=objective) as monitor:
        for epoch in range(epochs):
            losses, hits = [], 0
            for i in range(0, len(x), 16):
                outputs = model(x[i : i + 16])
                loss = loss_fn(outputs, y[i : i + 16])
                (loss / accumulate).backward()
                losses.append(loss.item() / accumulate)  # as a loop that logs the divided loss reports it
                hits += (outputs.argmax(1) == y[i : i + 16]).sum().item()
                if (i // 16 + 1) % accumulate == 0:
                    optimizer.step()
                    monitor.step(loss)
                    optimizer.zero_grad()
            metrics = {"train/loss": sum(losses) / len(losses), "train/accuracy": hits / len(x)}
            monitor.epoch_end(epoch, metrics, classes=names)
    return monitor.findings


def test_a_square_loss_on_one_hot_targets_is_named_and_cross_entropy_is_not(tmp_path):
    """F.mse_loss given one-hot class labels: the loss's graph shows it at the first step, with its line. Written
    out by hand, where the graph cannot name it: cross-entropy costs at least ln 2 per wrong answer, so a loss far
    below that at the run's accuracy is not cross-entropy. Label smoothing and a loss divided over 4 accumulation
    steps stay clean."""

    def mse_one_hot(outputs, targets):
        return F.mse_loss(outputs, F.one_hot(targets, 10).float())

    def l1_one_hot(outputs, targets):  # torch writes l1_loss as a mean of abs: only its call names it
        return F.l1_loss(outputs, F.one_hot(targets, 10).float())

    def square_by_hand(outputs, targets):
        return ((outputs - F.one_hot(targets, 10).float()) ** 2).mean()

    def smoothed(outputs, targets):
        return F.cross_entropy(outputs, targets, label_smoothing=0.1)

    finding = first(ten_classes(tmp_path / "mse", mse_one_hot))
    assert finding.rule == "not_cross_entropy" and finding.step == 1
    assert finding.evidence["graph"]["kind"] == "one_hot_targets" and finding.evidence["graph"]["classes"] == 10
    assert "mse_loss between the model's scores and one-hot class labels" in finding.message
    assert "test_loop.py" in finding.message
    finding = first(ten_classes(tmp_path / "l1", l1_one_hot))
    assert finding.rule == "not_cross_entropy" and finding.step == 1 and finding.evidence["graph"]["loss"] == "l1_loss"
    # a loss written out is no known loss function: the objective is said, as watch() asks then
    finding = first(ten_classes(tmp_path / "by_hand", square_by_hand, objective="classification"))
    assert finding.rule == "not_cross_entropy" and finding.epoch == 0 and "graph" not in finding.evidence
    loss, accuracy = finding.evidence["train_loss"], finding.evidence["train_accuracy"]
    assert loss < 0.25 * (1 - accuracy) * math.log(2) and "nn.CrossEntropyLoss" in finding.suggestion
    for i, (loss_fn, accumulate) in enumerate([(F.cross_entropy, 1), (smoothed, 1), (F.cross_entropy, 4)]):
        findings = ten_classes(tmp_path / str(i), loss_fn, epochs=4, accumulate=accumulate)
        assert "not_cross_entropy" not in rules(findings)
