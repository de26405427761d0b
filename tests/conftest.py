import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent

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
    accumulator = EventAccumulator(
        str(run_dir), size_guidance={"histograms": 0, "scalars": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks():
    """[(file name, the heading above it, its code)] of every ```python block in README.md and docs/*.md: the
    snippets that run as printed (an excerpt that does not run alone is marked ```py)."""
    blocks = []
    for path in DOCUMENTS:
        heading, code = None, None
        for line in path.read_text().splitlines(keepends=True):
            stripped = line.strip()
            if code is not None:
                if stripped == "```":
                    blocks.append((path.name, heading, textwrap.dedent("".join(code))))
                    code = None
                else:
                    code.append(line)
            elif stripped == "```python":
                code = []
            elif line.startswith("#"):
                heading = line.rstrip("\n")
    return blocks


def readme_python(heading, index=0):
    """The Python block `index` under `heading` (a heading line of README.md or docs/*.md, as written), as printed."""
    found = [code for _, above, code in python_blocks() if above == heading]
    assert len(found) > index, f"no Python block {index} under {heading!r} in README.md or docs/"
    return found[index]


def histogram_steps(accumulator):
    return {tag: [event.step for event in accumulator.Histograms(tag)] for tag in accumulator.Tags()["histograms"]}


def run_script(*args, cwd=ROOT, env_extra=None, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    if "PYTHONPATH" in (env_extra or {}) and os.environ.get("PYTHONPATH"):  # add to it, do not replace it
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar_batches(folder, per_batch=6, test_size=10, seed=0):
    """The official CIFAR-10 python layout (pickled dicts with bytes keys, as the archive holds them) in
    folder/cifar-10-batches-py; returns {batch name: (images as N x 32 x 32 x 3, labels)}."""
    import pickle

    rng = np.random.default_rng(seed)
    root = Path(folder) / "cifar-10-batches-py"
    root.mkdir(parents=True)
    made = {}
    for name, size in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_size)]:
        data = rng.integers(0, 256, (size, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(size)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        made[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root, made


def make_cifar_archive(folder, **kwargs):
    """cifar-10-python.tar.gz in folder, holding what make_cifar_batches makes."""
    import tarfile

    root, made = make_cifar_batches(Path(folder) / "unpacked", **kwargs)
    archive = Path(folder) / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    return archive, made


@pytest.fixture(autouse=True)
def no_monitor_failures(request, tmp_path):
    """The monitor reports its own failures and lets training go on; in the tests, none may happen unnoticed."""
    yield
    if not request.node.get_closest_marker("monitor_failures"):
        logs = list(tmp_path.rglob("gradwatch-errors.log"))
        assert not logs, logs[0].read_text()
