"""Turn image sets into the list format train.py reads ("path label" lines, classes.txt).

    python prepare_data.py cifar10 --archive cifar-10-python.tar.gz --out cifar10   # official archive -> PNGs
    python prepare_data.py cifar10 --download --out cifar10                         # fetch it first (internet)
    python prepare_data.py folder photos/ --out photos-lists                        # photos/<class>/*.jpg
    python prepare_data.py stats cifar10                                            # mean/std -> stats.json
    python train.py --data cifar10

Every output folder gets train.txt, valid.txt, test.txt and classes.txt; paths in a list are
relative to the list's folder. An existing output is never overwritten without --force.
"""

import argparse
import io
import json
import os
import pickle
import random
import shutil
import signal
import sys
import tarfile
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the libraries load (seconds) ends quietly; main() restores KeyboardInterrupt
    # os._exit, not an exception: one raised inside torch's import can surface in its C++ code and abort
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import check_images, process_pool
from utils import DataListError, read_image_list

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
OUTPUT_FILES = ("train.txt", "valid.txt", "test.txt", "classes.txt")


class PrepareError(Exception):
    """Bad input or an output in the way; the message says what to do."""


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's python batches hold: dicts, lists, bytes, numbers and numpy arrays. Any other
    global (a function a crafted archive would have called while it loads) is refused before it runs."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}  # fmt: skip

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}, which CIFAR-10 batches never hold")
        if name == "_reconstruct":  # the archive names numpy 1's module; numpy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
        return super().find_class(module, name)


def _unpickle(data, name):
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
        return {_text(key): value for key, value in batch.items()}
    except Exception as err:  # any failure to unpickle means a damaged (or crafted) file
        raise PrepareError(f"{name}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None


def read_cifar10(archive):
    """{'train': (images, labels), 'test': (images, labels)} and the class names, from the official python
    archive (cifar-10-python.tar.gz) or the folder cifar-10-batches-py unpacked from it.
    Images are uint8 arrays (N, 32, 32, 3), exactly the archive's pixels."""
    archive = Path(archive)
    raw = {}
    try:
        if archive.is_dir():
            for name in CIFAR10_FILES:
                raw[name] = (archive / name).read_bytes()
        else:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if name in CIFAR10_FILES and member.isfile():
                        raw[name] = tar.extractfile(member).read()
    except FileNotFoundError as err:
        what = f"{err.strerror.lower()} ({Path(err.filename).name})"
        raise PrepareError(
            f"{archive}: {what}; pass cifar-10-python.tar.gz or the cifar-10-batches-py folder"
        ) from None
    except (tarfile.TarError, EOFError, OSError) as err:
        again = "download cifar-10-python.tar.gz again or use --download"
        raise PrepareError(f"{archive}: truncated or not a tar archive ({err}); {again}") from None
    missing = [name for name in CIFAR10_FILES if name not in raw]
    if missing:
        raise PrepareError(f"{archive}: no {', '.join(missing)} inside; is it the CIFAR-10 *python* archive?")

    meta = _unpickle(raw["batches.meta"], "batches.meta")
    classes = [_text(name) for name in meta.get("label_names", [])]
    if len(classes) != 10:
        raise PrepareError(f"{archive}: batches.meta holds {len(classes)} label names, not CIFAR-10's 10")
    splits = {}
    for split, names in (("train", CIFAR10_FILES[:5]), ("test", ["test_batch"])):
        images, labels = [], []
        for name in names:
            batch = _unpickle(raw[name], name)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                batch_labels = np.asarray(batch["labels"], dtype=np.int64)
            except (KeyError, ValueError) as err:
                raise PrepareError(f"{archive}: {name} is malformed ({type(err).__name__}: {err})") from None
            if len(batch_labels) != len(data) or not ((0 <= batch_labels) & (batch_labels < 10)).all():
                counts = f"{len(data)} images but {len(batch_labels)} labels"
                raise PrepareError(f"{archive}: {name} has {counts} or labels outside 0..9")
            images.append(data)
            labels.append(batch_labels)
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits, classes


def _quotas(sizes, fraction):
    """Per-class counts for a fraction: the same share of every class, summing to round(total * fraction)
    (largest remainders get the leftover images)."""
    exact = {label: size * fraction for label, size in sizes.items()}
    counts = {label: int(value) for label, value in exact.items()}
    leftover = round(sum(sizes.values()) * fraction) - sum(counts.values())
    for label in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[: max(leftover, 0)]:
        counts[label] += 1
    return counts


def stratified_split(labels, fractions, seed):
    """Indices per part for {part: fraction} (the rest goes to the first part), the same share of each class."""
    rng = random.Random(seed)
    members = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    sizes = {label: len(indices) for label, indices in members.items()}
    quotas = {name: _quotas(sizes, fraction) for name, fraction in list(fractions.items())[1:]}
    parts = {name: [] for name in fractions}
    first = next(iter(fractions))
    for label in sorted(members):
        shuffled = members[label][:]
        rng.shuffle(shuffled)
        start = 0
        for name in quotas:
            parts[name] += shuffled[start : start + quotas[name][label]]
            start += quotas[name][label]
        parts[first] += shuffled[start:]
    return {name: sorted(indices) for name, indices in parts.items()}


def check_output(out, force, names=OUTPUT_FILES):
    existing = [name for name in names if (Path(out) / name).exists()]
    if existing and not force:
        raise PrepareError(f"{out} already holds {', '.join(existing)}; add --force to replace them")


def write_lists(out, lists, classes):
    """lists: {split: [(path relative to out, label)]}; writes <split>.txt and classes.txt."""
    out = Path(out)
    for split, rows in lists.items():
        (out / f"{split}.txt").write_text("".join(f"{path} {label}\n" for path, label in rows))
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in classes))


