"""Fusion models: attention over modality tokens, and the baselines it is measured against.

Every model reads the same batch and returns the same Outputs, so training, evaluation and the runtime
treat them alike:

    x        dict modality -> float32 (B, D_m), the vectors of features.py (D = 10 face, 8 voice, 11 text);
             the rows of a missing modality must be finite but are never read
    present  bool (B, M), M = 3 modalities in MODALITIES order
    ->       Outputs(log_probs (B, 7) over EMOTIONS, valence (B,) in -1..1, arousal (B,) in 0..1,
                     confidence (B,) in 0..1: the model's estimate that its top label is right)

Methods (METHODS): "face", "voice", "text" (one modality alone: a small MLP that answers the training prior
when its modality is missing), "late" (confidence-weighted late fusion of those three), "attention". Each
method is an Ensemble of FusionConfig.ensemble copies trained from different seeds, outputs averaged: on the
generated set one trained copy's held-out macro F1 varies by about +-0.03 with the seed, which is as much as
the gap between the methods; the average of five is steadier and better (docs/fusion.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from npc_server.fusion.features import INPUT_DIMS, MODALITIES
from npc_server.perception.types import EMOTIONS

METHODS: tuple[str, ...] = (*MODALITIES, "late", "attention")
N_CLASSES = len(EMOTIONS)
WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"


@dataclass
class FusionConfig:
    input_dims: dict[str, int] = field(default_factory=lambda: dict(INPUT_DIMS))
    # width 16 / 2 heads won on validation macro F1 (template-grouped validation, 4 seeds) over 24 and 32, one
    # layer, more modality dropout and a lower learning rate: about 800 training rows favour a small model
    width: int = 16  # token width, shared by every modality
    heads: int = 2
    layers: int = 2
    ff_mult: int = 2  # feed-forward width = ff_mult * width
    dropout: float = 0.1
    modality_dropout: float = 0.25  # training only: chance that a present modality is hidden (one always stays)
    ensemble: int = 5  # copies of each method, trained from seeds seed .. seed + ensemble - 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Outputs(NamedTuple):
    log_probs: Tensor  # (B, 7)
    valence: Tensor  # (B,)
    arousal: Tensor  # (B,)
    confidence: Tensor  # (B,)


class Standardize(nn.Module):
    """(x - mean) / std with statistics fitted on the training rows; stored with the weights."""

    mean: Tensor
    std: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: np.ndarray) -> None:
        """x: (N, D) rows where the modality is present."""
        if len(x):
            self.mean.copy_(torch.as_tensor(x.mean(axis=0), dtype=torch.float32))
            self.std.copy_(torch.as_tensor(np.maximum(x.std(axis=0), 1e-3), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Heads(nn.Module):
    """(B, W) -> Outputs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.emotion = nn.Linear(width, N_CLASSES)
        self.affect = nn.Linear(width, 2)  # valence (tanh), arousal (sigmoid)
        self.confidence = nn.Linear(width, 1)

    def forward(self, h: Tensor) -> Outputs:
        va = self.affect(h)
        return Outputs(
            log_probs=torch.log_softmax(self.emotion(h), dim=-1),
            valence=torch.tanh(va[:, 0]),
            arousal=torch.sigmoid(va[:, 1]),
            confidence=torch.sigmoid(self.confidence(h)[:, 0]),
        )


def hide_modalities(present: Tensor, p: float) -> Tensor:
    """Modality dropout: hide each present modality with chance p, but never the last one of a row."""
    kept = present & (torch.rand(present.shape, device=present.device) >= p)
    emptied = ~kept.any(dim=1)
    return torch.where(emptied[:, None], present, kept)


