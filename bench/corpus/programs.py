"""Healthy programs that other people wrote, run here with generated data and the fewest changes.

Each program's model, loss and training loop are the code of a published package, imported as it is installed (see
bench/corpus/requirements.txt): the book Dive into Deep Learning (the `d2l` package: its Trainer, LeNet, ResNet
blocks, RNN and GRU language models, linear regression, its GAN's update functions), Stable-Baselines3 (PPO, A2C,
DQN on CartPole), PyTorch Lightning's demos (a transformer and an LSTM language model), Hugging Face transformers
(GPT-2 and BERT from configs, its Trainer), pytorch-metric-learning (a triplet loss and its trainer) and skorch (a
regressor), timm (a ViT, its Mixup, soft-target loss, optimizer and scheduler factories). Some are scripts rather
than packages, and their loops are written out here with their models and settings: CleanRL's ppo.py and dqn.py,
PyTorch-GAN's gan.py, the training references of torchvision and timm. What this file adds is marked CHANGE: the
data (generated or read from Python's own help topics, since nothing is downloaded), the number of steps, the
monitor's attachment (bench/corpus/attach.py, or the gradwatch callbacks a user of Lightning and Hugging Face would
add), and the fault's changes (`Change`), which are empty for a healthy run. Every program is a function
`(log_dir, change) -> outcome`: the monitor writes its findings to `log_dir/diagnosis.json`, and the outcome says in
a few words how well the program did (that a healthy run learnt).
"""

import pydoc_data.topics
import random
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from attach import Attached
from torch import nn

from gradwatch import TrainingMonitor

TEXT = "\n".join(pydoc_data.topics.topics.values())


@dataclass
class Change:
    """A fault's changes to a program (the mutation operators of faults.py act through these); the defaults
    change nothing. Programs apply those they can take and refuse the others (`applies`)."""

    lr: float = 1.0  # a factor on the program's learning rate
    model: Callable | None = None  # applied to the built model: activations, initialisation, dropout, bias
    data: Callable | None = None  # applied to the training tensors (x, y) -> (x, y): labels, deletion, noise
    batch: int | None = None  # the batch size
    loss: str | None = None  # a replacement loss, by name (LOSSES)
    optimizer: str | None = None  # another optimizer at the program's learning rate: "sgd", "adam"
    decay: float | None = None  # weight decay (L2 regularisation) in the optimizer
    clip: float | None = None  # clip gradients' norm at this value
    settings: dict = field(default_factory=dict)  # a program's own settings (a config's activation, say)


def seeded(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- generated data (CHANGE: in place of Fashion-MNIST, The Time Machine, WikiText-2, and the like) ----


def images(n, classes=10, size=28, noise=2.0, seed=0):
    """`n` images of `classes` classes: each class a smooth random pattern, each image its class's pattern plus
    Gaussian noise (a task a small CNN learns to over 90% in a few hundred steps, softmax regression to about 80%)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, 1, size // 4, size // 4, generator=torch.Generator().manual_seed(1234))
    patterns = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    labels = torch.randint(classes, (n,), generator=generator)
    return patterns[labels] + noise * torch.randn(n, 1, size, size, generator=generator), labels


def optimizer_for(change, parameters, lr, default="sgd"):
    """The program's optimizer with the fault's changes (another kind, weight decay)."""
    kind = change.optimizer or default
    decay = change.decay or 0.0
    if kind == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=decay)
    return torch.optim.SGD(parameters, lr=lr, weight_decay=decay)


LOSSES = {
    # classification losses a fault puts in place of cross-entropy (DeepCrime's "change loss function")
    "mse": lambda scores, labels: F.mse_loss(scores, F.one_hot(labels, scores.shape[-1]).float()),
    "l1": lambda scores, labels: F.l1_loss(scores, F.one_hot(labels, scores.shape[-1]).float()),
    "hinge": lambda scores, labels: F.multi_margin_loss(scores, labels),
}


# ---- Dive into Deep Learning (d2l): its Trainer.fit loop, its models ----


def d2l():
    import d2l.torch as book

    book.ProgressBoard.draw = lambda *args, **kwargs: None  # CHANGE: no animated plots (no notebook here)
    return book


def d2l_images(change, n=6400, batch=64):
    """A d2l DataModule of generated images (CHANGE: in place of d2l.FashionMNIST)."""
    book = d2l()

    class Images(book.DataModule):
        def __init__(self):
            super().__init__()
            self.batch_size = change.batch or batch
            self.train = images(n, seed=0)
            self.val = images(n // 4, seed=1)
            if change.data:
                self.train = change.data(*self.train)

        def get_dataloader(self, train):
            return self.get_tensorloader(self.train if train else self.val, train)

    return Images()


def fit_d2l(log_dir, model, data, change, epochs, clip=0, classes=None, objective=None):
    """d2l's Trainer.fit with the monitor attached; each epoch ends with the validation loss (and accuracy) that
    d2l plots, given to the monitor instead (CHANGE)."""
    book = d2l()
    if change.model:
        change.model(model)
    model.lr *= change.lr
    if change.loss:
        model.loss = LOSSES[change.loss]
    if change.optimizer or change.decay:
        model.configure_optimizers = lambda: optimizer_for(change, model.parameters(), model.lr)
    trainer = book.Trainer(max_epochs=epochs, gradient_clip_val=change.clip or clip)
    monitor = TrainingMonitor(log_dir)
    fit_epoch = trainer.fit_epoch

    def fit_epoch_then_report():
        fit_epoch()
        monitor.epoch_end(trainer.epoch, validation(model, trainer.val_dataloader, classes), classes=classes)

    trainer.fit_epoch = fit_epoch_then_report
    with Attached(monitor, model, objective=objective) as attached:
        configure = model.configure_optimizers

        def configured():  # CHANGE: the monitor watches the optimizer as Trainer.fit makes it
            optimizer = configure()
            attached.watch(optimizer)
            return optimizer

        model.configure_optimizers = configured
        trainer.fit(model, data)
    scalars = validation(model, trainer.val_dataloader, classes)
    return ", ".join(f"{tag} {value:.3g}" for tag, value in scalars.items())


def fit_d2l_cnn(log_dir, model, data, change, epochs):
    """fit_d2l of an image classifier of the book's, its lazy layers shaped by a first batch and initialised by
    the book's init_cnn, as its chapters do."""
    model.apply_init([next(iter(data.get_dataloader(True)))[0]], d2l().init_cnn)
    return fit_d2l(log_dir, model, data, change, epochs, classes=CLASSES, objective="classification")


def validation(model, batches, classes):
    model.eval()
    losses = []
    right = count = 0
    with torch.no_grad():
        for *inputs, labels in batches:
            scores = model(*inputs)
            losses.append(float(type(model).loss(model, scores, labels)))
            if classes:
                right += int((scores.reshape(-1, scores.shape[-1]).argmax(1) == labels.reshape(-1)).sum())
                count += labels.numel()
    scalars = {"valid/loss": sum(losses) / len(losses)}
    return {**scalars, "valid/accuracy": right / count} if classes else scalars


CLASSES = [str(c) for c in range(10)]


def d2l_lenet(log_dir, change):
    """d2l's LeNet-5 (sigmoid activations, average pooling), SGD at the book's lr 0.9 with its init_cnn."""
    book = d2l()
    seeded()
    data = d2l_images(change, batch=128)
    model = book.LeNet(lr=0.9)  # the book's sec_lenet: lr=0.1 and 10 epochs of 60,000 images
    return fit_d2l_cnn(log_dir, model, data, change, epochs=6)


def d2l_resnet(log_dir, change):
    """A small ResNet of d2l's Residual blocks (BatchNorm), in the layout of the book's ResNet class, SGD 0.01."""
    book = d2l()
    seeded()
    data = d2l_images(change, n=3200)
    model = book.Classifier()
    model.lr = 0.01  # the book's sec_resnet
    model.net = nn.Sequential(
        nn.LazyConv2d(16, kernel_size=3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(),
        book.Residual(16), book.Residual(32, use_1x1conv=True, strides=2),
        book.Residual(64, use_1x1conv=True, strides=2),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.LazyLinear(10),
    )  # fmt: skip
    return fit_d2l_cnn(log_dir, model, data, change, epochs=5)


def d2l_softmax(log_dir, change):
    """d2l's softmax regression, SGD at the book's lr 0.1."""
    book = d2l()
    seeded()
    data = d2l_images(change, batch=256)
    model = book.SoftmaxRegression(num_outputs=10, lr=0.1)
    model.apply_init([next(iter(data.get_dataloader(True)))[0]])
    return fit_d2l(log_dir, model, data, change, epochs=6, classes=CLASSES, objective="classification")


def d2l_linear_regression(log_dir, change):
    """d2l's concise linear regression on its own synthetic data, SGD at the book's lr 0.03."""
    book = d2l()
    seeded()
    data = book.SyntheticRegressionData(w=torch.tensor([2, -3.4]), b=4.2)
    if change.data:
        data.X[: data.num_train], data.y[: data.num_train] = change.data(
            data.X[: data.num_train], data.y[: data.num_train]
        )
    data.batch_size = change.batch or data.batch_size
    model = book.LinearRegression(lr=0.03)
    model.apply_init([data.X[:2]])
    return fit_d2l(log_dir, model, data, change, epochs=3, objective="regression")


def d2l_text(change, steps=32):
    """d2l's TimeMachine data module over Python's help topics (CHANGE: in place of the downloaded book)."""
    book = d2l()

    class Topics(book.TimeMachine):
        def _download(self):
            return TEXT[:60_000]

    data = Topics(batch_size=change.batch or 1024, num_steps=steps, num_train=10_000, num_val=5_000)
    if change.data:
        data.X[: data.num_train], data.Y[: data.num_train] = change.data(
            data.X[: data.num_train], data.Y[: data.num_train]
        )
    return data


def d2l_rnn_lm(log_dir, change):
    """d2l's concise RNN language model (nn.RNN, 32 hidden units), SGD lr 1, clipping at 1 (sec_rnn-concise)."""
    book = d2l()
    seeded()
    data = d2l_text(change)
    rnn = book.RNN(num_inputs=len(data.vocab), num_hiddens=32)
    model = book.RNNLM(rnn, vocab_size=len(data.vocab), lr=1)
    model.apply_init([data.X[:2]])
    return fit_d2l(log_dir, model, data, change, epochs=12, clip=1, objective="language_model")


def d2l_gru_lm(log_dir, change):
    """d2l's two-layer GRU language model, SGD lr 2, clipping at 1 (sec_deep_rnn)."""
    book = d2l()
    seeded()
    data = d2l_text(change)
    gru = book.GRU(num_inputs=len(data.vocab), num_hiddens=32, num_layers=2)
    model = book.RNNLM(gru, vocab_size=len(data.vocab), lr=2)
    model.apply_init([data.X[:2]])
    return fit_d2l(log_dir, model, data, change, epochs=12, clip=1, objective="language_model")


def d2l_gan(log_dir, change):
    """d2l's GAN of a Gaussian (sec_basic_gan): its generator, discriminator, update_D and update_G, Adam at
    0.05 and 0.005, 20 epochs of batches of 8; the loop is the book's, with the monitor's epoch_end."""
    book = d2l()
    seeded()
    x = torch.normal(0.0, 1, (1000, 2))
    data = torch.matmul(x, torch.tensor([[1, 2], [-0.1, 0.5]])) + torch.tensor([1, 2])
    batches = torch.utils.data.DataLoader(data, batch_size=change.batch or 8, shuffle=True)
    generator = nn.Sequential(nn.Linear(2, 2))
    discriminator = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))
    for model in (generator, discriminator):
        for weight in model.parameters():
            nn.init.normal_(weight, 0, 0.02)
        if change.model:
            change.model(model)
    loss = nn.BCEWithLogitsLoss(reduction="sum") if change.loss is None else nn.MSELoss(reduction="sum")
    trainer_d = optimizer_for(change, discriminator.parameters(), 0.05 * change.lr, "adam")
    trainer_g = optimizer_for(change, generator.parameters(), 0.005 * change.lr, "adam")
    monitor = TrainingMonitor(log_dir)
    parts = {"generator": (generator, trainer_g), "discriminator": (discriminator, trainer_d)}
    with Attached(monitor, parts=parts, objective="gan"):
        for epoch in range(20):
            for x in batches:
                z = torch.normal(0, 1, size=(x.shape[0], 2))
                book.update_D(x, z, discriminator, generator, loss, trainer_d)
                book.update_G(z, discriminator, generator, loss, trainer_g)
            monitor.epoch_end(epoch, {})
    fake = generator(torch.normal(0, 1, size=(1000, 2)))
    return f"generated mean {fake.mean(0).tolist()} (data {data.mean(0).tolist()})".replace(".0000", "")


