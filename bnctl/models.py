"""The networks bnctl trains, all built from the normalization registry."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bnctl.config import ModelConfig
from bnctl.errors import ConfigError
from bnctl.norms import make_norm


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _conv_block(cfg: ModelConfig, c_in: int, c_out: int, bias: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), make_norm(cfg, c_out, 2), nn.ReLU(inplace=True)]


class SeedCNN(nn.Module):
    """The notebook's network: three conv-norm-ReLU-pool stages, then fc-norm-ReLU-fc.

    Convolutions are unpadded 3x3 as in the notebook (32 -> 30 -> 15 -> 13 -> 6 -> 4 -> 2),
    and keep their biases even under BN so the parameter count matches it exactly.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int = 10, image_size: tuple[int, int] = (32, 32)):
        super().__init__()
        c1, c2, c3, hidden = (_ch(c, cfg.width) for c in (32, 64, 64, 64))
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, c1), (c1, c2), (c2, c3)):
            layers += [nn.Conv2d(c_in, c_out, 3), make_norm(cfg, c_out, 2), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        flat = self._flat_size(image_size)
        fc_norm = make_norm(cfg, hidden, 1) if cfg.fc_norm else nn.Identity()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), fc_norm, nn.ReLU(),
            nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity(), nn.Linear(hidden, num_classes),
        )

    def _flat_size(self, image_size: tuple[int, int]) -> int:
        # Eval mode so that measuring the shape does not move BN's running statistics.
        if min(image_size) < 22:  # three unpadded convs and three 2x2 pools leave nothing below 22 pixels
            raise ConfigError(f"seed_cnn needs images of at least 22x22 pixels, got {image_size[0]}x{image_size[1]}")
        self.features.eval()
        with torch.no_grad():
            out = self.features(torch.zeros(1, 3, *image_size))
        self.features.train()
        return out.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


VGG_LAYOUTS = {  # channels per conv, "M" = 2x2 max-pool (Simonyan & Zisserman, CIFAR variant)
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class _PooledNet(nn.Module):
    """A feature extractor ending in global average pooling, then (dropout and) one linear layer."""

    def _finish(self, layers: list[nn.Module], channels: int, cfg: ModelConfig, num_classes: int) -> None:
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity(),
            nn.Linear(channels, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGG(_PooledNet):
    """CIFAR VGG (11/13/16/19 layers): deep and plain, where BN decides trainability."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 10, image_size: tuple[int, int] = (32, 32)):
        super().__init__()
        depth = cfg.depth or 11
        if depth not in VGG_LAYOUTS:
            raise ConfigError(f"model.depth={depth} is not a VGG; choose one of {', '.join(map(str, VGG_LAYOUTS))}")
        if min(image_size) < 32:  # five 2x2 pools: the last conv stage would see less than 2x2 pixels
            raise ConfigError(f"vgg halves the image five times and needs at least 32x32 pixels, "
                              f"got {image_size[0]}x{image_size[1]}; use seed_cnn or resnet20 for smaller images")
        layers: list[nn.Module] = []
        c_in = 3
        for item in VGG_LAYOUTS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = _ch(int(item), cfg.width)
                layers += _conv_block(cfg, c_in, c_out, bias=cfg.norm == "none")
                c_in = c_out
        self._finish(layers, c_in, cfg, num_classes)


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride and pad the new channels with zeros (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in
        if self.pad < 0:
            raise ValueError(f"a zero-pad shortcut cannot shrink {c_in} channels to {c_out}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # The extra channels go half before and half after the existing ones.
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


def _projection(cfg: ModelConfig, c_in: int, c_out: int, stride: int) -> nn.Module:
    """Option B: a strided 1x1 convolution and a norm layer."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=cfg.norm == "none"), make_norm(cfg, c_out, 2))


SHORTCUTS: dict[str, Callable[[ModelConfig, int, int, int], nn.Module]] = {
    "zero_pad": lambda cfg, c_in, c_out, stride: ZeroPadShortcut(c_in, c_out, stride),
    "projection": _projection,
}


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with an identity shortcut, or model.shortcut where the shape changes."""

    def __init__(self, cfg: ModelConfig, c_in: int, c_out: int, stride: int):
        super().__init__()
        bias = cfg.norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)
        self.norm1 = make_norm(cfg, c_out, 2)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.norm2 = make_norm(cfg, c_out, 2)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = SHORTCUTS[cfg.shortcut](cfg, c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(_PooledNet):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016): 20, 32, 44, 56 ...; 0.27M parameters at depth 20."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 10, image_size: tuple[int, int] = (32, 32)):
        super().__init__()
        depth = cfg.depth or 20
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.depth={cfg.depth} is not a CIFAR ResNet depth (6n+2: 20, 32, 44, 56)")
        blocks = (depth - 2) // 6
        widths = [_ch(c, cfg.width) for c in (16, 32, 64)]
        layers: list[nn.Module] = _conv_block(cfg, 3, widths[0], bias=cfg.norm == "none")
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cfg, c_in, c_out, stride=2 if stage > 0 and b == 0 else 1))
                c_in = c_out
        self._finish(layers, c_in, cfg, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {"seed_cnn": SeedCNN, "vgg": VGG, "resnet20": ResNet}


def _init_default(w: torch.Tensor, cfg: ModelConfig) -> None:
    """Keep PyTorch's own initialization."""


INITS: dict[str, Callable[[torch.Tensor, ModelConfig], None]] = {
    "default": _init_default,
    "kaiming": lambda w, cfg: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "xavier": lambda w, cfg: nn.init.xavier_uniform_(w),
    "normal": lambda w, cfg: nn.init.normal_(w, 0.0, cfg.init_std),
}


@torch.no_grad()
def initialize(model: nn.Module, cfg: ModelConfig) -> None:
    """Apply model.init to every conv/linear weight, then multiply them by model.init_scale."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if cfg.init != "default":
                INITS[cfg.init](m.weight, cfg)
                if m.bias is not None:
                    m.bias.zero_()
            if cfg.init_scale != 1.0:
                m.weight.mul_(cfg.init_scale)


def build_model(cfg: ModelConfig, num_classes: int = 10, image_size: tuple[int, int] = (32, 32)) -> nn.Module:
    """Build and initialize the configured network (seeded by the caller)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model '{cfg.name}'; choose one of {', '.join(MODELS)}")
    model = MODELS[cfg.name](cfg, num_classes=num_classes, image_size=image_size)
    initialize(model, cfg)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