class AttentionFusion(nn.Module):
    """Self-attention across one token per present modality plus a summary token, read out from the summary.

    Each modality's vector is standardised and projected by its own small MLP to the shared width, plus a
    learned modality embedding. A missing modality's token is excluded from attention by the key padding
    mask: the summary never sees it, so its values cannot matter (and it is not the same as a vector of
    zeros, which would be a real observation).
    """

    name = "attention"

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.norm = nn.ModuleDict({m: Standardize(cfg.input_dims[m]) for m in MODALITIES})
        self.embed = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(cfg.input_dims[m], w), nn.GELU(), nn.Linear(w, w)) for m in MODALITIES}
        )
        self.modality = nn.Parameter(torch.randn(len(MODALITIES), w) * 0.02)  # (M, W)
        self.summary = nn.Parameter(torch.randn(w) * 0.02)  # (W,)
        layer = nn.TransformerEncoderLayer(
            w, cfg.heads, cfg.ff_mult * w, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, norm=nn.LayerNorm(w), enable_nested_tensor=False)
        self.heads = Heads(w)

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Outputs:
        if self.training and self.cfg.modality_dropout > 0:
            present = hide_modalities(present, self.cfg.modality_dropout)
        batch = present.shape[0]
        tokens = []
        for i, m in enumerate(MODALITIES):
            t = self.embed[m](self.norm[m](x[m])) + self.modality[i]  # (B, W)
            # masked below; also zeroed here so that not even a NaN in a missing row can reach the sum
            tokens.append(torch.where(present[:, i, None], t, torch.zeros_like(t)))
        seq = torch.cat([self.summary.expand(batch, 1, -1), torch.stack(tokens, dim=1)], dim=1)  # (B, 1+M, W)
        ignore = torch.cat([torch.zeros_like(present[:, :1]), ~present], dim=1)  # (B, 1+M), True = masked
        h = self.encoder(seq, src_key_padding_mask=ignore)  # (B, 1+M, W)
        return self.heads(h[:, 0])


class UnimodalNet(nn.Module):
    """One modality alone: standardise -> MLP -> heads. Rows without the modality get the training prior."""

    prior_log_probs: Tensor  # (7,)
    prior_affect: Tensor  # (2,) valence, arousal

    def __init__(self, modality: str, cfg: FusionConfig) -> None:
        super().__init__()
        w = cfg.width
        self.modality, self.index = modality, MODALITIES.index(modality)
        self.name = modality
        self.norm = Standardize(cfg.input_dims[modality])
        self.mlp = nn.Sequential(
            nn.Linear(cfg.input_dims[modality], w), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(w, w), nn.GELU()
        )
        self.heads = Heads(w)
        self.register_buffer("prior_log_probs", torch.full((N_CLASSES,), -float(np.log(N_CLASSES))))
        self.register_buffer("prior_affect", torch.tensor([0.0, 0.5]))  # mean valence, arousal of the labels

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Outputs:
        out = self.heads(self.mlp(self.norm(x[self.modality])))
        here = present[:, self.index]  # (B,)
        return Outputs(
            log_probs=torch.where(here[:, None], out.log_probs, self.prior_log_probs.expand_as(out.log_probs)),
            valence=torch.where(here, out.valence, self.prior_affect[0]),
            arousal=torch.where(here, out.arousal, self.prior_affect[1]),
            confidence=torch.where(here, out.confidence, torch.zeros_like(out.confidence)),
        )


class LateFusion(nn.Module):
    """Confidence-weighted late fusion of the single-modality nets.

    Each present modality m gives a distribution p_m and a confidence c_m (its net's own estimate); the fused
    distribution, valence and arousal are averages weighted by w_m = c_m * exp(b_m), where b_m is one learned
    reliability per modality (fitted after the nets are trained, with the nets frozen).
    """

    name = "late"

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.members = nn.ModuleDict({m: UnimodalNet(m, cfg) for m in MODALITIES})
        self.log_reliability = nn.Parameter(torch.zeros(len(MODALITIES)))  # (M,)

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Outputs:
        outs = [self.members[m](x, present) for m in MODALITIES]
        probs = torch.stack([o.log_probs.exp() for o in outs], dim=1)  # (B, M, 7)
        conf = torch.stack([o.confidence for o in outs], dim=1)  # (B, M)
        w = present * (conf + 1e-3) * self.log_reliability.exp()  # (B, M)
        # a row with no modality at all falls back to the first member, which answers the prior
        w = torch.where(present.any(dim=1, keepdim=True), w, torch.eye(len(MODALITIES))[0].expand_as(w))
        w = w / w.sum(dim=1, keepdim=True)

        def mix(values: list[Tensor]) -> Tensor:
            return (w * torch.stack(values, dim=1)).sum(dim=1)

        return Outputs(
            log_probs=torch.log((w[:, :, None] * probs).sum(dim=1).clamp_min(1e-8)),
            valence=mix([o.valence for o in outs]),
            arousal=mix([o.arousal for o in outs]),
            confidence=mix([o.confidence for o in outs]),
        )


