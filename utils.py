"""The tutorial's building blocks, kept callable exactly as Chapter 4.4 calls them:

    from utils import MyDataset, validate, show_confMat, Net

    net = Net()                 # Net(num_classes=...) for other data sets
    net.initialize_weights()
    train_data = MyDataset(txt_path="Data/train.txt", transform=train_transform)
    conf_mat, accuracy = validate(net, valid_loader, "valid", classes_name)
    show_confMat(conf_mat, classes_name, "valid", out_dir)

A list file holds one "path label" line per image. A path may contain spaces (the
label is the last word); a relative path is relative to the list file's folder.
"""
import functools
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from pictures import BLACK, WHITE, Picture, font, shade_levels, text_mask


class DataListError(ValueError):
    """A list file or an image it names is unusable. The message names the file, the line and the fix."""


class ImageReadError(OSError):
    """An image could not be decoded while training. The message names its path."""


def read_classes(path):
    """Class names, one per line of `path` (line i names label i)."""
    path = Path(path)
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    for number, name in enumerate(names, start=1):
        if not name:
            raise DataListError(f"{path}:{number}: empty class name; write one class name per line")
    if not names:
        raise DataListError(f"{path}: no class names; write one class name per line, or delete the file")
    return names


def read_image_list(txt_path, num_classes=None):
    """Parse a "path label" list into [(absolute path, label)], checking every line.

    Relative paths resolve against the list file's folder. Raises DataListError naming
    the file and line of the first problem; images are checked by check_images.
    """
    txt_path = Path(txt_path)
    if not txt_path.is_file():
        raise DataListError(f"{txt_path}: list file not found; it should hold one 'path label' line per image "
                            f"(python prepare_data.py makes one from CIFAR-10 or a folder of images)")
    root = txt_path.resolve().parent
    samples = []
    with open(txt_path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{txt_path}:{number}"
            words = line.rsplit(maxsplit=1)
            if len(words) < 2:
                raise DataListError(f"{where}: no label after '{line}'; write 'path label', e.g. 'train/cat/1.png 3'")
            name, label_text = words
            try:
                label = int(label_text)
            except ValueError:
                raise DataListError(f"{where}: label '{label_text}' is not an integer; "
                                    f"write 'path label' with an integer label") from None
            if label < 0:
                raise DataListError(f"{where}: label {label} is negative; labels run from 0 to N-1 for N classes")
            if num_classes is not None and label >= num_classes:
                raise DataListError(f"{where}: label {label} is out of range ({num_classes} classes); "
                                    f"use 0 to {num_classes - 1} or add the class to classes.txt")
            samples.append((str(root / name), label, where))
    if not samples:
        raise DataListError(f"{txt_path}: the list is empty; add one 'path label' line per image")
    return samples


def _decode(sample, size):
    path, _, where = sample
    if not os.path.isfile(path):
        return f"{where}: image '{path}' not found; fix the path or remove the line", None
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{where}: cannot read image '{path}' ({err}); replace the file or remove the line", None
    if size is None:
        return None, None
    if img.size != (size, size):  # most data sets are already the network's size: skip the no-op resize
        img = TF.center_crop(TF.resize(img, size), size)
    return None, np.asarray(img).transpose(2, 0, 1)


def _decode_chunk(chunk, size):
    return [_decode(sample, size) for sample in chunk]


def ignore_sigint(*_):
    """In a worker process: Ctrl-C reaches every process of the terminal's group; only the main one decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def process_pool(workers):
    """A ProcessPoolExecutor whose workers ignore Ctrl-C and whose queued work is dropped, not waited for,
    when the caller stops early (an error in the input, or Ctrl-C): only the chunks already running finish."""
    pool = ProcessPoolExecutor(workers, initializer=ignore_sigint)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def check_images(samples, size=None, workers=None):
    """Decode every image once, raising DataListError for the first (in list order) that fails.

    With `size`, also return them as one uint8 tensor (N, 3, size, size), each resized so
    its short side is `size` and centre-cropped: the decoded-once cache of a data set.
    Small images decode faster in one thread than in several (PIL holds the GIL for most of
    the work), so large lists are spread over processes instead, in chunks.
    """
    chunk = 2000
    chunks = [samples[i:i + chunk] for i in range(0, len(samples), chunk)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    progress = tqdm(total=len(samples), desc="Checking images", unit="img", leave=False,
                    disable=len(samples) < 5000 or not sys.stderr.isatty())
    images = []
    with progress, (process_pool(workers) if workers > 1 else nullcontext()) as pool:
        results = pool.map(_decode_chunk, chunks, [size] * len(chunks)) if pool else \
            (_decode_chunk(c, size) for c in chunks)
        for decoded in results:
            for problem, array in decoded:
                if problem:
                    raise DataListError(problem)
                images.append(array)
            progress.update(len(decoded))
    return torch.from_numpy(np.stack(images)) if size is not None else None


def load_image(path):
    """Open an image as RGB; an unreadable file raises ImageReadError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot read image ({err}); replace the file or remove it from the list, "
                             f"then resume the run") from None


