"""Histograms and statistics on the GPU, AMP with GradScaler, and train.py on CUDA. Skipped without a GPU."""

import numpy as np
import pytest
import torch
from conftest import histogram_steps, load_events
from test_histograms import check_against_numpy
from test_train import HISTOGRAM_TAGS, train_args
from torch import nn

import train
from gradwatch import TrainingMonitor, compute_histograms, parameter_statistics
from gradwatch.histograms import CHUNK

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_tensors():
    g = torch.Generator().manual_seed(0)
    with_nonfinite = torch.randn(10_000, generator=g)
    with_nonfinite[[1, 5, 9]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return {
        "big": torch.randn(3_000_001, generator=g),
        "half": torch.randn(5000, generator=g).half(),
        "bf16": (torch.randn(5000, generator=g) * 300).bfloat16(),
        "nonfinite": with_nonfinite,
        "constant": torch.full((7,), 0.25),
        "all_nan": torch.full((4,), float("nan")),
        "scales": torch.randn(20_000, generator=g) * 10 ** torch.randint(-30, 30, (20_000,), generator=g),
        "far": 1000 + torch.randn(150_001, generator=g) * 1e-3,
        "chunked": torch.randn(CHUNK + 7, generator=g),
        "wide": torch.randn(20_000, generator=g) * 100,
    }


def test_histograms_binned_on_the_gpu_match_numpy_and_the_cpu():
    tensors = cuda_tensors()
    on_gpu = compute_histograms({name: t.cuda() for name, t in tensors.items()})
    on_cpu = compute_histograms(tensors)
    mixed = compute_histograms({name: t.cuda() if i % 2 else t for i, (name, t) in enumerate(tensors.items())})
    for name, tensor in tensors.items():
        gpu, cpu = on_gpu[name], on_cpu[name]
        assert (gpu.num, gpu.nonfinite, gpu.min, gpu.max) == (cpu.num, cpu.nonfinite, cpu.min, cpu.max), name
        np.testing.assert_array_equal(gpu.bucket_limits, cpu.bucket_limits)
        np.testing.assert_array_equal(gpu.bucket_counts, cpu.bucket_counts)
        np.testing.assert_array_equal(mixed[name].bucket_counts, cpu.bucket_counts)
        if gpu.num:
            check_against_numpy(gpu, tensor)


def test_statistics_on_the_gpu_equal_those_on_the_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model(torch.randn(8, 16)).square().mean().backward()
    on_cpu = parameter_statistics(model)
    assert parameter_statistics(model.cuda()) == pytest.approx(on_cpu, rel=1e-5)


def test_under_cuda_amp_the_monitor_sees_unscaled_gradients(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(64, 16, device="cuda"), torch.randint(0, 4, (64,), device="cuda")
    norms = {}
    for scale in (None, 2.0**16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        scaler = torch.amp.GradScaler("cuda", init_scale=scale or 1.0, enabled=scale is not None)
        with TrainingMonitor(tmp_path / str(scale), stats_every=1).watch(model, optimizer) as monitor:
            for i in range(0, 64, 32):
                optimizer.zero_grad()
                with torch.autocast("cuda", dtype=torch.float16, enabled=scale is not None):
                    loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                monitor.step()
        norms[scale] = [e.value for e in load_events(tmp_path / str(scale) / "steps").Scalars("grad_norm/0.weight")]
    assert norms[2.0**16] == pytest.approx(norms[None], rel=1e-2)  # fp16 forward: close, not equal


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_train_py_on_cuda(amp, data_dir, tmp_path, capsys):
    assert train.main(train_args(data_dir, tmp_path, "--run-name", "r", "--device", "cuda", "--amp", amp)) == 0
    assert "images/s" in capsys.readouterr().out
    assert histogram_steps(load_events(tmp_path / "r")) == {tag: [0, 1] for tag in HISTOGRAM_TAGS}
    checkpoint = torch.load(tmp_path / "r" / "last.pt", weights_only=True, map_location="cpu")
    assert all(t.device.type == "cpu" for t in checkpoint["model"].values())
    assert "cuda" in checkpoint["rng"]
    # resuming on the GPU: the checkpoint is loaded onto it, random states included
    assert train.main(["--resume", str(tmp_path / "r"), "--epochs", "3"]) == 0
    assert histogram_steps(load_events(tmp_path / "r")) == {tag: [0, 1, 2] for tag in HISTOGRAM_TAGS}


def test_train_py_clips_the_unscaled_gradients_under_fp16(data_dir, tmp_path):
    """With a threshold no step reaches, the norm before clipping is the monitor's own norm of the unscaled
    gradients: a scaled norm would be 2^16 times larger."""
    args = train_args(data_dir, tmp_path, "--run-name", "r", "--device", "cuda", "--amp", "fp16", "--stats-every", "1")
    assert train.main([*args, "--clip-grad-norm", "1e6"]) == 0
    steps = load_events(tmp_path / "r" / "steps")
    before = {e.step: e.value for e in steps.Scalars("clip/grad_norm")}
    after = {e.step: e.value for e in steps.Scalars("grad_norm/total")}
    assert before and before == pytest.approx({step: after[step] for step in before}, rel=1e-4)
    assert [e.value for e in load_events(tmp_path / "r").Scalars("clip/clipped_share")] == [0.0, 0.0]
