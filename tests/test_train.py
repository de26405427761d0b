import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, histogram_steps, load_events, make_data, run_script

import checkpoints
import data
import options
import train
from gradwatch import TrainingMonitor
from utils import Net

PARAMETERS = [name for name, _ in Net(num_classes=4).named_parameters()]
HISTOGRAM_TAGS = {name + suffix for name in PARAMETERS for suffix in ("_data", "_grad")}


def train_args(data_dir, log_dir, *extra, epochs=2):
    return [
        "--data",
        str(data_dir),
        "--log-dir",
        str(log_dir),
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--print-every",
        "2",
        *map(str, extra),
    ]


def test_end_to_end_run_writes_histograms_scalars_and_checkpoints(data_dir, tmp_path, capsys):
    assert train.main(train_args(data_dir, tmp_path / "Result", "--run-name", "first")) == 0
    out = capsys.readouterr().out
    assert "Training: Epoch[001/002] Iteration[002/006] Loss: " in out and "Acc: " in out
    run = tmp_path / "Result" / "first"
    events = load_events(run)
    assert histogram_steps(events) == {tag: [1, 2] for tag in HISTOGRAM_TAGS}
    for tag in (
        "Loss/train",
        "Accuracy/train",
        "Loss/valid",
        "Accuracy/valid",
        "Optimizer/learning rate",
        "valid_recall/cat",
    ):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert [e.step for e in events.Images("valid/confusion_matrix")] == [1, 2]
    assert json.loads((run / "args.json").read_text())["epochs"] == 2

    last = torch.load(run / "last.pt", weights_only=True, map_location="cpu")
    best = torch.load(run / "best.pt", weights_only=True, map_location="cpu")
    assert (last["epoch"], last["batches_done"], last["step"]) == (2, 0, 12)
    assert set(last) >= {"model", "optimizer", "scheduler", "epoch", "step"} and best["epoch"] in (1, 2)
    # The last epoch's weight histogram is the histogram of the weights in the last checkpoint.
    stored = events.Histograms("fc3.bias_data")[-1].histogram_value
    weights = last["model"]["fc3.bias"].numpy()
    counts, _ = np.histogram(weights, bins=np.concatenate([[stored.min], stored.bucket_limit]))
    assert list(stored.bucket) == counts.tolist() and stored.min == weights.min() and stored.max == weights.max()
    accuracy = events.Scalars("Accuracy/valid")[-1].value
    assert 0 <= accuracy <= 1
    # The confusion matrices in the run folder are the pictures TensorBoard shows: the best and the last epoch's.
    pictures = [e.encoded_image_string for e in events.Images("valid/confusion_matrix")]
    assert (run / "Confusion_Matrix_valid_last.png").read_bytes() == pictures[-1]
    assert (run / "Confusion_Matrix_valid_best.png").read_bytes() == pictures[best["epoch"] - 1]


def test_without_cache_workers_decode_every_epoch(data_dir, tmp_path):
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--cache", "no", "--workers", "1")) == 0
    assert histogram_steps(load_events(tmp_path / "r")) == {tag: [1, 2] for tag in HISTOGRAM_TAGS}


def test_hist_every_logs_steps_on_their_own_axis(data_dir, tmp_path, capsys):
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--hist-every", "4")) == 0
    assert "samples_per_plugin" not in capsys.readouterr().out  # 3 steps: TensorBoard keeps them all
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "many", "--hist-every", "1", epochs=17)) == 0
    assert (
        f"this run logs 102 histogram steps per tag; TensorBoard shows a sample of 100 unless started with: "
        f"tensorboard --logdir {tmp_path} --samples_per_plugin histograms=0"
    ) in capsys.readouterr().out
    assert histogram_steps(load_events(tmp_path / "r")) == {tag: [1, 2] for tag in HISTOGRAM_TAGS}
    assert histogram_steps(load_events(tmp_path / "r" / "steps")) == {tag: [4, 8, 12] for tag in HISTOGRAM_TAGS}


def rewrite_line(path, number, text):
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


BAD_INPUTS = {
    "missing data folder": (lambda d: d.rename(d.parent / "gone"), "Data: data folder not found"),
    "missing list": (lambda d: (d / "valid.txt").unlink(), "valid.txt: list file not found"),
    "empty list": (lambda d: (d / "train.txt").write_text("\n"), "train.txt: the list is empty"),
    "no label": (lambda d: rewrite_line(d / "train.txt", 3, "train/cat/x.png"), "train.txt:3: no label"),
    "label not an integer": (
        lambda d: rewrite_line(d / "train.txt", 4, "train/cat/img 1.png one"),
        "train.txt:4: label 'one' is not an integer",
    ),
    "label out of range": (
        lambda d: rewrite_line(d / "valid.txt", 2, "valid/cat/img 0.png 4"),
        "valid.txt:2: label 4 is out of range (4 classes)",
    ),
    "missing image": (lambda d: (d / "train" / "bird" / "img 5.png").unlink(), "train.txt:18: image '"),
    "unreadable image": (
        lambda d: (d / "valid" / "car" / "img 1.png").write_bytes(b"\x89PNG broken"),
        "valid.txt:4: cannot read image '",
    ),
}


