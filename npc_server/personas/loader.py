"""Load persona YAML files into `Persona` objects, reporting every problem as file + field + message.

A broken file never stops the others from loading: `load_personas` skips it and reports why. Messages
name the file (never its full path), the dotted field (`examples.2.npc`, or "" for the whole file) and
what is wrong, so the same errors serve the server log and `npc-server personas validate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from npc_server.personas.schema import Persona

MAX_FILE_BYTES = 256 * 1024
SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class PersonaFileError:
    """One problem in one persona file. `field` is a dotted path, or "" when the whole file is at fault."""

    path: Path
    field: str
    message: str

    @property
    def file(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        if self.field:
            return f"{self.file}: {self.field}: {self.message}"
        return f"{self.file}: {self.message}"


class PersonaLoadError(Exception):
    """A persona file that could not be loaded; `errors` holds every problem found in it."""

    def __init__(self, errors: list[PersonaFileError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


def _read_document(path: Path) -> Any:
    def fail(message: str) -> PersonaLoadError:
        return PersonaLoadError([PersonaFileError(path, "", message)])

    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise fail(f"file is larger than {MAX_FILE_BYTES // 1024} KiB")
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise fail(f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise fail(f"file is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(f"file is not valid UTF-8 (byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        where = ""
        if exc.problem_mark is not None:
            where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        raise fail(f"invalid YAML{where}: {exc.problem or exc.context or 'syntax error'}") from None
    except yaml.YAMLError:
        raise fail("invalid YAML") from None
    except RecursionError:
        raise fail("invalid YAML: nested too deeply") from None


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def load_persona_file(path: Path) -> Persona:
    """Parse and validate one persona file. Raises `PersonaLoadError` listing every problem in it."""
    data = _read_document(path)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise PersonaLoadError([PersonaFileError(path, "", f"expected a mapping of fields, got {kind}")])
    errors: list[PersonaFileError] = []
    persona: Persona | None = None
    try:
        persona = Persona.model_validate(data)
    except ValidationError as exc:
        errors = [PersonaFileError(path, _field(err["loc"]), err["msg"]) for err in exc.errors()]
    declared = data.get("id")
    if isinstance(declared, str) and declared.strip() != path.stem:
        errors.append(PersonaFileError(path, "id", f"id {declared[:60]!r} must match the file name {path.stem!r}"))
    if errors or persona is None:
        raise PersonaLoadError(errors)
    return persona


def persona_files(directory: Path) -> list[Path]:
    """The persona files in `directory` (not recursive), sorted by name; hidden files are skipped."""
    return sorted(
        (p for p in directory.iterdir() if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )


def _load_all(files: Iterable[Path]) -> tuple[dict[str, Persona], list[PersonaFileError]]:
    personas: dict[str, Persona] = {}
    sources: dict[str, Path] = {}
    errors: list[PersonaFileError] = []
    for path in files:
        try:
            persona = load_persona_file(path)
        except PersonaLoadError as exc:
            errors.extend(exc.errors)
            continue
        if persona.id in personas:
            message = f"duplicate id {persona.id!r}, already defined by {sources[persona.id].name}"
            errors.append(PersonaFileError(path, "id", message))
            continue
        personas[persona.id] = persona
        sources[persona.id] = path
    return personas, errors


def load_personas(directory: Path) -> tuple[dict[str, Persona], list[PersonaFileError]]:
    """Load every `*.yaml` / `*.yml` file in `directory`. Broken files are reported and skipped."""
    if not directory.is_dir():
        return {}, [PersonaFileError(directory, "", "not a directory")]
    try:
        files = persona_files(directory)
    except OSError as exc:
        return {}, [PersonaFileError(directory, "", f"cannot list directory ({exc.strerror})")]
    return _load_all(files)


def validate_paths(paths: list[Path]) -> list[PersonaFileError]:
    """Check persona files and directories (for `npc-server personas validate`); [] means all good."""
    files: list[Path] = []
    errors: list[PersonaFileError] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:  # the same file named twice is not a duplicate id
            seen.add(key)
            files.append(path)

    for path in paths:
        if path.is_dir():
            try:
                found = persona_files(path)
            except OSError as exc:
                errors.append(PersonaFileError(path, "", f"cannot list directory ({exc.strerror})"))
                continue
            if not found:
                errors.append(PersonaFileError(path, "", "no .yaml or .yml persona files in directory"))
            for file in found:
                add(file)
        elif path.is_file():
            add(path)
        else:
            errors.append(PersonaFileError(path, "", "no such file or directory"))
    _, load_errors = _load_all(files)
    return errors + load_errors