# ---- Stable-Baselines3: PPO, A2C and DQN on CartPole, their own train() loops, counted in steps ----


def sb3(log_dir, change, algorithm, timesteps, policy=(), **options):
    """An SB3 agent at its defaults on CartPole-v1 (as in SB3's README), or at `policy` and `options`, with the
    fault's changes through SB3's own arguments; the monitor sees every gradient step (CHANGE), and diagnoses in
    windows of steps."""
    import stable_baselines3

    seeded()
    policy = {**dict(policy), **change.settings.get("policy", {})}
    if change.optimizer == "sgd":
        policy["optimizer_class"] = torch.optim.SGD
    if change.decay:
        policy["optimizer_kwargs"] = {"weight_decay": change.decay}
        if algorithm == "A2C":  # A2C's RMSprop, which it builds only where no optimizer is given
            policy["optimizer_class"] = torch.optim.RMSprop
            policy["optimizer_kwargs"].update(alpha=0.99, eps=1e-5)
    if change.batch:
        options["batch_size"] = change.batch
    if change.clip:
        options["max_grad_norm"] = change.clip
    agent_class = getattr(stable_baselines3, algorithm)
    lr = options.pop("learning_rate", None) or _default_lr(agent_class)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = agent_class("MlpPolicy", "CartPole-v1", learning_rate=lr * change.lr, seed=0, device="cpu",
                            policy_kwargs=policy, **options)  # fmt: skip
    if change.model:
        change.model(agent.policy)
    monitor = TrainingMonitor(log_dir)
    with Attached(monitor, agent.policy, agent.policy.optimizer, objective="rl"):
        agent.learn(total_timesteps=timesteps)
    returns = [episode["r"] for episode in agent.ep_info_buffer]
    return f"mean return of the last {len(returns)} episodes {np.mean(returns):.0f} (500 at most)"


def _default_lr(agent_class):
    import inspect

    return inspect.signature(agent_class.__init__).parameters["learning_rate"].default


def sb3_ppo(log_dir, change):
    """SB3's PPO: rollouts of 2,048 steps, 10 epochs of minibatches of 64, Adam 3e-4, clipping at 0.5."""
    return sb3(log_dir, change, "PPO", 16_384)


def sb3_a2c(log_dir, change):
    """SB3's A2C: a step every 5 environment steps, RMSprop 7e-4, clipping at 0.5."""
    return sb3(log_dir, change, "A2C", 20_000)


def sb3_dqn(log_dir, change):
    """SB3's DQN with the hyperparameters of rl-baselines3-zoo for CartPole-v1 (its hyperparams/dqn.yml)."""
    zoo = dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000, gamma=0.99,
               target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
               exploration_final_eps=0.04)  # fmt: skip
    return sb3(log_dir, change, "DQN", 20_000, policy={"net_arch": [256, 256]}, **zoo)


# ---- PyTorch Lightning's demos: a transformer and an LSTM language model, Lightning's Trainer ----


