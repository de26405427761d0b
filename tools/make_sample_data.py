"""Regenerate the sample data set in Data/ from scikit-learn's bundled digits.

    pip install scikit-learn
    python tools/make_sample_data.py            # writes Data/ (refuses to overwrite)
    python tools/make_sample_data.py --force    # rewrite it

The 1,797 8x8 digit images (16 grey levels) become 32x32 RGB PNGs, white ink on
black (the digit 24x24 in a 4-pixel margin), under Data/<split>/<class>/<index>.png, with a stratified, seeded split
and the lists train.txt / valid.txt ("path label", paths relative to Data/) and
classes.txt. scikit-learn is needed only here, never at training time.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def stratified_split(labels, valid_fraction, seed):
    """Return (train_indices, valid_indices), the same fraction of every class in valid."""
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_valid = round(len(idx) * valid_fraction)
        valid.extend(idx[:n_valid])
        train.extend(idx[n_valid:])
    return sorted(train), sorted(valid)


def to_png(image8x8):
    """16 grey levels at 8x8 -> 8-bit RGB at 32x32: the digit smoothly scaled to 24x24 and centred
    with a 4-pixel black margin, as MNIST centres its digits, so that random crops do not cut strokes."""
    grey = Image.fromarray(np.round(image8x8 * (255 / 16)).astype(np.uint8), mode="L")
    canvas = Image.new("L", (32, 32))
    canvas.paste(grey.resize((24, 24), Image.Resampling.BICUBIC), (4, 4))
    return canvas.convert("RGB")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "Data")
    parser.add_argument("--valid-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()

    from sklearn.datasets import load_digits  # development-only dependency

    if (args.out / "train.txt").exists() and not args.force:
        parser.error(f"{args.out} already holds a data set; add --force to rewrite it")
    for split in ("train", "valid"):
        shutil.rmtree(args.out / split, ignore_errors=True)

    digits = load_digits()
    classes = [str(c) for c in digits.target_names]
    splits = dict(zip(("train", "valid"), stratified_split(digits.target, args.valid_fraction, args.seed)))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, indices in splits.items():
        lines = []
        for i in indices:
            label = int(digits.target[i])
            rel = Path(split) / classes[label] / f"{i:04d}.png"
            (args.out / rel).parent.mkdir(parents=True, exist_ok=True)
            to_png(digits.images[i]).save(args.out / rel, optimize=True)
            lines.append(f"{rel.as_posix()} {label}\n")
        (args.out / f"{split}.txt").write_text("".join(lines))
        print(f"{split}: {len(indices)} images")
    (args.out / "classes.txt").write_text("".join(c + "\n" for c in classes))


if __name__ == "__main__":
    main()
