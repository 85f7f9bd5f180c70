"""`npc-server serve | chat | personas validate | finetune | fusion ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from npc_server import chat, finetune
from npc_server.evaluation import cli as eval_cli
from npc_server.fusion.cli import add_parser as add_fusion_parser
from npc_server.fusion.cli import run as run_fusion
from npc_server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npc-server", description="Self-hosted dialogue server for game NPCs.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to bind (NPC_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (NPC_PORT, default 8000)")
    serve.add_argument("--personas-dir", type=Path, help="persona files (NPC_PERSONAS_DIR)")
    serve.add_argument("--model", help="'smollm2', a model folder or a .gguf file (NPC_MODEL)")
    serve.add_argument("--data-dir", type=Path, help="database and caches (NPC_DATA_DIR)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="NPC_LOG_LEVEL")

    chat.add_parser(commands)

    personas = commands.add_parser("personas", help="persona file tools")
    persona_commands = personas.add_subparsers(dest="persona_command", required=True)
    validate = persona_commands.add_parser("validate", help="check persona files; exit 1 if any is broken")
    validate.add_argument("paths", nargs="*", type=Path, help="files or folders (default: NPC_PERSONAS_DIR)")

    finetune.add_parser(commands)
    add_fusion_parser(commands)
    eval_cli.add_parser(commands)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "chat":
        return chat.run(args)
    if args.command == "finetune":
        return finetune.run(args, _settings())
    if args.command == "fusion":
        return run_fusion(args)
    if args.command == "eval":
        return eval_cli.run(args)
    return _validate(args.paths)


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            print(f"setting {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from npc_server.app import create_app

    settings = _settings(
        host=args.host,
        port=args.port,
        personas_dir=args.personas_dir,
        model=args.model,
        data_dir=args.data_dir,
        log_level=args.log_level,
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _validate(paths: list[Path]) -> int:
    from npc_server.personas.loader import validate_paths

    if not paths:
        paths = [_settings().personas_dir]
    problems = validate_paths(paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print("all persona files are valid")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