def _save_pngs(job):
    images, paths = job
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path, compress_level=1)
    return len(paths)


def save_images(images, paths, workers, desc):
    """Write uint8 HWC images as PNGs, in parallel, with a progress bar."""
    for folder in {Path(p).parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [(images[i : i + chunk], paths[i : i + chunk]) for i in range(0, len(paths), chunk)]
    with (
        process_pool(workers) as pool,
        tqdm(total=len(paths), desc=desc, unit="img", disable=not sys.stderr.isatty()) as progress,
    ):
        for done in pool.map(_save_pngs, jobs):
            progress.update(done)


def download_cifar10(root):
    """Fetch the archive into root with torchvision, checking its MD5; returns its path."""
    from torchvision.datasets.utils import download_url

    try:
        download_url(CIFAR10_URL, str(root), "cifar-10-python.tar.gz", CIFAR10_MD5)
    except (OSError, RuntimeError) as err:
        elsewhere = "fetch cifar-10-python.tar.gz elsewhere and pass --archive PATH"
        raise PrepareError(
            f"could not download {CIFAR10_URL} ({err}); this machine may have no internet: {elsewhere}"
        ) from None
    return Path(root) / "cifar-10-python.tar.gz"


def prepare_cifar10(args):
    check_output(args.out, args.force)
    if args.download:
        args.out.mkdir(parents=True, exist_ok=True)
        args.archive = download_cifar10(args.out)
    elif args.archive is None:
        raise PrepareError("pass --archive PATH (cifar-10-python.tar.gz or cifar-10-batches-py) or --download")
    splits, classes = read_cifar10(args.archive)
    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]
    held = stratified_split(train_labels.tolist(), {"train": 1.0, "valid": args.train_to_valid}, args.seed)
    parts = stratified_split(test_labels.tolist(), {"test": 1.0, "valid": args.valid_fraction}, args.seed)
    valid_images = np.concatenate([train_images[held["valid"]], test_images[parts["valid"]]])
    valid_labels = np.concatenate([train_labels[held["valid"]], test_labels[parts["valid"]]])
    sources = {
        "train": (train_images[held["train"]], train_labels[held["train"]]),
        "valid": (valid_images, valid_labels),
        "test": (test_images[parts["test"]], test_labels[parts["test"]]),
    }
    lists = {}
    for split, (images, labels) in sources.items():
        if args.force:
            shutil.rmtree(args.out / split, ignore_errors=True)
        rows = [(f"{split}/{classes[label]}/{i:05d}.png", int(label)) for i, label in enumerate(labels)]
        save_images(images, [str(args.out / path) for path, _ in rows], args.workers, split)
        lists[split] = rows
    write_lists(args.out, lists, classes)
    return {split: len(rows) for split, rows in lists.items()}


def find_images(src):
    """{class: [image paths]} from src/<class>/... (searched recursively), and the count of skipped files."""
    src = Path(src)
    if not src.is_dir():
        raise PrepareError(f"{src}: folder not found; pass a folder with one sub-folder per class")
    classes = {}
    skipped = sum(1 for p in src.iterdir() if p.is_file())  # files beside the class folders belong to no class
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        images = []
        for root, dirs, files in os.walk(class_dir):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(Path(root) / name)
                else:
                    skipped += 1
        if not images:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise PrepareError(f"{class_dir}: class folder without images ({kinds}); add images or remove the folder")
        classes[class_dir.name] = images
    if not classes:
        raise PrepareError(f"{src}: no class folders; expected {src}/<class>/<image> as for ImageFolder")
    return classes, skipped