def test_without_classes_txt_a_label_that_names_empty_classes_is_said_with_its_line(data_dir, tmp_path, capsys):
    """Labels 0-3, and one typo: 6 names classes 4 and 5, which have no image; the run goes on (data sets with
    classes left out exist) and the line of the label is named."""
    (data_dir / "classes.txt").unlink()
    rewrite_line(data_dir / "train.txt", 20, "train/bird/img 1.png 6")
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", epochs=1)) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"warning: {data_dir}: no classes.txt, so the labels name 7 classes (0 to 6), and 2 of them have no image (4, "
        f"5); the highest label, 6, is at {data_dir / 'train.txt'}:20 (a typo?); write classes.txt, one name per "
        "line, to have the labels checked"
    )
    rewrite_line(data_dir / "train.txt", 20, "train/bird/img 1.png 2")
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "s", epochs=1)) == 0
    assert "warning" not in capsys.readouterr().err  # every class has images


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line_and_nothing_is_written(case, data_dir, tmp_path, capsys):
    damage, expected = BAD_INPUTS[case]
    damage(data_dir)
    assert train.main(train_args(data_dir, tmp_path / "Result")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "Result").exists()


def test_bad_input_from_the_command_line_has_no_traceback(data_dir, tmp_path):
    rewrite_line(data_dir / "train.txt", 5, "train/cat/img 0.png 9")
    result = run_script("train.py", *train_args(data_dir, tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {data_dir / 'train.txt'}:5: label 9 is out of range (4 classes); use 0 to 3 or add the class to "
        f"classes.txt"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs: must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--lr", "-0.1"], "--lr: must be a positive number, got -0.1"),
        (["--lr", "nan"], "--lr: must be a positive number"),
        (["--resume", "Result/no-such-run"], "run folder 'Result/no-such-run' does not exist"),
        (["--device", "quantum"], "unknown device 'quantum'"),
        (["--compile", "bogus"], "--compile: unknown torch.compile backend 'bogus'; use cudagraphs, inductor"),
        (["--clip-grad-norm", "0"], "--clip-grad-norm: must be a positive number, got 0"),
        (["--fsdp"], "--fsdp shards the model over the processes of a torchrun job: torchrun --nproc_per_node N"),
        (["--run-name", ".."], "--run-name: must be one folder name, which goes under --log-dir"),
        (["--run-name", "../x"], "--run-name: must be one folder name, which goes under --log-dir"),
        (["--run-name", "."], "--run-name: must be one folder name, which goes under --log-dir"),
        (["--run-name", "/tmp/x"], "--run-name: must be one folder name, which goes under --log-dir"),
        (["--run-name", "a/b"], "--run-name: must be one folder name, which goes under --log-dir"),
        (["--run-name", "x" * 256], "--run-name: must be at most 255 bytes, the longest file name"),
        (["--seed", str(2**64)], "--seed: must be an integer from 0 to 2**64 - 1"),
        (["--seed", "-1"], "--seed: must be an integer from 0 to 2**64 - 1"),
        (["--threshold", "stuck_epochs=nan"], "--threshold: stuck_epochs must be a whole number, 0 or more"),
        (["--threshold", "update_fast=inf"], "--threshold: update_fast must be a finite number, got 'inf'"),
    ],
)
def test_parser_refuses_nonsense(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_image_unreadable_mid_training_names_it_and_keeps_a_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "check_images", lambda samples, size=None: None)  # let it slip past the check
    bad = data_dir / "train" / "cat" / "img 2.png"
    bad.write_bytes(b"garbage")
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--cache", "no", "--workers", "0")) == 1
    err = capsys.readouterr().err
    assert f"error: {bad}: cannot read image" in err and "Traceback" not in err
    assert "Resume with: python train.py --resume" in err
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 0


def test_existing_run_is_not_overwritten(data_dir, tmp_path, capsys):
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", epochs=1)) == 0
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", epochs=1)) == 1
    assert f"{tmp_path / 'r'} already holds a run; continue it with --resume" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "r")]) == 0
    assert "has already trained 1 epochs; pass --epochs N" in capsys.readouterr().out


