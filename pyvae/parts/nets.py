"""Neural networks for encoders and decoders.

The contract a custom ``encoder=``/``decoder=`` module must meet:

* the encoder maps x of shape ``(..., x_dim)`` to ``(..., guide.encoder_outputs(z_dim))``
  (``2 * z_dim`` for the default diagonal Normal guide: loc, then unconstrained scale);
* the decoder maps z of shape ``(..., z_dim)`` to ``(..., likelihood.params_per_pixel * x_dim)``
  (``x_dim`` logits for Bernoulli); leading dimensions may include a particle dimension,
  so use layers that act on the last dimension only (``nn.Linear`` does).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from pyvae.errors import PyvaeError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


#: activations that are layers of their own (the gate has weights), not a function between linear
#: layers
GATED = "gated"
MLP_ACTIVATIONS = (*ACTIVATIONS, GATED)


class GatedDense(nn.Module):
    """A gated dense layer (Dauphin et al. 2017; VampPrior's ``GatedDense``, Tomczak & Welling
    2018)::

        h = (W1 x + b1) * sigmoid(W2 x + b2)

    the sigmoid gate deciding, per unit and per input, how much of the linear part passes.
    Acts on the last dimension only, so a leading particle dimension is fine.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.h = nn.Linear(in_dim, out_dim)
        self.g = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def mlp(
    in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "softplus"
) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them; ``hidden=()`` is one
    linear layer.

    ``activation="gated"`` makes every hidden layer a :class:`GatedDense` (no further nonlinearity),
    the output layer staying linear: VampPrior's 784-300-300 gated networks are
    ``hidden=(300, 300)``.
    """
    if activation not in MLP_ACTIVATIONS:
        raise PyvaeError(
            f"unknown activation {activation!r}; choose from {', '.join(sorted(MLP_ACTIVATIONS))}"
        )
    widths = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if activation == GATED:
            layers.append(GatedDense(a, b) if i < len(widths) - 2 else nn.Linear(a, b))
            continue
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


NETS = ("mlp", "conv", "resnet")


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (32 and 64 channels), then a linear layer:
    (..., C*H*W) -> (..., out_dim)."""

    def __init__(
        self, image_shape: Sequence[int], out_dim: int, activation: str = "softplus"
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = _checked_image_shape(self.image_shape)
        act = _conv_activation(activation)
        self.net = nn.Sequential(
            nn.Conv2d(c, 32, 4, stride=2, padding=1),
            act(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            act(),
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, *self.image_shape)).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """A linear layer, then two stride-2 transposed convolutions:
    (..., z_dim) -> (..., channels*C*H*W).

    The output is channel-major: all pixels' first parameter, then all pixels' second,
    which is the layout the likelihoods split with ``chunk``.
    """

    def __init__(
        self,
        z_dim: int,
        image_shape: Sequence[int],
        params_per_pixel: int = 1,
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        c, h, w = _checked_image_shape(tuple(image_shape))
        act = _conv_activation(activation)
        self.start = (64, h // 4, w // 4)
        self.net = nn.Sequential(
            nn.Linear(z_dim, 64 * (h // 4) * (w // 4)),
            act(),
            nn.Unflatten(1, self.start),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(32, c * params_per_pixel, 4, stride=2, padding=1),
            nn.Flatten(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*lead, -1)


def _conv_activation(activation: str) -> type[nn.Module]:
    if activation == GATED:
        raise PyvaeError(
            "activation 'gated' is for MLPs (net mlp); net 'conv' takes relu, softplus, elu, tanh, "
            "leaky_relu or gelu"
        )
    if activation not in ACTIVATIONS:
        raise PyvaeError(
            f"unknown activation {activation!r}; choose from {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[activation]


def _checked_image_shape(image_shape: tuple) -> tuple[int, int, int]:
    if len(image_shape) != 3 or image_shape[1] % 4 or image_shape[2] % 4:
        raise PyvaeError(
            f"net 'conv' needs images (C, H, W) with H and W divisible by 4; got {image_shape}"
        )
    return image_shape


# -- residual networks that scale with the image ----------------------------------------------
class ResidualBlock(nn.Module):
    """x + conv(act(conv(act(x)))): two 3x3 convolutions, pre-activation (He et al. 2016)."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            act(),
            nn.Conv2d(channels, channels, 3, padding=1),
            act(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def residual_stages(
    height: int, width: int, base: int = 32, widest: int = 128
) -> list[tuple[int, int]]:
    """(in, out) channels of each stride-2 stage: one per halving while both sides are even and
    above 4 (28: 2 stages to 7x7; 32: 3 to 4x4; 64: 4 to 4x4), doubling from ``base`` up to
    ``widest``."""
    stages, channels = [], base
    while height % 2 == 0 and width % 2 == 0 and min(height, width) > 4:
        stages.append((channels, min(2 * channels, widest)))
        channels, height, width = min(2 * channels, widest), height // 2, width // 2
    return stages


def _init_residual(net: nn.Module) -> None:
    """He initialization of the convolutions (fan-in, ReLU gain; He et al. 2015) and residual
    branches that start at zero, so each block starts as the identity (Goyal et al. 2017; Zhang et
    al. 2019's Fixup). With PyTorch's default initialization every layer shrank the signal, and at
    32x32 the decoder's output hardly depended on z (40 times less than the two-layer conv net's)
    nor the encoder's on x: training collapsed the posterior (on the photos, 0 of 50 units active,
    8.08 bits/dim)."""
    for layer in net.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    for block in net.modules():
        if isinstance(block, ResidualBlock):
            nn.init.zeros_(block.body[-1].weight)
            nn.init.zeros_(block.body[-1].bias)


class ResidualEncoder(nn.Module):
    """A 3x3 stem, then per stage a residual block and a stride-2 convolution, then a linear layer:
    (..., C*H*W) -> (..., out_dim). Depth follows the image size (:func:`residual_stages`)."""

    def __init__(
        self, image_shape: Sequence[int], out_dim: int, activation: str = "softplus"
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        act = _conv_activation(activation)
        stages = residual_stages(h, w)
        if not stages:
            raise PyvaeError(
                "net 'resnet' needs images (C, H, W) with even H and W above 4; got "
                f"{self.image_shape}"
            )
        layers: list[nn.Module] = [nn.Conv2d(c, stages[0][0], 3, padding=1)]
        for a, b in stages:
            layers += [ResidualBlock(a, act), act(), nn.Conv2d(a, b, 4, stride=2, padding=1)]
        scale = 2 ** len(stages)
        layers += [
            ResidualBlock(stages[-1][1], act),
            act(),
            nn.Flatten(),
            nn.Linear(stages[-1][1] * (h // scale) * (w // scale), out_dim),
        ]
        self.net = nn.Sequential(*layers)
        _init_residual(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, *self.image_shape)).reshape(*lead, -1)


class ResidualDecoder(nn.Module):
    """The encoder mirrored: a linear layer, then per stage a residual block and a stride-2
    transposed convolution, then a 3x3 convolution to ``params_per_pixel`` channels per image
    channel: (..., z_dim) -> (..., params_per_pixel*C*H*W), channel-major like
    :class:`ConvDecoder`."""

    def __init__(
        self,
        z_dim: int,
        image_shape: Sequence[int],
        params_per_pixel: int = 1,
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        c, h, w = tuple(image_shape)
        act = _conv_activation(activation)
        stages = residual_stages(h, w)
        if not stages:
            raise PyvaeError(
                "net 'resnet' needs images (C, H, W) with even H and W above 4; got "
                f"{tuple(image_shape)}"
            )
        scale = 2 ** len(stages)
        start = (stages[-1][1], h // scale, w // scale)
        layers: list[nn.Module] = [
            nn.Linear(z_dim, start[0] * start[1] * start[2]),
            nn.Unflatten(1, start),
        ]
        for a, b in reversed(stages):
            layers += [
                ResidualBlock(b, act),
                act(),
                nn.ConvTranspose2d(b, a, 4, stride=2, padding=1),
            ]
        layers += [
            ResidualBlock(stages[0][0], act),
            act(),
            nn.Conv2d(stages[0][0], c * params_per_pixel, 3, padding=1),
            nn.Flatten(),
        ]
        self.net = nn.Sequential(*layers)
        _init_residual(self.net)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*lead, -1)
