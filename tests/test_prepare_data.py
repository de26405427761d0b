import json

import numpy as np
import pytest
from conftest import CIFAR_CLASSES, make_cifar_archive, make_cifar_batches, make_data, run_script
from PIL import Image

import prepare_data
import train


def read_list(path):
    rows = []
    for line in path.read_text().splitlines():
        name, label = line.rsplit(maxsplit=1)
        rows.append((path.parent / name, int(label)))
    return rows


@pytest.mark.parametrize("form", ["tar.gz", "folder"])
def test_cifar10_archive_becomes_pngs_with_exact_pixels_and_labels(tmp_path, form):
    if form == "tar.gz":
        source, made = make_cifar_archive(tmp_path)
    else:
        source, made = make_cifar_batches(tmp_path)
    out = tmp_path / "cifar"
    assert prepare_data.main(["cifar10", "--archive", str(source), "--out", str(out), "--workers", "2"]) == 0
    assert (out / "classes.txt").read_text().split() == CIFAR_CLASSES
    train_rows = read_list(out / "train.txt")
    valid_rows, test_rows = read_list(out / "valid.txt"), read_list(out / "test.txt")
    assert (len(train_rows), len(valid_rows), len(test_rows)) == (30, 5, 5)
    # training images in archive order, pixel for pixel
    images = np.concatenate([made[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((made[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    for (path, label), image, expected in zip(train_rows, images, labels):
        assert label == expected and path.parent.name == CIFAR_CLASSES[label]
        assert np.array_equal(np.asarray(Image.open(path)), image)
    # valid and test split the test batch: together exactly its images and labels
    test_images, test_labels = made["test_batch"]
    seen = sorted((np.asarray(Image.open(p)).tobytes(), label) for p, label in valid_rows + test_rows)
    assert seen == sorted((image.tobytes(), label) for image, label in zip(test_images, test_labels))
    assert train.main(["--data", str(out), "--log-dir", str(tmp_path / "runs"), "--epochs", "1"]) == 0


def test_cifar10_never_overwrites_without_force(tmp_path, capsys):
    source, _ = make_cifar_batches(tmp_path)
    out = tmp_path / "cifar"
    args = ["cifar10", "--archive", str(source), "--out", str(out), "--valid-fraction", "0.3", "--seed", "1"]
    assert prepare_data.main(args) == 0
    assert len(read_list(out / "valid.txt")) == 3
    before = (out / "train.txt").read_text()
    assert prepare_data.main(args) == 1
    assert "already holds train.txt, valid.txt, test.txt, classes.txt; add --force" in capsys.readouterr().err
    assert prepare_data.main(args + ["--force", "--train-to-valid", "0.5"]) == 0
    assert (out / "train.txt").read_text() != before and len(read_list(out / "train.txt")) == 15


def test_ctrl_c_leaves_an_unfinished_output_that_the_same_command_finishes(tmp_path, monkeypatch, capsys):
    source, _ = make_cifar_batches(tmp_path)
    out = tmp_path / "cifar"
    args = ["cifar10", "--archive", str(source), "--out", str(out)]
    save_images = prepare_data.save_images

    def interrupted(images, paths, workers, desc):
        if desc == "valid":  # the training images are written, then Ctrl-C
            raise KeyboardInterrupt
        return save_images(images, paths, workers, desc)

    monkeypatch.setattr(prepare_data, "save_images", interrupted)
    assert prepare_data.main(args) == 130
    assert f"Stopped: {out} is unfinished" in capsys.readouterr().err
    assert (out / "train").is_dir() and not (out / "train.txt").exists()
    monkeypatch.setattr(prepare_data, "save_images", save_images)
    assert prepare_data.main(args) == 0  # no --force needed: nothing was listed
    assert len(read_list(out / "train.txt")) == 30


def test_a_truncated_or_wrong_archive_is_one_clear_line(tmp_path):
    archive, _ = make_cifar_archive(tmp_path)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:2000])
    result = run_script("prepare_data.py", "cifar10", "--archive", truncated, "--out", tmp_path / "o")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {truncated}: truncated or not a tar archive")
    source, _ = make_cifar_batches(tmp_path / "broken")
    (source / "test_batch").write_bytes(b"not a pickle")
    assert prepare_data.main(["cifar10", "--archive", str(source), "--out", str(tmp_path / "o2")]) == 1
    assert prepare_data.main(["cifar10", "--archive", str(tmp_path / "nothing"), "--out", str(tmp_path / "o3")]) == 1


def test_download_without_internet_says_what_to_do(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    assert prepare_data.main(["cifar10", "--download", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "could not download" in err and "pass --archive PATH" in err


def make_tree(src):
    """Three classes, one with a space in its name, one with images in nested folders, plus non-images."""
    rng = np.random.default_rng(0)
    layout = {
        "cat": ["a.png", "b.jpg", "c.png", "d.png", "e.png"],
        "big dog": ["x.png", "y.png", "z.png", "w.png", "v.png"],
        "fish": ["deep/one.png", "deep/deeper/two.jpeg", "three.png", "4.png", "5.png"],
    }
    for name, files in layout.items():
        for file in files:
            path = src / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "fish" / "deep" / "Thumbs.db").write_bytes(b"\0")
    (src / "README.txt").write_text("a file beside the class folders")
    return layout


def test_folder_tree_becomes_a_stratified_split_in_place(tmp_path, capsys):
    src = tmp_path / "photos"
    layout = make_tree(src)
    out = tmp_path / "lists"
    assert prepare_data.main(["folder", str(src), "--out", str(out), "--valid", "0.2", "--test", "0.2"]) == 0
    assert "skipped (not images) 3" in capsys.readouterr().out
    assert (out / "classes.txt").read_text().splitlines() == ["big dog", "cat", "fish"]
    rows = {split: read_list(out / f"{split}.txt") for split in ("train", "valid", "test")}
    for split, count in (("train", 3), ("valid", 1), ("test", 1)):  # per class
        assert sorted(label for _, label in rows[split]) == sorted([0, 1, 2] * count)
    listed = sorted(p.resolve() for split in rows.values() for p, _ in split)
    assert listed == sorted((src / name / f).resolve() for name, files in layout.items() for f in files)
    assert all(src in p.resolve().parents for p in listed)  # referenced in place
    assert train.main(["--data", str(out), "--log-dir", str(tmp_path / "runs"), "--epochs", "1"]) == 0


def test_folder_copy_empty_class_and_empty_tree(tmp_path, capsys):
    src = tmp_path / "photos"
    make_tree(src)
    out = tmp_path / "copied"
    assert prepare_data.main(["folder", str(src), "--out", str(out), "--copy"]) == 0
    listed = [p for split in ("train", "valid", "test") for p, _ in read_list(out / f"{split}.txt")]
    assert len(listed) == 15 and all(p.is_file() and out in p.resolve().parents for p in listed)
    assert [p.relative_to(out).parts[1:] for p in listed if p.name == "two.jpeg"][0] == (
        "fish",
        "deep",
        "deeper",
        "two.jpeg",
    )  # copied with its nested folders, under <split>/<class>/
    (src / "empty").mkdir()
    assert prepare_data.main(["folder", str(src), "--out", str(tmp_path / "o"), "--force"]) == 1
    assert "empty: class folder without images" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    assert prepare_data.main(["folder", str(tmp_path / "bare"), "--out", str(tmp_path / "o")]) == 1
    assert "no class folders" in capsys.readouterr().err


def test_stats_are_exact_and_used_by_train(tmp_path, capsys):
    data_dir = make_data(tmp_path / "Data")
    assert prepare_data.main(["stats", str(data_dir)]) == 0
    stats = json.loads((data_dir / "stats.json").read_text())
    pixels = []
    for path, _ in read_list(data_dir / "train.txt"):
        pixels.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255)
    pixels = np.stack(pixels).reshape(-1, 3)
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0), rtol=1e-12)
    assert prepare_data.main(["stats", str(data_dir)]) == 1  # no overwrite without --force
    capsys.readouterr()
    assert train.main(["--data", str(data_dir), "--log-dir", str(tmp_path / "runs"), "--epochs", "1"]) == 0
    assert f"Normalising with {data_dir / 'stats.json'}" in capsys.readouterr().out
    (data_dir / "stats.json").write_text('{"mean": [0.5, 0.5]}')
    assert train.main(["--data", str(data_dir), "--log-dir", str(tmp_path / "runs"), "--epochs", "1"]) == 1
    assert "stats.json: unusable" in capsys.readouterr().err


class _RunsCode:
    """What a crafted archive holds: unpickling it calls exec(), which here writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_crafted_archive_runs_no_code(tmp_path):
    """The batches are read by an unpickler that accepts only arrays and plain values: a pickle that would call a
    function while it loads is refused, in one line naming the file, before the function runs."""
    import pickle

    source, _ = make_cifar_batches(tmp_path)
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the oracle: a plain unpickler runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    (source / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": []}, protocol=2))
    result = run_script("prepare_data.py", "cifar10", "--archive", source, "--out", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr and not marker.exists()
    assert "test_batch: not a CIFAR-10 python batch" in result.stderr
    assert "refused to load __builtin__.exec" in result.stderr  # protocol 2 names Python 2's module
    # the official archive was pickled by numpy 1, whose module numpy 2 renamed: it still loads
    numpy_1 = (source / "data_batch_1").read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in numpy_1
    assert prepare_data._unpickle(numpy_1, "data_batch_1")["data"].shape == (6, 3072)