class Ensemble(nn.Module):
    """Several models of one kind: the mean of their probabilities, valence, arousal and confidence."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Outputs:
        outs = [model(x, present) for model in self.models]

        def mean(values: list[Tensor]) -> Tensor:
            return torch.stack(values).mean(dim=0)

        return Outputs(
            log_probs=torch.log(mean([o.log_probs.exp() for o in outs]).clamp_min(1e-8)),
            valence=mean([o.valence for o in outs]),
            arousal=mean([o.arousal for o in outs]),
            confidence=mean([o.confidence for o in outs]),
        )


class FusionSuite(nn.Module):
    """Every method in one module, saved as one safetensors file.

    attention: Ensemble of AttentionFusion (keys attention.models.K.*); late: Ensemble of LateFusion, whose
    members are the single-modality nets (late.models.K.members.face.*, ...). A single-modality method is the
    ensemble of those members.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = Ensemble([AttentionFusion(cfg) for _ in range(cfg.ensemble)])
        self.late = Ensemble([LateFusion(cfg) for _ in range(cfg.ensemble)])

    def copies(self, kind: str) -> list[nn.Module]:
        """The trained copies behind "attention" or "late"."""
        return list(self.attention.models if kind == "attention" else self.late.models)

    def member(self, modality: str, k: int = 0) -> UnimodalNet:
        """The single-modality net of the k-th late-fusion copy."""
        return cast(UnimodalNet, cast(LateFusion, self.late.models[k]).members[modality])

    def norms(self, modality: str) -> list[Standardize]:
        """Every Standardize that reads `modality`."""
        attention = [cast(Standardize, cast(AttentionFusion, a).norm[modality]) for a in self.attention.models]
        return attention + [self.member(modality, k).norm for k in range(self.cfg.ensemble)]

    def method(self, name: str) -> nn.Module:
        """The model behind one of METHODS."""
        if name == "attention":
            return self.attention
        if name == "late":
            return self.late
        if name in MODALITIES:
            return Ensemble([self.member(name, k) for k in range(self.cfg.ensemble)])
        raise ValueError(f"unknown fusion method '{name}'; one of {', '.join(METHODS)}")


@dataclass
class FusedAffect:
    """The player's affect in one turn, as the runtime reports it."""

    emotion: dict[str, float]  # probabilities over EMOTIONS
    label: str  # the most probable emotion
    valence: float  # -1..1
    arousal: float  # 0..1
    confidence: float  # 0..1; 0 when no modality could be read
    modalities: list[str]  # the modalities that contributed, in MODALITIES order
    method: str  # "attention", "late", or a single modality

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["emotion"] = {k: round(v, 4) for k, v in self.emotion.items()}
        for k in ("valence", "arousal", "confidence"):
            d[k] = round(d[k], 4)
        return d


def save_suite(suite: FusionSuite, folder: Path, info: dict[str, Any]) -> None:
    """folder/model.safetensors (every tensor) + folder/config.json (FusionConfig under "model", plus info)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in suite.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"model": asdict(suite.cfg), **info}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_suite(folder: Path) -> tuple[FusionSuite, dict[str, Any]]:
    """The suite in eval mode and its whole config.json. Raises FileNotFoundError / ValueError when broken."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    cfg = FusionConfig.from_dict(config.get("model", {}))
    if cfg.input_dims != INPUT_DIMS:
        raise ValueError(f"{folder}: checkpoint was trained on other feature vectors ({cfg.input_dims})")
    suite = FusionSuite(cfg)
    suite.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    suite.eval()
    return suite, config
