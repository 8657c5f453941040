"""The one place that builds networks from configuration.

Every network is multi-task: a shared 3D backbone (MONAI DenseNet121 by default) whose pooled features, optionally
concatenated with clinical covariates (age, sex), feed two heads:

- ``logits``: the diagnosis (COVID-19 pattern / other pneumonia / normal);
- ``risk``: a prognostic log-risk score trained with the Cox partial likelihood on (time, event) —
  higher means a severe outcome sooner.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from monai.data import MetaTensor
from monai.networks.nets import DenseNet121, resnet10, resnet18
from torch import nn

MODEL_NAMES = ("densenet121", "resnet10", "resnet18", "smallcnn")
NORMS = ("batch", "instance", "group")
#: Clinical covariates fused before the heads when ``ModelConfig.covariates`` is on (see :func:`covariate_vector`).
COVARIATES = ("age", "sex", "age_known", "sex_known")
#: How the clinical/molecular profile enters the network (``profile-fusion``): not at all; "late" = a small MLP of
#: the profile concatenated to the pooled image features before the heads; "film" = feature-wise linear modulation
#: (FiLM) of the pooled image features, ``f * (1 + gamma(p)) + beta(p)``, gamma/beta from the profile; "only" = the
#: heads see the profile embedding alone (the image is not used: the profile-only baseline of the benchmark).
PROFILE_FUSIONS = ("none", "late", "film", "only")
#: Width of the profile embedding (late fusion) and of FiLM's hidden layer.
PROFILE_HIDDEN = 32


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the multi-task network."""

    name: str = "densenet121"
    num_classes: int = 3
    in_channels: int = 1
    norm: str = "batch"
    dropout: float = 0.0
    covariates: bool = False
    #: ``profile-fusion`` (:data:`PROFILE_FUSIONS`) and the number of schema variables V (the input is 2V: z-scores
    #: and presence flags, :mod:`preprocessing.profile_features`); 0 with fusion "none".
    profile_fusion: str = "none"
    profile_variables: int = 0
    #: Test-time augmentation: spatial axes (0, 1, 2 of the (X, Y, Z) input) along which the evaluating network also
    #: sees the mirrored input; its outputs are the mean over the views (``()``: one view). Training is unaffected.
    test_time_flips: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        flips = self.test_time_flips
        if not isinstance(flips, (tuple, list)):
            raise ValueError(f"test-time flips must be a sequence of spatial axes, got {flips!r}")
        object.__setattr__(self, "test_time_flips", tuple(flips))  # a JSON list (bundle) becomes the tuple
        if any(not isinstance(a, int) or isinstance(a, bool) or a not in (0, 1, 2) for a in flips):
            raise ValueError(f"test-time flips must be spatial axes among 0, 1, 2, got {flips!r}")
        if len(set(flips)) != len(flips):
            raise ValueError(f"test-time flips must not repeat an axis, got {flips!r}")
        if self.profile_fusion not in PROFILE_FUSIONS:
            raise ValueError(f"profile-fusion {self.profile_fusion!r} is not one of {', '.join(PROFILE_FUSIONS)}")
        if (self.profile_fusion == "none") != (self.profile_variables == 0) or self.profile_variables < 0:
            raise ValueError(
                f"profile-fusion {self.profile_fusion!r} needs profile_variables > 0 exactly when fusing, "
                f"got {self.profile_variables}"
            )
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

    @property
    def architecture(self) -> ModelConfig:
        """What the weights belong to: this configuration without how it is evaluated (test-time flips), so a
        bundle evaluated one way can start or join a run that evaluates another."""
        return replace(self, test_time_flips=())


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """The data of a MONAI ``MetaTensor`` as a plain tensor (no copy); other tensors unchanged.

    A ``MetaTensor`` runs its ``__torch_function__`` (metadata bookkeeping) on every operation; inside a
    network that roughly doubles the cost of a training step, so the network only ever sees plain tensors.
    """
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class ModelOutput(NamedTuple):
    """Diagnosis logits (batch, classes) and prognostic log-risk (batch,)."""

    logits: torch.Tensor
    risk: torch.Tensor


