"""When each rule fires: `Thresholds`, one field per number a rule compares against, which users set
by name (`--threshold NAME=VALUE`, `threshold_override`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Thresholds:
    """When each rule fires (README's table says the same). The fields keep the order in which
    they were added, so that positional arguments keep their meaning."""

    # vanishing_gradients: the first weight layer's gradient RMS is below vanishing_ratio of the
    # last one's, or a weight layer's gradient RMS is below vanishing_floor
    vanishing_ratio: float = 1e-2
    vanishing_floor: float = 1e-7
    # exploding_gradients: the total gradient norm exceeds this multiple of its earlier median
    exploding_factor: float = 100.0
    # mostly_clipped: gradient clipping scaled down more than this share of an epoch's steps
    clipped_share: float = 0.5
    # weights_growing: max |w| above weight_max_abs, at least weight_growth times its value after
    # the first epoch, and still growing over weight_window epochs (the tutorial: 0.3, then 0.6)
    weight_max_abs: float = 1.0
    weight_growth: float = 2.0
    weight_window: int = 3
    # output_bias_skew: an output bias bias_z robust standard deviations (1.4826 MAD) from the
    # median, and at least bias_min_deviation from it
    bias_z: float = 3.5
    bias_min_deviation: float = 1.0
    # not_learning: a layer's median update-to-weight ratio ||dw|| / ||w|| is below update_slow;
    # moving_too_fast: it is above update_fast (about 1e-3 is typical of healthy training)
    update_slow: float = 1e-6
    update_fast: float = 1e-1
    # high_initial_loss: the first training loss is above this multiple of ln C
    initial_loss_factor: float = 3.0
    # diverging: the training loss rises above this multiple of its first value
    diverging_factor: float = 1.5
    # dead_units: this share of a ReLU's units gave no positive output at any statistics step of
    # the epoch
    dead_share: float = 0.5
    # saturated: this share of a sigmoid's or tanh's outputs are within 1% of their limits
    saturated_share: float = 0.5
    # stuck: the training loss stays above stuck_loss x ln C (C classes) and the accuracy within
    # chance_margin of chance (1 / C) for stuck_epochs epochs in a row; with the weights moving
    # slower than stuck_moving_ratio (median update ratio), the lr is named; at stuck_data_ratio or
    # faster (a pace that trains models), the data are suspect; between the two, neither; a run
    # that ended in fewer epochs is stuck where it took stuck_steps optimizer steps or more and its
    # loss stayed above stuck_loss x ln C (C from the classes given or the cross-entropy's input)
    stuck_loss: float = 0.9
    chance_margin: float = 0.1
    stuck_epochs: int = 5
    stuck_steps: int = 256
    stuck_moving_ratio: float = 1e-4
    stuck_data_ratio: float = 1e-3
    # no_generalisation: the training accuracy generalisation_gap above chance, the validation
    # accuracy within chance_margin of it
    generalisation_gap: float = 0.3
    # overfitting: the training accuracy overfit_gap further above the validation accuracy than at
    # the best validation loss, which the validation loss now exceeds by overfit_rise
    overfit_gap: float = 0.05
    overfit_rise: float = 0.1
    # oscillating: over the last oscillation_epochs epochs the training loss went up and down by
    # oscillation_amplitude of its level, without falling
    oscillation_epochs: int = 6
    oscillation_amplitude: float = 0.2
    # overfitting: the validation loss overfit_rise above its best for overfit_epochs epochs in a
    # row
    overfit_epochs: int = 3
    # lr_collapsed: the learning rate fell below lr_collapse of its peak within the first epoch and
    # stayed there
    lr_collapse: float = 0.01
    # unshuffled: at least this share of a batch's rows had the same top class
    uniform_batch: float = 0.9
    # noisy_labels: the training accuracy below the validation accuracy of the epoch before by
    # noisy_gap, for noisy_epochs epochs in a row
    noisy_gap: float = 0.15
    noisy_epochs: int = 3
    # strong_weight_decay: the decayed weights' norm below half its first value while the loss
    # stayed above stuck_loss x an untrained model's for decay_epochs epochs; where the loss cannot
    # tell (RL, GAN, other), below decay_shrunk of it for those epochs
    decay_epochs: int = 3
    decay_shrunk: float = 0.1
    # not_cross_entropy: the training loss below ce_bound x the least cross-entropy allows at the
    # training accuracy ((1 - accuracy) x ln 2); a quarter leaves room for focal losses and a loss
    # divided by up to 4 accumulation steps
    ce_bound: float = 0.25
    # loss_spikes: a loss window's highest loss above spike_factor x the median of the highest of
    # the SPIKE_BASELINE windows before, and above it by spike_rise x an untrained model's loss,
    # from a level below stuck_loss x that; back once a window's highest is within half that rise
    spike_factor: float = 1.5
    spike_rise: float = 0.2

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def replace(self, overrides: Mapping[str, Any]) -> Thresholds:
        """A copy with {name: value} overrides; unknown names raise ValueError listing the known
        ones."""
        values = asdict(self)
        for name, value in overrides.items():
            if name not in values:
                raise ValueError(f"unknown threshold '{name}'; known: {', '.join(self.names())}")
            values[name] = type(values[name])(value)
        return Thresholds(**values)


def threshold_override(text: str) -> tuple[str, float]:
    """argparse type for --threshold NAME=VALUE (train.py and diagnose.py): a known name and a
    number."""
    name, sep, value = text.partition("=")
    known = Thresholds.names()
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown threshold '{name}'; known: {', '.join(known)}")
    try:
        if not sep:
            raise ValueError
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=VALUE with a number, got '{text}'"
        ) from None
    whole = isinstance(getattr(Thresholds(), name), int)  # a count of epochs or readings
    if not math.isfinite(number) or (whole and not (number.is_integer() and number >= 0)):
        what = "a whole number, 0 or more" if whole else "a finite number"
        raise argparse.ArgumentTypeError(f"{name} must be {what}, got '{value}'")
    return name, number
