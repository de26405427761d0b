"""Every rule and every cause with its example runs, the way linters keep each rule with its good and bad code: the
runs a rule must find, and the runs it must leave alone, most of them the recipe or the near miss that looks like
the fault (a frozen backbone beside an optimizer that holds nothing trainable, a policy-gradient loss that rises by
design beside a divergence, clipping while the loss falls beside clipping that hides a learning rate too high).

A run is its epoch summaries (summary.EpochSummary), which is all a rule reads: each rule is a pure function of
them. A new rule or cause is not whole without its examples here (the last tests check that each has them)."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from gradwatch.diagnosis import RULES, Thresholds
from gradwatch.diagnosis.facts import LARGE_INIT
from gradwatch.diagnosis.findings import _never
from gradwatch.summary import EpochSummary

STEPS = 64  # optimizer steps per epoch of the example runs
LN10 = math.log(10)


def windows(means, first=1, width=8, maxes=None):
    """Loss windows of `width` steps from step `first`, one per mean (each its window's median too)."""
    maxes = maxes or [1.2 * m for m in means]
    out = []
    for i, (mean, top) in enumerate(zip(means, maxes)):
        start = first + i * width
        out.append({"first": start, "step": start + width - 1, "mean": mean, "median": mean, "max": top,
                    "max_step": start + width // 2, "nonfinite_step": None})  # fmt: skip
    return out


def epoch(number, loop=None, **fields):
    """Epoch `number` (from 0) of STEPS steps, with a loop that read 4 statistics steps in training mode."""
    facts = {"readings": 4, "eval_readings": 0, "mode_matters": True, "trainable": 4, "frozen": [],
             "not_in_optimizer": [], "no_gradient": [], "clearing_checks": 4, "not_cleared": 0,
             "lrs": [[STEPS * number + 1, 0.1]], "lr_first": 0.1, "lr_peak": 0.1, "weight_decay": 0.0,
             "outputs": []}  # fmt: skip
    return EpochSummary(number, STEPS * (number + 1), loop={**facts, **(loop or {})}, **fields)


def epochs(count, **each):
    """`count` epochs; a keyword whose value is a list gives epoch i its item i, any other value every epoch."""
    return [epoch(i, **{k: v[i] if isinstance(v, list) else v for k, v in each.items()}) for i in range(count)]


def graph(*problems, **facts):
    """The loss's graph as graph.py reads it, read whole at step 1, with these problems."""
    return {"graph": {"whole": True, "reached": 4, "step": 1, "losses": [{"function": "cross_entropy"}],
                      "problems": list(problems), **facts}}  # fmt: skip


SQUASHED = {"kind": "squashed", "squash": "softmax", "loss": "cross_entropy", "line": "train.py:42"}
RAW_TO_NLL = {"kind": "not_log_probabilities", "fed": "raw scores", "made_by": "Linear", "loss_line": "x.py:3"}
BROADCAST = {"kind": "broadcast", "loss": "mse_loss", "input_shape": [32, 1], "target_shape": [32],
             "broadcast_shape": [32, 32], "line": "x.py:9"}  # fmt: skip
BCE_RANGE = {"kind": "target_range", "loss": "binary_cross_entropy", "min": 0, "max": 9}
ONE_HOT = {"kind": "one_hot_targets", "loss": "mse_loss", "classes": 10, "line": "x.py:5"}
ANNEALED = {"lrs": [[60, 1e-4]], "lr_set": 0.1}  # a schedule down to a thousandth of the rate set
CLIPPING = {"max_norm": 1.0, "steps": STEPS, "clipped_share": 0.9, "grad_norm_median": 3.0, "grad_norm_p90": 5.0}


def outputs(classes, loss, count=8):
    """Statistics readings of the model's output: one top class for every row of each batch, class after class."""
    return [{"rows": 32, "mode_share": 1.0, "mode": i % classes, "loss": loss, "step": 8 * i + 1,
             "probabilities": False} for i in range(count)]  # fmt: skip


def spiked(peak, mean):
    """One epoch of 10 classes whose loss sits at 0.5, then one window of 8 steps reaches `peak` at mean `mean`, and
    the next comes back."""
    means = [0.5] * 10 + [mean, 0.5]
    return [epoch(0, num_classes=10, losses=windows(means, maxes=[0.6] * 10 + [peak, 0.6]))]


def layers(**values):
    """{name.weight: statistics}: e.g. layers(fc1=dict(grad_rms=1e-6))."""
    return {f"{name}.weight": {"weight_norm": 1.0, **stats} for name, stats in values.items()}


DEEP_SIGMOID = layers(fc1={"grad_rms": 1e-6}, fc2={"grad_rms": 1e-3}, fc3={"grad_rms": 1.0})
SATURATED = {"sig1": {"kind": "sigmoid", "layer": "fc1", "share": 0.9}}
GAIN_6 = {"name": "fc.weight", "gain": 6.0}  # a weight's RMS x sqrt(fan-in) before the first step: far too large
TINY = layers(fc1={"grad_rms": 1e-9}, fc2={"grad_rms": 1e-9})  # both below vanishing_floor
# statistics readings [total gradient norm, loss]: of steps clipped to 1e-3, of steps not clipped, and of one batch
# at the same weights (the same norm, unclipped)
CLIPPED = [[1e-3, 2.3 + i / 100] for i in range(6)]
UNCLIPPED = [[norm, 2.3] for norm in (1e-3, 2e-3, 5e-4, 1.5e-3, 8e-4, 1.2e-3)]
SAME_BATCH = [[1e-3, 2.3]] * 6


def units(kind, share, *update_ratios, **fields):
    """An epoch per update ratio (1e-3 if none) of a `kind` activation ("tanh", "relu") after fc1 with `share` of
    its outputs at its limits (silent, for a ReLU), fc1 moving by that ratio per step."""
    return [epoch(i, activations={"a1": {"kind": kind, "layer": "fc1", "share": share}},
                  layers=layers(fc1={"update_ratio": ratio}), **fields)
            for i, ratio in enumerate(update_ratios or [1e-3])]  # fmt: skip


def tanh(share, *update_ratios):
    return units("tanh", share, *update_ratios)


def fast(*means):
    """An epoch of 10 classes per list of loss-window means, fc.weight moving by half its size per step."""
    return [epoch(i, num_classes=10, losses=windows(m, first=STEPS * i + 1), layers=layers(fc={"update_ratio": 0.5}))
            for i, m in enumerate(means)]  # fmt: skip


def ended(means, steps=200, end=True, losses=({"function": "cross_entropy", "input": {"shape": [512, 256]}},)):
    """A run of one epoch of `steps` steps per list of loss-window means (its loss their median), its cross-entropy
    over 256 classes read from the loss's graph (ln 256 = 5.55), the weights still; closed (close()) after the last
    where `end`."""
    run = []
    for i, m in enumerate(means):
        run.append(epoch(i, first_loss=means[0][0], losses=windows(m, first=steps * i + 1, width=steps // len(m)),
                         loop={**graph(losses=list(losses))}, layers=layers(fc={"update_ratio": 1e-6})))  # fmt: skip
        run[-1].step = steps * (i + 1)
    run[-1].loop["ended"] = end
    return run


def slow(grad_rms, at=0):
    """Epoch `at`, in which fc.weight does not move (update ratio 1e-8) with gradients of this RMS."""
    return [epoch(at, layers=layers(fc={"update_ratio": 1e-8, "grad_rms": grad_rms}))]


def grow(valid_losses, name="fc.weight", start=0.5, **loop):
    """Five epochs whose weight `name`'s max |w| grows from `start` after the first to 1.6, with these validation
    losses."""
    sizes = [{name: {"max_abs_weight": w}} for w in (start, 0.6, 0.8, 1.2, 1.6)]
    return epochs(5, layers=sizes, metrics=[{"valid_loss": v} for v in valid_losses], loop=loop)


def accuracies(train, valid, **extra):
    return [{"train_accuracy": t, "valid_accuracy": v, **extra} for t, v in zip(train, valid)]


def skew(recall):
    bias = {"name": "fc3.bias", "values": [0.1, 0.0, -0.1, 0.05, -3.0], "classes": list("abcde"),
            "recall": [0.9, 0.9, 0.9, 0.9, recall]}  # fmt: skip
    return [epoch(0, output_bias=bias)]


def replicas(**reading):
    return [epoch(0, loop={"replicas": reading})]


def level(*means, classes=10, **loop):
    """One epoch of `classes` classes whose loss windows have these means."""
    return [epoch(0, num_classes=classes, losses=windows(list(means)), loop=loop)]


@dataclass
class Example:
    rule: str
    finds: bool  # whether the rule must find something in the run
    what: str
    run: Callable[[], list[EpochSummary]]

    def __str__(self):
        return f"{self.rule}: {'finds' if self.finds else 'leaves alone'} {self.what}"


def finds(rule, what, run):
    return Example(rule, True, what, run)


def leaves(rule, what, run):
    return Example(rule, False, what, run)


EXAMPLES = [
    finds("loss_misses_model", "a loss that reaches no watched parameter, none with a gradient",
          lambda: [epoch(0, loop={**graph(reached=0), "no_gradient": ["a", "b", "c", "d"]})]),
    leaves("loss_misses_model", "a graph read in part (no_gradient tells that)",
           lambda: [epoch(0, loop={**graph(reached=0, whole=False), "no_gradient": ["a", "b", "c", "d"]})]),
    finds("optimizer_frozen", "an optimizer holding only frozen tensors",
          lambda: [epoch(0, loop={"held": 4, "held_frozen": 4})]),
    leaves("optimizer_frozen", "a frozen backbone beside a trained head",
           lambda: [epoch(0, loop={"held": 4, "held_frozen": 2})]),
    finds("not_in_optimizer", "a trained layer left out of the optimizer",
          lambda: [epoch(0, loop={"not_in_optimizer": ["head.weight"]})]),
    leaves("not_in_optimizer", "a target network: in no optimizer and not reached by the loss",
           lambda: [epoch(0, loop={"not_in_optimizer": ["target.weight"], "no_gradient": ["target.weight"]})]),
    finds("no_gradient", "a layer the backward pass never reaches",
          lambda: [epoch(0, loop={"no_gradient": ["encoder.weight"]})]),
    leaves("no_gradient", "a target network kept apart",
           lambda: [epoch(0, loop={"not_in_optimizer": ["target.weight"], "no_gradient": ["target.weight"]})]),
    finds("eval_mode", "a model with dropout left in eval mode", lambda: [epoch(0, loop={"eval_readings": 4})]),
    leaves("eval_mode", "a model in eval mode that has no dropout nor BatchNorm",
           lambda: [epoch(0, loop={"eval_readings": 4, "mode_matters": False})]),
    finds("gradients_not_cleared", "gradients never cleared", lambda: [epoch(0, loop={"not_cleared": 4})]),
    leaves("gradients_not_cleared", "gradient accumulation: cleared at most checks",
           lambda: [epoch(0, loop={"not_cleared": 1})]),
    finds("linear_model", "the graph's two weight layers with only linear ops between them",
          lambda: [epoch(0, loop=graph({"kind": "linear_model", "layers": 2}))]),
    leaves("linear_model", "a graph without that problem", lambda: [epoch(0, loop=graph())]),
    finds("softmax_before_loss", "softmax before cross_entropy in the graph", lambda: [epoch(0, loop=graph(SQUASHED))]),
    leaves("softmax_before_loss", "a graph with another problem only", lambda: [epoch(0, loop=graph(BROADCAST))]),
    finds("not_log_probabilities", "nll_loss fed raw scores", lambda: [epoch(0, loop=graph(RAW_TO_NLL))]),
    leaves("not_log_probabilities", "a softmax squashed before the loss instead",
           lambda: [epoch(0, loop=graph(SQUASHED))]),
    finds("loss_broadcast", "mse_loss of (32, 1) against (32,)", lambda: [epoch(0, loop=graph(BROADCAST))]),
    leaves("loss_broadcast", "a graph with another problem only", lambda: [epoch(0, loop=graph(BCE_RANGE))]),
    finds("target_range", "binary cross-entropy on targets up to 9", lambda: [epoch(0, loop=graph(BCE_RANGE))]),
    leaves("target_range", "a graph with another problem only", lambda: [epoch(0, loop=graph(BROADCAST))]),
    finds("updates_rounded_away", "bfloat16 weights whose steps round away",
          lambda: [epoch(0, loop={"rounded": {"w": {"dtype": "bfloat16", "unchanged_share": 0.9,
                                                     "grad_zero_share": 0.0}}})]),  # fmt: skip
    leaves("updates_rounded_away", "the same at the end of an annealed schedule",
           lambda: [epoch(0, loop={**ANNEALED, "rounded": {"w": {"dtype": "bfloat16", "unchanged_share": 0.9,
                                                                  "grad_zero_share": 0.0}}})]),  # fmt: skip
    finds("not_updated", "weights with gradients that never change", lambda: [epoch(0, loop={"not_updated": ["w"]})]),
    leaves("not_updated", "the same at the end of an annealed schedule",
           lambda: [epoch(0, loop={**ANNEALED, "not_updated": ["w"]})]),
    finds("replicas_differ", "gradients that differ between ranks",
          lambda: replicas(first={"gradients_differ": 1, "weights_differ": 0, "ranks": 2,
                                  "apart": {"gradients": {"w": 0.01}, "weights": {}}}, first_step=5)),  # fmt: skip
    leaves("replicas_differ", "replicas that agree", lambda: replicas(agreed_step=64)),
    finds("ranks_out_of_step", "ranks that made different numbers of steps",
          lambda: replicas(out_of_step={"optimizer_steps": [10, 9], "step": 10})),
    leaves("ranks_out_of_step", "replicas that agree", lambda: replicas(agreed_step=64)),
    finds("nonfinite_on_some_ranks", "a NaN loss on rank 1 of 2",
          lambda: replicas(nonfinite={"nonfinite_ranks": [1], "ranks": 2, "step": 12})),
    leaves("nonfinite_on_some_ranks", "replicas that agree", lambda: replicas(agreed_step=64)),
    finds("not_cross_entropy", "a loss far below what cross-entropy gives at 50% accuracy",
          lambda: [epoch(0, metrics={"train_loss": 0.01, "train_accuracy": 0.5})]),
    finds("not_cross_entropy", "mse_loss on one-hot labels in the graph", lambda: [epoch(0, loop=graph(ONE_HOT))]),
    leaves("not_cross_entropy", "a cross-entropy's loss at 50% accuracy",
           lambda: [epoch(0, metrics={"train_loss": 0.4, "train_accuracy": 0.5})]),
    finds("lr_collapsed", "a per-epoch schedule stepped every batch",
          lambda: epochs(2, lr=1e-5, loop=[{"lrs": [[20, 1e-5]]}, {"lrs": [[84, 1e-5]]}])),
    leaves("lr_collapsed", "an epoch that ends a schedule at its last step",
           lambda: epochs(2, lr=[0.1, 1e-5], loop=[{"lrs": [[20, 0.1]]}, {"lrs": [[84, 1e-5]]}])),
    finds("unshuffled", "batches of one class each, each learnt at once",
          lambda: [epoch(0, num_classes=4, first_loss=2.0, loop={"outputs": outputs(4, loss=0.1)})]),
    leaves("unshuffled", "a model that ignores its input on shuffled batches",
           lambda: [epoch(0, num_classes=4, first_loss=2.0, loop={"outputs": outputs(4, loss=1.9)})]),
    finds("high_initial_loss", "a first loss of 50 over 10 classes",
          lambda: [epoch(0, num_classes=10, first_loss=50.0)]),
    leaves("high_initial_loss", "a first loss of ln 10", lambda: [epoch(0, num_classes=10, first_loss=2.3)]),
    finds("high_initial_loss", "a first loss of twice ln 10, a weight of gain 6 read before the first step",
          lambda: [epoch(0, num_classes=10, first_loss=4.6, loop=graph(largest_gain=GAIN_6))]),
    leaves("high_initial_loss", "a first loss of twice ln 10, the weights at torch.nn's gains",
           lambda: [epoch(0, num_classes=10, first_loss=4.6, loop=graph(largest_gain={**GAIN_6, "gain": 0.8}))]),
    finds("loss_spikes", "a loss that spikes to 3 for two windows and comes back", lambda: spiked(3.0, 1.0)),
    leaves("loss_spikes", "one hard batch in a window", lambda: spiked(1.2, 0.52)),
    finds("diverging", "a loss that rises from ln 10 to 5", lambda: level(2.3, 2.3, 4.0, 5.0, 5.0)),
    leaves("diverging", "a policy-gradient loss that rises by design",
           lambda: level(2.3, 2.3, 4.0, 5.0, 5.0, objective="rl")),
    leaves("diverging", "one batch at twice the first loss, the level where it started",
           lambda: [epoch(0, num_classes=10, losses=windows([2.3] * 4, maxes=[2.5, 4.6, 2.5, 2.5]))]),
    leaves("diverging", "a loss as high at its first batch, before any step, and falling (heavy dropout)",
           lambda: [epoch(0, num_classes=10, first_loss=6.6, losses=windows([6.6, 3.0, 2.9, 2.8]))]),
    leaves("diverging", "a first batch's loss of 1e4 (weights 30x too large), where it stays: no rise",
           lambda: [epoch(0, num_classes=10, first_loss=1e4, losses=windows([1e4] * 4))]),
    finds("diverging", "a loss that rises from a high first batch to twice it",
          lambda: [epoch(0, num_classes=10, first_loss=6.6, losses=windows([6.6, 8.0, 12.0, 14.0]))]),
    finds("nonfinite_gradients", "NaN in a gradient", lambda: [epoch(0, layers=layers(fc={"nonfinite_share": 0.5}))]),
    leaves("nonfinite_gradients", "finite gradients", lambda: [epoch(0, layers=layers(fc={"nonfinite_share": 0.0}))]),
    finds("exploding_gradients", "a gradient norm 500x its median of the epochs before",
          lambda: epochs(3, total_grad_norm_median=1.0, total_grad_norm_max=[2.0, 2.0, 500.0])),
    leaves("exploding_gradients", "a large first norm: no baseline from the first steps",
           lambda: epochs(1, total_grad_norm_median=1.0, total_grad_norm_max=1000.0)),
    finds("mostly_clipped", "total norms at one value at every reading (clipped to it), the loss flat",
          lambda: epochs(2, lr=0.1, first_loss=2.0, metrics={"train_loss": 2.1},
                         loop={"total_norms": CLIPPED[:4]}, layers=layers(fc={"update_ratio": 1e-7}))),
    leaves("mostly_clipped", "total norms that differ, the loss flat",
           lambda: epochs(2, lr=0.1, first_loss=2.0, metrics={"train_loss": 2.1}, loop={"total_norms": UNCLIPPED})),
    leaves("mostly_clipped", "one norm at every reading of one batch at the same weights (not clipped)",
           lambda: epochs(2, lr=0.1, first_loss=2.0, metrics={"train_loss": 2.1}, loop={"total_norms": SAME_BATCH})),
    finds("mostly_clipped", "clipping most steps while the loss makes no new low",
          lambda: epochs(2, lr=0.1, first_loss=2.0, clipping=CLIPPING, metrics={"train_loss": 2.1})),
    leaves("mostly_clipped", "clipping at 1.0 most steps while the loss falls (a transformer's start)",
           lambda: epochs(2, lr=0.1, first_loss=2.0, clipping=CLIPPING, metrics=[{"train_loss": 1.5},
                                                                                {"train_loss": 1.0}])),  # fmt: skip
    finds("strong_weight_decay", "decay 1.0 holding the weights near zero, the loss at ln 10",
          lambda: epochs(3, num_classes=10, metrics={"train_loss": 2.3},
                         loop={"weight_decay": 1.0, "weight_norm_first": 10.0, "weight_norm": 2.0})),
    finds("strong_weight_decay", "the decayed weights near zero, the norms' gains of 1 (not decayed) kept",
          lambda: epochs(3, num_classes=4, metrics={"train_loss": 1.38},
                         loop={"weight_decay": 100.0, "weight_norm_first": 27.0, "weight_norm": 25.0,
                               "decayed_norm_first": 10.0, "decayed_norm": 0.4})),
    leaves("strong_weight_decay", "the decayed weights as large as at first, the loss at ln 4",
           lambda: epochs(3, num_classes=4, metrics={"train_loss": 1.38},
                          loop={"weight_decay": 0.01, "weight_norm_first": 27.0, "weight_norm": 5.0,
                                "decayed_norm_first": 10.0, "decayed_norm": 9.0})),
    finds("strong_weight_decay", "an RL policy's decayed weights at a twentieth of their first norm, 3 epochs",
          lambda: epochs(3, loop=[{"objective": "rl", "weight_decay": 1.0, "decayed_norm_first": 10.0,
                                   "decayed_norm": n} for n in (0.5, 0.5, 0.4)])),
    leaves("strong_weight_decay", "an RL policy's decayed weights at a fifth of it (the loss cannot tell more)",
           lambda: epochs(3, loop=[{"objective": "rl", "weight_decay": 1.0, "decayed_norm_first": 10.0,
                                    "decayed_norm": n} for n in (2.0, 2.0, 2.0)])),
    leaves("strong_weight_decay", "a GAN's weights shrunk only in its last epoch",
           lambda: epochs(3, loop=[{"objective": "gan", "weight_decay": 1.0, "decayed_norm_first": 10.0,
                                    "decayed_norm": n} for n in (8.0, 5.0, 0.5)])),
    leaves("strong_weight_decay", "weights shrinking under decay while the loss falls",
           lambda: epochs(3, num_classes=10, metrics=[{"train_loss": v} for v in (1.5, 1.0, 0.5)],
                          loop={"weight_decay": 5e-4, "weight_norm_first": 10.0, "weight_norm": 2.0})),
    finds("dead_units", "80% of fc1's ReLUs silent", lambda: units("relu", 0.8)),
    leaves("dead_units", "30% of them silent", lambda: units("relu", 0.3)),
    finds("saturated", "90% of a tanh's outputs at its limits", lambda: tanh(0.9)),
    leaves("saturated", "30% of them", lambda: tanh(0.3)),
    finds("vanishing_gradients", "the first layer's gradients 1e-6 of the last's",
          lambda: [epoch(0, layers=DEEP_SIGMOID)]),
    leaves("vanishing_gradients", "the same gradients under Adam, whose steps do not vanish",
           lambda: [epoch(0, layers=layers(fc1={"grad_rms": 1e-6, "grad_norm": 1e-5, "update_ratio": 1e-3},
                                           fc3={"grad_rms": 1.0, "grad_norm": 10.0, "update_ratio": 1e-3}))]),
    leaves("vanishing_gradients", "Adam's steps alike per value under a head 1,000 times smaller (a policy's)",
           lambda: [epoch(0, layers=layers(
               fc1={"grad_rms": 1e-6, "grad_norm": 1e-5, "update_ratio": 1e-5, "weight_norm": 10.0},
               fc3={"grad_rms": 1.0, "grad_norm": 10.0, "update_ratio": 1e-2, "weight_norm": 0.01}))]),
    finds("vanishing_gradients", "SGD's steps as small per value as the gradients",
          lambda: [epoch(0, layers=layers(fc1={"grad_rms": 1e-6, "grad_norm": 1e-5, "update_ratio": 1e-9},
                                          fc3={"grad_rms": 1.0, "grad_norm": 10.0, "update_ratio": 1e-3}))]),
    leaves("vanishing_gradients", "an embedding's gradients (a lookup's rows a batch did not read are zero)",
           lambda: [epoch(0, layers=DEEP_SIGMOID,
                          loop={"graph": {"lookups": ["fc1.weight", "fc2.weight"]}})]),  # fmt: skip
    finds("not_learning", "weights that move by 1e-8 of their size per step",
          lambda: [epoch(0, layers=layers(fc={"update_ratio": 1e-8}))]),
    leaves("not_learning", "the same at the end of an annealed schedule",
           lambda: [epoch(0, lr=1e-5, layers=layers(fc={"update_ratio": 1e-8}))]),
    leaves("not_learning", "a frozen layer", lambda: [epoch(0, layers=layers(fc={"update_ratio": 0.0}),
                                                            loop={"frozen": ["fc.weight"]})]),  # fmt: skip
    finds("moving_too_fast", "weights that move by half their size per step while the loss stays",
          lambda: fast([2.2] * 4, [2.2] * 4)),
    leaves("moving_too_fast", "the same in the first epoch, whose steps are no baseline", lambda: fast([2.2] * 4)),
    leaves("moving_too_fast", "the same while the loss still makes new lows", lambda: fast([2.2] * 4, [2.0] * 4)),
    leaves("moving_too_fast", "weights from near zero moving fast, the loss down to a quarter and bouncing there",
           lambda: fast([2.2, 1.0, 0.5, 0.5], [0.6] * 4)),
    finds("stuck", "five epochs at ln 10 and chance, the weights still",
          lambda: epochs(5, num_classes=10, metrics={"train_loss": 2.3, "train_accuracy": 0.1},
                         layers=layers(fc={"update_ratio": 1e-6}))),  # fmt: skip
    leaves("stuck", "a contrastive loss that stays flat while the weights move (a miner picks harder pairs)",
           lambda: epochs(5, first_loss=1.0, metrics={"train_loss": 0.97}, layers=layers(fc={"update_ratio": 1e-2}),
                          loop={"objective": "contrastive"})),
    finds("stuck", "a contrastive loss that stays flat with the weights still",
          lambda: epochs(5, first_loss=1.0, metrics={"train_loss": 0.97}, layers=layers(fc={"update_ratio": 1e-6}),
                         loop={"objective": "contrastive"})),
    leaves("stuck", "a loss that falls epoch by epoch",
           lambda: epochs(5, num_classes=10, metrics=[{"train_loss": v, "train_accuracy": 0.1}
                                                      for v in (2.3, 2.0, 1.5, 1.0, 0.5)])),  # fmt: skip
    finds("stuck", "a run that ended after two epochs of 200 steps near ln 256, the cross-entropy's classes",
          lambda: ended([[5.7, 5.6, 5.5, 5.5], [5.5, 5.5, 5.4, 5.4]])),
    leaves("stuck", "the same two epochs in a run that goes on",
           lambda: ended([[5.7, 5.6, 5.5, 5.5], [5.5, 5.5, 5.4, 5.4]], end=False)),
    leaves("stuck", "the same in a run that ended after 128 steps in all: too few to judge",
           lambda: ended([[5.7, 5.6, 5.5, 5.5], [5.5, 5.5, 5.4, 5.4]], steps=64)),
    leaves("stuck", "a run that ended where its loss began to fall at the end",
           lambda: ended([[5.7, 5.6, 5.5, 5.5], [5.5, 5.5, 5.4, 3.0]])),
    leaves("stuck", "a regression that ended near its first loss: an untrained model's loss is not known",
           lambda: ended([[1.0, 0.98, 0.97, 0.97], [0.96] * 4], losses=({"function": "mse_loss"},))),
    finds("oscillating", "a loss up and down by 0.5 every epoch",
          lambda: epochs(6, metrics=[{"train_loss": v} for v in (1.0, 1.5, 1.0, 1.5, 1.0, 1.5)])),
    leaves("oscillating", "a loss that bounces while it falls",
           lambda: epochs(6, metrics=[{"train_loss": v} for v in (2.0, 2.2, 1.6, 1.8, 1.2, 1.4)])),
    finds("weights_growing", "weights growing while validation worsens", lambda: grow((1.0, 0.9, 1.0, 1.1, 1.2))),
    leaves("weights_growing", "weights growing while validation makes new bests",
           lambda: grow((1.0, 0.9, 0.8, 0.7, 0.6))),
    leaves("weights_growing", "a bias grown from 1e-4 while validation worsens: no weight matrix",
           lambda: grow((1.0, 0.9, 1.0, 1.1, 1.2), name="conv1.bias", start=1e-4)),
    leaves("weights_growing", "a norm's gain grown while validation worsens: the graph lists no such matrix",
           lambda: grow((1.0, 0.9, 1.0, 1.1, 1.2), name="bn1.weight", **graph(depths={"conv1.weight": 1}))),
    finds("weights_growing", "a kernel the loss's graph lists, growing while validation worsens",
          lambda: grow((1.0, 0.9, 1.0, 1.1, 1.2), name="conv1.weight", **graph(depths={"conv1.weight": 1}))),
    finds("output_bias_skew", "a class's bias far below the others, its recall 0.1", lambda: skew(0.1)),
    leaves("output_bias_skew", "the same bias with that class's recall at 0.85", lambda: skew(0.85)),
    finds("noisy_labels", "validation 30 points above training for three epochs",
          lambda: epochs(4, metrics=accuracies([0.5] * 4, [0.8] * 4))),
    leaves("noisy_labels", "validation ahead of the epoch's average accuracy while learning fast",
           lambda: epochs(4, metrics=accuracies([0.3, 0.6, 0.8, 0.9], [0.5, 0.7, 0.85, 0.9]))),
    finds("no_generalisation", "90% training accuracy, validation at chance",
          lambda: [epoch(0, num_classes=10, metrics=accuracies([0.9], [0.1])[0])]),
    leaves("no_generalisation", "90% training, 60% validation",
           lambda: [epoch(0, num_classes=10, metrics=accuracies([0.9], [0.6])[0])]),
    finds("overfitting", "validation loss up three epochs as the accuracy gap widens",
          lambda: epochs(5, metrics=[{**m, "valid_loss": v} for m, v in zip(
              accuracies([0.7, 0.8, 0.9, 0.95, 0.99], [0.65, 0.75, 0.7, 0.7, 0.7]), (1.0, 0.8, 1.0, 1.1, 1.2))])),
    leaves("overfitting", "validation loss up while the accuracy gap stays",
           lambda: epochs(5, metrics=[{**m, "valid_loss": v} for m, v in zip(
               accuracies([0.7] * 5, [0.68] * 5), (1.0, 0.8, 1.0, 1.1, 1.2))])),
]  # fmt: skip


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_each_rule_finds_its_faults_and_leaves_the_rest_alone(example):
    found = RULES[example.rule](example.run(), Thresholds())
    assert bool(found) == example.finds, [f.message for f in found]
    for finding in found:
        assert finding.rule == example.rule and finding.message and finding.step >= 1


def first_steps(**ratios):
    """Sigmoid units saturated after fc1, and each weight's largest update ratio at the first steps' readings."""
    return [epoch(0, layers=DEEP_SIGMOID, activations=SATURATED, loop={"first_update_ratios": ratios})]


def feeding_fast():
    """fc1, which feeds the saturated units, moved by twice its size at a first step."""
    return first_steps(**{"fc1.weight": 2.0, "fc3.weight": 1e-3})


def head_fast():
    """Only the head fc3, which feeds no saturated unit, moved by half its size at a first step."""
    return first_steps(**{"fc1.weight": 1e-3, "fc3.weight": 0.5})


# (rule, cause, held, what, run): the cause's check holds in the run, or does not; the rule finds its symptom in both
CAUSES = [
    ("vanishing_gradients", "saturation", True, "sigmoid units saturated below the output",
     lambda: [epoch(0, layers=DEEP_SIGMOID, activations=SATURATED)]),
    ("vanishing_gradients", "saturation", False, "no saturated units", lambda: [epoch(0, layers=DEEP_SIGMOID)]),
    ("vanishing_gradients", "saturation", False, "sigmoid units saturated after fc1 moved by half its size per step",
     lambda: [epoch(0, layers=layers(fc1={"grad_rms": 1e-3, "update_ratio": 0.5}, fc3={"grad_rms": 1.0})),
              epoch(1, layers=DEEP_SIGMOID, activations=SATURATED)]),
    ("vanishing_gradients", "saturation", False, "fc1, which feeds the saturated units, moved by twice its size at "
     "a first step", feeding_fast),
    ("vanishing_gradients", "saturation", True, "only the head, which feeds no saturated unit, moved by half its "
     "size at a first step", head_fast),
    ("vanishing_gradients", "learning_rate", True, "fc1, which feeds the saturated units, moved by twice its size at "
     "a first step", feeding_fast),
    ("vanishing_gradients", "learning_rate", False, "only the head, which feeds no saturated unit, moved by half its "
     "size at a first step", head_fast),
    ("vanishing_gradients", "learning_rate", False, "fc1 moved by twice its size at a first step, no unit saturated",
     lambda: [epoch(0, layers=DEEP_SIGMOID, loop={"first_update_ratios": {"fc1.weight": 2.0}})]),
    ("vanishing_gradients", "depth", True, "fc1 seven weight layers below the loss",
     lambda: [epoch(0, layers=DEEP_SIGMOID, loop={"graph": {"depths": {"fc1.weight": 7, "fc2.weight": 6,
                                                                       "fc3.weight": 0}}})]),
    ("vanishing_gradients", "depth", False, "fc1 two layers below it",
     lambda: [epoch(0, layers=DEEP_SIGMOID, loop={"graph": {"depths": {"fc1.weight": 2, "fc2.weight": 1,
                                                                       "fc3.weight": 0}}})]),
    ("saturated", "learning_rate", True, "fc1 moving by half its size per step", lambda: tanh(0.9, 0.5)),
    ("saturated", "learning_rate", False, "fc1 moving by 1e-3 per step", lambda: tanh(0.9, 1e-3)),
    ("saturated", "learning_rate", True, "fc1 moving by half its size per step the epoch before",
     lambda: tanh(0.9, 0.5, 1e-3)),
    ("dead_units", "learning_rate", True, "fc1 moving by half its size per step", lambda: units("relu", 0.8, 0.5)),
    ("dead_units", "learning_rate", False, "fc1 moving by 1e-3 per step", lambda: units("relu", 0.8, 1e-3)),
    ("dead_units", "initialisation", True, "fc1's weights all zero before the first step",
     lambda: units("relu", 0.8, 1e-3, loop=graph(zero_weights=["fc1.weight"]))),
    ("dead_units", "initialisation", False, "another layer's weights zero",
     lambda: units("relu", 0.8, 1e-3, loop=graph(zero_weights=["fc2.weight"]))),
    ("not_learning", "learning_rate", True, "fc still, with gradients that reach it, never fast",
     lambda: slow(1e-3)),
    ("not_learning", "learning_rate", False, "fc still, its gradients vanished", lambda: slow(1e-9)),
    ("not_learning", "learning_rate", False, "fc still after moving by half its size per step",
     lambda: [epoch(0, layers=layers(fc={"update_ratio": 0.5, "grad_rms": 1e-3})), *slow(1e-3, at=1)]),
    ("vanishing_gradients", "clipping", True, "gradients below the floor, every reading's total norm at 1e-3",
     lambda: [epoch(0, layers=TINY, loop={"total_norms": CLIPPED})]),
    ("vanishing_gradients", "clipping", False, "the same gradients, total norms that differ (no clipping)",
     lambda: [epoch(0, layers=TINY, loop={"total_norms": UNCLIPPED})]),
    ("not_learning", "clipping", True, "fc still, every reading's total norm at 1e-3",
     lambda: [epoch(0, layers=layers(fc={"update_ratio": 1e-8, "grad_rms": 1e-3}), loop={"total_norms": CLIPPED})]),
    ("not_learning", "clipping", False, "fc still, norms at 1e-3 under Adam, whose steps do not scale with them",
     lambda: [epoch(0, layers=layers(fc={"update_ratio": 1e-8, "grad_rms": 1e-3}),
                    loop={"total_norms": CLIPPED, "optimizer": "Adam"})]),
    ("not_learning", "clipping", False, "fc still, clipped at 0.25 under norms of 0.5 (steps halved, no more)",
     lambda: [epoch(0, layers=layers(fc={"update_ratio": 1e-8, "grad_rms": 1e-3}),
                    clipping={**CLIPPING, "max_norm": 0.25, "grad_norm_median": 0.5, "grad_norm_p90": 0.8})]),
    ("not_learning", "clipping", True, "fc still, clipped at 0.25 under norms of 5 (steps a twentieth)",
     lambda: [epoch(0, layers=layers(fc={"update_ratio": 1e-8, "grad_rms": 1e-3}),
                    clipping={**CLIPPING, "max_norm": 0.25, "grad_norm_median": 5.0, "grad_norm_p90": 8.0})]),
    ("not_learning", "clipping", False, "fc still, total norms that differ",
     lambda: [epoch(0, layers=layers(fc={"update_ratio": 1e-8, "grad_rms": 1e-3}), loop={"total_norms": UNCLIPPED})]),
    ("exploding_gradients", "learning_rate", True, "a gradient norm 500x its median, fc moving by half its size",
     lambda: epochs(3, total_grad_norm_median=1.0, total_grad_norm_max=[2.0, 2.0, 500.0],
                    layers=layers(fc={"update_ratio": 0.5}))),
    ("exploding_gradients", "learning_rate", False, "the same norm, fc moving by 1e-3 per step (a TD target jumped)",
     lambda: epochs(3, total_grad_norm_median=1.0, total_grad_norm_max=[2.0, 2.0, 500.0],
                    layers=layers(fc={"update_ratio": 1e-3}))),
    ("moving_too_fast", "learning_rate", True, "the loss risen above ln 10",
     lambda: fast([2.3, 3.0, 4.0, 4.0], [4.0] * 4)),
    ("moving_too_fast", "learning_rate", False, "the loss flat below ln 10", lambda: fast([2.2] * 4, [2.2] * 4)),
]  # fmt: skip


@pytest.mark.parametrize("rule, cause, held, what, run", CAUSES, ids=[f"{r}:{c}:{w}" for r, c, _, w, _ in CAUSES])
def test_each_cause_holds_on_its_evidence_and_only_there(rule, cause, held, what, run):
    (finding,) = RULES[rule](run(), Thresholds())
    evidence = finding.evidence
    holding = evidence["causes_held"] if evidence.get("cause") is None else [evidence["cause"]]
    assert (cause in holding) == held, evidence
    if evidence.get("cause") is None:  # no cause named: what to check, in order, those that hold first
        assert finding.suggestion.startswith("check, in this order: ")
    else:
        named = next(c for c in RULES[rule].causes if c.name == evidence["cause"])
        assert evidence["cause_evidence"] and named.suggestion.split("{")[0] in finding.suggestion


def test_every_rule_and_every_checked_cause_has_its_examples():
    for name in RULES:
        kinds = {example.finds for example in EXAMPLES if example.rule == name}
        assert kinds == {True, False}, f"{name} needs a run it finds and a run it leaves alone"
    for name, declaration in RULES.items():
        for cause in declaration.causes:
            if cause.check is _never:  # nothing the monitor reads can check it: told as what to look at
                continue
            held = {h for r, c, h, _, _ in CAUSES if (r, c) == (name, cause.name)}
            assert held == {True, False}, f"{name}:{cause.name} needs a run where it holds and one where it does not"


@pytest.mark.parametrize("rule, kind", [("saturated", "tanh"), ("dead_units", "relu")])
def test_units_at_their_limits_are_a_note_where_the_model_learns_anyway_or_its_loss_cannot_tell(rule, kind):
    def found(**fields):
        (finding,) = RULES[rule](units(kind, 0.9, 1e-3, 1e-3, num_classes=10, **fields), Thresholds())
        return finding

    learns = found(metrics={"train_loss": 0.5, "train_accuracy": 0.9})
    assert learns.harmless and "The model learns on the units left (training loss 0.5" in learns.message
    stays = found(metrics={"train_loss": 2.3, "train_accuracy": 0.1})
    assert not stays.harmless and "learns" not in stays.message
    policy = found(metrics={"train_loss": 2.3, "train_accuracy": 0.1}, loop={"objective": "rl"})
    assert policy.harmless and "cannot show what they cost" in policy.message


def test_weights_growing_without_a_validation_loss_is_a_note_that_says_so():
    (finding,) = RULES["weights_growing"](grow([math.nan] * 5), Thresholds())
    assert finding.harmless and "No validation loss shows whether that costs anything." in finding.message
    (finding,) = RULES["weights_growing"](grow((1.0, 0.9, 1.0, 1.1, 1.2)), Thresholds())
    assert not finding.harmless and "validation" not in finding.message


@pytest.mark.parametrize(
    "ratio, suspect",
    [
        (1e-6, "a larger learning rate"),
        (3e-4, "check, in this order: the learning rate"),
        (1e-2, "check that the labels match"),
    ],
)
def test_stuck_names_its_suspect_by_how_fast_the_weights_move(ratio, suspect):
    """Five epochs at ln 10 and chance (so that the rule finds), the weights moving by `ratio` per step: the rate
    below stuck_moving_ratio, the data at stuck_data_ratio and above, neither between (no claim on the rate)."""
    run = epochs(5, num_classes=10, metrics={"train_loss": 2.3, "train_accuracy": 0.1},
                 layers=layers(fc={"update_ratio": ratio}))  # fmt: skip
    (finding,) = RULES["stuck"](run, Thresholds())
    assert (finding.suggestion or RULES["stuck"].suggestion).startswith(suspect)
    assert RULES["stuck"].way(finding) == (1 if ratio < Thresholds().stuck_moving_ratio else 0)


def test_steps_too_large_are_a_rival_of_the_data_in_a_stuck_run():
    """Five epochs at ln 10 and chance, the weights moving at a learning pace; where fc moved by half its size per step
    in the first epoch, the learning rate is a rival of the labels: what to check, in order, and no cause."""

    def run(first_ratio):
        ratios = [first_ratio, 1e-2, 1e-2, 1e-2, 1e-2]
        return epochs(5, num_classes=10, metrics={"train_loss": 2.3, "train_accuracy": 0.1},
                      layers=[layers(fc={"update_ratio": ratio}) for ratio in ratios])  # fmt: skip

    (fast,) = RULES["stuck"](run(0.5), Thresholds())
    assert fast.evidence["cause"] is None and fast.evidence["fast"] == {"fc.weight": 0.5}
    assert fast.suggestion.startswith("check, in this order: the learning rate") and RULES["stuck"].way(fast) == 0
    (usual,) = RULES["stuck"](run(1e-2), Thresholds())
    assert usual.evidence.get("weights_move") and "fast" not in usual.evidence


def test_heavy_dropout_is_a_rival_of_the_data_and_of_the_initialisation():
    """With dropout at 0.95 in the model, a stuck loss whose weights move does not blame the labels, nor a high first
    loss the initial weights: each says what to check, the dropout rate first, and names no cause."""
    run = epochs(5, num_classes=10, metrics={"train_loss": 2.3, "train_accuracy": 0.1},
                 layers=layers(fc={"update_ratio": 1e-2}), loop={"dropout": [0.5, 0.95]})  # fmt: skip
    (stuck,) = RULES["stuck"](run, Thresholds())
    (high,) = RULES["high_initial_loss"]([epoch(0, num_classes=10, first_loss=50.0, loop={"dropout": [0.95]})],
                                         Thresholds())  # fmt: skip
    for finding in (stuck, high):
        assert finding.evidence["cause"] is None and finding.evidence["dropout"] == 0.95
        assert finding.suggestion.startswith("check, in this order: the dropout rate (0.95")
    assert "labels or the inputs say nothing" not in stuck.message and "far too large" not in high.message
    (usual,) = RULES["stuck"](epochs(5, num_classes=10, metrics={"train_loss": 2.3, "train_accuracy": 0.1},
                                     layers=layers(fc={"update_ratio": 1e-2}), loop={"dropout": [0.5]}),
                              Thresholds())  # fmt: skip
    assert usual.evidence.get("weights_move") and "dropout" not in usual.suggestion


@pytest.mark.parametrize("gain, cause", [(0.6, None), (6.0, "initialisation")])
def test_a_divergence_names_the_initialisation_where_the_weights_started_far_too_large(gain, cause):
    """The loss rose from ln 10 to 5; the loss's graph showed fc.weight's gain (RMS x sqrt(fan-in)) before the first
    step: the learning rate is named at torch.nn's scale, the initialisation far above it, with no claim on the rate."""
    loop = graph(largest_gain={"name": "fc.weight", "gain": gain})
    run = [epoch(0, num_classes=10, losses=windows([2.3, 2.3, 4.0, 5.0, 5.0]), loop=loop)]
    (finding,) = RULES["diverging"](run, Thresholds())
    assert finding.evidence.get("cause") == cause
    if cause is None:
        assert "the learning rate is too high" in finding.message and RULES["diverging"].way(finding) == -1
    else:
        assert "fc.weight: 6 times the square root of its fan-in" in finding.message
        assert "initialise the weights as torch.nn does" in finding.suggestion and RULES["diverging"].way(finding) == 0


def nan_from_the_start(gain=6.0, batch=(-1.0, 1.0), first_loss=math.nan, paces=(1e-3, 2e-3, 0.5), median_gain=0.6):
    """A loss that is NaN from its first batch on (`first_loss`: that batch's loss, before any update), the first
    batch's inputs ranging over `batch`, the loss's graph showing fc.weight's gain and the weights' median gain
    before the first step; three weights' largest update ratios at the first steps, `paces`."""
    nan = windows([math.nan] * 4)
    for window in nan:
        window.update(mean=math.nan, median=math.nan, max=math.nan, max_step=None, nonfinite_step=window["first"])
    inputs = [{"shape": [32, 20], "dtype": "float32", "min": batch[0], "max": batch[1]}]
    loop = graph(largest_gain={"name": "fc.weight", "gain": gain}, inputs=inputs, median_gain=median_gain)
    loop["first_update_ratios"] = dict(zip(("fc1.weight", "fc2.weight", "head.weight"), paces))
    return [epoch(0, num_classes=10, losses=nan, first_loss=first_loss, loop=loop)]


@pytest.mark.parametrize("case, run, cause, words", [
    ("weights far too large", nan_from_the_start(), "initialisation", "fc.weight: 6 times the square root"),
    ("weights at torch.nn's scale", nan_from_the_start(gain=0.6), None, "a log of 0, a division by 0"),
    ("a first batch that holds a NaN", nan_from_the_start(batch=(-1.0, math.nan)), None, "a batch with invalid"),
    ("a first loss that was finite", nan_from_the_start(first_loss=2.3), None, "a batch with invalid"),
    ("a first loss that was finite, after steps that moved most weights by half their size",
     nan_from_the_start(first_loss=2.3, paces=(0.5, 0.6, 0.5)), "absent", "the learning rate is too high"),
    ("the same steps, from weights that started a hundred times smaller than torch.nn's",
     nan_from_the_start(first_loss=2.3, paces=(0.5, 0.6, 0.5), median_gain=0.006), None, "started small"),
])  # fmt: skip
def test_a_loss_nan_before_any_update_on_finite_data_overflowed(case, run, cause, words):
    """A loss NaN at its first batch, before any update could cause it, on a batch of finite values: no learning rate
    nor data is the cause, the forward pass or the loss overflowed; the initialisation is named where the loss's
    graph showed a weight far too large. A NaN in the first batch, or a loss finite at first, leaves the data a
    suspect (a batch with invalid values, or an overflow: no cause named), but where the first steps moved most
    weights by more than a tenth of their size (a head alone is not most): then the learning rate, unless the
    weights started so small that a step of any usual rate moves them that much."""
    (finding,) = RULES["diverging"](run, Thresholds())
    assert finding.evidence.get("cause", "absent") == cause and words in finding.message
    if cause == "initialisation":
        assert finding.suggestion == LARGE_INIT and RULES["diverging"].way(finding) == 0
    elif cause is None and "before any update" in finding.message:
        assert "detect_anomaly" in finding.suggestion and RULES["diverging"].way(finding) == 0
    elif cause is None:
        assert "check the data" in finding.suggestion and RULES["diverging"].way(finding) == 0
    else:
        assert "lower the learning rate" in finding.suggestion and RULES["diverging"].way(finding) == -1


def sgd_rounding(fc1_rms=1e-5, fc2_ratio=5e-7, fc2_rms=1e-3, head=False, **loop):
    """SGD at a rate too low for it: fc1's steps round away, fc2 changes, by `fc2_ratio` of its size per step;
    with `head`, a last layer of gradient RMS 0.1 that moves by 1e-3 per step."""
    rounded = {"fc1.weight": {"dtype": "float32", "unchanged_share": 0.9, "grad_zero_share": 0.0}}
    stats = layers(fc1={"grad_rms": fc1_rms, "grad_norm": 1e-3, "update_ratio": 0.0},
                   fc2={"grad_rms": fc2_rms, "grad_norm": 0.1, "update_ratio": fc2_ratio})  # fmt: skip
    if head:
        stats.update(layers(fc3={"grad_rms": 0.1, "grad_norm": 1.0, "update_ratio": 1e-3}))
    return [epoch(0, layers=stats, loop={"rounded": rounded, "optimizer": "SGD", **loop})]


@pytest.mark.parametrize(
    "what, run, cause",
    [
        ("the other weights move by less than update_slow too", sgd_rounding(), "learning_rate"),
        ("the other weights move at a usual pace", sgd_rounding(fc2_ratio=1e-3), None),
        ("one barely moves, with a gradient like the head's", sgd_rounding(fc2_rms=0.01, head=True), "learning_rate"),
        ("the one that barely moves has small gradients too", sgd_rounding(fc2_rms=1e-4, head=True), None),
        ("the rounded weights' gradients below the floor", sgd_rounding(fc1_rms=1e-9), None),
        ("a weight that started far too large", sgd_rounding(graph={"largest_gain": GAIN_6}), None),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_steps_rounded_away_name_the_rate_only_where_every_weight_moves_too_slowly(what, run, cause):
    """Where other parameters do change, a learning rate too low is named only where some of them barely move too
    though their gradients are not small, with gradients that reach the weights whose steps are lost (vanishing ones
    would be the cause otherwise), and no weight started far too large (its spacing would be)."""
    (finding,) = RULES["updates_rounded_away"](run, Thresholds())
    assert finding.evidence["cause"] == cause, finding.message
    assert ("too low for this optimizer" in finding.message) == (cause is not None)


def test_a_stuck_model_mostly_frozen_reads_the_pace_of_what_trains_and_names_no_cause():
    """Five epochs at ln 10 and chance; three of four weight tensors frozen (their update ratio 0), the head moving at
    a learning pace: the frozen ones' ratio is not the model's pace (the rate is not named for them), and the frozen
    part rivals the data as the cause: what to check, the frozen layers first, and no cause. With one frozen tensor
    of four, the data are named as before."""

    def run(frozen):
        still = {name: {"update_ratio": 0.0} for name in frozen}
        return epochs(5, num_classes=10, metrics={"train_loss": 2.3, "train_accuracy": 0.1},
                      layers=layers(**still, head={"update_ratio": 1e-2}),
                      loop={"frozen": [f"{name}.weight" for name in frozen], "trainable": 4 - len(frozen)})  # fmt: skip

    (mostly,) = RULES["stuck"](run(["conv1", "conv2", "conv3"]), Thresholds())
    assert mostly.evidence["cause"] is None and mostly.evidence["update_ratio"] == 1e-2
    assert mostly.evidence["frozen"] == 3 and mostly.suggestion.startswith("check, in this order: that the frozen")
    assert RULES["stuck"].way(mostly) == 0
    (some,) = RULES["stuck"](run(["conv1"]), Thresholds())
    assert some.evidence.get("weights_move") and "frozen" not in some.evidence


@pytest.mark.parametrize("frozen, cause", [([], "clipping"), (["c1.weight", "c2.weight", "c3.weight"], None)])
def test_mostly_clipped_reads_the_pace_of_the_weights_that_train(frozen, cause):
    """Clipping most steps, the loss flat; three weights still (update ratio 0) and the head moving by 1e-2 a step:
    where the three train, the median pace is 0 and the threshold is named for keeping the steps too small; where
    they are frozen, their stillness says nothing of the clipping, and the pace read is the head's."""
    run = epochs(2, lr=0.1, first_loss=2.0, metrics={"train_loss": 2.1},
                 loop={"total_norms": CLIPPED[:4], "frozen": frozen},
                 layers=layers(c1={"update_ratio": 0.0}, c2={"update_ratio": 0.0}, c3={"update_ratio": 0.0},
                               fc={"update_ratio": 1e-2}))  # fmt: skip
    (finding,) = RULES["mostly_clipped"](run, Thresholds())
    assert finding.evidence.get("cause") == cause
    assert ("too small to learn" in finding.message) == (cause == "clipping")