def lightning_lm(log_dir, change, module_name):
    """A Lightning demo module on Python's help topics (CHANGE: written as the demo's WikiText2 file, which it
    tokenises by words), with gradwatch's Lightning callback, 300 steps (150 of the larger LSTM)."""
    import lightning as L
    from lightning.pytorch.demos import lstm, transformer

    from gradwatch.lightning import MonitorCallback

    seeded()
    folder = Path(tempfile.mkdtemp())
    (folder / "wikitext-2.txt").write_text(TEXT[:200_000])
    dataset = transformer.WikiText2(folder, download=False)
    module_class = transformer.LightningTransformer if module_name == "transformer" else lstm.LightningLSTM
    module = module_class(vocab_size=dataset.vocab_size)
    module.prepare_data = lambda: None  # CHANGE: nothing to download
    module.train_dataloader = _lightning_batches(module_name, dataset, change, lstm)
    lr = 0.1 if module_name == "transformer" else 20  # the demos' SGD rates
    module.configure_optimizers = lambda: optimizer_for(change, module.parameters(), lr * change.lr)
    if change.model:
        change.model(module)
    callback = MonitorCallback(log_dir)
    trainer = L.Trainer(max_steps=300 if module_name == "transformer" else 150, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback],
                        gradient_clip_val=change.clip or (0.25 if module_name == "lstm" else None))  # fmt: skip
    trainer.fit(module)
    return lm_outcome(module, dataset)


def lm_outcome(module, dataset):
    module.eval()
    with torch.no_grad():
        pairs = [dataset[i] for i in range(0, len(dataset), len(dataset) // 50)]
        if hasattr(module.model, "init_hidden"):  # the LSTM
            losses = [F.nll_loss(module.model(x[None], module.model.init_hidden(1))[0], y) for x, y in pairs]
        else:
            losses = [F.nll_loss(module(x[None], y[None]), y) for x, y in pairs]
    return f"loss {float(sum(losses) / len(losses)):.2f} (ln of the vocabulary: {np.log(dataset.vocab_size):.2f})"


def _lightning_batches(module_name, dataset, change, lstm):
    if module_name == "transformer":  # the demo's DataLoader(dataset): batches of one sequence
        return lambda: torch.utils.data.DataLoader(dataset, batch_size=change.batch or 1)
    return lambda: torch.utils.data.DataLoader(dataset, batch_sampler=lstm.SequenceSampler(dataset, change.batch or 20))


def lightning_transformer(log_dir, change):
    """Lightning's demo transformer (nn.Transformer, 2+2 layers of 200), SGD 0.1, batches of one sequence."""
    return lightning_lm(log_dir, change, "transformer")


def lightning_lstm(log_dir, change):
    """Lightning's demo LSTM (4 layers of 512, dropout 0.2), SGD 20, clipping at 0.25."""
    return lightning_lm(log_dir, change, "lstm")


# ---- Hugging Face transformers: GPT-2 and BERT built from configs, its Trainer and AdamW ----

TOPICS = ["compound", "formatstrings", "string-methods", "debugger"]  # four help topics: the BERT program's classes


def byte_blocks(text, length):
    ids = torch.tensor(list(text.encode()[: len(text) // length * length]))
    return ids.view(-1, length)


def hf_train(log_dir, change, model, train, evaluation=None, **arguments):
    """Hugging Face's Trainer with gradwatch's callback (as a user adds it) and the fault's changes through
    TrainingArguments."""
    import transformers

    from gradwatch.transformers import MonitorCallback

    settings = dict(output_dir=tempfile.mkdtemp(), report_to=[], save_strategy="no", disable_tqdm=True,
                    use_cpu=True, seed=0, logging_steps=25, per_device_eval_batch_size=64, **arguments)  # fmt: skip
    settings["learning_rate"] *= change.lr
    if change.batch:
        settings["per_device_train_batch_size"] = change.batch
    if change.decay:
        settings["weight_decay"] = change.decay
    if change.clip:
        settings["max_grad_norm"] = change.clip
    if change.optimizer == "sgd":
        settings["optim"] = "sgd"
    if change.model:
        change.model(model)
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**settings), train_dataset=train,
        eval_dataset=evaluation, compute_metrics=accuracy if evaluation is not None else None,
        callbacks=[MonitorCallback(log_dir)],
    )  # fmt: skip
    trainer.train()
    return trainer


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


class Examples(torch.utils.data.Dataset):
    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {name: column[i] for name, column in self.columns.items()}


def hf_gpt2(log_dir, change):
    """A 2-layer GPT-2 (64 wide) from its config, on the help topics' bytes, counted in steps: 300 steps of
    AdamW 1e-3 with a linear schedule after 30 warmup steps (the settings of Hugging Face's from-scratch
    language-model recipes, on a smaller model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded()
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2, **change.settings)
    model = GPT2LMHeadModel(config)
    blocks = byte_blocks(TEXT[:400_000], 64)
    inputs, labels = change.data(blocks, blocks.clone()) if change.data else (blocks, blocks)
    train = Examples(input_ids=inputs, labels=labels)
    trainer = hf_train(log_dir, change, model, train, learning_rate=1e-3, warmup_steps=30, max_steps=300,
                       per_device_train_batch_size=16)  # fmt: skip
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return f"training loss {losses[0]:.2f} at first, {losses[-1]:.2f} at the end (ln 256 = 5.55)"


def hf_bert(log_dir, change):
    """A 2-layer BERT (128 wide) from its config, classifying 64-byte pieces of four help topics, 6 epochs of
    AdamW 1e-3 with a linear schedule, evaluated each epoch."""
    from transformers import BertConfig, BertForSequenceClassification

    seeded()
    config = BertConfig(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=128, num_labels=len(TOPICS),
                        **change.settings)  # fmt: skip
    model = BertForSequenceClassification(config)
    pieces = [byte_blocks(pydoc_data.topics.topics[topic][:20_000], 64) for topic in TOPICS]
    inputs = torch.cat(pieces)
    labels = torch.cat([torch.full((len(piece),), i) for i, piece in enumerate(pieces)])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    inputs, labels = inputs[order], labels[order]
    cut = len(labels) * 4 // 5
    x, y = (inputs[:cut], labels[:cut]) if change.data is None else change.data(inputs[:cut], labels[:cut])
    trainer = hf_train(log_dir, change, model, Examples(input_ids=x, labels=y),
                       Examples(input_ids=inputs[cut:], labels=labels[cut:]), learning_rate=1e-3,
                       num_train_epochs=6, per_device_train_batch_size=16, eval_strategy="epoch")  # fmt: skip
    scores = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    return f"validation accuracy {scores[-1]:.3f} ({len(TOPICS)} classes)"


# ---- pytorch-metric-learning: a triplet loss with a miner, its MetricLossOnly trainer ----


def pml_triplet(log_dir, change):
    """An MLP embedding of 10 classes of 64-dimensional points, TripletMarginLoss with a TripletMarginMiner,
    MPerClassSampler (m=4), Adam 1e-3 (the library's example notebook's settings), 5 epochs; the monitor's
    epoch_end is the trainer's end_of_epoch_hook (CHANGE)."""
    from pytorch_metric_learning import losses, miners

    loss = losses.TripletMarginLoss(margin=0.1)
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    return pml(log_dir, change, loss, miner, lr=1e-3, spread=1.5)


def pml(log_dir, change, loss, miner, lr, spread):
    """pytorch-metric-learning's MetricLossOnly trainer on an MLP embedding of 10 classes of 64-dimensional points
    (class centres drawn with standard deviation `spread`), with `loss` and `miner`, MPerClassSampler (m=4), Adam
    at `lr`, 5 epochs; the monitor's epoch_end is the trainer's end_of_epoch_hook (CHANGE)."""
    from pytorch_metric_learning import samplers, trainers

    seeded()
    centres = torch.randn(10, 64) * spread
    labels = torch.randint(10, (4000,))
    points = centres[labels] + torch.randn(4000, 64)
    if change.data:
        points, labels = change.data(points, labels)
    trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))
    if change.model:
        change.model(trunk)
    optimizer = optimizer_for(change, trunk.parameters(), lr * change.lr, "adam")
    monitor = TrainingMonitor(log_dir)
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": nn.Identity()}, optimizers={"trunk_optimizer": optimizer},
        batch_size=change.batch or 64, loss_funcs={"metric_loss": loss}, mining_funcs={"tuple_miner": miner},
        dataset=torch.utils.data.TensorDataset(points, labels), dataset_labels=labels.numpy(),
        sampler=samplers.MPerClassSampler(labels, m=4, length_before_new_iter=len(labels)),
        dataloader_num_workers=0, end_of_epoch_hook=lambda trainer: monitor.epoch_end(trainer.epoch - 1, {}),
    )  # fmt: skip
    with Attached(monitor, trunk, optimizer, objective="contrastive"):
        trainer.train(num_epochs=5)
    return f"nearest-centre accuracy of the embeddings {nearest_centre(trunk, centres):.3f}"