def test_a_run_killed_before_its_first_checkpoint_starts_again(data_dir, tmp_path, capsys):
    """args.json and events but no last.pt: neither resumable nor to be refused; it starts again in its folder,
    and TensorBoard shows each step once (the old events purged)."""
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", epochs=1)) == 0
    for name in ("last.pt", "best.pt"):
        (tmp_path / "r" / name).unlink()  # as if killed before the first checkpoint was written
    capsys.readouterr()
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", epochs=1)) == 0
    assert "holds a run stopped before its first checkpoint: starting it again" in capsys.readouterr().out
    events = load_events(tmp_path / "r")
    assert [event.step for event in events.Histograms("conv1.weight_data")] == [1]
    assert len(list((tmp_path / "r").glob("events.out.tfevents.*"))) == 2
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 1


def test_interrupted_mid_epoch_then_resumed_logs_every_step_exactly_once(data_dir, tmp_path, monkeypatch, capsys):
    log_parameters = TrainingMonitor.log_parameters

    def interrupt_at_step_9(self, model, step, per_step=False):
        result = log_parameters(self, model, step, per_step)
        if per_step and step == 9:  # epoch 2 (index 1) has 6 steps: 7..12
            os.kill(os.getpid(), signal.SIGINT)
        return result

    # thresholds at which weights_growing fires once four epochs are known: it compares with three epochs back
    # (and overfit_rise=-1: whatever the validation loss does)
    options = [
        "--hist-every",
        "3",
        "--stats-every",
        "2",
        "--threshold",
        "weight_max_abs=0",
        "--threshold",
        "weight_growth=0",
        "--threshold",
        "overfit_rise=-1",
    ]
    monkeypatch.setattr(TrainingMonitor, "log_parameters", interrupt_at_step_9)
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", *options, epochs=4)) == 130
    assert "Resume with: python train.py --resume" in capsys.readouterr().err
    checkpoint = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["step"]) == (1, 3, 9)
    assert len(checkpoint["monitor"]["history"]) == 1 and len(checkpoint["monitor"]["records"]) == 1
    monkeypatch.setattr(TrainingMonitor, "log_parameters", log_parameters)

    assert train.main(["--resume", str(tmp_path / "r")]) == 0
    assert "Resuming" in capsys.readouterr().out
    assert histogram_steps(load_events(tmp_path / "r")) == {tag: [1, 2, 3, 4] for tag in HISTOGRAM_TAGS}
    assert histogram_steps(load_events(tmp_path / "r" / "steps")) == {
        tag: list(range(3, 25, 3)) for tag in HISTOGRAM_TAGS
    }
    assert [e.step for e in load_events(tmp_path / "r").Scalars("Loss/train")] == [1, 2, 3, 4]
    resumed = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert resumed["step"] == 24

    # the same run unbroken: the same weights (the crops' random state is in the checkpoint) and the same diagnosis
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "u", *options, epochs=4)) == 0
    unbroken = torch.load(tmp_path / "u" / "last.pt", weights_only=True)
    assert all(torch.equal(resumed["model"][name], value) for name, value in unbroken["model"].items())
    diagnosis = json.loads((tmp_path / "u" / "diagnosis.json").read_text())["findings"]
    assert "weights_growing" in {f["rule"] for f in diagnosis if f["epoch"] == 4}
    assert json.loads((tmp_path / "r" / "diagnosis.json").read_text())["findings"] == diagnosis


