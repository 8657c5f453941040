"""The one place that builds networks from configuration."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import DenseNet121, resnet10, resnet18
from torch import nn

MODEL_NAMES = ("densenet121", "resnet10", "resnet18", "smallcnn")
NORMS = ("batch", "instance", "group")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the diagnostic network."""

    name: str = "densenet121"
    num_classes: int = 3
    in_channels: int = 1
    norm: str = "batch"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model name {self.name!r} is not one of {', '.join(MODEL_NAMES)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def _monai_norm(norm: str) -> str | tuple[str, dict]:
    if norm == "group":
        return ("group", {"num_groups": 8})
    if norm == "instance":
        return ("instance", {"affine": True})
    return "batch"


class SmallCNN(nn.Module):
    """Four conv blocks (3D) and a linear head: a fast baseline for tests and tiny runs."""

    def __init__(self, *, in_channels: int, num_classes: int, norm: str, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = (in_channels, 16, 32, 64, 64)
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=False), _torch_norm(norm, c_out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool3d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def _torch_norm(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(8, channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.BatchNorm3d(channels)


def build_model(config: ModelConfig) -> nn.Module:
    """Build the network named in ``config`` (3D, channel-first input, logits out)."""
    if config.name == "densenet121":
        return DenseNet121(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            norm=_monai_norm(config.norm),
            dropout_prob=config.dropout,
        )
    if config.name in ("resnet10", "resnet18"):
        factory = resnet10 if config.name == "resnet10" else resnet18
        return factory(
            spatial_dims=3,
            n_input_channels=config.in_channels,
            num_classes=config.num_classes,
            norm=_monai_norm(config.norm),
        )
    return SmallCNN(in_channels=config.in_channels, num_classes=config.num_classes, norm=config.norm, dropout=config.dropout)