def nearest_centre(trunk, centres):
    labels = torch.randint(10, (1000,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        embedded = F.normalize(trunk(centres[labels] + torch.randn(1000, 64)), dim=1)
        anchors = F.normalize(trunk(centres), dim=1)
    return float(((embedded @ anchors.T).argmax(1) == labels).float().mean())


# ---- skorch: a regressor, its fit loop ----


def skorch_regressor(log_dir, change):
    """skorch's NeuralNetRegressor on scikit-learn's make_regression (1,000 samples, 20 features, the target
    divided by 100), an MLP of two hidden layers of 10, SGD 0.1, 20 epochs: skorch's README regression example;
    the monitor's epoch_end is a skorch callback (CHANGE)."""
    from sklearn.datasets import make_regression
    from skorch import NeuralNetRegressor

    seeded()
    x, y = make_regression(1000, 20, n_informative=10, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y / 100, dtype=torch.float32)[:, None]
    if change.data:
        x, y = change.data(x, y)
    module = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1))
    if change.model:
        change.model(module)
    monitor = TrainingMonitor(log_dir)

    optimizer = torch.optim.Adam if change.optimizer == "adam" else torch.optim.SGD
    net = NeuralNetRegressor(module, max_epochs=20, lr=0.1 * change.lr, batch_size=change.batch or 128,
                             optimizer=optimizer, optimizer__weight_decay=change.decay or 0.0,
                             callbacks=[_skorch_report(monitor)], verbose=0)  # fmt: skip
    net.initialize()
    with Attached(monitor, net.module_, net.optimizer_, objective="regression"):
        net.partial_fit(x.numpy(), y.numpy())
    return f"validation loss {net.history[-1]['valid_loss']:.3f} (the target's variance {float(y.var()):.3f})"


# ---- programs of the third part (held out: written and committed before any of its runs was diagnosed) ----


def d2l_mlp_dropout(log_dir, change):
    """d2l's concise dropout MLP (sec_dropout: two hidden layers of 256, dropout 0.5 and 0.5, SGD lr 0.1, its
    Trainer), 10 epochs; the class is the chapter's, which the d2l package does not export (CHANGE: copied)."""
    book = d2l()

    class DropoutMLP(book.Classifier):
        def __init__(self, num_outputs, num_hiddens_1, num_hiddens_2, dropout_1, dropout_2, lr):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.Flatten(), nn.LazyLinear(num_hiddens_1), nn.ReLU(), nn.Dropout(dropout_1),
                nn.LazyLinear(num_hiddens_2), nn.ReLU(), nn.Dropout(dropout_2), nn.LazyLinear(num_outputs),
            )  # fmt: skip

    seeded()
    data = d2l_images(change, batch=256)
    model = DropoutMLP(num_outputs=10, num_hiddens_1=256, num_hiddens_2=256, dropout_1=0.5, dropout_2=0.5, lr=0.1)
    model(next(iter(data.get_dataloader(True)))[0])  # the lazy layers take their shapes
    return fit_d2l(log_dir, model, data, change, epochs=10, classes=CLASSES, objective="classification")


def tv_resnet(log_dir, change):
    """torchvision's resnet18 (10 classes) with the recipe and the train_one_epoch loop of torchvision's
    classification reference (references/classification/train.py): SGD 0.1, momentum 0.9, weight decay 1e-4 on
    every parameter, label smoothing 0.1, a linear warmup epoch then cosine annealing, evaluated each epoch;
    5 epochs of 1,600 generated 32x32 images, their one channel repeated three times (CHANGE: in place of
    ImageNet; the loop is written out here, as the reference is a script, not a package)."""
    import torchvision

    seeded()
    model = torchvision.models.resnet18(num_classes=10)
    if change.model:
        change.model(model)
    criterion = LOSSES[change.loss] if change.loss else nn.CrossEntropyLoss(label_smoothing=0.1)
    lr = 0.1 * change.lr
    if change.optimizer:
        optimizer = optimizer_for(change, model.parameters(), lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=change.decay or 1e-4)
    epochs, warmup = 5, 1
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - warmup),
    ], milestones=[warmup])  # fmt: skip
    return reference_training(log_dir, change, model, (optimizer, scheduler), criterion, n=1600, epochs=epochs)


def reference_training(log_dir, change, model, stepping, criterion, n, epochs):
    """The train_one_epoch and evaluate loops of torchvision's classification reference, with the monitor attached:
    `epochs` epochs of `n` generated 32x32 images (the fault's data change applied), their one channel repeated
    three times, `stepping` (the optimizer, the scheduler stepped each epoch), validated on 400 others each epoch;
    the last validation loss and accuracy."""
    optimizer, scheduler = stepping
    train = images(n, size=32, seed=0)
    train = change.data(*train) if change.data else train
    valid = images(400, size=32, seed=1)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=change.batch or 64,
                                          shuffle=True)  # fmt: skip
    monitor = TrainingMonitor(log_dir)
    with Attached(monitor, model, optimizer, objective="classification"):
        for epoch in range(epochs):
            model.train()
            for image, target in batches:  # train_one_epoch
                output = model(image.expand(-1, 3, -1, -1))
                loss = criterion(output, target)
                optimizer.zero_grad()
                loss.backward()
                if change.clip:
                    nn.utils.clip_grad_norm_(model.parameters(), change.clip)
                optimizer.step()
            scheduler.step()
            scalars = evaluate(model, valid, nn.CrossEntropyLoss())
            monitor.epoch_end(epoch, scalars, classes=CLASSES)
    return ", ".join(f"{tag} {value:.3g}" for tag, value in scalars.items())


def evaluate(model, data, criterion):
    """The validation loss and accuracy of an image classifier (the reference's evaluate, in one batch)."""
    model.eval()
    with torch.no_grad():
        x, y = data
        scores = model(x.expand(-1, 3, -1, -1))
        accuracy = float((scores.argmax(1) == y).float().mean())
        return {"valid/loss": float(criterion(scores, y)), "valid/accuracy": accuracy}


def hf_vit(log_dir, change):
    """A 2-layer ViT (64 wide, 7x7 patches) from its config, classifying generated 28x28 images, 4 epochs of AdamW
    1e-3 with a cosine schedule after 40 warmup steps, evaluated each epoch."""
    from transformers import ViTConfig, ViTForImageClassification

    seeded()
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, **change.settings)  # fmt: skip
    model = ViTForImageClassification(config)
    return hf_images(log_dir, change, model, 3200, num_train_epochs=4, lr_scheduler_type="cosine",
                     eval_strategy="epoch")  # fmt: skip


def hf_images(log_dir, change, model, n, **arguments):
    """A Hugging Face image classifier trained on `n` generated 28x28 images with Trainer (AdamW 1e-3 in batches of
    32 after 40 warmup steps, and `arguments`), evaluated on 800 others; its last validation accuracy."""
    x, y = images(n, seed=0)
    x, y = change.data(x, y) if change.data else (x, y)
    vx, vy = images(800, seed=1)
    trainer = hf_train(log_dir, change, model, Examples(pixel_values=x, labels=y),
                       Examples(pixel_values=vx, labels=vy), learning_rate=1e-3, per_device_train_batch_size=32,
                       warmup_steps=40, **arguments)  # fmt: skip
    scores = [entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry]
    return f"validation accuracy {scores[-1]:.3f} (10 classes)"


