import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = ["plane", "car", "bird", "cat"]


def make_data(folder, per_class=6, valid_per_class=2, seed=0):
    """A tiny 4-class image set in the list format: one class folder has a space in its name,
    and one line of train.txt uses an absolute path."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for split, count in (("train", per_class), ("valid", valid_per_class)):
        lines = []
        for label, name in enumerate(CLASSES):
            subdir = folder / split / (name if label else "class one")
            subdir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                pixels[:, :, label % 3] += np.uint8(120 + 40 * (label // 3))  # a class-coloured image
                path = subdir / f"img {i}.png"
                Image.fromarray(pixels).save(path)
                rel = path.relative_to(folder).as_posix()
                lines.append(f"{path if (split, label, i) == ('train', 1, 0) else rel} {label}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return folder


@pytest.fixture
def data_dir(tmp_path):
    return make_data(tmp_path / "Data")


def load_events(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0, "images": 0,
                                                                 "tensors": 0})
    accumulator.Reload()
    return accumulator


def histogram_steps(accumulator):
    return {tag: [event.step for event in accumulator.Histograms(tag)] for tag in accumulator.Tags()["histograms"]}


def run_script(*args, cwd=ROOT, env_extra=None, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)
