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

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset

from gradwatch import confusion_matrix_image


class DataListError(ValueError):
    """A list file or an image it names is unusable. The message names the file, the line and the fix."""


class ImageReadError(OSError):
    """An image could not be decoded while training. The message names its path."""


def read_image_list(txt_path, num_classes=None):
    """Parse a "path label" list into [(absolute path, label)], checking every line.

    Relative paths resolve against the list file's folder. Raises DataListError naming
    the file and line of the first problem; data.check_images checks the images.
    """
    txt_path = Path(txt_path)
    if not txt_path.is_file():
        how = "it should hold one 'path label' line per image (python prepare_data.py makes one)"
        raise DataListError(f"{txt_path}: list file not found; {how}")
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
                raise DataListError(f"{where}: label '{label_text}' is not an integer; write 'path label'") from None
            if label < 0:
                raise DataListError(f"{where}: label {label} is negative; labels run from 0 to N-1 for N classes")
            if num_classes is not None and label >= num_classes:
                fix = f"use 0 to {num_classes - 1} or add the class to classes.txt"
                raise DataListError(f"{where}: label {label} is out of range ({num_classes} classes); {fix}")
            samples.append((str(root / name), label, where))
    if not samples:
        raise DataListError(f"{txt_path}: the list is empty; add one 'path label' line per image")
    return samples


def load_image(path):
    """Open an image as RGB; an unreadable file raises ImageReadError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        fix = "replace the file or remove it from the list, then resume the run"
        raise ImageReadError(f"{path}: cannot read image ({err}); {fix}") from None


class MyDataset(Dataset):
    """Images and integer labels from a "path label" list file."""

    def __init__(self, txt_path, transform=None, target_transform=None, num_classes=None):
        samples = read_image_list(txt_path, num_classes)
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
        # the tutorial's layers, with its ReLUs as modules after the layers they follow: the monitor watches them
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.fc1, self.relu3 = nn.Linear(16 * 5 * 5, 120), nn.ReLU()
        self.fc2, self.relu4 = nn.Linear(120, 84), nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
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
def validate(net, data_loader, set_name, classes_name, loss_fn=None):
    """Return (confusion matrix, accuracy): conf_mat[true, predicted] counts, accuracy in [0, 1]; with `loss_fn`
    (e.g. torch.nn.functional.cross_entropy), (confusion matrix, accuracy, the mean loss per image).

    `set_name` is kept for the tutorial's signature. The network's train/eval mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    n = len(classes_name)
    conf_mat = torch.zeros(n * n, dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in data_loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        outputs = net(images)
        conf_mat += torch.bincount(labels * n + outputs.argmax(dim=1), minlength=n * n)
        if loss_fn is not None:
            loss += loss_fn(outputs, labels, reduction="sum")
    net.train(was_training)
    conf_mat = conf_mat.view(n, n).cpu().numpy()  # one host transfer per validation
    total = conf_mat.sum()
    accuracy = float(np.trace(conf_mat) / total) if total else 0.0
    return (conf_mat, accuracy) if loss_fn is None else (conf_mat, accuracy, loss.item() / max(total, 1))


def class_report(conf_mat):
    """Per-class (recall, precision) arrays from a confusion matrix; NaN where a class has no samples."""
    conf_mat = np.asarray(conf_mat, dtype=np.float64)
    hits = np.diag(conf_mat)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / conf_mat.sum(axis=1), hits / conf_mat.sum(axis=0)


def show_confMat(confusion_mat, classes, set_name, out_dir):
    """Save the confusion matrix as <out_dir>/Confusion_Matrix<set_name>.png (the picture train.py logs to
    TensorBoard) and return that path."""
    path = os.path.join(out_dir, "Confusion_Matrix" + set_name + ".png")
    confusion_matrix_image(confusion_mat, classes, set_name).save(path)
    return path