def lightning_autoencoder(log_dir, change):
    """The LitAutoEncoder of Lightning's README (784-128-3-128-784, ReLU, MSE, Adam 1e-3), with gradwatch's
    Lightning callback; 3 epochs of 6,400 generated images in batches of 64 (CHANGE: in place of MNIST in
    batches of one)."""
    import lightning as L

    from gradwatch.lightning import MonitorCallback

    class LitAutoEncoder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(28 * 28, 128), nn.ReLU(), nn.Linear(128, 3))
            self.decoder = nn.Sequential(nn.Linear(3, 128), nn.ReLU(), nn.Linear(128, 28 * 28))

        def training_step(self, batch, batch_idx):
            x, _ = batch
            x = x.view(x.size(0), -1)
            z = self.encoder(x)
            x_hat = self.decoder(z)
            return F.mse_loss(x_hat, x)

        def configure_optimizers(self):
            return optimizer_for(change, self.parameters(), 1e-3 * change.lr, "adam")

    seeded()
    x, y = images(6400, noise=0.5, seed=0)
    x, y = change.data(x, y) if change.data else (x, y)
    autoencoder = LitAutoEncoder()
    if change.model:
        change.model(autoencoder)
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=change.batch or 64,
                                          shuffle=True)  # fmt: skip
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[MonitorCallback(log_dir)], gradient_clip_val=change.clip)  # fmt: skip
    trainer.fit(autoencoder, batches)
    vx = images(800, noise=0.5, seed=1)[0].view(800, -1)
    with torch.no_grad():
        error = F.mse_loss(autoencoder.decoder(autoencoder.encoder(vx)), vx)
    return f"validation reconstruction error {float(error):.3f} (the images' variance {float(vx.var()):.3f})"


def skorch_classifier(log_dir, change):
    """skorch's README classification example: make_classification (1,000 samples, 20 features, two classes),
    its module (two layers of 10 units, ReLU, dropout 0.5, a softmax output that skorch's NeuralNetClassifier
    takes the log of for its NLLLoss), SGD 0.1, 10 epochs, shuffled; the monitor's epoch_end is a skorch callback
    (CHANGE)."""
    from sklearn.datasets import make_classification
    from skorch import NeuralNetClassifier

    class MyModule(nn.Module):
        def __init__(self, num_units=10, nonlin=nn.ReLU()):  # noqa: B008 (the README's code)
            super().__init__()
            self.dense0 = nn.Linear(20, num_units)
            self.nonlin = nonlin
            self.dropout = nn.Dropout(0.5)
            self.dense1 = nn.Linear(num_units, num_units)
            self.output = nn.Linear(num_units, 2)
            self.softmax = nn.Softmax(dim=-1)

        def forward(self, X, **kwargs):
            X = self.nonlin(self.dense0(X))
            X = self.dropout(X)
            X = self.nonlin(self.dense1(X))
            X = self.softmax(self.output(X))
            return X

    seeded()
    x, y = make_classification(1000, 20, n_informative=10, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    x, y = change.data(x, y) if change.data else (x, y)
    module = MyModule()
    if change.model:
        change.model(module)
    monitor = TrainingMonitor(log_dir)
    optimizer = torch.optim.Adam if change.optimizer == "adam" else torch.optim.SGD
    net = NeuralNetClassifier(module, max_epochs=10, lr=0.1 * change.lr, batch_size=change.batch or 128,
                              optimizer=optimizer, optimizer__weight_decay=change.decay or 0.0,
                              iterator_train__shuffle=True, callbacks=[_skorch_report(monitor)], verbose=0)  # fmt: skip
    net.initialize()
    with Attached(monitor, net.module_, net.optimizer_, objective="classification"):
        net.partial_fit(x.numpy(), y.numpy())
    return f"validation accuracy {net.history[-1]['valid_acc']:.3f} (two classes)"


def _skorch_report(monitor):
    from skorch.callbacks import Callback

    class Report(Callback):
        def on_epoch_end(self, net, **kwargs):
            last = net.history[-1]
            scalars = {"train/loss": last["train_loss"], "valid/loss": last["valid_loss"]}
            monitor.epoch_end(len(net.history) - 1, scalars)

    return Report()


def pml_contrastive(log_dir, change):
    """An MLP embedding of 10 classes of 64-dimensional points, pytorch-metric-learning's ContrastiveLoss with a
    MultiSimilarityMiner (the pairs its README's example mines), MPerClassSampler (m=4), Adam 1e-4, 5 epochs of
    its MetricLossOnly trainer; the monitor's epoch_end is the trainer's end_of_epoch_hook (CHANGE). Its classes
    lie closer than the triplet program's: an untrained trunk tells them apart half the time."""
    from pytorch_metric_learning import losses, miners

    loss = losses.ContrastiveLoss(pos_margin=0, neg_margin=1)
    return pml(log_dir, change, loss, miners.MultiSimilarityMiner(epsilon=0.1), lr=1e-4, spread=0.5)


# ---- programs of the fourth part (held out: written and committed before any of its runs was diagnosed) ----


def d2l_bn_lenet(log_dir, change):
    """d2l's LeNet with batch normalization (sec_batch_norm, the concise BNLeNet: BatchNorm after every convolution
    and hidden linear layer, sigmoid activations), SGD at the book's lr 0.1, its init_cnn, batches of 128, 6 epochs;
    the class is the chapter's, which the d2l package does not export (CHANGE: copied)."""
    book = d2l()

    class BNLeNet(book.Classifier):
        def __init__(self, lr=0.1, num_classes=10):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nn.LazyConv2d(6, kernel_size=5), nn.LazyBatchNorm2d(), nn.Sigmoid(),
                nn.AvgPool2d(kernel_size=2, stride=2),
                nn.LazyConv2d(16, kernel_size=5), nn.LazyBatchNorm2d(), nn.Sigmoid(),
                nn.AvgPool2d(kernel_size=2, stride=2),
                nn.Flatten(), nn.LazyLinear(120), nn.LazyBatchNorm1d(), nn.Sigmoid(),
                nn.LazyLinear(84), nn.LazyBatchNorm1d(), nn.Sigmoid(), nn.LazyLinear(num_classes),
            )  # fmt: skip

    seeded()
    data = d2l_images(change, batch=128)
    model = BNLeNet(lr=0.1)
    return fit_d2l_cnn(log_dir, model, data, change, epochs=6)


def cleanrl_ppo(log_dir, change):
    """CleanRL's ppo.py on CartPole-v1 with its defaults (an actor and a critic, each two Tanh layers of 64 with
    orthogonal initialisation, the actor's head at std 0.01; Adam 2.5e-4, eps 1e-5, annealed linearly to 0; 4
    environments x 128 steps; GAE lambda 0.95; 4 epochs of 4 minibatches; clipping coefficient 0.2 on the ratio and
    the value; entropy 0.01, value 0.5; gradient norm clipped at 0.5), for 40,960 environment steps (CHANGE: of
    500,000), counted in optimizer steps. CleanRL is a single-file script, not a package: its loop is written out
    here, on gymnasium's vector API (CHANGE: resetting in the step that ends an episode, as gym did)."""
    import gymnasium as gym

    seeded(1)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 4,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)  # fmt: skip
    agent = PPOAgent()
    if change.model:
        change.model(agent)
    lr = 2.5e-4 * change.lr
    if change.optimizer or change.decay:
        optimizer = optimizer_for(change, agent.parameters(), lr, "adam")
    else:
        optimizer = torch.optim.Adam(agent.parameters(), lr=lr, eps=1e-5)
    monitor = TrainingMonitor(log_dir)
    returns, running = [], np.zeros(4)
    observation, _ = envs.reset(seed=1)
    updates = 40_960 // 512
    with Attached(monitor, agent, optimizer, objective="rl"):
        for update in range(updates):
            optimizer.param_groups[0]["lr"] = (1.0 - update / updates) * lr
            rollout, observation = _ppo_rollout(envs, agent, observation, running, returns)
            _ppo_update(agent, optimizer, rollout, change.batch or 128, change.clip or 0.5)
    envs.close()
    return f"mean return of the last 20 episodes {np.mean(returns[-20:]):.0f} (500 at most)"


