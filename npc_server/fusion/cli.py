"""`npc-server fusion make-data | import-meld | train | eval` (wired into npc_server/cli.py by add_parser)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path("data/fusion")


def add_parser(commands: Any) -> None:
    """Add the `fusion` command and its subcommands to the top-level subparsers."""
    fusion = commands.add_parser("fusion", help="player-affect fusion: make training data, train, evaluate")
    sub = fusion.add_subparsers(dest="fusion_command", required=True)

    make = sub.add_parser("make-data", help="generate the project's own training set (manifest + media)")
    make.add_argument("out", type=Path, nargs="?", default=DEFAULT_DATA, help=f"folder (default {DEFAULT_DATA})")
    make.add_argument("--per-class", type=int, default=120, help="congruent samples per emotion (default 120)")
    make.add_argument("--per-disagreement", type=int, default=60, help="samples per disagreement kind (default 60)")
    make.add_argument("--seed", type=int, default=0)

    meld = sub.add_parser("import-meld", help="write a manifest for a MELD folder (CSV + extracted .wav/frames)")
    meld.add_argument("meld_dir", type=Path)
    meld.add_argument("--out", type=Path, default=Path("data/meld/manifest.jsonl"))

    train = sub.add_parser("train", help="train every method on a manifest, evaluate, save a checkpoint")
    train.add_argument("--data", type=Path, required=True, help="manifest (.jsonl)")
    train.add_argument("--out", type=Path, default=DEFAULT_DATA / "checkpoint", help="checkpoint folder")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-epochs", type=int, default=None)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a manifest's held-out rows (or all, if unmarked)")
    ev.add_argument("--data", type=Path, default=DEFAULT_DATA / "manifest.jsonl", help="manifest (.jsonl)")
    ev.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the shipped one)")
    ev.add_argument("--method", default=None, help="method whose per-class report to print (default: runtime)")
    ev.add_argument("--metrics-out", type=Path, default=None, help="metrics JSON (default: <manifest>.eval.json)")


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed `fusion ...` command line; returns the exit status."""
    from npc_server.fusion.data import ManifestError

    handlers = {"make-data": _make_data, "import-meld": _import_meld, "train": _train, "eval": _eval}
    try:
        return handlers[args.fusion_command](args)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"fusion {args.fusion_command}: {exc}", file=sys.stderr)
        return 1


def _make_data(args: argparse.Namespace) -> int:
    from npc_server.fusion.generate import make_dataset

    started = time.monotonic()
    counts = make_dataset(args.out, per_class=args.per_class, per_disagreement=args.per_disagreement, seed=args.seed)
    print(json.dumps(counts, indent=2, sort_keys=True))
    print(f"wrote {args.out / 'manifest.jsonl'} in {time.monotonic() - started:.0f} s")
    return 0


def _import_meld(args: argparse.Namespace) -> int:
    from npc_server.fusion.meld import meld_manifest

    counts = meld_manifest(args.meld_dir, args.out)
    print(json.dumps(counts, indent=2, sort_keys=True))
    print(f"wrote {args.out}; train with: npc-server fusion train --data {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from npc_server.fusion.data import load_manifest
    from npc_server.fusion.metrics import ablation_table, format_report
    from npc_server.fusion.train import TrainConfig, checkpoint_info, save_checkpoint, train_suite

    started = time.monotonic()
    ds = load_manifest(args.data)
    print(f"features ready: {len(ds)} samples in {time.monotonic() - started:.0f} s")
    cfg = TrainConfig(seed=args.seed)
    if args.max_epochs:
        cfg.max_epochs = args.max_epochs
    suite, report = train_suite(ds, cfg)
    save_checkpoint(suite, args.out, report, checkpoint_info(report, cfg, args.data))
    runtime = report["runtime_method"]
    print(f"\nruntime method: {runtime} (the better macro F1 on the {report['selected_on']} rows)")
    if report["test"]:
        print(f"\nheld-out report, {runtime}:\n{format_report(report['test']['all'][runtime]['report'])}")
        print("\n" + ablation_table(report["test"], runtime))
    if report["copies_macro_f1"]:
        spread = {kind: [round(v, 3) for v in vals] for kind, vals in report["copies_macro_f1"].items()}
        print(f"\nheld-out macro F1 of each trained copy in the ensembles: {spread}")
    print(f"\nsaved {args.out} in {time.monotonic() - started:.0f} s")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from npc_server.fusion.data import load_manifest
    from npc_server.fusion.metrics import METRICS_NOTE, ablation_table, evaluate_all, format_report
    from npc_server.fusion.runtime import AffectFuser

    fuser = AffectFuser.load(args.checkpoint)
    method = args.method or fuser.method
    ds = load_manifest(args.data)
    marked = any(ds.split)
    held = ds.where(lambda i: ds.split[i] == "test") if marked else ds
    results = evaluate_all(fuser.suite, held)
    if not results:
        raise ValueError(f"{args.data} has no rows to evaluate")
    print(f"{len(held)} {'held-out' if marked else ''} rows; report for {method}:")
    print(format_report(results["all"][method]["report"]))
    print("\n" + ablation_table(results, fuser.method))
    out = args.metrics_out or args.data.with_name(args.data.name + ".eval.json")
    out.write_text(json.dumps({"note": METRICS_NOTE, "runtime_method": fuser.method, **results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0
