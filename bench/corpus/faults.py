"""Faults made by applying mutation operators to the healthy programs of programs.py.

The operators are DeepCrime's (Humbatova, Jahangirova and Tonella, "DeepCrime: Mutation Testing of Deep Learning
Systems Based on Real Faults", ISSTA 2021), derived from a taxonomy of real faults: each is named by its DeepCrime
id (TCL change labels, TRD delete training data, TUD unbalance training data, TAN add noise to training data, HBS
change batch size, HLR change learning rate, ACH change activation function, ARM remove activation function, AAL
add activation function, RAW add weights regularisation, RCD change dropout rate, WCI change weights
initialisation, LCH change loss function, OCH change optimiser, OCG change gradient clipping) and applied with a
magnitude that harms the run (a mutant that did not harm its program was replaced before anything was diagnosed:
AdamW's steps do not care for a clipping threshold, nor a triplet embedding of easy data for Adam at 1.0; in the
development part, softmax regression learnt the generated digits at 100 times its rate and PPO at 100 times its
rate, so they were given stronger magnitudes, and Adam trained the ResNet better than its SGD at 0.1 and at 1, so
that fault was dropped). Each
fault lists the rules whose finding names its cause and whose suggestion would fix it; a finding whose rule only
states a symptom (SYMPTOMS) is neither right nor wrong.

HELD_OUT was written and committed before any of its runs was diagnosed, and is scored once.
"""

import torch
from programs import Change
from torch import nn

# ---- the operators: each returns the Change that applies it ----


def labels_changed(share):
    """TCL: `share` of the training labels replaced by random ones (targets of a language model: random
    tokens)."""

    def apply(x, y):
        generator = torch.Generator().manual_seed(7)
        y = y.clone()
        hit = torch.rand(y.shape, generator=generator) < share
        y[hit] = torch.randint(int(y.max()) + 1, (int(hit.sum()),), generator=generator, dtype=y.dtype)
        return x, y

    return Change(data=apply)


def data_deleted(kept):
    """TRD: only the first `kept` share of the training data is kept."""
    return Change(data=lambda x, y: (x[: max(2, int(len(x) * kept))], y[: max(2, int(len(y) * kept))]))


def unbalanced(kept):
    """TUD: class 0 kept whole, `kept` of every other class."""

    def apply(x, y):
        generator = torch.Generator().manual_seed(7)
        keep = (y == 0) | (torch.rand(y.shape, generator=generator) < kept)
        return x[keep], y[keep]

    return Change(data=apply)


def noise_added(std):
    """TAN: Gaussian noise of `std` times the inputs' spread added to the training inputs."""
    return Change(data=lambda x, y: (x + std * x.std() * torch.randn(x.shape, generator=_seeded()), y))


def _seeded():
    return torch.Generator().manual_seed(7)


def activation_changed(to):
    """ACH: every activation module (ReLU, Tanh, Sigmoid, GELU) becomes `to`."""
    return Change(model=lambda model: _swap_activations(model, to))


def activation_removed():
    """ARM: every activation module becomes the identity."""
    return Change(model=lambda model: _swap_activations(model, nn.Identity))


ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU)


def _swap_activations(model, to):
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ACTIVATIONS):
                setattr(module, child_name, to())


def softmax_at_output():
    """AAL: a softmax after the last layer of a classifier that is trained with cross-entropy."""

    def apply(model):
        net = model.net
        net.append(nn.Softmax(dim=1))

    return Change(model=apply)


def initialisation(kind):
    """WCI: every weight of two or more dimensions re-initialised: "zeros", or "large" (normal, std 1)."""

    def apply(model):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.zero_() if kind == "zeros" else parameter.normal_(0, 1)

    return Change(model=apply)


def dropout(p):
    """RCD: every dropout at rate `p`."""

    def apply(model):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
        if isinstance(getattr(model, "model", None), nn.Module):  # Lightning's LSTM: dropout between layers
            for rnn in model.modules():
                if isinstance(rnn, nn.LSTM):
                    rnn.dropout = p

    return Change(model=apply)


# ---- the faults: name -> (program, operator id, change, the rules that name its cause) ----