class PPOAgent(nn.Module):
    """CleanRL's Agent for CartPole (4 observations, 2 actions)."""

    def __init__(self):
        super().__init__()
        self.critic = nn.Sequential(_orthogonal(4, 64), nn.Tanh(), _orthogonal(64, 64), nn.Tanh(),
                                    _orthogonal(64, 1, std=1.0))  # fmt: skip
        self.actor = nn.Sequential(_orthogonal(4, 64), nn.Tanh(), _orthogonal(64, 64), nn.Tanh(),
                                   _orthogonal(64, 2, std=0.01))  # fmt: skip

    def get_action_and_value(self, x, action=None):
        probabilities = torch.distributions.Categorical(logits=self.actor(x))
        if action is None:
            action = probabilities.sample()
        return action, probabilities.log_prob(action), probabilities.entropy(), self.critic(x)


def _orthogonal(inputs, outputs, std=2**0.5):
    layer = nn.Linear(inputs, outputs)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, 0.0)
    return layer


def _ppo_rollout(envs, agent, observation, running, returns, steps=128, gamma=0.99, lam=0.95):
    """128 steps of every environment with advantages by GAE; the episodes' returns appended to `returns`."""
    columns = {name: [] for name in ("obs", "actions", "logprobs", "rewards", "dones", "values")}
    done = np.zeros(4)
    for _ in range(steps):
        obs = torch.tensor(observation, dtype=torch.float32)
        with torch.no_grad():
            action, logprob, _, value = agent.get_action_and_value(obs)
        observation, reward, terminated, truncated, _ = envs.step(action.numpy())
        running += reward
        for i in np.flatnonzero(terminated | truncated):
            returns.append(running[i])
            running[i] = 0
        for name, item in zip(columns, (obs, action, logprob, reward, done, value.flatten())):
            columns[name].append(torch.as_tensor(item, dtype=torch.float32))
        done = (terminated | truncated).astype(np.float32)
    rollout = {name: torch.stack(column) for name, column in columns.items()}
    with torch.no_grad():
        following = agent.critic(torch.tensor(observation, dtype=torch.float32)).flatten()
    advantages = torch.zeros_like(rollout["rewards"])
    last = 0
    for t in reversed(range(steps)):
        alive = 1.0 - (torch.as_tensor(done) if t == steps - 1 else rollout["dones"][t + 1])
        following_value = following if t == steps - 1 else rollout["values"][t + 1]
        delta = rollout["rewards"][t] + gamma * following_value * alive - rollout["values"][t]
        advantages[t] = last = delta + gamma * lam * alive * last
    rollout.update(advantages=advantages, returns=advantages + rollout["values"])
    return {name: column.reshape(steps * 4, *column.shape[2:]) for name, column in rollout.items()}, observation


def _ppo_update(agent, optimizer, rollout, minibatch, clip_norm, coefficient=0.2):
    """CleanRL's 4 epochs of minibatches: the clipped surrogate, the clipped value loss, the entropy bonus."""
    for _ in range(4):
        order = torch.randperm(len(rollout["obs"]))
        for start in range(0, len(order), minibatch):
            b = {name: column[order[start : start + minibatch]] for name, column in rollout.items()}
            _, logprob, entropy, value = agent.get_action_and_value(b["obs"], b["actions"].long())
            ratio = (logprob - b["logprobs"]).exp()
            advantages = (b["advantages"] - b["advantages"].mean()) / (b["advantages"].std() + 1e-8)
            pg_loss = torch.max(-advantages * ratio,
                                -advantages * torch.clamp(ratio, 1 - coefficient, 1 + coefficient)).mean()  # fmt: skip
            value = value.view(-1)
            clipped = b["values"] + torch.clamp(value - b["values"], -coefficient, coefficient)
            v_loss = 0.5 * torch.max((value - b["returns"]) ** 2, (clipped - b["returns"]) ** 2).mean()
            loss = pg_loss - 0.01 * entropy.mean() + 0.5 * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), clip_norm)
            optimizer.step()


def pytorch_gan(log_dir, change):
    """The GAN of PyTorch-GAN (eriklindernoren, implementations/gan/gan.py): a generator of Linear blocks
    100-128-256-512-1024-784 with BatchNorm1d(out, 0.8) and LeakyReLU 0.2, a Tanh output; a discriminator
    784-512-256-1 with LeakyReLU and a Sigmoid, BCELoss; Adam 2e-4, betas (0.5, 0.999); each batch a generator
    step then a discriminator step on the average of its real and fake losses; 3 epochs of 6,400 generated
    images scaled to [-1, 1] in batches of 64 (CHANGE: in place of MNIST and 200 epochs; the script's loop is
    written out here, with the monitor's epoch_end)."""
    seeded()
    x, y = images(6400, noise=0.5, seed=0)
    x = x / x.abs().max()
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    x = change.data(x, torch.zeros(len(x)))[0] if change.data else x
    generator, discriminator = GANGenerator(), GANDiscriminator()
    for model in (generator, discriminator):
        if change.model:
            change.model(model)
    loss = nn.BCELoss() if change.loss is None else nn.MSELoss()
    if change.optimizer:
        optimizer_g = optimizer_for(change, generator.parameters(), 2e-4 * change.lr)
        optimizer_d = optimizer_for(change, discriminator.parameters(), 2e-4 * change.lr)
    else:
        optimizer_g, optimizer_d = (torch.optim.Adam(model.parameters(), lr=2e-4 * change.lr, betas=(0.5, 0.999),
                                                     weight_decay=change.decay or 0.0)
                                    for model in (generator, discriminator))  # fmt: skip
    before = _class_likeness(_generated(generator), means)
    batches = torch.utils.data.DataLoader(x, batch_size=change.batch or 64, shuffle=True)
    monitor = TrainingMonitor(log_dir)
    parts = {"generator": (generator, optimizer_g), "discriminator": (discriminator, optimizer_d)}
    with Attached(monitor, parts=parts, objective="gan"):
        for epoch in range(3):
            for imgs in batches:
                valid, fake = torch.ones(len(imgs), 1), torch.zeros(len(imgs), 1)
                optimizer_g.zero_grad()
                gen_imgs = generator(torch.randn(len(imgs), 100))
                g_loss = loss(discriminator(gen_imgs), valid)
                g_loss.backward()
                optimizer_g.step()
                optimizer_d.zero_grad()
                d_loss = (loss(discriminator(imgs), valid) + loss(discriminator(gen_imgs.detach()), fake)) / 2
                d_loss.backward()
                optimizer_d.step()
            monitor.epoch_end(epoch, {})
    after = _class_likeness(_generated(generator), means)
    return f"likeness to a class {before:.2f} before training, {after:.2f} after (real images " \
           f"{_class_likeness(x[:200], means):.2f})"  # fmt: skip


class GANGenerator(nn.Module):
    def __init__(self):
        super().__init__()

        def block(inputs, outputs, normalize=True):
            layers = [nn.Linear(inputs, outputs)]
            if normalize:
                layers.append(nn.BatchNorm1d(outputs, 0.8))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        self.model = nn.Sequential(*block(100, 128, normalize=False), *block(128, 256), *block(256, 512),
                                   *block(512, 1024), nn.Linear(1024, 784), nn.Tanh())  # fmt: skip

    def forward(self, z):
        return self.model(z).view(len(z), 1, 28, 28)


class GANDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(784, 512), nn.LeakyReLU(0.2, inplace=True), nn.Linear(512, 256),
                                   nn.LeakyReLU(0.2, inplace=True), nn.Linear(256, 1), nn.Sigmoid())  # fmt: skip

    def forward(self, img):
        return self.model(img.view(len(img), -1))


def _class_likeness(images, means):
    """The mean over `images` of their highest cosine similarity with a class's mean image: how much a generated
    image looks like one of the classes (the real images' own figure is the goal; noise scores near 0)."""
    flat = F.normalize(images.reshape(len(images), -1), dim=1)
    return float((flat @ F.normalize(means.reshape(len(means), -1), dim=1).T).max(1).values.mean())


def _generated(generator, n=200):
    with torch.no_grad():  # in training mode, as the script samples its images
        return generator(torch.randn(n, 100, generator=torch.Generator().manual_seed(3)))


