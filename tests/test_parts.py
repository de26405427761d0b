"""Several models in one loop: README's GAN and actor-critic as printed, each part diagnosed on its own and named
in the story, and a part's bug found in that part alone."""

import json

import pytest
import torch
from conftest import load_events, readme_python
from torch import nn

from gradwatch import TrainingMonitor


def gan(log_dir, forget_d_zero_grad=False, epochs=2, state=None):
    """A small GAN on a 2-D Gaussian, README's; returns the monitor (closed) and what each epoch_end returned."""
    torch.manual_seed(0)
    real = torch.randn(1024, 2) + 2
    generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    monitor = TrainingMonitor(log_dir, stats_every=8)
    monitor.watch(
        {"generator": generator, "discriminator": discriminator}, {"generator": opt_g, "discriminator": opt_d}
    )
    if state is not None:
        monitor.load_state_dict(state)
    returned = []
    with monitor:
        for epoch in range(epochs):
            for batch in real.split(64):
                fake = generator(torch.randn(len(batch), 8))
                if not forget_d_zero_grad:
                    opt_d.zero_grad()
                d_loss = bce(discriminator(batch), torch.ones(len(batch), 1))
                d_loss = d_loss + bce(discriminator(fake.detach()), torch.zeros(len(batch), 1))
                d_loss.backward()
                opt_d.step()
                monitor.step(d_loss, part="discriminator")
                opt_g.zero_grad()
                g_loss = bce(discriminator(fake), torch.ones(len(batch), 1))
                g_loss.backward()
                opt_g.step()
                monitor.step(g_loss, part="generator")
            scalars = {"generator/train_loss": g_loss.item(), "discriminator/train_loss": d_loss.item()}
            returned.append(monitor.epoch_end(epoch, scalars))
    return monitor, returned


def test_readmes_gan_runs_as_printed_each_part_in_its_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python("## Three ways to use it", 1), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "No findings."
    run = tmp_path / "Result" / "gan"
    for part in ("generator", "discriminator"):
        steps = load_events(run / part / "steps").Scalars("loss")
        assert [e.step for e in steps][:2] == [1, 2]  # the first two steps, read whatever the cadence
        assert "0.weight_grad" in load_events(run / part).Tags()["histograms"]
    assert "generator/train_loss" in load_events(run).Tags()["scalars"]  # what epoch_end was given, in the run
    saved = json.loads((run / "diagnosis.json").read_text())
    assert saved["findings"] == [] and set(saved["facts"]) == {"generator", "discriminator"}
    # the generator's loss reaches the discriminator's parameters: neither is judged as a loss to minimise
    assert saved["facts"]["generator"]["loss"]["reaches_parts"] == ["discriminator"]
    assert saved["facts"]["generator"]["objective"] == saved["facts"]["discriminator"]["objective"] == "other"


def test_readmes_actor_critic_runs_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python("## Three ways to use it", 2), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("No findings.") and float(out.split("end: ")[1].rstrip(")\n")) > 0.8  # it learnt
    facts = json.loads((tmp_path / "Result" / "actor-critic" / "diagnosis.json").read_text())["facts"]
    assert facts["objective"] == "other" and facts["loss"]["losses"][0]["function"] == "mse_loss"


def test_a_bug_in_one_part_is_named_in_that_part_alone(tmp_path):
    monitor, returned = gan(tmp_path, forget_d_zero_grad=True)
    first = monitor.findings[0]
    assert (first.part, first.rule, first.id) == (
        "discriminator",
        "gradients_not_cleared",
        "discriminator:gradients_not_cleared",
    )
    assert all(f.part == "discriminator" for f in monitor.findings)
    assert first.id in [f.id for f in returned[0]]
    assert monitor.story().startswith("Problem, discriminator, epoch 1")
    saved = json.loads((tmp_path / "diagnosis.json").read_text())["findings"]
    assert saved[0]["part"] == "discriminator"
    # the generator's own folder holds its own diagnosis: nothing
    assert json.loads((tmp_path / "generator" / "diagnosis.json").read_text())["findings"] == []


def test_parts_are_named_at_each_step_and_resume_from_their_state(tmp_path):
    monitor, _ = gan(tmp_path / "a", epochs=1)
    state = monitor.state_dict()
    assert set(state["parts"]) == {"generator", "discriminator"} and state["parts"]["generator"]["steps"] == 16
    monitor, _ = gan(tmp_path / "a", epochs=1, state=state)
    assert monitor.parts.monitors["generator"].steps == 32  # went on from the saved steps
    with pytest.raises(ValueError, match="part= one of generator, discriminator"):
        monitor.step(torch.tensor(1.0))
    with pytest.raises(ValueError, match="the same names"):
        TrainingMonitor(tmp_path / "b").watch({"g": nn.Linear(2, 2)}, {"d": None})
    with pytest.raises(ValueError, match="a folder of the run"):
        TrainingMonitor(tmp_path / "c").watch({"../g": nn.Linear(2, 2)})