def test_ctrl_c_then_resume_gives_each_epoch_exactly_once(data_dir, tmp_path):
    run = tmp_path / "Result" / "run"
    command = [
        sys.executable,
        "train.py",
        *train_args(
            data_dir, tmp_path / "Result", "--run-name", "run", "--batch-size", "1", "--print-every", "1", epochs=200
        ),
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    for line in process.stdout:
        if line.startswith("Training: Epoch[002/200]"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "SIGINT received" in err and f"Resume with: python train.py --resume {run}" in err
    assert "Traceback" not in err
    stopped_at = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 1 <= stopped_at < 200
    epochs = stopped_at + 2

    result = run_script("train.py", "--resume", run, "--epochs", epochs)
    assert result.returncode == 0, result.stderr
    assert histogram_steps(load_events(run)) == {tag: list(range(1, epochs + 1)) for tag in HISTOGRAM_TAGS}
    assert [e.step for e in load_events(run).Scalars("Accuracy/valid")] == list(range(1, epochs + 1))


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.0, 1.5])
def test_ctrl_c_while_starting_up_stops_quietly(data_dir, tmp_path, delay):
    """Ctrl-C while torch loads, or while the data are checked, ends the program without a traceback.
    (A run of many epochs, so that on a fast machine the signal still comes before the run could end.)"""
    command = [sys.executable, "train.py", *train_args(data_dir, tmp_path / "Result", "--run-name", "r", epochs=100)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_resume_from_an_older_checkpoint_purges_what_it_rewrites(data_dir, tmp_path):
    """A run killed after logging an epoch but before checkpointing it rewrites that epoch on resume."""
    run = tmp_path / "r"
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--hist-every", "5", epochs=2)) == 0
    older = torch.load(run / "last.pt", weights_only=True)
    assert train.main(["--resume", str(run), "--epochs", "3"]) == 0
    del older["monitor"], older["rng"]  # and from an earlier version of train.py, which saved neither
    torch.save(older, run / "last.pt")  # as if the process died before saving epoch 3's checkpoint
    assert train.main(["--resume", str(run), "--epochs", "3"]) == 0
    assert histogram_steps(load_events(run)) == {tag: [1, 2, 3] for tag in HISTOGRAM_TAGS}
    assert histogram_steps(load_events(run / "steps")) == {tag: [5, 10, 15] for tag in HISTOGRAM_TAGS}
    assert [e.step for e in load_events(run).Scalars("Loss/train")] == [1, 2, 3]
    assert torch.load(run / "last.pt", weights_only=True)["totals"]["seen"] == 24  # the last epoch's images only


def test_stop_on_nonfinite_stops_with_the_state_and_says_why(data_dir, tmp_path, capsys):
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--lr", "1e6", "--stop-on-nonfinite")) == 3
    err = capsys.readouterr().err
    assert "Stopped: non-finite" in err and "Lower the learning rate" in err and "Traceback" not in err
    state = torch.load(tmp_path / "r" / "nonfinite.pt", weights_only=True)
    assert state["step"] >= 1
    # statistics every step: the non-finite gradients are found before the loss turns
    args = train_args(data_dir, tmp_path, "--run-name", "g", "--lr", "1e6", "--stop-on-nonfinite", "--stats-every", "1")
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "Stopped: non-finite gradients in conv1.bias" in err and "Traceback" not in err


def test_layer_lr_and_wd_build_parameter_groups():
    net = Net(num_classes=4)
    groups = options.param_groups(
        net, 0.01, 0.0, layer_lr=[("conv1", 10.0), ("conv1.bias", 2.0)], layer_wd=[("fc1", 5e-4)]
    )
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    settings = {name: by_param[id(p)] for name, p in net.named_parameters()}
    assert settings["conv1.weight"] == (pytest.approx(0.1), 0.0)
    assert settings["conv1.bias"] == (pytest.approx(0.02), 0.0)  # the longest prefix wins
    assert settings["fc1.weight"] == (0.01, 5e-4) and settings["fc1.bias"] == (0.01, 5e-4)
    assert settings["fc3.weight"] == (0.01, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(PARAMETERS)
    with pytest.raises(ValueError, match="'conv9' names no parameter or module"):
        options.param_groups(net, 0.01, 0.0, layer_lr=[("conv9", 2.0)])


def test_layer_options_and_thresholds_from_the_command_line(data_dir, tmp_path, capsys):
    assert (
        train.main(
            train_args(
                data_dir,
                tmp_path,
                "--run-name",
                "r",
                "--layer-lr",
                "conv1=10",
                "--layer-wd",
                "fc3=1e-3",
                "--threshold",
                "bias_z=5",
                epochs=1,
            )
        )
        == 0
    )
    optimizer = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["optimizer"]
    assert sorted((g["lr"], g["weight_decay"]) for g in optimizer["param_groups"]) == [
        (0.01, 0.0),
        (0.01, 1e-3),
        (pytest.approx(0.1), 0.0),
    ]
    assert train.main(train_args(data_dir, tmp_path, "--layer-lr", "conv9=2", epochs=1)) == 1
    assert "error: --layer-lr/--layer-wd: 'conv9' names no parameter or module" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        options.parse_args(["--threshold", "nope=1"])
    assert "unknown threshold 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        options.parse_args(["--layer-lr", "conv1"])
    assert "expected NAME=VALUE, got 'conv1'" in capsys.readouterr().err


def test_the_sample_data_trains_without_warnings(tmp_path, capsys):
    """The shipped data and default settings, for the first epochs, where the tutorial's small initialisation
    makes training slowest: no rule warns. The run ends with the loss still near ln 10, which a note says at its
    end, naming no cause: a slow start the run ended too soon to tell from data with nothing to learn."""
    assert (
        train.main(["--log-dir", str(tmp_path), "--run-name", "r", "--epochs", "4", "--data", str(ROOT / "Data")]) == 0
    )
    out = capsys.readouterr().out
    assert "TensorBoard's Text tab):\n  Note, epoch 4, step 360: since epoch 1 the training loss stays near" in out
    run = tmp_path / "r"
    findings = json.loads((run / "diagnosis.json").read_text())["findings"]
    assert [(f["rule"], f["severity"], f["evidence"]["cause"]) for f in findings] == [("stuck", "note", None)]
    assert (run / "gradient_flow.png").is_file()
    events = load_events(run)
    assert [e.step for e in events.Images("gradient_flow")] == [1, 2, 3, 4]
    steps = load_events(run / "steps")
    # the first two steps, then every 50 (90-step epochs)
    assert [e.step for e in steps.Scalars("grad_norm/total")] == [1, 2, *range(50, 361, 50)]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert [e.step for e in events.Scalars("hparam/best_valid_accuracy")] == [4]


def test_statistics_come_16_times_a_long_epoch_after_the_first(tmp_path):
    args = ["--log-dir", tmp_path, "--run-name", "r", "--epochs", "2", "--batch-size", "1", "--data", ROOT / "Data"]
    assert train.main([str(arg) for arg in args]) == 0  # 1,438 steps an epoch: then every 1438 // 16 = 89 steps
    steps = load_events(tmp_path / "r" / "steps")
    expected = [1, 2, *range(50, 1438, 50), *range(1513, 2877, 89)]  # and the first two steps, which read the loop
    assert [e.step for e in steps.Scalars("grad_norm/total")] == expected


def test_resume_with_a_new_learning_rate_uses_it(data_dir, tmp_path, capsys):
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--layer-lr", "conv1=10", epochs=1)) == 0
    assert train.main(["--resume", str(tmp_path / "r"), "--epochs", "2", "--lr", "0.001"]) == 0
    assert "Learning rate changed from 0.01 to 0.001" in capsys.readouterr().out
    groups = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert sorted(g["lr"] for g in groups) == [pytest.approx(0.001), pytest.approx(0.01)]
    assert train.main(["--resume", str(tmp_path / "r"), "--epochs", "3", "--layer-wd", "fc1=0.1"]) == 1
    assert "--layer-wd differs from the run's (none), and its optimizer state holds" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "r"), "--epochs", "3", "--layer-lr", "conv1=5"]) == 1  # not ignored
    assert "--layer-lr differs from the run's ([['conv1', 10.0]])" in capsys.readouterr().err


