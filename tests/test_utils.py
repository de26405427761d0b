import math
import os
import signal
import time

import numpy as np
import pytest
import torch
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import DataLoader

from data import process_pool
from utils import DataListError, ImageReadError, MyDataset, Net, class_report, read_image_list, show_confMat, validate

TUTORIAL_SHAPES = {  # Chapter 4.4's LeNet-style Net, in named_parameters() order
    "conv1.weight": (6, 3, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 400),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (10, 84),
    "fc3.bias": (10,),
}


def test_net_has_the_tutorial_architecture_and_initialisation():
    torch.manual_seed(0)
    net = Net()
    net.initialize_weights()
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    assert list(shapes.items()) == list(TUTORIAL_SHAPES.items())
    for name, p in net.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    assert net.fc1.weight.std().item() == pytest.approx(0.01, rel=0.05)
    fan_in, fan_out = 6 * 25, 16 * 25
    assert net.conv2.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert Net(num_classes=4)(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_mydataset_resolves_relative_absolute_and_spaced_paths(data_dir):
    dataset = MyDataset(txt_path=str(data_dir / "train.txt"), transform=transforms.ToTensor())
    assert len(dataset) == 24
    paths = [path for path, _ in dataset.imgs]
    assert any(" " in p for p in paths)
    assert all(p.startswith(str(data_dir.resolve())) or p.startswith(str(data_dir)) for p in paths)
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert [label for _, label in dataset.imgs] == sorted(label for _, label in dataset.imgs)


def test_validate_returns_confusion_matrix_and_accuracy(data_dir):
    torch.manual_seed(0)
    net = Net(num_classes=4)
    net.initialize_weights()
    dataset = MyDataset(txt_path=data_dir / "train.txt", transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=5)
    conf_mat, accuracy = validate(net, loader, "train", ["a", "b", "c", "d"])
    with torch.no_grad():
        predicted = torch.cat([net(x).argmax(1) for x, _ in loader]).numpy()
    labels = np.array([label for _, label in dataset.imgs])
    expected = np.zeros((4, 4), dtype=np.int64)
    np.add.at(expected, (labels, predicted), 1)
    assert (conf_mat == expected).all()
    assert accuracy == pytest.approx((predicted == labels).mean())
    assert net.training  # mode restored


def test_class_report_recall_and_precision():
    conf_mat = np.array([[3, 1], [0, 0]])
    recall, precision = class_report(conf_mat)
    assert recall[0] == pytest.approx(0.75) and np.isnan(recall[1])
    assert precision[0] == pytest.approx(1.0) and precision[1] == pytest.approx(0.0)


def test_show_confmat_writes_the_picture_train_py_logs(tmp_path):
    from gradwatch import confusion_matrix_image

    conf_mat = np.array([[5, 1], [2, 7]])
    path = show_confMat(conf_mat, ["cat", "dog"], "valid", str(tmp_path))
    assert path == str(tmp_path / "Confusion_Matrixvalid.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100
        assert np.array_equal(np.asarray(img), np.asarray(confusion_matrix_image(conf_mat, ["cat", "dog"], "valid")))


@pytest.mark.parametrize(
    "line, problem",
    [
        ("train/a.png", "no label"),
        ("train/a.png cat", "label 'cat' is not an integer"),
        ("train/a.png 4", "label 4 is out of range (4 classes)"),
        ("train/a.png -1", "label -1 is negative"),
    ],
)
def test_bad_list_lines_name_file_and_line(tmp_path, line, problem):
    listing = tmp_path / "train.txt"
    listing.write_text(f"ok.png 0\n\n{line}\n")
    with pytest.raises(DataListError) as err:
        read_image_list(listing, num_classes=4)
    assert str(err.value).startswith(f"{listing}:3: {problem}")


def test_unreadable_image_at_load_time_names_its_path(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "list.txt").write_text("bad.png 0\n")
    dataset = MyDataset(txt_path=tmp_path / "list.txt")
    with pytest.raises(ImageReadError, match=str(tmp_path / "bad.png")):
        dataset[0]


def test_batched_random_crop_equals_cropping_the_padded_images_one_by_one():
    import torch.nn.functional as F

    from data import random_crop

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(3)
    cropped = random_crop(images, 4)
    torch.manual_seed(3)
    top, left = torch.randint(0, 9, (8,)), torch.randint(0, 9, (8,))
    padded = F.pad(images, (4,) * 4)
    expected = torch.stack([padded[i, :, top[i] : top[i] + 32, left[i] : left[i] + 32] for i in range(8)])
    assert torch.equal(cropped, expected) and not torch.equal(cropped, images)


def test_process_pool_workers_ignore_ctrl_c_and_queued_work_is_dropped_when_stopped_early():
    with pytest.raises(KeyboardInterrupt):
        with process_pool(1) as pool:
            worker = pool.submit(os.getpid).result()
            os.kill(worker, signal.SIGINT)  # as Ctrl-C reaches every process of the terminal's group
            assert pool.submit(sum, [1, 2]).result() == 3  # the worker lived through it
            queued = [pool.submit(time.sleep, 0.5) for _ in range(10)]
            started = time.monotonic()
            raise KeyboardInterrupt  # the main process stops: only what already runs is waited for
    assert time.monotonic() - started < 2.5  # not the 5 s of the whole queue
    assert sum(f.cancelled() for f in queued) >= 7
