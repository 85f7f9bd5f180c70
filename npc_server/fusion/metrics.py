"""Evaluation: per-class precision / recall / F1 / support with micro, macro and weighted averages, valence and
arousal errors, and the ablation table (every method, on all held-out rows and on the disagreeing ones)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from npc_server.fusion.data import Dataset
from npc_server.fusion.features import MODALITIES
from npc_server.fusion.model import METHODS, FusionSuite
from npc_server.perception.types import EMOTIONS

METRICS_NOTE = (
    "Held-out test rows of the training manifest. 'all': every test row; 'congruent': rows whose channels do "
    "not disagree; 'disagree': pleasant words or a smile beside a negative channel (label: the negative "
    "emotion); 'disagree:<kind>': one kind; 'N modalities': rows where N of face, voice, text could be read. "
    "coverage: share of rows the method can read (a single-modality method answers the training prior where "
    "its modality is missing)."
)


def predict(model: nn.Module, ds: Dataset) -> dict[str, np.ndarray]:
    """probs (N, 7), valence, arousal, confidence (N,) of one method on a dataset."""
    from npc_server.fusion.train import tensors

    model.eval()
    x, present, *_ = tensors(ds)
    with torch.inference_mode():
        out = model(x, present)
    return {
        "probs": out.log_probs.exp().numpy(),
        "valence": out.valence.numpy(),
        "arousal": out.arousal.numpy(),
        "confidence": out.confidence.numpy(),
    }


def classification_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Per class and averaged precision, recall, F1, support (as sklearn's classification_report, zero_division=0).

    micro averages count every row once (for one label per row they all equal accuracy); macro is the plain
    mean over classes that have support or predictions; weighted is the mean weighted by support.
    """
    n = len(EMOTIONS)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0).astype(np.float64), cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    report: dict[str, Any] = {
        e: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": int(support[i])}
        for i, e in enumerate(EMOTIONS)
    }
    total = support.sum()
    micro = float(tp.sum() / total) if total else 0.0
    seen = (support + predicted) > 0
    report["micro avg"] = {"precision": micro, "recall": micro, "f1": micro, "support": int(total)}
    scores = {"precision": precision, "recall": recall, "f1": f1}
    report["macro avg"] = {k: float(v[seen].mean()) if seen.any() else 0.0 for k, v in scores.items()}
    report["weighted avg"] = {k: float(v @ support / total) if total else 0.0 for k, v in scores.items()}
    report["macro avg"]["support"] = report["weighted avg"]["support"] = int(total)
    report["accuracy"] = micro
    report["confusion"] = cm.tolist()
    return _rounded(report)


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned text, sklearn's layout."""
    rows = [f"{'':>14}{'precision':>10}{'recall':>10}{'f1-score':>10}{'support':>9}", ""]
    for name in (*EMOTIONS, "", "micro avg", "macro avg", "weighted avg"):
        if not name:
            rows.append("")
            continue
        r = report[name]
        rows.append(f"{name:>14}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>10.3f}{r['support']:>9}")
    accuracy = f"{'accuracy':>14}{'':>20}{report['accuracy']:>10.3f}{report['micro avg']['support']:>9}"
    rows.insert(len(EMOTIONS) + 3, accuracy)
    return "\n".join(rows)


def method_metrics(method: str, pred: dict[str, np.ndarray], ds: Dataset) -> dict[str, Any]:
    y_pred = pred["probs"].argmax(axis=1)
    report = classification_report(ds.labels, y_pred)
    readable = ds.present[:, MODALITIES.index(method)] if method in MODALITIES else ds.present.any(axis=1)
    return _rounded(
        {
            "n": len(ds),
            "coverage": float(readable.mean()),
            "accuracy": report["accuracy"],
            "macro_f1": report["macro avg"]["f1"],
            "weighted_f1": report["weighted avg"]["f1"],
            "valence_mae": float(np.abs(pred["valence"] - ds.valence).mean()),
            "arousal_mae": float(np.abs(pred["arousal"] - ds.arousal).mean()),
            "mean_confidence": float(pred["confidence"].mean()),
            "report": report,
        }
    )


def subsets(ds: Dataset) -> dict[str, Dataset]:
    """The evaluation subsets of METRICS_NOTE that have rows."""
    out = {"all": ds, "congruent": ds.where(lambda i: "disagree" not in ds.tags[i])}
    out["disagree"] = ds.where(lambda i: "disagree" in ds.tags[i])
    count = ds.present.sum(axis=1)
    for n in range(1, len(MODALITIES) + 1):
        out[f"{n} modalit{'y' if n == 1 else 'ies'}"] = ds.where(lambda i, n=n: count[i] == n)  # type: ignore[misc]
    kinds = sorted({t for tags in ds.tags for t in tags if t.startswith("disagree:")})
    for kind in kinds:
        out[kind] = ds.where(lambda i, kind=kind: kind in ds.tags[i])  # type: ignore[misc]
    return {name: sub for name, sub in out.items() if len(sub)}


def evaluate_all(suite: FusionSuite, ds: Dataset) -> dict[str, dict[str, Any]]:
    """{subset: {method: metrics}} for every method of METHODS."""
    if not len(ds):
        return {}
    return {
        name: {m: method_metrics(m, predict(suite.method(m), sub), sub) for m in METHODS}
        for name, sub in subsets(ds).items()
    }


def ablation_table(results: dict[str, dict[str, Any]], runtime: str | None = None) -> str:
    """Two markdown tables, one row per method: (1) all rows (coverage, accuracy, macro and weighted F1) and
    accuracy by how many modalities a row has; (2) accuracy on the congruent and disagreeing rows, by kind."""
    overall = [n for n in results if n.endswith(("modality", "modalities"))]
    conflict = [n for n in results if n in ("congruent", "disagree") or n.startswith("disagree:")]
    first = ["coverage", f"accuracy (n={results['all']['attention']['n']})", "macro F1", "weighted F1"]
    tables = []
    for names, extra in ((overall, first), (conflict, [])):
        head = ["method", *extra] + [f"{n.replace('disagree:', '')} (n={results[n]['attention']['n']})" for n in names]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in METHODS:
            a = results["all"][m]
            cells = [f"**{m}** (runtime)" if m == runtime else m]
            if extra:
                cells += [f"{a['coverage']:.2f}"] + [f"{a[k]:.3f}" for k in ("accuracy", "macro_f1", "weighted_f1")]
            cells += [f"{results[n][m]['accuracy']:.3f}" for n in names]
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _rounded(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_rounded(v) for v in d]
    if isinstance(d, float | np.floating):
        return round(float(d), 4)
    return d