def test_a_kill_between_the_two_checkpoint_renames_leaves_a_pair_that_heals(tmp_path, monkeypatch):
    """Killed between writing the two checkpoints of a new best epoch after the first, then resumed to that
    epoch: best.pt is the checkpoint of the best epoch that last.pt records (best.pt is written first, so the
    kill leaves last.pt an epoch behind, and the rerun of that epoch writes both)."""
    save = checkpoints.save
    killed = []

    def killed_between(run, *names):
        if len(names) == 2 and run.progress.epoch > 1 and not killed:
            save(run, names[0])
            killed.append(run.progress.epoch)  # the epochs done, that one included
            raise KeyboardInterrupt
        save(run, *names)

    monkeypatch.setattr(checkpoints, "save", killed_between)
    args = ["--data", str(ROOT / "Data"), "--log-dir", str(tmp_path), "--run-name", "r", "--epochs", "6"]
    assert train.main(args) == 130 and killed  # a new best came after the first epoch
    monkeypatch.setattr(checkpoints, "save", save)
    assert train.main(["--resume", str(tmp_path / "r"), "--epochs", str(killed[0])]) == 0
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert last["epoch"] == killed[0] and best["best_accuracy"] == last["best_accuracy"]


KILLED_AFTER_ITS_FIRST_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import checkpoints, train
save = checkpoints.save
def save_then_die(run, *names):
    save(run, *names)
    if names[-1] == "last.pt":
        os.kill(os.getpid(), signal.SIGKILL)  # the moment the first checkpoint is on disk
checkpoints.save = save_then_die
train.main(sys.argv[1:])
"""


def test_events_are_on_disk_before_each_checkpoint(data_dir, tmp_path):
    """SIGKILL right after the first checkpoint: every step and the epoch it covers are in the event files,
    though tensorboardX would have held the last of them in its queue for up to 30 s (flush_secs)."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_ITS_FIRST_CHECKPOINT.format(root=str(ROOT)))
    args = train_args(data_dir, tmp_path, "--run-name", "r", "--stats-every", "1", epochs=3)
    result = run_script(script, *args)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    steps = torch.load(tmp_path / "r" / "last.pt", weights_only=True)["step"]
    assert steps == 6  # 24 images in batches of 4: one epoch
    logged = load_events(tmp_path / "r" / "steps")
    assert [e.step for e in logged.Scalars("grad_norm/total")] == list(range(1, steps + 1))
    epochs = load_events(tmp_path / "r")
    assert all(histogram_steps(epochs)[tag] == [1] for tag in HISTOGRAM_TAGS)
    assert [e.step for e in epochs.Scalars("Loss/train")] == [1]


