"""What users see: a real TensorBoard process serving a short run, read through its HTTP data API."""

import contextlib
import functools
import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch
from conftest import load_events
from tensorboard.plugins.hparams import metadata
from test_train import HISTOGRAM_TAGS, train_args

import train
from gradwatch import TrainingMonitor
from options import hyperparameters, parse_args


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def served(logdir, ready):
    """A TensorBoard process over `logdir`, once `ready(port)` holds; its port."""
    port = free_port()
    tensorboard = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    server = subprocess.Popen([*tensorboard, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if ready(port):
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "tensorboard did not start"
            time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def hparams_experiment(port):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/data/plugin/hparams/experiment",
        data=json.dumps({"experimentName": ""}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def has_histograms(port):
    return set(get(port, "/data/plugin/histograms/tags").get("r", {})) == HISTOGRAM_TAGS


@pytest.fixture
def served_run(data_dir, tmp_path):
    # --threshold update_slow=1 makes the not_learning rule fire, so the Text tab has a finding to show
    assert (
        train.main(
            train_args(
                data_dir, tmp_path / "logs", "--run-name", "r", "--threshold", "update_slow=1", "--stats-every", "3"
            )
        )
        == 0
    )
    with served(tmp_path / "logs", has_histograms) as port:  # up once it lists the run with its histogram tags
        yield port, tmp_path / "logs" / "r"


def test_tensorboard_serves_histograms_scalars_images_and_diagnosis(served_run):
    port, run = served_run
    assert set(get(port, "/data/runs")) == {"r", "r/steps"}

    weights = get(port, "/data/plugin/histograms/histograms", run="r", tag="fc3.bias_data")
    assert [step for _, step, _ in weights] == [1, 2]
    bias = torch.load(run / "last.pt", weights_only=True)["model"]["fc3.bias"]
    buckets = weights[-1][2]  # [left, right, count] per bucket, as the Histograms tab draws them
    assert sum(count for _, _, count in buckets) == bias.numel()
    assert buckets[0][0] == pytest.approx(bias.min().item()) and buckets[-1][1] == pytest.approx(bias.max().item())
    gradients = get(port, "/data/plugin/histograms/histograms", run="r", tag="conv1.weight_grad")
    assert [step for _, step, _ in gradients] == [1, 2]
    assert sum(count for _, _, count in gradients[0][2]) == 6 * 3 * 5 * 5

    accuracy = get(port, "/data/plugin/scalars/scalars", run="r", tag="Accuracy/valid")
    assert [step for _, step, _ in accuracy] == [1, 2] and all(0 <= value <= 1 for _, _, value in accuracy)
    update = get(port, "/data/plugin/scalars/scalars", run="r/steps", tag="update_ratio/conv1.weight")
    assert [step for _, step, _ in update] == [1, 2, 3, 6, 9, 12]  # the first two steps read the loop
    assert set(get(port, "/data/plugin/images/tags")["r"]) == {"gradient_flow", "valid/confusion_matrix"}

    texts = get(port, "/data/plugin/text/text", run="r", tag="diagnosis/text_summary")
    assert [t["step"] for t in texts] == [1, 2] and "not_learning" in texts[0]["text"]


def tensorboard_order(a, b):
    """TensorBoard's compareTagNames (tensorboard/webapp/metrics/utils.ts), by which Time Series orders its cards:
    digit runs compare as numbers, a break ('/' or a digit) comes before any other character, the rest by code."""

    def number_end(s, i):
        while i < len(s) and (s[i].isdigit() or s[i] == "."):
            i += 1
        return i

    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            ei, ej = number_end(a, i + 1), number_end(b, j + 1)
            x, y = float(a[i:ei].rstrip(".") or 0), float(b[j:ej].rstrip(".") or 0)
            if x != y:
                return -1 if x < y else 1
            i, j = ei, ej
            continue
        a_break, b_break = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if a_break != b_break:
            return -1 if a_break else 1
        if not a_break and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def test_the_first_view_opens_on_the_curves_and_custom_scalars_charts_them(served_run):
    port, _ = served_run
    listing = get(port, "/data/plugin/timeseries/tags")  # what the Time Series tab lays out, every run together
    tags = {tag for kind in ("scalars", "histograms") for run in listing[kind]["runTagInfo"].values() for tag in run}
    tags |= set(listing["images"]["tagRunSampledInfo"])
    ordered = sorted(tags, key=functools.cmp_to_key(tensorboard_order))
    sections = list(dict.fromkeys(tag.split("/", 1)[0] for tag in ordered))  # in the order of their first card
    assert sections[:3] == ["Accuracy", "Loss", "Optimizer"]  # Scalars opens the first two
    assert {"conv1.weight_grad", "fc3.bias_data"} <= tags  # the tutorial's histograms, after the curves
    assert "grad_norm" in sections and sections.index("grad_norm") > 2  # a section per statistic
    assert not any(tag.startswith("nonfinite_share/") for tag in tags)  # zero all the run: not charted

    layout = get(port, "/data/plugin/custom_scalars/layout")["category"]
    charts = {chart["title"]: chart["multiline"]["tag"] for category in layout for chart in category["chart"]}
    step_tags = set(listing["scalars"]["runTagInfo"]["r/steps"])
    matched = {title: {t for t in tags | step_tags for pattern in patterns if re.match(pattern, t)}
               for title, patterns in charts.items()}  # fmt: skip
    assert matched["loss: train and valid"] == {"Loss/train", "Loss/valid"} and matched[
        "accuracy: train and valid"
    ] == {
        "Accuracy/train",
        "Accuracy/valid",
    }
    assert matched["learning rate"] == {"Optimizer/learning rate"} and matched["total gradient norm"] == {
        "grad_norm/total"
    }
    assert matched["update ratio: the fastest and the slowest layer"] == {"update_ratio/max", "update_ratio/min"}
    assert matched["dead share: the most silent ReLU"] == {"dead_share/max"}
    ratio = {}
    for name in ("max", "min", "conv1.weight", "fc3.bias"):
        points = get(port, "/data/plugin/scalars/scalars", run="r/steps", tag=f"update_ratio/{name}")
        ratio[name] = [value for _, _, value in points]
    for layer in ("conv1.weight", "fc3.bias"):  # the extremes bound every layer's ratio at every reading
        assert all(low <= value <= high for low, value, high in zip(ratio["min"], ratio[layer], ratio["max"]))


def test_hparams_ticks_the_settings_most_compared_and_shows_clipping_off(served_run):
    port, run = served_run
    experiment = hparams_experiment(port)
    names = [info["name"] for info in experiment["hparamInfos"]]  # in TensorBoard's order; it ticks the first five
    assert names[:5] == ["Batch size", "Clipping", "Learning rate", "Momentum", "Weight decay"]
    assert {"epochs", "layer_lr"} <= set(names[5:])
    content = load_events(run).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = metadata.parse_session_start_info_plugin_data(content).hparams
    assert values["Clipping"].string_value == "off" and values["Learning rate"].number_value == 0.01
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [
        "hparam/best_valid_accuracy",
        "hparam/final_train_loss",
    ]


def test_hparams_ticks_the_same_five_settings_when_runs_differ_in_another(tmp_path):
    """Two runs of train.py's settings that differ only in epochs: TensorBoard still ticks the five named, in
    name order (the experiment summary each run carries fixes the order), as docs/tensorboard.md says."""
    for epochs in (10, 20):
        with TrainingMonitor(tmp_path / f"e{epochs}") as monitor:
            args = parse_args(["--epochs", str(epochs)])
            monitor.log_hparams(hyperparameters(args), {"hparam/best_valid_accuracy": 0.5}, epochs - 1)
    with served(tmp_path, lambda port: set(get(port, "/data/runs")) == {"e10", "e20"}) as port:
        names = [info["name"] for info in hparams_experiment(port)["hparamInfos"]]
    assert names[:5] == ["Batch size", "Clipping", "Learning rate", "Momentum", "Weight decay"]
    assert "epochs" in names[5:]