LR_HIGH = ("diverging", "loss_spikes", "exploding_gradients", "nonfinite_gradients", "oscillating",
           "moving_too_fast", "mostly_clipped", "moving_too_fast:learning_rate", "saturated:learning_rate",
           "dead_units:learning_rate", "vanishing_gradients:learning_rate")  # fmt: skip
LR_LOW = ("stuck", "not_learning", "updates_rounded_away", "not_learning:learning_rate",
          "updates_rounded_away:learning_rate")  # fmt: skip
LARGE_INIT = ("high_initial_loss", "saturated", "diverging:initialisation", "high_initial_loss:initialisation")
SATURATING = ("saturated", "vanishing_gradients", "vanishing_gradients:saturation")
LABELS = ("noisy_labels", "no_generalisation", "stuck:weights_move")
CLIPPING = ("mostly_clipped", "updates_rounded_away:clipping", "mostly_clipped:clipping",
            "vanishing_gradients:clipping", "not_learning:clipping")  # fmt: skip
ZERO_INIT = ("dead_units:initialisation",)  # dead units, their initialisation named
# data deleted: overfitting, no generalisation, or too few steps to learn (whose suggestion is more data)
DATA_SMALL = ("overfitting", "no_generalisation", "stuck:few_steps")
NOISY_INPUTS = ("stuck:weights_move",)  # noise added to the inputs: they hold nothing the model can learn
# rules whose finding states a symptom and what to check, naming no cause (a rule of candidate
# causes says so of a finding in its evidence: "cause" is None)
SYMPTOMS = ("not_updated", "replicas_differ", "nonfinite_on_some_ranks")
# evidence that tells which of its causes a rule's finding names: "stuck:weights_move" is stuck's
# finding that the data are the suspects (the weights move), "stuck" its finding of the learning rate;
# a finding's evidence "cause" adds its name too ("vanishing_gradients:saturation")
CAUSE_FLAGS = ("weights_move",)


def lr(factor):
    return Change(lr=factor)


