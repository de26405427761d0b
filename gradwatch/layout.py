"""What TensorBoard opens on: the Custom Scalars tab's charts, and the order of the sections.

TensorBoard's Time Series and Scalars tabs sort their sections (a tag's part before the first "/")
by name, digits first, then capitals, then lower case. The per-layer statistics are one section per
statistic in lower case (`grad_norm/<layer>`, `update_ratio/<layer>`, ...), so that curves logged
under a capital (train.py's `Accuracy/valid`, `Loss/train`, `Optimizer/learning rate`: the Scalars
tab opens its first two sections) come before them, and before the tutorial's `<name>_data` /
`<name>_grad` histograms of lower-case layer names.

The Custom Scalars tab gets the few charts a practitioner opens first, the curves by epoch and the
gradients by optimizer step, whatever the loop calls its curves: the tags the diagnosis reads.
"""

from __future__ import annotations

import re

from .diagnosis import METRIC_TAGS

# the tags under which loops log the learning rate: train.py's, Hugging Face's, Lightning's
# LearningRateMonitor (`lr-SGD`, `lr-AdamW/pg1`), and plain ones
LR_TAGS = ("Optimizer/learning rate", "train/lr", "lr", "learning_rate", "train/learning_rate")


def exactly(tags: tuple[str, ...], also: str = "") -> str:
    """A regular expression that matches each of `tags` whole (and `also`)."""
    choices = [re.escape(tag) for tag in tags] + ([also] if also else [])
    return f"^({'|'.join(choices)})$"


def custom_scalars() -> dict:
    """The Custom Scalars layout: {category: {chart: ["Multiline", [regex]]}}. The per-step `loss`
    of the monitor's <run>/steps is left out of the loss chart, whose x axis counts epochs."""
    curves = {
        name: [key for key in METRIC_TAGS if key.endswith(kind)]
        for name, kind in (("loss", "_loss"), ("accuracy", "_accuracy"))
    }
    tags = {
        name: tuple(t for key in keys for t in METRIC_TAGS[key] if t != "loss")
        for name, keys in curves.items()
    }
    return {
        "Curves, by epoch": {
            # one colour per run in this tab: the titles say which lines a chart holds, and its
            # "Matches" list gives each one's symbol and tag
            "loss: train and valid": ["Multiline", [exactly(tags["loss"])]],
            "accuracy: train and valid": ["Multiline", [exactly(tags["accuracy"])]],
            "learning rate": ["Multiline", [exactly(LR_TAGS, also="lr-.*")]],
        },
        "Gradients, by optimizer step": {
            "total gradient norm": ["Multiline", ["^grad_norm/total$"]],
            "update ratio: the fastest and the slowest layer": [
                "Multiline",
                ["^update_ratio/(max|min)$"],
            ],
            "dead share: the most silent ReLU": ["Multiline", ["^dead_share/max$"]],
        },
    }