def prepare_folder(args):
    check_output(args.out, args.force)
    if args.valid + args.test >= 1:
        raise PrepareError(f"--valid {args.valid} and --test {args.test} leave nothing to train on")
    found, skipped = find_images(args.src)
    classes = list(found)
    paths = [path for name in classes for path in found[name]]
    labels = [label for label, name in enumerate(classes) for _ in found[name]]
    parts = stratified_split(labels, {"train": 1.0, "valid": args.valid, "test": args.test}, args.seed)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    lists = {}
    for split, indices in parts.items():
        rows = []
        for i in indices:
            path = paths[i]
            if args.copy:
                target = out / split / classes[labels[i]] / path.relative_to(args.src / classes[labels[i]])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                path = target
            rows.append((os.path.relpath(path.resolve(), out), labels[i]))
        lists[split] = rows
    write_lists(args.out, lists, classes)
    counts = {split: len(rows) for split, rows in lists.items()}
    counts["skipped (not images)"] = skipped
    return counts


def compute_stats(data_dir, workers=4):
    """Exact per-channel mean and std, in [0, 1], of the training images as train.py sees them (32x32)."""
    samples = read_image_list(Path(data_dir) / "train.txt")
    images = check_images(samples, size=32, workers=workers).numpy()
    values = images.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64) / 255
    mean, std = values.mean(axis=1).tolist(), values.std(axis=1).tolist()
    return {"mean": mean, "std": std, "images": len(samples), "source": "train.txt"}


def prepare_stats(args):
    check_output(args.dir, args.force, names=("stats.json",))
    stats = compute_stats(args.dir, args.workers)
    (args.dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="command", required=True)
    workers = min(4, os.cpu_count() or 1)

    def command(name, help):
        return commands.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    cifar = command("cifar10", "convert the CIFAR-10 python archive to PNGs and lists")
    cifar.add_argument("--archive", type=Path, help="cifar-10-python.tar.gz or the cifar-10-batches-py folder")
    cifar.add_argument("--download", action="store_true", help="download the archive (checks its MD5) into --out")
    cifar.add_argument("--out", type=Path, required=True, help="output folder")
    cifar.add_argument("--valid-fraction", type=fraction, default=0.5, help="share of the test images for valid")
    cifar.add_argument("--train-to-valid", type=fraction, default=0.0, help="share of the training images for valid")
    cifar.add_argument("--seed", type=int, default=0, help="seeds the splits")
    cifar.add_argument("--workers", type=int, default=workers, help="processes writing PNGs")
    cifar.add_argument("--force", action="store_true", help="replace an existing output")

    folder = command("folder", "list a class-per-folder image tree (ImageFolder layout)")
    folder.add_argument("src", type=Path, help="folder with one sub-folder of images per class")
    folder.add_argument("--out", type=Path, required=True, help="output folder for the lists")
    folder.add_argument("--valid", type=fraction, default=0.1, help="share of each class for valid")
    folder.add_argument("--test", type=fraction, default=0.1, help="share of each class for test")
    folder.add_argument("--seed", type=int, default=0, help="seeds the split")
    folder.add_argument("--copy", action="store_true", help="copy the images under --out instead of listing them")
    folder.add_argument("--force", action="store_true", help="replace existing lists")

    stats = command("stats", "per-channel mean and std of a data folder's training images")
    stats.add_argument("dir", type=Path, help="data folder holding train.txt")
    stats.add_argument("--workers", type=int, default=workers, help="decoding threads")
    stats.add_argument("--force", action="store_true", help="replace an existing stats.json")
    return parser


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "cifar10":
            counts = prepare_cifar10(args)
        elif args.command == "folder":
            counts = prepare_folder(args)
        else:
            stats = prepare_stats(args)
            mean, std = ([round(v, 4) for v in stats[key]] for key in ("mean", "std"))
            print(f"{args.dir / 'stats.json'}: mean {mean}, std {std} over {stats['images']} training images")
            return 0
    except (PrepareError, DataListError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        unfinished = f"{args.out} is unfinished (its lists are written last, so nothing reads it yet)"
        if args.command == "stats":
            unfinished = f"{args.dir / 'stats.json'} was not written"
        print(f"Stopped: {unfinished}; run the same command again to finish it", file=sys.stderr)
        return 130
    summary = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"{args.out}: {summary}. Next: python prepare_data.py stats {args.out} && python train.py --data {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