FAULTS = {
    # the CNN (d2l's LeNet: sigmoid, SGD 0.9, epochs)
    "lenet_TCL_60": ("d2l_lenet", "TCL", labels_changed(0.6), LABELS),
    "lenet_HLR_x30": ("d2l_lenet", "HLR", lr(30), LR_HIGH),
    "lenet_HLR_d1000": ("d2l_lenet", "HLR", lr(1e-3), LR_LOW),
    "lenet_LCH_mse": ("d2l_lenet", "LCH", Change(loss="mse"), ("not_cross_entropy",)),
    "lenet_RAW_1": ("d2l_lenet", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    "lenet_WCI_large": ("d2l_lenet", "WCI", initialisation("large"), LARGE_INIT),
    # the BatchNorm ResNet (d2l's Residual blocks, SGD 0.01, epochs)
    "resnet_TUD_5": ("d2l_resnet", "TUD", unbalanced(0.05), ("output_bias_skew",)),
    "resnet_AAL_softmax": ("d2l_resnet", "AAL", softmax_at_output(), ("softmax_before_loss",)),
    "resnet_TRD_3": ("d2l_resnet", "TRD", data_deleted(0.03), DATA_SMALL),
    "resnet_HLR_d1000": ("d2l_resnet", "HLR", lr(1e-3), LR_LOW),
    # softmax regression and linear regression (d2l, epochs)
    "softmax_WCI_large": ("d2l_softmax", "WCI", initialisation("large"), LARGE_INIT),
    "softmax_TCL_100": ("d2l_softmax", "TCL", labels_changed(1.0), LABELS),
    "linreg_HLR_x100": ("d2l_linear_regression", "HLR", lr(100), LR_HIGH),
    "linreg_TAN_3": ("d2l_linear_regression", "TAN", noise_added(3.0), NOISY_INPUTS),
    # RL policies (Stable-Baselines3 on CartPole, counted in steps)
    "ppo_HLR_x1000": ("sb3_ppo", "HLR", lr(1000), LR_HIGH),
    "ppo_HLR_d1000": ("sb3_ppo", "HLR", lr(1e-3), LR_LOW),
    "ppo_ACH_sigmoid": ("sb3_ppo", "ACH", Change(settings={"policy": {"activation_fn": nn.Sigmoid}}), SATURATING),
    "a2c_OCH_sgd": ("sb3_a2c", "OCH", Change(optimizer="sgd"), LR_LOW),
    "a2c_RAW_1": ("sb3_a2c", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    # transformer and LSTM language models (Lightning's demos, counted in steps)
    "transformer_HLR_x30": ("lightning_transformer", "HLR", lr(30), LR_HIGH),
    "transformer_RCD_95": ("lightning_transformer", "RCD", dropout(0.95), ()),
    "transformer_OCG_1e-4": ("lightning_transformer", "OCG", Change(clip=1e-4), CLIPPING),
    "lstm_HLR_d1000": ("lightning_lstm", "HLR", lr(1e-3), LR_LOW),
    "lstm_WCI_large": ("lightning_lstm", "WCI", initialisation("large"), LARGE_INIT),
}

HELD_OUT = {
    # the CNN
    "lenet_TUD_5": ("d2l_lenet", "TUD", unbalanced(0.05), ("output_bias_skew",)),
    "lenet_HBS_1": ("d2l_lenet", "HBS", Change(batch=1), LR_HIGH),
    "lenet_ARM": ("d2l_lenet", "ARM", activation_removed(), ("linear_model",)),
    # the BatchNorm ResNet
    "resnet_TCL_50": ("d2l_resnet", "TCL", labels_changed(0.5), LABELS),
    "resnet_RAW_1": ("d2l_resnet", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    "resnet_LCH_l1": ("d2l_resnet", "LCH", Change(loss="l1"), ("not_cross_entropy",)),
    # RNN language models (d2l's RNN and GRU, epochs)
    "rnn_HLR_x30": ("d2l_rnn_lm", "HLR", lr(30), LR_HIGH),
    "rnn_HLR_d1000": ("d2l_rnn_lm", "HLR", lr(1e-3), LR_LOW),
    "gru_TCL_60": ("d2l_gru_lm", "TCL", labels_changed(0.6), LABELS),
    "gru_WCI_large": ("d2l_gru_lm", "WCI", initialisation("large"), LARGE_INIT),
    # the GAN (d2l's, two models, epochs)
    "gan_HLR_x100": ("d2l_gan", "HLR", lr(100), LR_HIGH),
    "gan_OCH_sgd": ("d2l_gan", "OCH", Change(optimizer="sgd", lr=0.01), LR_LOW),
    # RL (SB3's DQN)
    "dqn_HLR_x100": ("sb3_dqn", "HLR", lr(100), LR_HIGH),
    "dqn_ACH_sigmoid": ("sb3_dqn", "ACH", Change(settings={"policy": {"activation_fn": nn.Sigmoid}}), SATURATING),
    # the transformer language model (GPT-2, Hugging Face, counted in steps)
    "gpt2_HLR_x100": ("hf_gpt2", "HLR", lr(100), LR_HIGH),
    "gpt2_OCH_sgd": ("hf_gpt2", "OCH", Change(optimizer="sgd"), LR_LOW),
    "gpt2_TCL_100": ("hf_gpt2", "TCL", labels_changed(1.0), LABELS),
    # BERT classification (Hugging Face, epochs)
    "bert_TCL_100": ("hf_bert", "TCL", labels_changed(1.0), LABELS),
    "bert_RAW_100": ("hf_bert", "RAW", Change(decay=100.0), ("strong_weight_decay",)),
    # the regression (skorch) and the triplet embedding (pytorch-metric-learning)
    "regressor_HLR_x100": ("skorch_regressor", "HLR", lr(100), LR_HIGH),
    "regressor_WCI_zeros": ("skorch_regressor", "WCI", initialisation("zeros"), ZERO_INIT),
    "triplet_WCI_zeros": ("pml_triplet", "WCI", initialisation("zeros"), ZERO_INIT),
}

HEALTHY = ["d2l_lenet", "d2l_resnet", "d2l_softmax", "d2l_linear_regression", "sb3_ppo", "sb3_a2c",
           "lightning_transformer", "lightning_lstm"]  # fmt: skip
HELD_OUT_HEALTHY = ["sb3_dqn", "hf_gpt2", "hf_bert", "pml_triplet", "skorch_regressor", "d2l_rnn_lm",
                    "d2l_gru_lm", "d2l_gan"]  # fmt: skip

# The third part, held out: six healthy programs the other parts do not have and faults on them and on the
# others' programs, by operators each program had not been given; written and committed before any of its runs
# was diagnosed (its runs were only checked for harm with --smoke), and scored once. Replaced after that check:
# unbalancing skorch's classes (its validation split is as unbalanced, so its accuracy rose) by weight decay, and
# the autoencoder's sigmoid (12% worse only), dropped; the contrastive program's classes were drawn closer, since
# an untrained trunk told the first ones apart (0.97). Before it was scored, and before any of its runs was
# diagnosed, the zero initialisation's expected finding was spelled with its cause (ZERO_INIT), as dead_units
# names it: the bare rule name matched no finding that names a cause.
THIRD = {
    # d2l's dropout MLP
    "mlp_HLR_x30": ("d2l_mlp_dropout", "HLR", lr(30), LR_HIGH),
    "mlp_ACH_sigmoid": ("d2l_mlp_dropout", "ACH", activation_changed(nn.Sigmoid), SATURATING),
    "mlp_RCD_95": ("d2l_mlp_dropout", "RCD", dropout(0.95), ()),
    "mlp_TCL_60": ("d2l_mlp_dropout", "TCL", labels_changed(0.6), LABELS),
    # torchvision's ResNet-18 with its reference recipe (BatchNorm, warmup, cosine, label smoothing)
    "tvres_HLR_x30": ("tv_resnet", "HLR", lr(30), LR_HIGH),
    "tvres_TUD_5": ("tv_resnet", "TUD", unbalanced(0.05), ("output_bias_skew",)),
    "tvres_OCG_1e-3": ("tv_resnet", "OCG", Change(clip=1e-3), CLIPPING),
    "tvres_LCH_mse": ("tv_resnet", "LCH", Change(loss="mse"), ("not_cross_entropy",)),
    "tvres_WCI_large": ("tv_resnet", "WCI", initialisation("large"), LARGE_INIT),
    # a ViT (Hugging Face, epochs, cosine schedule after warmup)
    "vit_HLR_x100": ("hf_vit", "HLR", lr(100), LR_HIGH),
    "vit_TCL_100": ("hf_vit", "TCL", labels_changed(1.0), LABELS),
    "vit_OCH_sgd": ("hf_vit", "OCH", Change(optimizer="sgd"), LR_LOW),
    "vit_RAW_100": ("hf_vit", "RAW", Change(decay=100.0), ("strong_weight_decay",)),
    # Lightning's autoencoder
    "ae_HLR_x100": ("lightning_autoencoder", "HLR", lr(100), LR_HIGH),
    "ae_WCI_large": ("lightning_autoencoder", "WCI", initialisation("large"), LARGE_INIT),
    "ae_OCH_sgd": ("lightning_autoencoder", "OCH", Change(optimizer="sgd"), LR_LOW),
    # skorch's classifier (a softmax output and NLLLoss of its log)
    "skclf_RAW_1": ("skorch_classifier", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    "skclf_HLR_d1000": ("skorch_classifier", "HLR", lr(1e-3), LR_LOW),
    "skclf_WCI_zeros": ("skorch_classifier", "WCI", initialisation("zeros"), ZERO_INIT),
    # pytorch-metric-learning's contrastive loss
    "contrastive_OCH_sgd": ("pml_contrastive", "OCH", Change(optimizer="sgd"), LR_LOW),
    "contrastive_TCL_100": ("pml_contrastive", "TCL", labels_changed(1.0), LABELS),
    # the other parts' programs, by operators they had not been given
    "lenet_OCH_adam": ("d2l_lenet", "OCH", Change(optimizer="adam"), LR_HIGH),
    "linreg_HLR_d1000": ("d2l_linear_regression", "HLR", lr(1e-3), LR_LOW),
    "rnn_TCL_100": ("d2l_rnn_lm", "TCL", labels_changed(1.0), LABELS),
    "gan_HLR_d1000": ("d2l_gan", "HLR", lr(1e-3), LR_LOW),
    "ppo_RAW_1": ("sb3_ppo", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    "dqn_HLR_d1000": ("sb3_dqn", "HLR", lr(1e-3), LR_LOW),
    "transformer_HLR_d1000": ("lightning_transformer", "HLR", lr(1e-3), LR_LOW),
    "gpt2_WCI_large": ("hf_gpt2", "WCI", initialisation("large"), LARGE_INIT),
    "bert_HLR_x100": ("hf_bert", "HLR", lr(100), LR_HIGH),
}

THIRD_HEALTHY = ["d2l_mlp_dropout", "tv_resnet", "hf_vit", "lightning_autoencoder", "skorch_classifier",
                 "pml_contrastive"]  # fmt: skip

# The fourth part, held out: four healthy programs the other parts do not have (d2l's BatchNorm LeNet, CleanRL's
# PPO, PyTorch-GAN's GAN, a Hugging Face ConvNeXt counted in steps) and faults on them and on the others'
# programs, by operators each program had not been given; written and committed before any of its runs was
# diagnosed (checked for harm only, with --smoke), and scored once. Replaced or dropped after that check, as they
# did not harm their program: the BatchNorm LeNet at 100 times its rate (given 1,000), with 60% of its labels
# changed (given 100%), with noise of 3 times the inputs' spread (given 10), with MSE, and with Adam at its rate;
# CleanRL's PPO and the ConvNeXt at 100 times their rate (given 1,000); the triplet embedding at 100 times its
# rate, the dropout MLP with 5% of its data, softmax regression in batches of one, and Lightning's LSTM with
# dropout 0.95, dropped. Before it was scored, and before any of its runs was diagnosed, in every part: the
# clipping's expected findings gained the rules that came to name the clipping as their cause (mostly_clipped,
# vanishing_gradients and not_learning, in CLIPPING), and a large initialisation's high_initial_loss naming it
# (in LARGE_INIT); noise added to the inputs expects stuck's finding that the
# inputs (or labels) hold nothing to learn (NOISY_INPUTS), and data deleted the findings whose suggestion is more
# data (DATA_SMALL), where each part had spelled them its own way.
FOURTH = {
    # d2l's LeNet with BatchNorm
    "bnlenet_HLR_x1000": ("d2l_bn_lenet", "HLR", lr(1000), LR_HIGH),
    "bnlenet_TCL_100": ("d2l_bn_lenet", "TCL", labels_changed(1.0), LABELS),
    "bnlenet_TUD_5": ("d2l_bn_lenet", "TUD", unbalanced(0.05), ("output_bias_skew",)),
    "bnlenet_TRD_5": ("d2l_bn_lenet", "TRD", data_deleted(0.05), DATA_SMALL),
    "bnlenet_TAN_10": ("d2l_bn_lenet", "TAN", noise_added(10.0), NOISY_INPUTS),
    # CleanRL's PPO (counted in steps)
    "cleanrl_HLR_x1000": ("cleanrl_ppo", "HLR", lr(1000), LR_HIGH),
    "cleanrl_HLR_d1000": ("cleanrl_ppo", "HLR", lr(1e-3), LR_LOW),
    "cleanrl_WCI_zeros": ("cleanrl_ppo", "WCI", initialisation("zeros"), ZERO_INIT),
    "cleanrl_OCH_sgd": ("cleanrl_ppo", "OCH", Change(optimizer="sgd"), LR_LOW),
    "cleanrl_OCG_1e-3": ("cleanrl_ppo", "OCG", Change(clip=1e-3), CLIPPING),
    # PyTorch-GAN's GAN
    "ptgan_HLR_x100": ("pytorch_gan", "HLR", lr(100), LR_HIGH),
    "ptgan_OCH_sgd": ("pytorch_gan", "OCH", Change(optimizer="sgd"), LR_LOW),
    "ptgan_ACH_sigmoid": ("pytorch_gan", "ACH", activation_changed(nn.Sigmoid), SATURATING),
    "ptgan_WCI_large": ("pytorch_gan", "WCI", initialisation("large"), LARGE_INIT),
    # a ConvNeXt (Hugging Face, counted in steps)
    "convnext_HLR_x1000": ("hf_convnext", "HLR", lr(1000), LR_HIGH),
    "convnext_OCH_sgd": ("hf_convnext", "OCH", Change(optimizer="sgd"), LR_LOW),
    "convnext_TCL_100": ("hf_convnext", "TCL", labels_changed(1.0), LABELS),
    "convnext_WCI_large": ("hf_convnext", "WCI", initialisation("large"), LARGE_INIT),
    "convnext_RAW_100": ("hf_convnext", "RAW", Change(decay=100.0), ("strong_weight_decay",)),
    # the other parts' programs, by operators they had not been given
    "lenet_TAN_3": ("d2l_lenet", "TAN", noise_added(3.0), NOISY_INPUTS),
    "gpt2_RAW_100": ("hf_gpt2", "RAW", Change(decay=100.0), ("strong_weight_decay",)),
    "a2c_HLR_x100": ("sb3_a2c", "HLR", lr(100), LR_HIGH),
    "vit_WCI_zeros": ("hf_vit", "WCI", initialisation("zeros"), ZERO_INIT),
    "skreg_TAN_3": ("skorch_regressor", "TAN", noise_added(3.0), NOISY_INPUTS),
}

FOURTH_HEALTHY = ["d2l_bn_lenet", "cleanrl_ppo", "pytorch_gan", "hf_convnext"]

# The fifth part, held out: four healthy programs the other parts do not have (SB3's SAC on Pendulum, two
# watched parts; torchvision's MobileNetV3 with its RMSprop recipe; a Hugging Face T5 encoder-decoder counted in
# steps; PyTorch-VAE's VanillaVAE) and faults on them and on the others' programs, by operators each program had
# not been given; written and committed before any of its runs was diagnosed (checked for harm only, with
# --smoke), and scored once. Replaced or dropped after that check, as they did not harm their program: the T5 at
# 100 and 1,000 times its rate (AdamW with warmup and clipping at 1.0; given weight decay 100), the VAE's zero
# initialisation (its BatchNorm restores the scale; given a large one), the contrastive embedding at 100 and 1,000
# times its rate (given a zero initialisation), torchvision's ResNet with sigmoids (accuracy 1.0), BERT clipped
# at 1e-4 (0.504 against 0.512) and DQN clipped at 1e-3 (a return of 125 against 151), dropped.
FIFTH = {
    # SB3's SAC (two parts: the actor and the critics, counted in steps)
    "sac_HLR_x100": ("sb3_sac", "HLR", lr(100), LR_HIGH),
    "sac_HLR_d1000": ("sb3_sac", "HLR", lr(1e-3), LR_LOW),
    "sac_WCI_large": ("sb3_sac", "WCI", initialisation("large"), LARGE_INIT),
    "sac_RAW_1": ("sb3_sac", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    # torchvision's MobileNetV3 (RMSprop, BatchNorm, Hardswish, squeeze-and-excitation)
    "mobilenet_HLR_x100": ("tv_mobilenet", "HLR", lr(100), LR_HIGH),
    "mobilenet_TCL_100": ("tv_mobilenet", "TCL", labels_changed(1.0), LABELS),
    "mobilenet_TUD_5": ("tv_mobilenet", "TUD", unbalanced(0.05), ("output_bias_skew",)),
    "mobilenet_LCH_mse": ("tv_mobilenet", "LCH", Change(loss="mse"), ("not_cross_entropy",)),
    "mobilenet_OCH_sgd": ("tv_mobilenet", "OCH", Change(optimizer="sgd"), LR_LOW),
    # the T5 encoder-decoder (Hugging Face, counted in steps)
    "t5_RAW_100": ("hf_t5", "RAW", Change(decay=100.0), ("strong_weight_decay",)),
    "t5_OCH_sgd": ("hf_t5", "OCH", Change(optimizer="sgd"), LR_LOW),
    "t5_TCL_100": ("hf_t5", "TCL", labels_changed(1.0), LABELS),
    "t5_WCI_large": ("hf_t5", "WCI", initialisation("large"), LARGE_INIT),
    # PyTorch-VAE's VanillaVAE
    "vae_HLR_x100": ("pytorch_vae", "HLR", lr(100), LR_HIGH),
    "vae_OCH_sgd": ("pytorch_vae", "OCH", Change(optimizer="sgd"), LR_LOW),
    "vae_WCI_large": ("pytorch_vae", "WCI", initialisation("large"), LARGE_INIT),
    "vae_RAW_1": ("pytorch_vae", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    # the other parts' programs, by operators they had not been given
    "lstm_OCH_adam": ("lightning_lstm", "OCH", Change(optimizer="adam"), LR_HIGH),
    "gru_HLR_d1000": ("d2l_gru_lm", "HLR", lr(1e-3), LR_LOW),
    "cleanrl_ACH_sigmoid": ("cleanrl_ppo", "ACH", activation_changed(nn.Sigmoid), SATURATING),
    "contrastive_WCI_zeros": ("pml_contrastive", "WCI", initialisation("zeros"), ZERO_INIT),
    "mlp_WCI_large": ("d2l_mlp_dropout", "WCI", initialisation("large"), LARGE_INIT),
}

FIFTH_HEALTHY = ["sb3_sac", "tv_mobilenet", "hf_t5", "pytorch_vae"]

# The sixth part, held out: three healthy programs the other parts do not have (d2l's Network in Network, CleanRL's
# DQN counted in steps, timm's ViT with its Mixup, soft-target cross-entropy and per-update cosine schedule) and
# faults on them and on the others' programs, by operators each program had not been given; written and committed
# before any of its runs was diagnosed (checked for harm only, with --smoke), and scored once. Replaced after that
# check, as it did not harm its program: the DQN's large initialisation (a return of 212 against 224; given weight
# decay 1), once the DQN's random actions were seeded (its returns had differed from run to run).
SIXTH = {
    # d2l's Network in Network (ReLU, dropout, no BatchNorm, SGD)
    "nin_HLR_x30": ("d2l_nin", "HLR", lr(30), LR_HIGH),
    "nin_TCL_100": ("d2l_nin", "TCL", labels_changed(1.0), LABELS),
    "nin_WCI_zeros": ("d2l_nin", "WCI", initialisation("zeros"), ZERO_INIT),
    "nin_OCH_adam": ("d2l_nin", "OCH", Change(optimizer="adam"), LR_HIGH),
    "nin_RCD_95": ("d2l_nin", "RCD", dropout(0.95), ()),
    # CleanRL's DQN (counted in steps)
    "cdqn_HLR_x1000": ("cleanrl_dqn", "HLR", lr(1000), LR_HIGH),
    "cdqn_HLR_d1000": ("cleanrl_dqn", "HLR", lr(1e-3), LR_LOW),
    "cdqn_OCH_sgd": ("cleanrl_dqn", "OCH", Change(optimizer="sgd"), LR_LOW),
    "cdqn_RAW_1": ("cleanrl_dqn", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    "cdqn_ACH_sigmoid": ("cleanrl_dqn", "ACH", activation_changed(nn.Sigmoid), SATURATING),
    # timm's ViT (Mixup, soft targets, AdamW, cosine per update)
    "tvit_HLR_x100": ("timm_vit", "HLR", lr(100), LR_HIGH),
    "tvit_TCL_100": ("timm_vit", "TCL", labels_changed(1.0), LABELS),
    "tvit_OCH_sgd": ("timm_vit", "OCH", Change(optimizer="sgd"), LR_LOW),
    "tvit_RAW_100": ("timm_vit", "RAW", Change(decay=100.0), ("strong_weight_decay",)),
    "tvit_WCI_large": ("timm_vit", "WCI", initialisation("large"), LARGE_INIT),
    # the other parts' programs, by operators they had not been given
    "t5_HLR_d1000": ("hf_t5", "HLR", lr(1e-3), LR_LOW),
    "gpt2_HLR_d1000": ("hf_gpt2", "HLR", lr(1e-3), LR_LOW),
    "bert_OCH_sgd": ("hf_bert", "OCH", Change(optimizer="sgd"), LR_LOW),
    "convnext_TUD_5": ("hf_convnext", "TUD", unbalanced(0.05), ("output_bias_skew",)),
    "mobilenet_RAW_1": ("tv_mobilenet", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    "sac_OCH_sgd": ("sb3_sac", "OCH", Change(optimizer="sgd"), LR_LOW),
    "skreg_RAW_1": ("skorch_regressor", "RAW", Change(decay=1.0), ("strong_weight_decay",)),
    "bnlenet_HLR_d1000": ("d2l_bn_lenet", "HLR", lr(1e-3), LR_LOW),
}

SIXTH_HEALTHY = ["d2l_nin", "cleanrl_dqn", "timm_vit"]