def _monai_norm(norm: str) -> str | tuple[str, dict]:
    if norm == "group":
        return ("group", {"num_groups": 8})
    if norm == "instance":
        return ("instance", {"affine": True})
    return "batch"


def _torch_norm(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(8, channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.BatchNorm3d(channels)


class SmallCNN(nn.Module):
    """Four 3D conv blocks and global pooling: a fast backbone for tests and tiny runs (64 features)."""

    out_features = 64

    def __init__(self, *, in_channels: int, norm: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = (in_channels, 16, 32, 64, self.out_features)
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [
                nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                _torch_norm(norm, c_out),
                nn.ReLU(inplace=True),
            ]
            layers.append(nn.MaxPool3d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _backbone(config: ModelConfig) -> tuple[nn.Module, int]:
    """A network mapping (B, C, X, Y, Z) to pooled features (B, F), and F."""
    if config.name == "densenet121":
        net = DenseNet121(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            norm=_monai_norm(config.norm),
            dropout_prob=config.dropout,
        )
        width = net.class_layers.out.in_features
        net.class_layers.out = nn.Identity()
        return net, width
    if config.name in ("resnet10", "resnet18"):
        factory = resnet10 if config.name == "resnet10" else resnet18
        net = factory(
            spatial_dims=3,
            n_input_channels=config.in_channels,
            num_classes=config.num_classes,
            norm=_monai_norm(config.norm),
        )
        width = net.fc.in_features
        net.fc = nn.Identity()
        return net, width
    net = SmallCNN(in_channels=config.in_channels, norm=config.norm)
    return net, SmallCNN.out_features


class ProfileFusion(nn.Module):
    """The tabular branch: maps a profile input (B, 2V) to what the fusion adds to the image features.

    ``late``: an embedding (B, :data:`PROFILE_HIDDEN`) concatenated to the features; ``film``: (gamma, beta), each
    (B, width), initialised to 0 so that a fresh model starts as the image-only one.
    """

    def __init__(self, mode: str, n_inputs: int, width: int) -> None:
        super().__init__()
        self.mode = mode
        if mode == "late":
            self.net = nn.Sequential(
                nn.Linear(n_inputs, PROFILE_HIDDEN), nn.ReLU(), nn.Linear(PROFILE_HIDDEN, PROFILE_HIDDEN), nn.ReLU()
            )
            self.out_features = PROFILE_HIDDEN
        else:
            self.net = nn.Sequential(
                nn.Linear(n_inputs, PROFILE_HIDDEN), nn.ReLU(), nn.Linear(PROFILE_HIDDEN, 2 * width)
            )
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
            self.out_features = 0

    def forward(self, features: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        out = self.net(profile.to(features.dtype))
        if self.mode == "late":
            return torch.cat([features, out], dim=1)
        gamma, beta = out.chunk(2, dim=1)
        return features * (1.0 + gamma) + beta


class MultiTaskNet(nn.Module):
    """Shared backbone, optional covariate and profile fusion, diagnosis head and prognostic (Cox) head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.backbone, width = _backbone(config)
        self.n_covariates = len(COVARIATES) if config.covariates else 0
        #: Length of the profile input (2V), 0 without profile fusion.
        self.n_profile = 2 * config.profile_variables
        #: False for the profile-only baseline (``profile_fusion = "only"``): the backbone is never run.
        self.uses_image = config.profile_fusion != "only"
        mode = "late" if config.profile_fusion == "only" else config.profile_fusion
        self.profile = ProfileFusion(mode, self.n_profile, width) if self.n_profile else None
        extra = self.profile.out_features if self.profile is not None else 0
        width = width if self.uses_image else 0
        self.dropout = nn.Dropout(config.dropout)
        self.diagnosis = nn.Linear(width + extra + self.n_covariates, config.num_classes)
        self.prognosis = nn.Linear(width + extra + self.n_covariates, 1)
        #: ``ModelConfig.test_time_flips``: in eval mode, the outputs are averaged over these mirrored views too.
        self.test_time_flips = tuple(config.test_time_flips) if self.uses_image else ()

    def forward(
        self, x: torch.Tensor, covariates: torch.Tensor | None = None, profile: torch.Tensor | None = None
    ) -> ModelOutput:
        """Both heads' outputs; evaluating (``eval()``) with test-time flips, the mean over the input and its mirror
        images (logits and log-risk averaged). Training always sees the one input it is given."""
        view = self.forward_view(x, covariates, profile)
        if self.training or not self.test_time_flips:
            return view
        x = as_plain_tensor(x)
        views = [view] + [
            self.forward_view(torch.flip(x, dims=(axis + 2,)), covariates, profile) for axis in self.test_time_flips
        ]
        return ModelOutput(
            torch.stack([v.logits for v in views]).mean(dim=0), torch.stack([v.risk for v in views]).mean(dim=0)
        )

    def forward_view(
        self, x: torch.Tensor, covariates: torch.Tensor | None = None, profile: torch.Tensor | None = None
    ) -> ModelOutput:
        """One pass on the input as given (what explanations differentiate: one view, one map)."""
        x = as_plain_tensor(x)  # metadata stays outside the network (see as_plain_tensor)
        if not self.uses_image:
            return self.heads(x.new_zeros((x.shape[0], 0)), covariates, profile)
        return self.heads(self.dropout(self.backbone(x)), covariates, profile)

    def heads(
        self, features: torch.Tensor, covariates: torch.Tensor | None = None, profile: torch.Tensor | None = None
    ) -> ModelOutput:
        """Everything after the backbone: fusion of covariates and profile with the pooled image features (B, F),
        then both heads (the tabular attribution of :mod:`inference.profile_view` reruns only this part)."""
        if self.profile is not None:
            if profile is None or tuple(profile.shape) != (features.shape[0], self.n_profile):
                raise ValueError(
                    f"this model fuses a profile of {self.n_profile} inputs per study; got {None if profile is None else tuple(profile.shape)}"
                )
            features = self.profile(features, profile)
        if self.n_covariates:
            if covariates is None or covariates.shape != (features.shape[0], self.n_covariates):
                raise ValueError(
                    f"this model fuses {self.n_covariates} covariates per study; got {None if covariates is None else tuple(covariates.shape)}"
                )
            features = torch.cat([features, covariates.to(features.dtype)], dim=1)
        return ModelOutput(self.diagnosis(features), self.prognosis(features).squeeze(1))


def covariate_vector(age: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
    """(B, 4) covariates from age in years and sex (1 = male, 0 = female), NaN meaning unknown.

    Age is centred at 60 and scaled by 15 years; unknown values become 0 with their indicator set to 0.
    """
    age = torch.as_tensor(age, dtype=torch.float32)
    sex = torch.as_tensor(sex, dtype=torch.float32)
    age_known, sex_known = ~torch.isnan(age), ~torch.isnan(sex)
    scaled_age = torch.where(age_known, (age - 60.0) / 15.0, torch.zeros_like(age))
    scaled_sex = torch.where(sex_known, sex * 2.0 - 1.0, torch.zeros_like(sex))
    return torch.stack([scaled_age, scaled_sex, age_known.float(), sex_known.float()], dim=1)


def build_model(config: ModelConfig) -> MultiTaskNet:
    """Build the multi-task network named in ``config`` (3D, channel-first input)."""
    return MultiTaskNet(config)


#: Layer types whose parameters and statistics FedBN keeps at each site (``bn-mode = local``).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


def norm_state_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the normalisation layers (weights, biases, running statistics, batch counters)."""
    keys = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys.update(f"{prefix}.{name}" if prefix else name for name in module.state_dict())
    return frozenset(keys)


def buffer_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys that are buffers (running statistics, counters), not trained parameters."""
    return frozenset(name for name, _ in model.named_buffers())
