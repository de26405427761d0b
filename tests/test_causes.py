"""Symptoms and their causes: a finding names a cause only where a check of it holds, and the facts those checks
read (each weight's depth below the loss, read from the loss's graph)."""

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradwatch import Thresholds, TrainingMonitor
from gradwatch.graph import loss_graph


def depths_of(loss, named):
    loss.backward()
    graph = loss_graph(loss, named)
    return graph["depths"], graph["lookups"]


def test_each_weight_is_as_deep_below_the_loss_as_its_fewest_layers_on_any_way():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    loss = F.cross_entropy(mlp(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1]))
    assert depths_of(loss, list(mlp.named_parameters())) == ({"0.weight": 2, "2.weight": 1, "4.weight": 0}, [])

    # two heads on one trunk (an actor and a critic): both are nearest the loss
    trunk, actor, critic = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 1)
    hidden = torch.tanh(trunk(torch.randn(6, 4)))
    loss = F.cross_entropy(actor(hidden), torch.zeros(6, dtype=torch.long)) + critic(hidden).pow(2).mean()
    named = [("trunk", trunk.weight), ("actor", actor.weight), ("critic", critic.weight)]
    assert depths_of(loss, named) == ({"trunk": 1, "actor": 0, "critic": 0}, [])

    # an embedding is read by a lookup; a Linear on a sequence adds its bias apart, which makes no layer of it
    embedding, lstm, decoder = nn.Embedding(50, 8), nn.LSTM(8, 16, 2, batch_first=True), nn.Linear(16, 50)
    tokens = torch.randint(50, (2, 7))
    loss = F.cross_entropy(decoder(lstm(embedding(tokens))[0]).reshape(-1, 50), tokens.reshape(-1))
    named = [("embedding", embedding.weight), ("ih0", lstm.weight_ih_l0), ("ih1", lstm.weight_ih_l1)]
    named += [("decoder", decoder.weight), ("decoder.bias", decoder.bias)]
    assert depths_of(loss, named) == ({"embedding": 3, "ih0": 2, "ih1": 1, "decoder": 0}, ["embedding"])


def actor_critic(log_dir, steps=120):
    """Two towers trained by one loss: the actor's cross-entropy, and the critic's squared error on returns near
    1,000 (as a policy-gradient loss adds them). Returns the findings and the gradient RMS of the actor's first layer
    over the critic's head at the end."""
    torch.manual_seed(0)
    actor = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    critic = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    model = nn.ModuleDict({"actor": actor, "critic": critic})
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    with TrainingMonitor(log_dir, stats_every=10).watch(model, optimizer) as monitor:
        for _ in range(steps):
            states = torch.randn(64, 4)
            actions = (states[:, 0] > 0).long()
            returns = 1000 + 100 * states[:, 1:2]
            optimizer.zero_grad()
            loss = F.cross_entropy(actor(states), actions) + F.mse_loss(critic(states), returns)
            loss.backward()
            optimizer.step()
            monitor.step(loss)
    rms = actor[0].weight.grad.pow(2).mean().sqrt() / critic[4].weight.grad.pow(2).mean().sqrt()
    return monitor.findings, float(rms)


def test_a_head_of_large_loss_is_not_what_another_heads_layers_are_measured_against(tmp_path):
    """The actor's first layer gets gradients over a hundred times smaller than the critic's head (a vanishing
    gradient by model order, the critic's head being the last layer), but it is measured against its own head,
    the actor's: no finding."""
    findings, ratio = actor_critic(tmp_path)
    assert ratio < Thresholds().vanishing_ratio
    assert "vanishing_gradients" not in {f.rule for f in findings}


