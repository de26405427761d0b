"""The input pipeline of train.py: list files checked up front, then batches of normalised 3x32x32 images.

With the cache (the default where it fits in memory), each image is decoded once into a uint8 tensor and the
tutorial's augmentation (random crop with 4 pixels of zero padding) and normalisation run on whole batches, on
the training device. Without it, the tutorial's MyDataset decodes every image every epoch in worker processes.
"""

import itertools
import json
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

from utils import DataListError, MyDataset, read_image_list

# The tutorial's per-channel statistics of CIFAR-10's training images.
CIFAR10_MEAN = [0.4948052, 0.48568845, 0.44682974]
CIFAR10_STD = [0.24580306, 0.24236229, 0.2603115]
IMAGE_SIZE = 32
PADDING = 4


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
    chunks = [samples[i : i + chunk] for i in range(0, len(samples), chunk)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    quiet = len(samples) < 5000 or not sys.stderr.isatty()
    progress = tqdm(total=len(samples), desc="Checking images", unit="img", leave=False, disable=quiet)
    images = []
    with progress, process_pool(workers) if workers > 1 else nullcontext() as pool:
        decode = pool.map if pool else map
        for decoded in decode(_decode_chunk, chunks, [size] * len(chunks)):
            for problem, array in decoded:
                if problem:
                    raise DataListError(problem)
                images.append(array)
            progress.update(len(decoded))
    return torch.from_numpy(np.stack(images)) if size is not None else None


class EpochBatchSampler(BatchSampler):
    """Batches whose order depends only on (seed, epoch), so that a resumed epoch can skip those it has done;
    under torchrun each rank takes its share, as DistributedSampler deals it (padded to the same length)."""

    def __init__(self, size, batch_size, seed=0, shuffle=True, rank=0, world_size=1):
        super().__init__(DistributedSampler(range(size), world_size, rank, shuffle, seed), batch_size, drop_last=False)
        self.size, self.start = size, 0

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch)
        self.start = start_batch

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


def random_crop(images, padding):
    """Per-image random crop of a zero-padded (N, C, H, W) batch back to (H, W): RandomCrop(size, padding) batched.

    unfold makes every possible crop a view, so choosing one per image is a single indexing operation."""
    n, c, h, w = images.shape
    windows = F.pad(images, (padding,) * 4).unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 2p+1, 2p+1, H, W), no copy
    top = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    left = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    return windows[torch.arange(n, device=images.device), :, top, left]


class CachedBatches:
    """Iterate (images, labels) batches from a decoded uint8 cache; yields float32 normalised tensors."""

    def __init__(self, images, labels, batch_sampler, mean, std, augment):
        self.images, self.labels = images, labels
        self.batch_sampler = batch_sampler
        self.mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
        self.augment = augment

    def __iter__(self):
        for indices in self.batch_sampler:
            indices = torch.tensor(indices, device=self.images.device)
            batch = self.images.index_select(0, indices)
            if self.augment:
                batch = random_crop(batch, PADDING)
            yield (batch.float() - self.mean) / self.std, self.labels.index_select(0, indices)

    def __len__(self):
        return len(self.batch_sampler)


def cache_fits(num_images):
    """True when the decoded images would take under a quarter of the memory available now."""
    needed = num_images * 3 * IMAGE_SIZE * IMAGE_SIZE
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return needed < 2**30
    return needed < available / 4


def load_normalisation(data_dir):
    """(mean, std, where they came from): data_dir/stats.json (prepare_data.py stats) or the CIFAR-10 constants."""
    path = Path(data_dir) / "stats.json"
    if not path.is_file():
        hint = f"{path} not found; python prepare_data.py stats {data_dir} makes it"
        return CIFAR10_MEAN, CIFAR10_STD, f"the tutorial's CIFAR-10 constants ({hint})"
    try:
        stats = json.loads(path.read_text())
        mean, std = [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("needs three means and three positive standard deviations")
    except (ValueError, KeyError, TypeError) as err:
        again = f"recompute it with: python prepare_data.py stats {data_dir} --force"
        raise DataListError(f"{path}: unusable ({err}); {again}") from None
    return mean, std, str(path)


def warn_empty_classes(data_dir, lists, count):
    """Without classes.txt the labels name the classes 0..max: a typo in one label (12 in a list of
    10 classes) makes classes without an image. Say which, and the line of the highest label."""
    used = {label for samples in lists for _, label, _ in samples}
    empty = [label for label in range(count) if label not in used]
    if not empty:
        return
    highest = max((sample for samples in lists for sample in samples), key=lambda sample: sample[1])
    shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
    check = f"the highest label, {highest[1]}, is at {highest[2]} (a typo?)"
    print(
        f"warning: {data_dir}: no classes.txt, so the labels name {count} classes (0 to {count - 1}), and "
        f"{len(empty)} of them have no image ({shown}); {check}; write classes.txt, one name per line, "
        "to have the labels checked",
        file=sys.stderr,
    )


def build_loaders(data_dir, batch_size, seed, device, workers, cache, mean, std, rank=0, world_size=1):
    """Check data_dir's lists and every image, then return (train batches, valid batches, classes, cached).

    The train batches' `batch_sampler` is an EpochBatchSampler, sharded by rank under torchrun; every rank
    validates on the whole validation set. Raises DataListError.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        how = "pass --data DIR holding train.txt and valid.txt (python prepare_data.py makes them)"
        raise DataListError(f"{data_dir}: data folder not found; {how}")
    classes = read_classes(data_dir / "classes.txt") if (data_dir / "classes.txt").is_file() else None
    num_classes = len(classes) if classes else None
    lists = [read_image_list(data_dir / f"{split}.txt", num_classes) for split in ("train", "valid")]
    if classes is None:
        classes = [str(i) for i in range(1 + max(label for samples in lists for _, label, _ in samples))]
        warn_empty_classes(data_dir, lists, len(classes))
    train_sampler = EpochBatchSampler(len(lists[0]), batch_size, seed, rank=rank, world_size=world_size)
    valid_sampler = EpochBatchSampler(len(lists[1]), batch_size * 4, shuffle=False)
    cached = cache == "yes" or (cache == "auto" and cache_fits(sum(map(len, lists))))

    if cached:
        batches = []
        for samples, sampler in zip(lists, (train_sampler, valid_sampler)):
            images = check_images(samples, size=IMAGE_SIZE).to(device)
            labels = torch.tensor([label for _, label, _ in samples], device=device)
            batches.append(CachedBatches(images, labels, sampler, mean, std, augment=sampler is train_sampler))
        return (*batches, classes, True)

    for samples in lists:
        check_images(samples)
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    crop = {"train": transforms.RandomCrop(IMAGE_SIZE, padding=PADDING), "valid": transforms.CenterCrop(IMAGE_SIZE)}
    options = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    loaders = []
    for split, sampler in (("train", train_sampler), ("valid", valid_sampler)):
        transform = transforms.Compose([transforms.Resize(IMAGE_SIZE), crop[split], *finish])
        dataset = MyDataset(data_dir / f"{split}.txt", transform=transform, num_classes=num_classes)
        loaders.append(DataLoader(dataset, batch_sampler=sampler, worker_init_fn=ignore_sigint, **options))
    return (*loaders, classes, False)