def test_a_mid_epoch_resume_with_another_batch_size_is_refused(finished_run, tmp_path, capsys):
    run = damaged_copy(finished_run, tmp_path)
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint["batches_done"] = 2  # as if stopped within the epoch
    torch.save(checkpoint, run / "last.pt")
    size = checkpoint["args"]["batch_size"]
    assert train.main(["--resume", str(run), "--epochs", "2", "--batch-size", str(size * 2)]) == 1
    err = capsys.readouterr().err
    assert f"stopped within an epoch (2 batches of {size} of epoch 2 done): resume it with --batch-size {size}" in err


def torchrun(*args):  # gloo on the CPU, also where a GPU is present
    return run_script(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args, "--device", "cpu"
    )


def test_torchrun_two_processes_train_one_run_and_resume(data_dir, tmp_path):
    """Two gloo processes: metrics over the whole data set, one console, one set of events, and --resume."""
    run = tmp_path / "r"
    result = torchrun(*train_args(data_dir, tmp_path, "--run-name", "r"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Summary:") == 2  # rank 0 alone prints
    assert "Iteration[003/003]" in result.stdout  # 24 images, 12 per rank, batches of 4
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["totals"]["seen"] == 24 and checkpoint["step"] == 6  # the whole data set, 3 steps an epoch
    assert not any(name.startswith("module.") for name in checkpoint["model"])  # loads into a plain Net
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one writer, the HParams summary in its file

    result = torchrun("--resume", run, "--epochs", "3")
    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stdout
    assert histogram_steps(load_events(run)) == {tag: [1, 2, 3] for tag in HISTOGRAM_TAGS}
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 9


def test_clip_grad_norm_logs_the_norm_before_clipping_and_the_share_of_clipped_steps(data_dir, tmp_path):
    """The monitor's own gradient norm, read after clipping, is the oracle: min(norm before, MAX) at every step."""
    for run, max_norm in (("tight", "0.01"), ("loose", "1e6")):
        assert (
            train.main(
                train_args(data_dir, tmp_path, "--run-name", run, "--clip-grad-norm", max_norm, "--stats-every", "1")
            )
            == 0
        )
        steps, epochs = load_events(tmp_path / run / "steps"), load_events(tmp_path / run)
        before, after = steps.Scalars("clip/grad_norm"), steps.Scalars("grad_norm/total")
        assert [e.step for e in before] == [e.step for e in after] == list(range(1, 13))
        for b, a, clipped in zip(before, after, steps.Scalars("clip/clipped")):
            assert a.value == pytest.approx(min(b.value, float(max_norm)), rel=1e-4)
            assert clipped.value == float(b.value > float(max_norm))
        share = [e.value for e in epochs.Scalars("clip/clipped_share")]
        findings = [f["rule"] for f in json.loads((tmp_path / run / "diagnosis.json").read_text())["findings"]]
        if run == "tight":
            assert share == [1.0, 1.0] and "mostly_clipped" in findings
        else:
            assert share == [0.0, 0.0] and "mostly_clipped" not in findings
    assert json.loads((tmp_path / "tight" / "args.json").read_text())["clip_grad_norm"] == 0.01


def test_amp_bf16_trains_on_the_cpu_and_fp16_asks_for_cuda(data_dir, tmp_path, capsys):
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--amp", "bf16", epochs=1)) == 0
    assert histogram_steps(load_events(tmp_path / "r")) == {tag: [1] for tag in HISTOGRAM_TAGS}
    if not torch.cuda.is_available():
        assert train.main(train_args(data_dir, tmp_path, "--amp", "fp16", "--device", "cpu", epochs=1)) == 1
        assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err


@pytest.mark.monitor_failures
def test_a_failing_rule_or_statistic_never_ends_the_run(data_dir, tmp_path, capsys, monkeypatch):
    """The monitor's own failures are reported once, in one line, with the traceback in the run folder; the run
    finishes, its checkpoints and the rest of the monitor's work intact."""
    import gradwatch.diagnosis
    import gradwatch.monitor

    def broken_rule(history, thresholds):
        raise ZeroDivisionError("a rule that divides by a zero norm")

    def broken_statistics(*args, **kwargs):
        raise RuntimeError("statistics of a strange parameter")

    broken = gradwatch.diagnosis.Rule("broken_rule", broken_rule, "nothing to try")
    monkeypatch.setitem(gradwatch.diagnosis.RULES, "broken_rule", broken)
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "rule", "--stats-every", "2")) == 0
    log = tmp_path / "rule" / "gradwatch-errors.log"
    assert capsys.readouterr().err.splitlines() == [
        f"gradwatch: the broken_rule rule failed (ZeroDivisionError: a rule that divides by a zero norm); training "
        f"goes on; see {log}"
    ]
    assert log.read_text().count("Traceback") == 2  # each epoch's failure
    assert json.loads((tmp_path / "rule" / "diagnosis.json").read_text())["findings"] == []  # the other rules ran

    monkeypatch.setattr(gradwatch.monitor, "parameter_statistics", broken_statistics)
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "statistics", "--stats-every", "2")) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("statistics" in line and "RuntimeError" in line for line in err)  # steps', epoch's
    assert torch.load(tmp_path / "statistics" / "last.pt", weights_only=True)["epoch"] == 2
    assert histogram_steps(load_events(tmp_path / "statistics")) == {tag: [1, 2] for tag in HISTOGRAM_TAGS}