def regression(log_dir, targets, steps=96):
    """A linear regression from weights near zero (as d2l's: normal with std 0.01), SGD at 0.03, batches of 32."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    nn.init.normal_(model.weight, 0, 0.01)
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    with TrainingMonitor(log_dir, stats_every=8).watch(model, optimizer, objective="regression") as monitor:
        for step in range(steps):
            x = torch.randn(32, 2)
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), targets(x))
            loss.backward()
            optimizer.step()
            monitor.step(loss)
            if step % 32 == 31:
                monitor.epoch_end(step // 32, {})
    return monitor.findings


def test_large_steps_that_bring_the_loss_down_are_learning_and_without_a_check_of_a_cause_a_symptom(tmp_path):
    """Weights that start near zero move by much of their size while the loss falls: no finding. Targets of noise
    alone: the weights move as fast and the loss does not fall, but it does not rise either, so no check of the
    learning rate holds: the finding names no cause and says what to check, the learning rate among them."""
    findings = regression(tmp_path / "learns", lambda x: x @ torch.tensor([[2.0], [-3.4]]) + 4.2)
    assert "moving_too_fast" not in {f.rule for f in findings}
    findings = regression(tmp_path / "noise", lambda x: 5 * torch.randn(len(x), 1))
    fast = next(f for f in findings if f.rule == "moving_too_fast")
    assert fast.evidence["cause"] is None and fast.evidence["update_ratio"]["weight"] > Thresholds().update_fast
    assert fast.suggestion.startswith("check, in this order: the learning rate")


def test_a_loss_that_stays_at_the_start_in_a_few_steps_blames_neither_the_rate_nor_the_data(tmp_path):
    """Three epochs of four steps on random labels: the loss stays at ln C while the weights move, which after
    more steps points at the labels; twelve steps say nothing yet of the data or the learning rate: the finding
    says so, and makes no claim on either."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    thresholds = Thresholds(stuck_epochs=3, chance_margin=0.2)
    with TrainingMonitor(tmp_path, stats_every=2, thresholds=thresholds).watch(model, optimizer) as monitor:
        for epoch in range(3):
            for _ in range(4):
                x = torch.randn(32, 20)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), torch.randint(4, (32,)))
                loss.backward()
                optimizer.step()
                monitor.step(loss)
            monitor.epoch_end(epoch, {"train/accuracy": 0.25}, classes=list("abcd"))
    stuck = next(f for f in monitor.findings if f.rule == "stuck")
    assert stuck.evidence["cause"] == "few_steps" and stuck.evidence["steps"] == 12
    assert stuck.cause is None and "more steps" in stuck.suggestion
    assert "larger learning rate" not in stuck.suggestion and "labels match" not in stuck.suggestion


def test_a_target_network_kept_apart_is_neither_left_out_of_the_optimizer_nor_cut_from_the_graph(tmp_path):
    """A DQN's loop: the online network trains, its target copy (which requires gradients, as a deepcopy does)
    gives the targets under no_grad and is copied over now and then. The copy is in no optimizer and the loss does
    not reach it, by design: no finding. A layer the loss does reach but the optimizer left out still is one."""
    import copy

    torch.manual_seed(0)

    def run(log_dir, leave_out_head):
        online = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
        model = nn.ModuleDict({"online": online, "target": copy.deepcopy(online)})
        trained = online[0].parameters() if leave_out_head else online.parameters()
        optimizer = torch.optim.Adam(trained, lr=1e-3)
        with TrainingMonitor(log_dir, stats_every=5).watch(model, optimizer, objective="rl") as monitor:
            for step in range(40):
                states, following = torch.randn(32, 4), torch.randn(32, 4)
                with torch.no_grad():
                    targets = 1 + 0.9 * model["target"](following).max(1).values
                optimizer.zero_grad()
                loss = F.smooth_l1_loss(online(states).gather(1, torch.zeros(32, 1, dtype=torch.long)).squeeze(1),
                                        targets)  # fmt: skip
                loss.backward()
                optimizer.step()
                monitor.step(loss)
                if step % 10 == 9:
                    model["target"].load_state_dict(online.state_dict())
        return {f.rule: f for f in monitor.findings}

    found = run(tmp_path / "dqn", leave_out_head=False)
    assert "not_in_optimizer" not in found and "no_gradient" not in found and "not_learning" not in found
    found = run(tmp_path / "head_left_out", leave_out_head=True)
    assert found["not_in_optimizer"].parameters == ["online.2.weight", "online.2.bias"]


def test_a_loss_down_to_a_hundredth_of_its_start_is_neither_oscillating_nor_vanishing():
    """A regression whose loss fell from 9 to about 0.03 and bounces there by a third of that, epoch to epoch,
    with gradients below the floor: batches bouncing a converged loss around its floor, and no gradient due. The
    same bounce at a level a tenth of the start is an oscillation."""
    from gradwatch.diagnosis import RULES
    from gradwatch.summary import EpochSummary

    def history(scale):
        losses = [9.0, *(scale * level for level in (0.05, 0.03, 0.045, 0.028, 0.044, 0.03, 0.046))]
        layers = {"0.weight": {"grad_rms": 1e-8}, "2.weight": {"grad_rms": 1e-8}}
        return [EpochSummary(epoch, 10 * (epoch + 1), first_loss=9.0, layers=layers, metrics={"train_loss": loss})
                for epoch, loss in enumerate(losses)]  # fmt: skip

    for rule in ("oscillating", "vanishing_gradients"):
        assert RULES[rule](history(1.0), Thresholds()) == []
    assert [f.rule for f in RULES["oscillating"](history(10.0), Thresholds())] == ["oscillating"]
    assert [f.rule for f in RULES["vanishing_gradients"](history(10.0), Thresholds())] == ["vanishing_gradients"]


