"""`npc-server eval roleplay [PERSONA_FILES...] [--quick] [--baseline] [--out DIR]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_VARIANTS = ("shipped",)


def add_parser(commands: Any) -> None:
    evaluation = commands.add_parser("eval", help="evaluation harnesses")
    kinds = evaluation.add_subparsers(dest="eval_command", required=True)
    roleplay = kinds.add_parser(
        "roleplay",
        help="run fixed player prompts against every persona and report how well they stay in character",
        description="Character breaks, persona identifiability, lore recall, length and repetition "
        "(docs/roleplay.md). Writes roleplay.json and roleplay.md into --out.",
    )
    roleplay.add_argument("persona_files", nargs="*", type=Path, help="extra persona files to evaluate")
    roleplay.add_argument("--quick", action="store_true", help="a small subset of the prompts (a smoke test)")
    roleplay.add_argument("--baseline", action="store_true", help="also run the naive baseline")
    roleplay.add_argument(
        "--variant",
        action="append",
        dest="variants",
        help="variant to run, repeatable (default: shipped; see docs/roleplay.md)",
    )
    roleplay.add_argument("--only", action="append", help="persona id to evaluate, repeatable (default: all)")
    roleplay.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    roleplay.add_argument("--concurrency", type=int, default=16, help="conversations run at once (default 16)")
    roleplay.add_argument("--out", type=Path, default=Path("data/eval"), help="report folder (default data/eval)")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from npc_server.evaluation.roleplay import evaluate, markdown
    from npc_server.personas.loader import PersonaLoadError, load_persona_file, load_personas
    from npc_server.settings import Settings

    try:
        settings = Settings(seed=args.seed, perception=False)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    personas, problems = load_personas(settings.personas_dir)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    for path in args.persona_files:
        try:
            persona = load_persona_file(path)
        except PersonaLoadError as exc:
            print(exc, file=sys.stderr)
            return 2
        personas[persona.id] = persona
    if args.only:
        unknown = sorted(set(args.only) - set(personas))
        if unknown:
            print(f"unknown persona id(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        personas = {pid: p for pid, p in personas.items() if pid in args.only}
    variants = list(dict.fromkeys([*(["baseline"] if args.baseline else []), *(args.variants or DEFAULT_VARIANTS)]))
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(
            evaluate(settings, personas, variants, quick=args.quick, concurrency=args.concurrency, progress=progress)
        )
    except ValueError as exc:
        print(f"npc-server eval: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roleplay.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    table = markdown(report)
    (args.out / "roleplay.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {args.out / 'roleplay.json'} and {args.out / 'roleplay.md'}", file=sys.stderr)
    return 0
