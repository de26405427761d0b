"""What users see: a real TensorBoard process serving a short run, read through its HTTP data API."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import torch
from test_train import HISTOGRAM_TAGS, train_args

import train


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def served_run(data_dir, tmp_path):
    # --threshold update_fast=1e-9 makes the moving_too_fast rule fire, so the Text tab has a finding to show
    assert (
        train.main(
            train_args(
                data_dir, tmp_path / "logs", "--run-name", "r", "--threshold", "update_fast=1e-9", "--stats-every", "3"
            )
        )
        == 0
    )
    port = free_port()
    tensorboard = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"), "--host", "127.0.0.1"]
    server = subprocess.Popen([*tensorboard, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:  # the server is up once it lists the run with its histogram tags
            try:
                if set(get(port, "/data/plugin/histograms/tags").get("r", {})) == HISTOGRAM_TAGS:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "tensorboard did not start"
            time.sleep(0.5)
        yield port, tmp_path / "logs" / "r"
    finally:
        server.terminate()
        server.wait(timeout=30)


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

    accuracy = get(port, "/data/plugin/scalars/scalars", run="r", tag="valid/accuracy")
    assert [step for _, step, _ in accuracy] == [1, 2] and all(0 <= value <= 1 for _, _, value in accuracy)
    update = get(port, "/data/plugin/scalars/scalars", run="r/steps", tag="update_ratio/conv1.weight")
    assert [step for _, step, _ in update] == [3, 6, 9, 12]
    assert set(get(port, "/data/plugin/images/tags")["r"]) == {"gradient_flow", "valid/confusion_matrix"}

    texts = get(port, "/data/plugin/text/text", run="r", tag="diagnosis/text_summary")
    assert [t["step"] for t in texts] == [1, 2] and "moving_too_fast" in texts[0]["text"]