def hf_convnext(log_dir, change):
    """A 2-stage ConvNeXt (16 and 32 channels, one block each) from its config, classifying generated 28x28
    images, counted in steps: 400 steps of AdamW 1e-3 in batches of 32 with a linear schedule after 40 warmup
    steps and weight decay 0.05 (the settings of Hugging Face's image-classification examples for ConvNeXt, on a
    smaller model), evaluated every 100 steps."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    seeded()
    config = ConvNextConfig(num_channels=1, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                            num_labels=10, **change.settings)  # fmt: skip
    model = ConvNextForImageClassification(config)
    return hf_images(log_dir, change, model, 6400, max_steps=400, weight_decay=0.05, eval_strategy="steps",
                     eval_steps=100)  # fmt: skip


# ---- programs of the fifth part (held out: written and committed before any of its runs was diagnosed) ----


def sb3_sac(log_dir, change):
    """SB3's SAC on Pendulum-v1 with the hyperparameters of rl-baselines3-zoo (its hyperparams/sac.yml: learning
    rate 1e-3, the rest SB3's defaults: an actor and two critics of 256-256 ReLU, batches of 256 from a buffer,
    one gradient step per environment step after 100, the entropy coefficient learnt), for 6,000 environment steps
    (CHANGE: of 20,000); the actor and the critics are watched as two parts, each with its own optimizer (the
    entropy coefficient's optimizer steps a single number, unwatched)."""
    import stable_baselines3

    seeded()
    policy = dict(change.settings.get("policy", {}))
    if change.optimizer == "sgd":
        policy["optimizer_class"] = torch.optim.SGD
    if change.decay:
        policy["optimizer_kwargs"] = {"weight_decay": change.decay}
    options = {"batch_size": change.batch} if change.batch else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = stable_baselines3.SAC("MlpPolicy", "Pendulum-v1", learning_rate=1e-3 * change.lr, seed=0,
                                      device="cpu", policy_kwargs=policy, **options)  # fmt: skip
    if change.model:
        change.model(agent.policy)
    monitor = TrainingMonitor(log_dir)
    actor, critic = agent.policy.actor, agent.policy.critic
    parts = {"actor": (actor, actor.optimizer), "critic": (critic, critic.optimizer)}
    with Attached(monitor, parts=parts, objective="rl"):
        agent.learn(total_timesteps=6_000)
    returns = [episode["r"] for episode in agent.ep_info_buffer][-5:]
    return f"mean return of the last {len(returns)} episodes {np.mean(returns):.0f} (about -1,200 at random, 0 best)"


def tv_mobilenet(log_dir, change):
    """torchvision's mobilenet_v3_small (10 classes) with the recipe of torchvision's classification reference for
    MobileNetV3 (references/classification/README.md: RMSprop, alpha 0.9, eps 0.0316, momentum 0.9, weight decay
    1e-5, the learning rate stepped by 0.973 every 2 epochs) at the reference's rate of 0.064 scaled linearly from
    its 8 x 128 images a step to batches of 64 (0.004), and its train_one_epoch and evaluate loops; 6 epochs of
    2,400 generated 32x32 images, their one channel repeated three times (CHANGE: in place of ImageNet, the loop
    written out as the reference is a script)."""
    import torchvision

    seeded()
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    if change.model:
        change.model(model)
    criterion = LOSSES[change.loss] if change.loss else nn.CrossEntropyLoss()
    lr = 0.064 * 64 / 1024 * change.lr
    if change.optimizer:
        optimizer = optimizer_for(change, model.parameters(), lr)
    else:
        optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.9, eps=0.0316, momentum=0.9,
                                        weight_decay=change.decay or 1e-5)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.973)
    return reference_training(log_dir, change, model, (optimizer, scheduler), criterion, n=2400, epochs=6)


def hf_t5(log_dir, change):
    """A 2+2-layer T5 (64 wide) from its config, an encoder-decoder taught to continue the help topics: 32 bytes
    in, the next 32 out (the decoder fed the target shifted right, as T5 does from its labels), counted in steps:
    400 steps of AdamW 1e-3 in batches of 16 with a linear schedule after 40 warmup steps (the settings of Hugging
    Face's from-scratch recipes, on a smaller model)."""
    from transformers import T5Config, T5ForConditionalGeneration

    seeded()
    config = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, **change.settings)  # fmt: skip
    model = T5ForConditionalGeneration(config)
    blocks = byte_blocks(TEXT[:300_000], 64)
    inputs, targets = blocks[:, :32].contiguous(), blocks[:, 32:].contiguous()
    cut = len(blocks) - 200
    x, y = change.data(inputs[:cut], targets[:cut]) if change.data else (inputs[:cut], targets[:cut])
    trainer = hf_train(log_dir, change, model, Examples(input_ids=x, labels=y), learning_rate=1e-3,
                       warmup_steps=40, max_steps=400, per_device_train_batch_size=16)  # fmt: skip
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    with torch.no_grad():
        held_out = float(model(input_ids=inputs[cut:], labels=targets[cut:]).loss)
    return f"training loss {losses[0]:.2f} at first, {losses[-1]:.2f} at the end, {held_out:.2f} on 200 held-out " \
           f"pieces (ln 256 = 5.55)"  # fmt: skip


def pytorch_vae(log_dir, change):
    """The VanillaVAE of PyTorch-VAE (AntixK, models/vanilla_vae.py, configs/vae.yaml): convolutions of stride 2
    with BatchNorm and LeakyReLU, a latent of 128, transposed convolutions back, a Tanh output; the loss is the
    reconstruction's MSE plus the KL divergence weighted 0.00025; Adam 0.005, the rate times 0.95 each epoch
    (ExponentialLR); 4 epochs of 6,400 generated 32x32 images scaled to [-1, 1] in batches of 64 (CHANGE: one
    channel and three halvings of 32 to 128 channels, in place of CelebA's 64x64 colour images and five of 32 to
    512; the loop, which the repository runs through Lightning, written out)."""
    seeded()
    x = images(6400, size=32, noise=0.5, seed=0)[0]
    x = x / x.abs().max()
    x = change.data(x, torch.zeros(len(x)))[0] if change.data else x
    vx = images(800, size=32, noise=0.5, seed=1)[0]
    vx = vx / vx.abs().max()
    model = VanillaVAE()
    if change.model:
        change.model(model)
    lr = 0.005 * change.lr
    optimizer = optimizer_for(change, model.parameters(), lr, "adam")
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
    batches = torch.utils.data.DataLoader(x, batch_size=change.batch or 64, shuffle=True)
    monitor = TrainingMonitor(log_dir)
    with Attached(monitor, model, optimizer):
        for epoch in range(4):
            model.train()
            for batch in batches:
                loss = model.loss_function(*model(batch), kld_weight=0.00025)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
            model.eval()
            with torch.no_grad():
                monitor.epoch_end(epoch, {"valid/loss": float(model.loss_function(*model(vx), kld_weight=0.00025))})
    with torch.no_grad():
        error = F.mse_loss(model(vx)[0], vx)
    return f"validation reconstruction error {float(error):.3f} (the images' variance {float(vx.var()):.3f})"


class VanillaVAE(nn.Module):
    def __init__(self, in_channels=1, latent_dim=128, hidden_dims=(32, 64, 128)):
        super().__init__()
        encoder, channels = [], in_channels
        for h_dim in hidden_dims:
            encoder.append(nn.Sequential(nn.Conv2d(channels, h_dim, kernel_size=3, stride=2, padding=1),
                                         nn.BatchNorm2d(h_dim), nn.LeakyReLU()))  # fmt: skip
            channels = h_dim
        self.encoder = nn.Sequential(*encoder)
        self.fc_mu = nn.Linear(hidden_dims[-1] * 16, latent_dim)
        self.fc_var = nn.Linear(hidden_dims[-1] * 16, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, hidden_dims[-1] * 16)
        reverse = list(reversed(hidden_dims))
        self.decoder = nn.Sequential(*(
            nn.Sequential(nn.ConvTranspose2d(reverse[i], reverse[i + 1], kernel_size=3, stride=2, padding=1,
                                             output_padding=1), nn.BatchNorm2d(reverse[i + 1]), nn.LeakyReLU())
            for i in range(len(reverse) - 1)
        ))  # fmt: skip
        self.final_layer = nn.Sequential(
            nn.ConvTranspose2d(reverse[-1], reverse[-1], kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(reverse[-1]), nn.LeakyReLU(),
            nn.Conv2d(reverse[-1], out_channels=in_channels, kernel_size=3, padding=1), nn.Tanh(),
        )  # fmt: skip
        self.channels = hidden_dims[-1]

    def forward(self, inputs):
        result = torch.flatten(self.encoder(inputs), start_dim=1)
        mu, log_var = self.fc_mu(result), self.fc_var(result)
        z = torch.randn_like(mu) * torch.exp(0.5 * log_var) + mu  # reparameterize
        decoded = self.decoder(self.decoder_input(z).view(-1, self.channels, 4, 4))
        return self.final_layer(decoded), inputs, mu, log_var

    def loss_function(self, recons, inputs, mu, log_var, kld_weight):
        recons_loss = F.mse_loss(recons, inputs)
        kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu**2 - log_var.exp(), dim=1), dim=0)
        return recons_loss + kld_weight * kld_loss