DAMAGED_ARGS = {
    "not JSON": "{'epochs': 1",
    "empty": "",
    "not an object": "[1, 2]",
    "keys missing": '{"epochs": 1}',
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of one epoch, to be copied and damaged."""
    root = tmp_path_factory.mktemp("finished")
    data = make_data(root / "Data")
    assert train.main(train_args(data, root / "Result", "--run-name", "r", epochs=1)) == 0
    return root / "Result" / "r"


def damaged_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "r"))


@pytest.mark.parametrize("form", DAMAGED_ARGS)
def test_a_damaged_args_json_gets_one_line_and_nothing_is_lost(form, finished_run, tmp_path, capsys):
    run = damaged_copy(finished_run, tmp_path)
    (run / "args.json").write_text(DAMAGED_ARGS[form])
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(run), "--epochs", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{run / 'args.json'} is damaged (" in err and "restore it, or start a new run" in err
    assert "Traceback" not in err and sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize(
    "saved, message",
    [
        ({"batch_size": "sixteen"}, "--batch-size must be a positive integer, got sixteen"),
        ({"lr": -1}, "--lr must be a positive number, got -1"),
        ({"amp": "fp8"}, "--amp must be one of off, bf16, fp16, got 'fp8'"),
        ({"fsdp": "yes"}, "--fsdp must be true or false, got 'yes'"),
        ({"layer_lr": [["conv1", "x"]]}, "--layer-lr must be a positive number, got x"),
        (
            {"threshold": [["stuck_epochs", "nan"]]},
            "--threshold stuck_epochs must be a whole number, 0 or more, got 'nan'",
        ),
        ({"seed": 2**64}, f"--seed must be an integer from 0 to 2**64 - 1 (what torch.manual_seed takes), got {2**64}"),
    ],
)
def test_values_of_a_damaged_args_json_are_checked_as_the_parser_checks_them(saved, message, finished_run, tmp_path,
                                                                             capsys):  # fmt: skip
    run = damaged_copy(finished_run, tmp_path)
    args = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**args, **saved}))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(run), "--epochs", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: {run / 'args.json'} is damaged ({message}); restore it, or start a new run")
    if "batch_size" in saved:  # what the command line gives is not checked against the file
        assert train.main(["--resume", str(run), "--epochs", "2", "--batch-size", "8"]) == 0


DAMAGED_CHECKPOINTS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:1000]),
    "random bytes": lambda path: path.write_bytes(bytes(range(256)) * 40),
    "empty": lambda path: path.write_bytes(b""),
    "keys missing": lambda path: torch.save({"model": {}}, path),
}


@pytest.mark.parametrize("form", DAMAGED_CHECKPOINTS)
def test_a_damaged_last_pt_gets_one_line_and_nothing_is_lost(form, finished_run, tmp_path, capsys):
    run = damaged_copy(finished_run, tmp_path)
    DAMAGED_CHECKPOINTS[form](run / "last.pt")
    kept = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run / 'last.pt'}: not a"), err
    assert "copy best.pt over it" in err and "weights_only=False" not in err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == kept


def edited(change):
    """A form of last.pt that loads but holds values train.py does not save: `change(checkpoint)`."""

    def damage(path):
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)

    return damage


def another_net(checkpoint):  # Net edited after the run: a layer of another width
    checkpoint["model"]["fc1.weight"] = torch.zeros(100, 400)


def momentum_of_another_shape(checkpoint):
    state = checkpoint["optimizer"]["state"]
    state[0]["momentum_buffer"] = torch.zeros(3)


WRONG_VALUES = {
    "another Net": (another_net, "its model or optimizer state does not fit the run as built (RuntimeError: "),
    "garbage optimizer": (
        lambda c: c.update(optimizer={"state": {}, "param_groups": "x"}),
        "checkpoint['optimizer']['param_groups'] is a str where a list belongs",
    ),
    "momentum of another shape": (momentum_of_another_shape, "its momentum_buffer of conv1.weight has shape (3,)"),
    "negative epoch": (lambda c: c.update(epoch=-5), "checkpoint['epoch'] is -5, below 0"),
    "string epoch": (lambda c: c.update(epoch="5"), "checkpoint['epoch'] is a str where an int belongs"),
    "rng of another size": (lambda c: c["rng"].update(cpu=torch.zeros(10, dtype=torch.uint8)), "checkpoint['rng']"),
    "scheduler of strings": (lambda c: c["scheduler"].update(last_epoch="1"), "checkpoint['scheduler']['last_epoch']"),
    "classes not a list": (lambda c: c.update(classes=3), "checkpoint['classes'] is an int where a list belongs"),
}


@pytest.mark.parametrize("form", WRONG_VALUES)
def test_a_last_pt_of_wrong_values_gets_one_line_and_nothing_is_lost(form, finished_run, tmp_path, capsys):
    change, words = WRONG_VALUES[form]
    run = damaged_copy(finished_run, tmp_path)
    edited(change)(run / "last.pt")
    kept = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run / 'last.pt'}: ") and words in err, err
    assert "start a new run" in err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == kept


@pytest.mark.parametrize("monitor", ["garbage", {"steps": "7"}, {"history": [{"epoch": "x"}]}])
def test_a_damaged_monitor_state_restarts_the_diagnosis_and_the_run_goes_on(monitor, finished_run, tmp_path, capsys):
    run = damaged_copy(finished_run, tmp_path)
    edited(lambda c: c.update(monitor=monitor if isinstance(monitor, str) else {**c["monitor"], **monitor}))(
        run / "last.pt"
    )
    assert train.main(["--resume", str(run), "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {run / 'last.pt'}: the monitor's saved state is damaged (not a TrainingMonitor")
    assert err.count("\n") == 1 and "its diagnosis starts afresh at epoch 2" in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_a_run_folder_that_cannot_be_made_gets_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert train.main(train_args(data_dir, tmp_path / "file", "--run-name", "r", epochs=1)) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'file' / 'r'}: cannot create the run folder (")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "taken").write_text("a file where the run would go")
    assert train.main(train_args(data_dir, tmp_path / "runs", "--run-name", "taken", epochs=1)) == 1
    assert "cannot create the run folder" in capsys.readouterr().err


def test_one_run_folder_has_one_writer(data_dir, tmp_path, capsys):
    """A second train.py on a run folder that another one holds is refused, naming it."""
    (tmp_path / "r").mkdir()
    with open(tmp_path / "r" / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("12345")
        lock.flush()
        holder = subprocess.run(
            [sys.executable, "train.py", *train_args(data_dir, tmp_path, "--run-name", "r", epochs=1)],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
    assert holder.returncode == 1
    assert holder.stderr.strip() == (
        f"error: {tmp_path / 'r'} is being trained by another train.py (process 12345); wait for it to end, or pick "
        "another --run-name"
    )
    assert not (tmp_path / "r" / "args.json").exists()


def test_one_epoch_numbering_from_the_console_to_tensorboard_and_diagnosis_json(data_dir, tmp_path, capsys):
    """An epoch is the same number wherever it is shown, the first being 1: a finding of the first epoch of three."""
    args = train_args(
        data_dir, tmp_path, "--run-name", "r", "--threshold", "update_slow=1", "--stats-every", 3, epochs=3
    )
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "Epoch[001/003]" in out and "Epoch[003/003]" in out and "Problem, epoch 1-3," in out
    run = tmp_path / "r"
    finding = next(
        f for f in json.loads((run / "diagnosis.json").read_text())["findings"] if f["rule"] == "not_learning"
    )
    assert (finding["epoch"], finding["last_epoch"]) == (1, 3)
    events = load_events(run)
    texts = events.Tensors("diagnosis/text_summary")
    assert [t.step for t in texts] == [1, 2, 3] and b"epoch 1" in texts[0].tensor_proto.string_val[0]
    for steps in ([e.step for e in events.Images("gradient_flow")], [e.step for e in events.Scalars("Loss/valid")]):
        assert steps == [1, 2, 3]


def test_help_answers_before_torch_loads():
    """--help lists every option without importing torch (3 s idle, 20 s and more on a loaded machine)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0 and "--stats-every" in result.stdout and "--threshold NAME=VALUE" in result.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "options" in imported and "gradwatch.diagnosis.loop" in imported and "torch" not in imported