def test_a_weights_gain_is_its_rms_times_the_square_root_of_its_fan_in():
    """torch.nn's Linear and Conv2d defaults give 1/sqrt(3); a normal draw of standard deviation 1, sqrt(fan-in);
    embeddings read by a lookup are left out of the loss graph's largest gain."""
    from gradwatch.graph import largest_gain

    torch.manual_seed(0)
    linear, conv = nn.Linear(400, 300), nn.Conv2d(16, 32, 3)
    assert abs(largest_gain([("linear", linear.weight)])["gain"] - 3**-0.5) < 0.01
    assert abs(largest_gain([("conv", conv.weight)])["gain"] - 3**-0.5) < 0.01
    nn.init.normal_(linear.weight, 0.0, 1.0)
    found = largest_gain([("conv", conv.weight), ("linear", linear.weight), ("linear.bias", linear.bias)])
    assert found["name"] == "linear" and abs(found["gain"] - 400**0.5) < 0.5

    embedding, head = nn.Embedding(100, 64), nn.Linear(64, 100)  # std 1 by design: a lookup
    tokens = torch.randint(100, (4, 8))
    loss = F.cross_entropy(head(embedding(tokens)).reshape(-1, 100), tokens.reshape(-1))
    loss.backward()
    graph = loss_graph(loss, [("embedding", embedding.weight), ("head", head.weight)])
    assert graph["largest_gain"]["name"] == "head" and graph["largest_gain"]["gain"] < 1

    # a position embedding drawn at std 1 (as many ViTs draw it) is added, not multiplied by: no gain of its own;
    # a cls token of zeros is no zero weight either
    position, cls = nn.Parameter(torch.randn(1, 8, 64)), nn.Parameter(torch.zeros(1, 1, 64))
    features = torch.cat([cls.expand(4, -1, -1), embedding(tokens)], 1)[:, 1:] + position
    loss = F.cross_entropy(head(features).reshape(-1, 100), tokens.reshape(-1))
    loss.backward()
    graph = loss_graph(loss, [("embedding", embedding.weight), ("position", position), ("cls", cls),
                              ("head", head.weight)])  # fmt: skip
    assert graph["largest_gain"]["name"] == "head" and graph["zero_weights"] == []
    assert largest_gain([("position", position)])["gain"] > 20  # what it would have been read as