# ---- programs of the sixth part (held out: written and committed before any of its runs was diagnosed) ----


def d2l_nin(log_dir, change):
    """d2l's Network in Network (sec_nin: blocks of a convolution and two 1x1 convolutions, each with a ReLU, max
    pooling between them, dropout 0.5, a last block of one channel per class and global average pooling, no fully
    connected layer), with its init_cnn, SGD at the class's lr 0.1, 10 epochs; the class is the chapter's, which
    the d2l package does not export (CHANGE: copied, with 24, 64 and 96 channels in place of 96, 256 and 384, a
    first block of 5x5 stride 1 on 28x28 images in place of 11x11 stride 4 on 224x224, and batches of 64 in place
    of 128). It starts slowly: near chance for its first 3 epochs."""
    book = d2l()

    def nin_block(out_channels, kernel_size, strides, padding):
        return nn.Sequential(
            nn.LazyConv2d(out_channels, kernel_size, strides, padding), nn.ReLU(),
            nn.LazyConv2d(out_channels, kernel_size=1), nn.ReLU(),
            nn.LazyConv2d(out_channels, kernel_size=1), nn.ReLU(),
        )  # fmt: skip

    class NiN(book.Classifier):
        def __init__(self, lr=0.1, num_classes=10):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(
                nin_block(24, kernel_size=5, strides=1, padding=2), nn.MaxPool2d(3, stride=2),
                nin_block(64, kernel_size=5, strides=1, padding=2), nn.MaxPool2d(3, stride=2),
                nin_block(96, kernel_size=3, strides=1, padding=1), nn.MaxPool2d(3, stride=2),
                nn.Dropout(0.5),
                nin_block(num_classes, kernel_size=3, strides=1, padding=1),
                nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
            )  # fmt: skip

    seeded()
    data = d2l_images(change, batch=64)
    model = NiN(lr=0.1)
    return fit_d2l_cnn(log_dir, model, data, change, epochs=10)


def cleanrl_dqn(log_dir, change):
    """CleanRL's dqn.py on CartPole-v1 with its defaults (a Q-network of two ReLU layers of 120 and 84; Adam
    2.5e-4; SB3's replay buffer of 10,000; gamma 0.99; the target network copied every 500 steps; batches of 128
    every 10 steps; epsilon from 1 to 0.05 over half the run) for 60,000 environment steps with learning from step
    5,000 (CHANGE: of 500,000 and 10,000), counted in optimizer steps. CleanRL is a single-file script, not a
    package: its loop is written out here."""
    import gymnasium as gym
    from stable_baselines3.common.buffers import ReplayBuffer

    seeded(1)
    env = gym.make("CartPole-v1")
    q_network, target_network = QNetwork(), QNetwork()
    if change.model:
        change.model(q_network)
    target_network.load_state_dict(q_network.state_dict())
    lr = 2.5e-4 * change.lr
    optimizer = optimizer_for(change, q_network.parameters(), lr, "adam")
    buffer = ReplayBuffer(10_000, env.observation_space, env.action_space, "cpu", handle_timeout_termination=False)
    total, starts, returns, episode = 60_000, 5_000, [], 0.0
    observation, _ = env.reset(seed=1)
    env.action_space.seed(1)  # CHANGE: the random actions seeded too, so that a run repeats
    monitor = TrainingMonitor(log_dir)
    with Attached(monitor, q_network, optimizer, objective="rl"):
        for step in range(total):
            epsilon = max(0.05, 1 - 0.95 * step / (0.5 * total))  # linear_schedule(1, 0.05, 0.5 * total, step)
            if random.random() < epsilon:
                action = env.action_space.sample()
            else:
                action = int(q_network(torch.tensor(observation)[None]).argmax(1))
            following, reward, terminated, truncated, _ = env.step(action)
            buffer.add(observation, following, np.array(action), np.array(reward), np.array(terminated), [{}])
            episode += reward
            observation = following
            if terminated or truncated:
                returns.append(episode)
                episode = 0.0
                observation, _ = env.reset()
            if step > starts and step % 10 == 0:
                _dqn_update(q_network, target_network, optimizer, buffer.sample(change.batch or 128), change.clip)
            if step % 500 == 0:
                target_network.load_state_dict(q_network.state_dict())
    env.close()
    return f"mean return of the last 20 episodes {np.mean(returns[-20:]):.0f} (500 at most)"


class QNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(4, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 2))

    def forward(self, x):
        return self.network(x)


def _dqn_update(q_network, target_network, optimizer, data, clip=None):
    with torch.no_grad():
        target_max, _ = target_network(data.next_observations).max(dim=1)
        td_target = data.rewards.flatten() + 0.99 * target_max * (1 - data.dones.flatten())
    old_val = q_network(data.observations).gather(1, data.actions).squeeze()
    loss = F.mse_loss(td_target, old_val)
    optimizer.zero_grad()
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(q_network.parameters(), clip)
    optimizer.step()


def timm_vit(log_dir, change):
    """timm's ViT (vit_tiny_patch16_224's width of 192 and 3 heads, CHANGE: 4 blocks of 12, 4x4 patches of 28x28
    one-channel images) with the pieces of timm's train.py for ViTs: Mixup (mixup 0.8, cutmix 1.0, label smoothing
    0.1) and SoftTargetCrossEntropy, AdamW from create_optimizer_v2 (lr 1e-3, weight decay 0.05, none on biases
    and norms), a cosine schedule with a warmup epoch from create_scheduler_v2 stepped per update, 6 epochs of
    3,200 images in batches of 64, evaluated each epoch (the loop written out, as train.py is a script)."""
    import timm
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    seeded()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                              num_classes=10, depth=4)  # fmt: skip
    if change.model:
        change.model(model)
    lr, epochs = 1e-3 * change.lr, 6
    if change.optimizer:
        optimizer = optimizer_for(change, model.parameters(), lr)
    else:
        optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=change.decay or 0.05)
    train = images(3200, seed=0)
    train = change.data(*train) if change.data else train
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=change.batch or 64,
                                          shuffle=True, drop_last=True)  # fmt: skip
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=1, warmup_lr=1e-5,
                                       min_lr=1e-5, step_on_epochs=False, updates_per_epoch=len(batches))  # fmt: skip
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    criterion, valid, updates = SoftTargetCrossEntropy(), images(800, seed=1), 0
    monitor = TrainingMonitor(log_dir)
    with Attached(monitor, model, optimizer, objective="classification"):
        for epoch in range(epochs):
            model.train()
            for image, target in batches:  # train_one_epoch
                image, target = mixup(image, target)
                loss = criterion(model(image), target)
                optimizer.zero_grad()
                loss.backward()
                if change.clip:
                    nn.utils.clip_grad_norm_(model.parameters(), change.clip)
                optimizer.step()
                updates += 1
                scheduler.step_update(num_updates=updates)
            scheduler.step(epoch + 1)
            model.eval()
            with torch.no_grad():
                scores = model(valid[0])
            scalars = {"valid/loss": float(F.cross_entropy(scores, valid[1])),
                       "valid/accuracy": float((scores.argmax(1) == valid[1]).float().mean())}  # fmt: skip
            monitor.epoch_end(epoch, scalars, classes=CLASSES)
    return ", ".join(f"{tag} {value:.3g}" for tag, value in scalars.items())
