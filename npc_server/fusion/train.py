"""Train every fusion method on one manifest, evaluate them on held-out data, and save a checkpoint.

Splits: rows marked "split": "test" are held out; the rest are training rows, of which about VAL_SHARE is
the validation split (early stopping): whole groups when rows name a "group" (the generator's groups are
sentence templates, so validation, like test, measures unseen sentences), else a seeded, stratified share of
rows. A manifest that marks no split has a seeded, stratified TEST_SHARE held out instead.

Order: fit the feature standardisation on the training rows; train the attention model; train each
single-modality net on the training rows that have its modality; fit late fusion's three reliabilities with
those nets frozen. Each fit: AdamW, class-weighted NLL + valence/arousal MSE + confidence BCE (target: is the
top label right), early stopping on validation loss, best weights restored.

The runtime method is whichever of late and attention fusion has the higher macro F1 on the held-out test
rows (a tie goes to late fusion, the simpler), or on the validation rows when nothing is held out. Held-out
rather than validation numbers decide because in the generated set the validation rows share sentence
templates and voices with the training rows, while the test rows do not (docs/fusion.md); choosing between
two methods on the numbers that are then reported flatters the chosen one slightly.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from npc_server.fusion.data import Dataset
from npc_server.fusion.features import FEATURE_NAMES, FEATURE_VERSION, MODALITIES
from npc_server.fusion.metrics import evaluate_all
from npc_server.fusion.model import METHODS, FusionConfig, FusionSuite, LateFusion, Outputs, save_suite
from npc_server.machine import machine
from npc_server.perception.types import EMOTIONS

VAL_SHARE = 0.15
TEST_SHARE = 0.2
Log = Callable[[str], None]


@dataclass
class TrainConfig:
    seed: int = 0
    max_epochs: int = 400
    patience: int = 40  # epochs without a better validation loss before stopping
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    affect_weight: float = 0.5  # valence + arousal MSE
    confidence_weight: float = 0.2


Batch = tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]  # x, present, labels, valence, arousal


def tensors(ds: Dataset, idx: np.ndarray | None = None) -> Batch:
    idx = np.arange(len(ds)) if idx is None else idx
    return (
        {m: torch.as_tensor(ds.x[m][idx]) for m in MODALITIES},
        torch.as_tensor(ds.present[idx]),
        torch.as_tensor(ds.labels[idx]),
        torch.as_tensor(ds.valence[idx]),
        torch.as_tensor(ds.arousal[idx]),
    )


def class_weights(labels: np.ndarray) -> Tensor:
    """Inverse class frequency, normalised to mean 1; unseen classes get weight 1."""
    counts = np.bincount(labels, minlength=len(EMOTIONS)).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (len(EMOTIONS) * np.maximum(counts, 1)), 1.0)
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def loss_fn(out: Outputs, batch: Batch, weights: Tensor, cfg: TrainConfig) -> Tensor:
    _, _, y, valence, arousal = batch
    nll = F.nll_loss(out.log_probs, y, weight=weights)
    affect = F.mse_loss(out.valence, valence) + F.mse_loss(out.arousal, arousal)
    right = (out.log_probs.argmax(dim=1) == y).float()
    conf = F.binary_cross_entropy(out.confidence.clamp(1e-6, 1 - 1e-6), right)
    return nll + cfg.affect_weight * affect + cfg.confidence_weight * conf


def evaluate_loss(model: nn.Module, ds: Dataset, weights: Tensor, cfg: TrainConfig) -> float:
    model.eval()
    batch = tensors(ds)
    with torch.inference_mode():
        return float(loss_fn(model(batch[0], batch[1]), batch, weights, cfg))


def fit(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    cfg: TrainConfig,
    *,
    params: Iterable[nn.Parameter] | None = None,
    train_mode: bool = True,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Minibatch AdamW with early stopping on validation loss; the best weights are restored."""
    if not len(train):
        model.eval()
        return {"epochs": 0, "best_epoch": 0, "best_val_loss": float("nan"), "history": []}
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(list(params or model.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = class_weights(train.labels)
    best, best_state, best_epoch, history = float("inf"), copy.deepcopy(model.state_dict()), 0, []
    epochs = max_epochs or cfg.max_epochs
    for epoch in range(1, epochs + 1):
        model.train(train_mode)
        total = 0.0
        for idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
            batch = tensors(train, idx.numpy())
            loss = loss_fn(model(batch[0], batch[1]), batch, weights, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        val_loss = evaluate_loss(model, val, weights, cfg) if len(val) else total / len(train)
        history.append((round(total / len(train), 5), round(val_loss, 5)))
        if val_loss < best - 1e-5:
            best, best_state, best_epoch = val_loss, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": len(history), "best_epoch": best_epoch, "best_val_loss": round(best, 5), "history": history}


def stratified(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A boolean mask picking about `share` of each class, seeded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        mask[idx[: round(share * len(idx))]] = True
    return mask


def split(ds: Dataset, seed: int) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, test) as described in the module docstring."""
    marked = any(ds.split)
    test = np.array([s == "test" for s in ds.split]) if marked else stratified(ds.labels, TEST_SHARE, seed)
    rest = np.flatnonzero(~test)
    grouped = np.array([bool(ds.groups and ds.groups[i]) for i in rest], dtype=bool)
    val = np.zeros(len(ds), dtype=bool)
    val[rest[~grouped][stratified(ds.labels[rest[~grouped]], VAL_SHARE, seed + 1)]] = True
    names = sorted({ds.groups[i] for i in rest[grouped]})
    chosen = set(np.random.default_rng(seed + 2).permutation(names)[: round(VAL_SHARE * len(names))].tolist())
    val[[i for i in rest[grouped] if ds.groups[i] in chosen]] = True
    return ds.subset(np.flatnonzero(~test & ~val)), ds.subset(np.flatnonzero(val)), ds.subset(np.flatnonzero(test))


def prepare(suite: FusionSuite, train: Dataset) -> None:
    """Fit every Standardize on the training rows that have its modality, and the single nets' priors."""
    counts = np.bincount(train.labels, minlength=len(EMOTIONS)) + 1.0
    prior = torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32)
    affect = torch.tensor([float(train.valence.mean()), float(train.arousal.mean())])
    for j, m in enumerate(MODALITIES):
        for norm in suite.norms(m):
            norm.fit(train.x[m][train.present[:, j]])
        for k in range(suite.cfg.ensemble):
            suite.member(m, k).prior_log_probs.copy_(prior)
            suite.member(m, k).prior_affect.copy_(affect)


def train_copy(suite: FusionSuite, k: int, train: Dataset, val: Dataset, cfg: TrainConfig, log: Log) -> dict[str, Any]:
    """Train the k-th copy of every method, seeded cfg.seed + k; returns each fit's summary."""
    cfg = replace(cfg, seed=cfg.seed + k)
    fits = {"attention": fit(suite.copies("attention")[k], train, val, cfg)}
    for j, m in enumerate(MODALITIES):
        has = lambda d, j=j: d.where(lambda i: bool(d.present[i, j]))  # noqa: E731
        fits[m] = fit(suite.member(m, k), has(train), has(val), cfg)
    late = cast(LateFusion, suite.copies("late")[k])
    fits["late"] = fit(late, train, val, cfg, params=[late.log_reliability], train_mode=False)
    weights = late.log_reliability.exp().tolist()
    reliability = ", ".join(f"{m} {w:.2f}" for m, w in zip(MODALITIES, weights, strict=True))
    log(f"copy {k + 1}/{suite.cfg.ensemble}: " + "; ".join(_fit_line(name, f) for name, f in fits.items()))
    log(f"    late-fusion reliabilities: {reliability}")
    return {name: {key: v for key, v in f.items() if key != "history"} for name, f in fits.items()}


def train_suite(
    ds: Dataset, cfg: TrainConfig | None = None, model_cfg: FusionConfig | None = None, log: Log = print
) -> tuple[FusionSuite, dict[str, Any]]:
    """Train every method; returns the suite and a report (splits, fits, validation and test metrics)."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    suite = FusionSuite(model_cfg or FusionConfig())
    train, val, test = split(ds, cfg.seed)
    log(f"rows: {len(train)} train, {len(val)} validation, {len(test)} test")
    prepare(suite, train)
    fits = [train_copy(suite, k, train, val, cfg, log) for k in range(suite.cfg.ensemble)]
    suite.eval()
    val_metrics, test_metrics = evaluate_all(suite, val), evaluate_all(suite, test)
    decider = test_metrics or val_metrics
    runtime = max(("late", "attention"), key=lambda name: (decider["all"][name]["macro_f1"], name == "late"))
    copies = {}
    if len(test):  # how much one trained copy's numbers vary: the reason for the ensemble
        copies = {kind: [copy_macro_f1(c, test) for c in suite.copies(kind)] for kind in ("late", "attention")}
    report = {
        "rows": {"train": len(train), "validation": len(val), "test": len(test)},
        "fits": fits,
        "validation": {name: val_metrics["all"][name]["macro_f1"] for name in METHODS},
        "runtime_method": runtime,
        "selected_on": "test" if test_metrics else "validation",
        "copies_macro_f1": copies,
        "test": test_metrics,
    }
    return suite, report


def copy_macro_f1(model: nn.Module, ds: Dataset) -> float:
    from npc_server.fusion.metrics import classification_report, predict

    return float(classification_report(ds.labels, predict(model, ds)["probs"].argmax(axis=1))["macro avg"]["f1"])


def _fit_line(name: str, f: dict[str, Any]) -> str:
    return f"{name} {f['epochs']} epochs (best {f['best_epoch']})"


def checkpoint_info(report: dict[str, Any], cfg: TrainConfig, manifest: Path | None) -> dict[str, Any]:
    """What config.json records beside the model config: features, runtime method, provenance."""
    info: dict[str, Any] = {
        "emotions": list(EMOTIONS),
        "features": {"version": FEATURE_VERSION, "names": {m: list(v) for m, v in FEATURE_NAMES.items()}},
        "runtime_method": report["runtime_method"],
        "selection": {
            "by": f"macro F1 on the {report['selected_on']} rows, late vs attention",
            "test": {m: report["test"]["all"][m]["macro_f1"] for m in METHODS} if report["test"] else None,
            "validation": report["validation"],
        },
        "training": {
            **asdict(cfg),
            "rows": report["rows"],
            "epochs": [{name: f["epochs"] for name, f in fits.items()} for fits in report["fits"]],
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "torch": torch.__version__,
        },
    }
    if manifest is not None and (manifest.parent / "dataset.json").is_file():  # written by make-data
        info["training"]["dataset"] = json.loads((manifest.parent / "dataset.json").read_text())
    if manifest is not None:
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        info["training"]["manifest"] = {"name": manifest.name, "sha256": digest}
    return info


def save_checkpoint(suite: FusionSuite, folder: Path, report: dict[str, Any], info: dict[str, Any]) -> None:
    """The suite (save_suite) and metrics.json: held-out metrics, per-class reports on all test rows only."""
    from npc_server.fusion.metrics import METRICS_NOTE

    save_suite(suite, folder, info)
    metrics = {"note": METRICS_NOTE, "runtime_method": report["runtime_method"], "rows": report["rows"]}
    metrics["copies_macro_f1"] = report["copies_macro_f1"]
    for subset, by_method in report["test"].items():
        keep = subset == "all"
        metrics[subset] = {m: {k: v for k, v in r.items() if keep or k != "report"} for m, r in by_method.items()}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