class MyDataset(Dataset):
    """Images and integer labels from a "path label" list file."""

    def __init__(self, txt_path, transform=None, target_transform=None, num_classes=None, check=False):
        samples = read_image_list(txt_path, num_classes)
        if check:
            check_images(samples)
        self.imgs = [(path, label) for path, label, _ in samples]
        self.transform = transform
        self.target_transform = target_transform

    def __getitem__(self, index):
        path, label = self.imgs[index]
        img = load_image(path)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label

    def __len__(self):
        return len(self.imgs)


class Net(nn.Module):
    """The tutorial's LeNet-style network for 3x32x32 images."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def initialize_weights(self):
        """The tutorial's initialisation: Xavier-normal convolutions, N(0, 0.01) linear layers, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


@torch.no_grad()
def validate(net, data_loader, set_name, classes_name):
    """Return (confusion matrix, accuracy): conf_mat[true, predicted] counts, accuracy in [0, 1].

    `set_name` is kept for the tutorial's signature; printing is the caller's business
    (see class_report). The network's train/eval mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    n = len(classes_name)
    conf_mat = torch.zeros(n * n, dtype=torch.int64, device=device)
    for images, labels in data_loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        predicted = net(images).argmax(dim=1)
        conf_mat += torch.bincount(labels * n + predicted, minlength=n * n)
    net.train(was_training)
    conf_mat = conf_mat.view(n, n).cpu().numpy()  # one host transfer per validation
    total = conf_mat.sum()
    return conf_mat, float(np.trace(conf_mat) / total) if total else 0.0


def class_report(conf_mat):
    """Per-class (recall, precision) arrays from a confusion matrix; NaN where a class has no samples."""
    conf_mat = np.asarray(conf_mat, dtype=np.float64)
    hits = np.diag(conf_mat)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / conf_mat.sum(axis=1), hits / conf_mat.sum(axis=0)


def row_shares(confusion_mat):
    """Each row of a confusion matrix divided by its total (0 for a class without samples)."""
    confusion_mat = np.asarray(confusion_mat)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(confusion_mat / confusion_mat.sum(axis=1, keepdims=True))


def confusion_matrix_figure(confusion_mat, classes, set_name):
    """A matplotlib Figure of the row-normalised confusion matrix, annotated with the counts."""
    confusion_mat = np.asarray(confusion_mat)
    normalised = row_shares(confusion_mat)
    size = max(4.0, 0.45 * len(classes) + 2.5)
    fig = Figure(figsize=(size + 1, size))  # no pyplot: safe in any thread, nothing left open
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Greys", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=60)
    ax.set_yticks(ticks, [str(c) for c in classes])
    ax.set_xlabel("Predict label")
    ax.set_ylabel("True label")
    ax.set_title("Confusion_Matrix_" + set_name)
    if len(classes) <= 30:
        for i, j in np.ndindex(confusion_mat.shape):
            ax.text(j, i, int(confusion_mat[i, j]), va="center", ha="center", color="red", fontsize=8)
    # fixed margins: tight_layout would cost more than drawing the figure (about 170 ms here)
    longest = max(len(str(c)) for c in classes)
    fig.subplots_adjust(left=min(0.1 + 0.012 * longest, 0.35), bottom=min(0.12 + 0.012 * longest, 0.35),
                        right=0.95, top=0.93)
    return fig


CELL_GREYS = 33  # shades of grey for a confusion matrix's shares: steps of 1/32 (quarters exact)
COUNT_SHADES = 6  # steps of the red counts' antialiasing on their grey
OUTLINE, RED = (230, 230, 230), (255, 0, 0)
_GREYS = tuple((g, g, g) for g in (round(255 * k / (CELL_GREYS - 1)) for k in range(CELL_GREYS)))


def _cell_size(n):
    return max(16, min(32, 520 // max(n, 1)))  # TensorBoard fits a card to about 500 pixels: no bigger


class _ConfusionMatrixFrame:
    """A confusion-matrix picture's frame (title, class numbers and names), drawn once, and the cells of a
    matrix drawn into a copy of it with a few array operations."""

    def __init__(self, classes, set_name):
        n, self.cell = len(classes), _cell_size(len(classes))
        names = [f"{i} {c[:14]}" for i, c in enumerate(classes)]
        self.left, self.top = 16 + 7 * max(len(name) for name in names), 48
        text = [(BLACK, WHITE)] + ([(RED, grey) for grey in _GREYS] if n <= 30 else [])
        self.picture = Picture(self.left + n * self.cell + 12, self.top + n * self.cell + 24,
                               [*_GREYS, BLACK, OUTLINE], text, shades=COUNT_SHADES)
        self.picture.text((8, 6), f"Confusion_Matrix_{set_name}: rows true label, columns predicted", BLACK)
        for i in range(n):
            self.picture.text((self.left + i * self.cell + self.cell // 2, self.top - 4), str(i), BLACK, anchor="mb")
            self.picture.text((self.left - 6, self.top + i * self.cell + self.cell // 2), names[i], BLACK, anchor="rm")
        self.picture.text((self.left, self.top + n * self.cell + 6), "Predict label", BLACK)
        self._counts = {}  # count text: its shade levels in a cell
        self._red = np.array([self.picture.shade(RED, grey) for grey in _GREYS] if n <= 30 else [0], dtype=np.uint8)
        edge = np.arange(self.cell)
        self.outline = (edge == 0) | (edge == self.cell - 1)
        self.advance = round(font().getlength("0"))  # pixels from one digit to the next: the figures are tabular

    def _count(self, text):
        """The shade levels (0: none) of a count written in the middle of a cell, as a (cell, cell) array, put
        together from its digits' masks (the font's figures are tabular): a count not seen before costs two
        layout queries instead of a rendering (0.3 ms here)."""
        if text in self._counts:
            return self._counts[text]
        left, top = font().getbbox(text, anchor="mm")[:2]
        start, top_la = font().getbbox(text, anchor="la")[:2]
        levels = np.zeros((self.cell, self.cell), dtype=np.uint8)
        for i, digit in enumerate(text):
            digit_left, digit_top, coverage = text_mask(digit, "la")
            glyph = shade_levels(coverage, COUNT_SHADES)
            x = self.cell // 2 + left + self.advance * i + digit_left - start
            y = self.cell // 2 + top + digit_top - top_la
            region = levels[max(y, 0):y + glyph.shape[0], max(x, 0):x + glyph.shape[1]]
            np.maximum(region, glyph[max(-y, 0):max(-y, 0) + region.shape[0], max(-x, 0):max(-x, 0) + region.shape[1]],
                       out=region)
        self._counts[text] = levels
        return levels

    def draw(self, counts):
        """A Picture of `counts` in this frame: every cell as one block of palette indices, its grey (the greys
        come first, from 1), its count in shades of red on that grey where counts fit, its outline."""
        cell, n = self.cell, len(counts)
        levels = np.round((1 - row_shares(counts)) * (CELL_GREYS - 1)).astype(np.uint8)
        grey = (1 + levels)[:, :, None, None]
        if n <= 30 and self.advance * len(str(int(counts.max(initial=0)))) <= cell - 2:
            shades = np.stack([self._count(str(count)) for count in counts.ravel().tolist()]).reshape(n, n, cell, cell)
            blocks = np.where(shades > 0, (self._red[levels] - 1)[:, :, None, None] + shades, grey)
        else:
            blocks = np.repeat(np.repeat(grey, cell, axis=2), cell, axis=3)
        picture = self.picture.copy()
        blocks[:, :, self.outline, :] = picture.index(OUTLINE)
        blocks[:, :, :, self.outline] = picture.index(OUTLINE)
        picture.put(blocks.transpose(0, 2, 1, 3).reshape(n * cell, n * cell), (self.left, self.top))
        return picture


@functools.lru_cache(maxsize=4)
def _confusion_matrix_frame(classes, set_name):
    return _ConfusionMatrixFrame(classes, set_name)


def confusion_matrix_picture(confusion_mat, classes, set_name):
    """The same picture as confusion_matrix_figure, as a pictures.Picture drawn with PIL in about a millisecond
    (the matplotlib figure takes about 300 ms): rows are true classes, columns predictions, grey is the
    row-normalised share (in 1/32 steps), red the count (up to 30 classes, where the counts fit in their cells).
    Columns are numbered; rows give number and name. The frame is drawn once for a list of classes."""
    return _confusion_matrix_frame(tuple(str(c) for c in classes), set_name).draw(np.array(confusion_mat))


def confusion_matrix_image(confusion_mat, classes, set_name):
    """confusion_matrix_picture() as an (H, W, 3) uint8 array."""
    return confusion_matrix_picture(confusion_mat, classes, set_name).rgb()


def show_confMat(confusion_mat, classes, set_name, out_dir):
    """Save the confusion matrix as <out_dir>/Confusion_Matrix<set_name>.png and return that path."""
    path = os.path.join(out_dir, "Confusion_Matrix" + set_name + ".png")
    confusion_matrix_figure(confusion_mat, classes, set_name).savefig(path)
    return path
