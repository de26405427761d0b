"""The exact facts of the loop, read from the first steps: each on a small real run with the bug, as users write
it, and on its healthy twin, which stays silent. A table, as ESLint keeps a rule's valid and invalid examples:
each row is a loop with one switch turned, the rule expected first (None: no finding at all), and the words
its finding must hold."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import TrainingMonitor
from gradwatch.diagnosis.facts import _clipping

CLASSES = 4


def data(n=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=generator)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return x, y


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, CLASSES)).to(dtype)


LOSSES = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y),
    "softmax_in_the_call": lambda out, y: F.cross_entropy(out.softmax(1), y),
    "nll_on_scores": lambda out, y: F.nll_loss(out, y),
    "nll_on_log_softmax": lambda out, y: F.nll_loss(F.log_softmax(out, 1), y),
    "bce_on_logits": lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0], (y % 2).float()),
    "bce_on_sigmoid": lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0].sigmoid(), (y % 2).float()),
    "bce_on_labels": lambda out, y: F.binary_cross_entropy_with_logits(out[:, 0], y.float()),  # 0 to 3
    "mse": lambda out, y: F.mse_loss(out[:, :1], y.float().unsqueeze(1)),
    "mse_broadcast": lambda out, y: F.mse_loss(out[:, :1], y.float()),  # (N, 1) against (N,)
}


def train(log_dir, loss="cross_entropy", steps=60, model=None, params=None, lr=0.05, optimizer=torch.optim.SGD,
          zero_grad=True, restore=False, watched=None, eval_mode=False, epochs=None):  # fmt: skip
    """README's loop with one switch turned; returns the monitor (closed) and what each epoch_end returned."""
    model = model or mlp()
    x, y = data()
    x = x.to(next(model.parameters()).dtype)
    opt = optimizer(params if params is not None else model.parameters(), lr=lr)
    initial = copy.deepcopy(model.state_dict())
    returned = []
    with TrainingMonitor(log_dir, stats_every=10).watch(watched or model, opt) as monitor:
        for step in range(steps):
            if eval_mode:
                model.eval()
            rows = slice(32 * step % 512, 32 * step % 512 + 32)
            if zero_grad:
                opt.zero_grad()
            value = LOSSES[loss](model(x[rows]), y[rows])
            value.backward()
            opt.step()
            if restore:  # the weights put back after each step: the step changes nothing
                model.load_state_dict(initial)
            monitor.step(value)
            if epochs and (step + 1) % (steps // epochs) == 0:
                returned.append(monitor.epoch_end(step // (steps // epochs), {}))
    return monitor, returned


def linear_stack():
    """mlp() without its ReLU: two Linear layers in a row, one linear map."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.Linear(32, CLASSES))


def frozen_head_finetune():
    """A fine-tuning set-up as users write it: the backbone frozen, and the head frozen with it by mistake; only
    BatchNorm left trainable, and the optimizer built from the head."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU())
    head = nn.Linear(32, CLASSES)
    model = nn.Sequential(backbone, head)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in backbone[1].parameters():
        p.requires_grad_(True)
    return model, list(head.parameters())


def frozen_backbone_recipe():
    """The healthy twin: the backbone frozen, the head trained, the optimizer given every parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    model[0].requires_grad_(False)
    return model, list(model.parameters())


def graph_rule(loss, rule, words):
    return pytest.param({"loss": loss}, rule, words, id=loss)


CASES = [
    graph_rule("cross_entropy", None, []),
    graph_rule(
        "softmax_in_the_call",
        "softmax_before_loss",
        ["softmax applied to the scores at tests/test_facts.py:", "log-softmax"],
    ),
    graph_rule("nll_on_scores", "not_log_probabilities", ["fed raw scores", "test_facts.py:"]),
    graph_rule("nll_on_log_softmax", None, []),
    graph_rule("bce_on_logits", None, []),
    graph_rule("bce_on_sigmoid", "softmax_before_loss", ["sigmoid applied", "a log-sigmoid"]),
    graph_rule("bce_on_labels", "target_range", ["targets from 0 to 3, outside [0, 1]"]),
    graph_rule("mse", None, []),
    graph_rule("mse_broadcast", "loss_broadcast", ["shape (32, 1)", "shape (32,)", "broadcast them to (32, 32)"]),
    pytest.param(
        {"model": linear_stack()},
        "linear_model",
        ["stacks 2 weight layers with no activation"],
        id="activation_removed",
    ),  # fmt: skip
    pytest.param({"zero_grad": False, "lr": 0.01}, "gradients_not_cleared", ["never cleared"], id="no_zero_grad"),
    pytest.param({"restore": True}, "not_updated", ["did not change at all"], id="weights_restored"),
    pytest.param(
        {"eval_mode": True, "model": nn.Sequential(mlp(), nn.Dropout(0.5))}, "eval_mode", ["eval mode"], id="eval_mode"
    ),  # fmt: skip
    pytest.param(
        {"watched": mlp()},
        "loss_misses_model",
        ["reaches none of the watched model's parameters"],
        id="another_model_watched",
    ),  # fmt: skip
    pytest.param(
        {"model": mlp(torch.bfloat16), "optimizer": torch.optim.Adam, "lr": 1e-5},
        "updates_rounded_away",
        ["(bfloat16)", "rounded away"],
        id="bf16_lr_1e-5",
    ),  # fmt: skip
    pytest.param(
        {"model": mlp(torch.bfloat16), "optimizer": torch.optim.Adam, "lr": 1e-2}, None, [], id="bf16_lr_1e-2"
    ),  # fmt: skip
]


@pytest.mark.parametrize("switch, rule, words", CASES)
def test_each_fact_is_named_on_its_bug_and_silent_on_its_twin(tmp_path, switch, rule, words):
    monitor, _ = train(tmp_path, **switch)
    roots = [f for f in monitor.findings if f.cause is None]
    if rule is None:
        assert roots == [], [str(f) for f in roots]
        return
    assert roots and roots[0].rule == rule, [str(f) for f in roots]
    assert roots[0].step <= 20  # from the first readings, not at the end of an epoch
    text = str(roots[0])
    assert all(word in text for word in words), text


def test_a_frozen_optimizer_is_the_cause_and_the_clearing_check_reads_what_it_clears(tmp_path):
    model, head = frozen_head_finetune()
    monitor, _ = train(tmp_path / "frozen", model=model, params=head)
    first = monitor.findings[0]
    assert first.rule == "optimizer_frozen" and first.cause is None and "every one of them is frozen" in first.message
    assert "1.weight, 1.bias" in first.message.replace("0.1.", "1.")  # BatchNorm: trainable, not in the optimizer
    assert "gradients_not_cleared" not in {f.rule for f in monitor.findings}  # read on what the optimizer clears
    assert all(f.cause for f in monitor.findings[1:])  # the rest follows from it

    model, params = frozen_backbone_recipe()  # frozen tensors among trained ones: a recipe, not a bug
    monitor, _ = train(tmp_path / "recipe", model=model, params=params)
    assert monitor.findings == []


def test_the_finding_of_a_window_inside_an_epoch_is_returned_by_that_epoch(tmp_path):
    monitor, returned = train(tmp_path, zero_grad=False, lr=0.01, steps=60, epochs=3)
    assert [f.rule for f in returned[0]][:1] == ["gradients_not_cleared"]  # found at step 2, returned at epoch 1
    assert all("gradients_not_cleared" not in [f.rule for f in later] for later in returned[1:])


def test_a_run_that_stops_early_has_its_facts_and_the_first_batch_in_diagnosis_json(tmp_path):
    model = mlp()
    train(tmp_path, model=model, steps=7)  # no epoch, no statistics step of the cadence (every 10)
    saved = json.loads((tmp_path / "diagnosis.json").read_text())
    assert saved["findings"] == []
    facts = saved["facts"]
    assert facts["model"]["parameters"] == sum(p.numel() for p in model.parameters()) == 804
    assert facts["model"]["optimizer"]["class"] == "SGD" and facts["model"]["optimizer"]["groups"][0]["lr"] == 0.05
    [loss] = facts["loss"]["losses"]
    assert loss["function"] == "cross_entropy" and loss["line"].startswith("tests/test_facts.py:")
    assert loss["input"]["shape"] == [32, CLASSES] and loss["target"]["dtype"] == "int64"
    assert (loss["target"]["min"], loss["target"]["max"]) == (0, 3)  # the labels against the 4 outputs
    assert facts["loss"]["inputs"][0]["shape"] == [32, 20] and facts["loss"]["reached"] == 4
    assert facts["objective"] == "a loss to minimise"


def test_a_loss_of_another_kind_than_known_losses_is_judged_by_its_facts_alone(tmp_path):
    """A policy gradient's loss (-log p x advantage) rises and falls by design: recognised from the graph as
    "other", the loss rules stay silent on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    with TrainingMonitor(tmp_path, stats_every=5).watch(model, optimizer) as monitor:
        for _ in range(200):
            states = torch.eye(4)[torch.randint(0, 4, (8,))]
            dist = torch.distributions.Categorical(logits=model(states))
            actions = dist.sample()
            rewards = (actions == states.argmax(1) % 2).float() * 10 - 5  # large, noisy returns
            loss = -(dist.log_prob(actions) * rewards).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    saved = json.loads((tmp_path / "diagnosis.json").read_text())
    assert saved["facts"]["objective"] == "other" and saved["facts"]["loss"]["made_of_losses"] is False
    assert monitor.findings == []


@pytest.mark.parametrize("loss_fn", [F.l1_loss, F.mse_loss, F.smooth_l1_loss])
def test_a_regression_loss_is_one_whatever_ops_torch_writes_it_as(tmp_path, loss_fn):
    """l1_loss has no node of its own in the graph (a mean of abs): known by its call, a regression with it is
    made of losses, not "other", as mse_loss and smooth_l1_loss are."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with TrainingMonitor(tmp_path).watch(model, optimizer) as monitor:
        x, y = torch.randn(16, 20), torch.randn(16, CLASSES)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    facts = json.loads((tmp_path / "diagnosis.json").read_text())["facts"]
    assert facts["loss"]["made_of_losses"] is True and facts["objective"] != "other"
    assert [loss["function"] for loss in facts["loss"]["losses"]] == [loss_fn.__name__]


def test_the_decayed_norm_is_of_the_matrices_in_groups_with_weight_decay(tmp_path):
    """AdamW's usual groups (no decay for biases and LayerNorm's gains): the norm weight decay shrinks is that of
    the decayed matrices, read from the same reading as their statistics; None without decay."""
    from gradwatch.loop import decayed_norm

    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    named = list(model.named_parameters())
    stats = {name: {"weight_norm": float(p.norm())} for name, p in named}
    matrices = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0}])
    expected = float(torch.cat([p.detach().flatten() for p in matrices]).norm())
    assert decayed_norm(stats, named, optimizer) == pytest.approx(expected)
    assert decayed_norm(stats, named, torch.optim.AdamW(model.parameters(), weight_decay=0)) is None
    assert decayed_norm(stats, named, None) is None


def test_the_rules_read_the_models_dropout_rates_from_watch(tmp_path):
    """The dropout rates read at watch() reach every summary's loop facts, where the rules that weigh heavy dropout
    against the data and the initialisation read them."""
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(0.95), nn.Linear(32, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path).watch(model, optimizer) as monitor:
        for _ in range(10):
            loss = F.cross_entropy(model(torch.randn(16, 20)), torch.randint(0, CLASSES, (16,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        monitor.epoch_end(0, {})
        assert monitor.diagnosis.history[-1].loop["dropout"] == [0.95]


@pytest.mark.parametrize("lr", [1e-3, 1.0])
def test_the_first_steps_update_ratios_reach_the_first_summary(tmp_path, lr):
    """The readings of the first steps are left out of the summaries' medians, but each weight's largest update
    ratio there is kept: Adam's first step moves every value by about the rate, so at 1.0 the hidden layer moves by
    about its size at once, at 1e-3 by about a hundredth; biases are not kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, CLASSES))
    monitor, _ = train(tmp_path, model=model, lr=lr, optimizer=torch.optim.Adam, steps=40, epochs=1)
    first = monitor.diagnosis.history[0].loop["first_update_ratios"]
    assert set(first) == {"0.weight", "2.weight"}
    hidden = first["0.weight"]
    assert (hidden > 0.5) if lr == 1.0 else (1e-3 < hidden < 0.1), first


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clipping_that_the_loop_does_not_report_is_read_from_the_norms_it_leaves(tmp_path, max_norm):
    """clip_grad_norm_ at 1e-3 in the loop, its norms not passed to step(): the total gradient norm at every reading
    is the threshold, so the clipping is read from them and named as why the steps are too small; at 1e3 nothing is
    clipped, and no clipping is read."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(256, 20), torch.randint(0, CLASSES, (256,))
    with TrainingMonitor(tmp_path, stats_every=4).watch(model, optimizer) as monitor:
        for epoch in range(3):
            for i in range(0, 256, 16):
                loss = F.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                monitor.step(loss)
            monitor.epoch_end(epoch, {})
    clip = _clipping(monitor.diagnosis.history)
    if max_norm < 1:
        assert clip["max_norm"] == pytest.approx(max_norm, rel=1e-3) and clip["clipped_share"] == 1.0
        assert any(f.evidence.get("cause") == "clipping" for f in monitor.findings), monitor.findings
    else:
        assert clip == {} and not any(f.evidence.get("cause") == "clipping" for f in monitor.findings)


def test_step_says_at_once_what_it_takes(tmp_path):
    model = mlp()
    with TrainingMonitor(tmp_path).watch(model) as monitor:
        with pytest.raises(TypeError, match=r"one number .* got a tensor of shape \(32,\); pass loss.mean\(\)"):
            monitor.step(F.cross_entropy(model(data()[0][:32]), data()[1][:32], reduction="none"))
        with pytest.raises(TypeError, match="got str"):
            monitor.step("0.5")
        monitor.step(torch.tensor([0.5]))  # one element, and a NumPy number: taken
        monitor.step(__import__("numpy").float32(0.5))


def test_a_first_step_that_gradscaler_skips_is_read_and_leaves_no_mode_behind(tmp_path):
    """Under fp16 autocast the first steps often overflow and GradScaler skips optimizer.step(): the monitor's
    TorchFunctionMode, which notes the first step's calls, must not outlive that step (every torch call of the
    run would pass through Python), and the graph is read all the same."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data()
    with TrainingMonitor(tmp_path).watch(model, optimizer) as monitor:
        for step in range(3):
            optimizer.zero_grad()
            loss = LOSSES["softmax_in_the_call"](model(x[:32]), y[:32])
            loss.backward()
            if step:  # the first step skipped, as GradScaler skips one whose gradients overflowed
                optimizer.step()
            monitor.step(loss)
            assert torch._C._len_torch_function_stack() == 0
    assert monitor.skipped_steps == 1 and monitor.findings[0].rule == "softmax_before_loss"