def test_weights_all_zero_before_the_first_step_are_a_fact_of_the_loss_graph(tmp_path):
    """A layer initialised to zeros is named from the gains read before the first step, although that step
    moves it; a layer of torch's default initialisation is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.zeros_(model[0].weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path).watch(model, optimizer) as monitor:
        loss = F.cross_entropy(model(torch.randn(64, 20)), torch.randint(10, (64,)))
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    assert model[0].weight.abs().sum() > 0  # the step moved it
    graph = json.loads((tmp_path / "diagnosis.json").read_text())["facts"]["loss"]
    assert graph["zero_weights"] == ["0.weight"]


def small_start_run(tmp_path, scale):
    """An MLP with BatchNorm whose weight matrices are torch.nn's times `scale`, trained by SGD at 0.1 on random
    data for an epoch of 40 steps, the 30th batch holding a NaN: (the loss graph's facts, diverging's finding)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip
    with torch.no_grad():
        for layer in model[::3]:
            layer.weight.mul_(scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrainingMonitor(tmp_path, stats_every=5).watch(model, optimizer) as monitor:
        for step in range(40):
            inputs = torch.randn(32, 20)
            if step == 29:
                inputs[0, 0] = float("nan")
            loss = F.cross_entropy(model(inputs), torch.randint(10, (32,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        findings = monitor.epoch_end(0, {"train/loss": 2.3})
    graph = json.loads((tmp_path / "diagnosis.json").read_text())["facts"]["loss"]
    return graph, next((f for f in findings if f.rule == "diverging"), None)


def test_weights_that_started_small_are_a_rival_of_the_rate_where_the_loss_turns_nan(tmp_path):
    """Behind BatchNorm, the first steps of SGD at 0.1 move weights started a thousand times smaller than
    torch.nn's by many times their size (their gradients grow as they shrink), as a rate far too high would; when a
    batch holding a NaN then makes the loss NaN, the rate is not named: the finding says the weights started
    small, names no cause and says to check the data. At torch.nn's scale the median gain reads about 1/sqrt(3)."""
    from gradwatch.diagnosis.facts import SMALL_GAIN

    graph, finding = small_start_run(tmp_path / "default", 1.0)
    assert 0.4 < graph["median_gain"] < 0.8
    graph, finding = small_start_run(tmp_path / "small", 1e-3)
    assert graph["median_gain"] < SMALL_GAIN
    assert finding is not None and finding.evidence["cause"] is None
    assert finding.evidence["first_pace"] > Thresholds().update_fast
    assert "started small" in finding.message and "learning rate is too high" not in finding.message
    assert "check the data" in finding.suggestion


def test_the_biases_a_batch_norm_takes_out_are_a_fact_of_the_loss_graph():
    """A batch norm in training mode subtracts each channel's mean, and with it the bias of the layer it normalises
    directly: that bias's gradient is zero but for rounding. Not in eval mode (running statistics), nor behind a
    LayerNorm (which keeps a bias's pattern over the features), nor a bias the norm does not read directly."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8),
                        nn.Linear(8, 3))  # fmt: skip
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.BatchNorm2d(4))  # fmt: skip
    for model, inputs, expected in ((mlp, torch.randn(16, 6), ["0.bias"]), (cnn, torch.randn(4, 3, 9, 9), ["0.bias"])):
        for training, names in ((True, expected), (False, [])):
            model.train(training)
            model.zero_grad()
            loss = model(inputs).pow(2).mean()
            loss.backward()
            assert loss_graph(loss, list(model.named_parameters()))["normalised_biases"] == names


def test_a_healthy_batchnorm_network_under_plain_sgd_draws_no_warning_about_its_biases(tmp_path):
    """Linear layers with biases followed by BatchNorm, trained by plain SGD at 0.1 and read every 5 steps: the
    biases' gradients are rounding noise, their steps round away, and no rule says so (updates_rounded_away and
    not_updated said so before the loss's graph named those biases)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64),
                          nn.ReLU(), nn.Linear(64, 10))  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = torch.randn(10, 20)
    findings = []
    with TrainingMonitor(tmp_path, stats_every=5).watch(model, optimizer) as monitor:
        for epoch in range(2):
            for _ in range(50):
                inputs = torch.randn(32, 20)
                loss = F.cross_entropy(model(inputs), (inputs @ teacher.T).argmax(1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss)
            findings += monitor.epoch_end(epoch, {"train/loss": loss.item()})
    graph = json.loads((tmp_path / "diagnosis.json").read_text())["facts"]["loss"]
    assert graph["normalised_biases"] == ["0.bias", "3.bias"]
    assert findings == []


def short_run(log_dir, lr, random_labels=False, steps=150):
    """A classifier of 16 classes (points around 16 centres) taught two epochs of `steps` steps by SGD at `lr`, the
    rate a thousandth in the second (a step schedule's last stage); the monitor closed after the last epoch's end, as
    the Trainer callbacks and `with` close it. Returns diagnosis.json's findings."""
    torch.manual_seed(0)
    centres = 3 * torch.randn(16, 20)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with TrainingMonitor(log_dir).watch(model, optimizer) as monitor:
        for epoch in range(2):
            optimizer.param_groups[0]["lr"] = lr / 1000**epoch
            for _ in range(steps):
                labels = torch.randint(16, (32,))
                inputs = centres[labels] + torch.randn(32, 20)
                if random_labels:
                    labels = torch.randint(16, (32,))
                optimizer.zero_grad()
                loss = F.cross_entropy(model(inputs), labels)
                loss.backward()
                optimizer.step()
                monitor.step(loss)
            monitor.epoch_end(epoch, {})
        assert not monitor.findings, "two epochs are too few for stuck before the run ends"
    return json.loads((log_dir / "diagnosis.json").read_text())["findings"]


def test_a_run_that_ended_in_two_epochs_near_an_untrained_models_loss_is_stuck(tmp_path, capsys):
    """The classes come from the cross-entropy's input (no classes given), the run's end from close(); the suspect
    from the weights' pace at its fastest, not at the end, where the schedule made the rate a thousandth (read
    there, the pace would name the rate)."""
    (slow,) = short_run(tmp_path / "slow", lr=1e-4)
    assert slow["rule"] == "stuck" and "ln 16" in slow["message"] and "until the run's end" in slow["message"]
    assert slow["suggestion"].startswith("a larger learning rate") and slow["severity"] == "warning"
    assert "gradwatch found [stuck]" in capsys.readouterr().err
    # labels that say nothing, the weights moving: a slow start is a rival the run ended too soon to rule out
    (data,) = short_run(tmp_path / "data", lr=0.1, random_labels=True)
    assert data["rule"] == "stuck" and data["severity"] == "note" and data["evidence"]["cause"] is None
    assert data["suggestion"].startswith("check, in this order: whether the loss leaves it with more steps")
    assert short_run(tmp_path / "healthy", lr=0.1) == []
