"""Persona files: every shipped file is valid and in character; broken files are reported, never fatal."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from npc_server.personas.loader import (
    MAX_FILE_BYTES,
    PersonaFileError,
    PersonaLoadError,
    load_persona_file,
    load_personas,
    validate_paths,
)
from npc_server.personas.schema import Persona

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "personas"
SHIPPED_FILES = sorted(SHIPPED_DIR.glob("*.y*ml"))
REQUIRED_IDS = {"brokk", "elowen", "pip", "halcyon", "sam_marlowe"}


def _minimal(persona_id: str = "tester") -> dict[str, Any]:
    return {
        "id": persona_id,
        "name": "Tess Tester",
        "role": "test fixture",
        "setting": "A plain room.",
        "backstory": "Made for tests.",
        "personality": ["patient"],
        "speaking_style": {"description": "Plain."},
        "greeting": "Hello.",
        "examples": [{"player": "Hi.", "npc": "Hello there."}],
        "fallback_lines": ["Ask me again."],
    }


def _write(directory: Path, name: str, data: Any) -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def _load_errors(path: Path) -> list[PersonaFileError]:
    with pytest.raises(PersonaLoadError) as caught:
        load_persona_file(path)
    assert caught.value.errors
    return caught.value.errors


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _mentions(text: str, term: str) -> bool:
    return re.search(rf"\b{re.escape(term.lower())}\b", text.lower()) is not None


# --- shipped personas -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> dict[str, Persona]:
    personas, errors = load_personas(SHIPPED_DIR)
    assert errors == [], [str(e) for e in errors]
    return personas


def test_shipped_directory_loads_without_errors(shipped: dict[str, Persona]) -> None:
    assert len(shipped) == len(SHIPPED_FILES) >= 6
    assert set(shipped) >= REQUIRED_IDS


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_each_shipped_file_is_valid(path: Path) -> None:
    persona = load_persona_file(path)
    assert persona.id == path.stem
    assert validate_paths([path]) == []
    assert len(persona.examples) >= 4
    assert len(persona.knowledge) >= 8
    assert 4 <= len(persona.personality) <= 8
    assert len(persona.speaking_style.sample_phrases) >= 4
    assert 3 <= len(persona.fallback_lines) <= 5


def test_shipped_ids_are_unique() -> None:
    ids = [yaml.safe_load(p.read_text(encoding="utf-8"))["id"] for p in SHIPPED_FILES]
    assert len(ids) == len(set(ids))


def test_only_the_starship_ai_is_a_machine(shipped: dict[str, Persona]) -> None:
    assert [pid for pid, p in shipped.items() if p.is_machine] == ["halcyon"]


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=lambda p: p.name)
def test_shipped_lines_pass_their_own_guard(path: Path) -> None:
    """What the model imitates (examples) or falls back to must fit the reply limits and the era."""
    persona = load_persona_file(path)
    lines = [persona.greeting, *(e.npc for e in persona.examples), *persona.fallback_lines]
    for line in lines:
        assert len(line) <= persona.reply.max_chars, line
        assert len(_sentences(line)) <= persona.reply.max_sentences, line
        for term in persona.cannot_know:
            assert not _mentions(line, term), (term, line)


# --- broken files -----------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.yaml", "id: broken\nname: [unclosed\n  role: x\n")
    [error] = _load_errors(path)
    assert error.file == "broken.yaml"
    assert error.field == ""
    assert "invalid YAML" in error.message
    assert "line" in error.message
    assert str(error).startswith("broken.yaml: ")
    assert str(tmp_path) not in str(error)  # only the file name reaches users


def test_missing_required_field_names_file_and_field(tmp_path: Path) -> None:
    data = _minimal()
    del data["greeting"]
    errors = _load_errors(_write(tmp_path, "tester.yaml", data))
    assert [(e.file, e.field) for e in errors] == [("tester.yaml", "greeting")]
    assert str(errors[0]) == f"tester.yaml: greeting: {errors[0].message}"


def test_wrong_type_in_nested_field_names_dotted_path(tmp_path: Path) -> None:
    data = _minimal()
    data["examples"].append({"player": "Who are you?", "npc": ["not", "a", "string"]})
    data["temperament"] = {"valence": "very happy"}
    errors = _load_errors(_write(tmp_path, "tester.yaml", data))
    assert {e.field for e in errors} == {"examples.1.npc", "temperament.valence"}


def test_unknown_field_is_rejected(tmp_path: Path) -> None:
    data = _minimal()
    data["speaking_style"]["accent"] = "thick"
    data["favourite_colour"] = "blue"
    errors = _load_errors(_write(tmp_path, "tester.yaml", data))
    assert {e.field for e in errors} == {"speaking_style.accent", "favourite_colour"}


def test_out_of_bounds_value_is_rejected(tmp_path: Path) -> None:
    data = _minimal()
    data["temperament"] = {"arousal": 1.5}
    data["fallback_lines"] = []
    errors = _load_errors(_write(tmp_path, "tester.yaml", data))
    assert {e.field for e in errors} == {"temperament.arousal", "fallback_lines"}


def test_id_must_match_file_name(tmp_path: Path) -> None:
    [error] = _load_errors(_write(tmp_path, "someone_else.yaml", _minimal("tester")))
    assert (error.file, error.field) == ("someone_else.yaml", "id")
    assert "tester" in error.message
    assert "someone_else" in error.message


def test_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    text = yaml.safe_dump(_minimal()) + "# " + "x" * MAX_FILE_BYTES + "\n"
    [error] = _load_errors(_write(tmp_path, "tester.yaml", text))
    assert (error.file, error.field) == ("tester.yaml", "")
    assert "larger than" in error.message


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "just a string\n"])
def test_document_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    [error] = _load_errors(_write(tmp_path, "tester.yaml", text))
    assert error.field == ""
    assert "mapping" in error.message


def test_unsafe_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    text = "!!python/object/apply:os.system ['echo pwned']\n"
    [error] = _load_errors(_write(tmp_path, "tester.yaml", text))
    assert "invalid YAML" in error.message


def test_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "tester.yaml"
    path.write_bytes(b"id: tester\nname: \xff\xfe\n")
    [error] = _load_errors(path)
    assert "UTF-8" in error.message


def test_broken_file_does_not_stop_good_ones(tmp_path: Path) -> None:
    _write(tmp_path, "alpha.yaml", _minimal("alpha"))
    _write(tmp_path, "beta.yaml", "id: beta\nname: [oops\n")
    _write(tmp_path, "gamma.yml", _minimal("gamma"))
    _write(tmp_path, "notes.txt", "not a persona")
    personas, errors = load_personas(tmp_path)
    assert sorted(personas) == ["alpha", "gamma"]
    assert [e.file for e in errors] == ["beta.yaml"]


def test_duplicate_ids_are_reported(tmp_path: Path) -> None:
    _write(tmp_path, "tester.yaml", _minimal())
    _write(tmp_path, "tester.yml", _minimal())
    personas, errors = load_personas(tmp_path)
    assert list(personas) == ["tester"]
    [error] = errors
    assert (error.file, error.field) == ("tester.yml", "id")
    assert "duplicate" in error.message
    assert "tester.yaml" in error.message


def test_missing_directory_is_an_error_not_a_crash(tmp_path: Path) -> None:
    personas, errors = load_personas(tmp_path / "absent")
    assert personas == {}
    assert len(errors) == 1


def test_validate_paths_mixes_files_and_directories(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    _write(good, "alpha.yaml", _minimal("alpha"))
    bad = _write(tmp_path, "beta.yaml", {**_minimal("beta"), "role": ""})
    empty = tmp_path / "empty"
    empty.mkdir()

    assert validate_paths([good, good / "alpha.yaml"]) == []  # one file named twice is no duplicate
    errors = validate_paths([good, bad, empty, tmp_path / "missing.yaml"])
    assert sorted((e.file, e.field) for e in errors) == [
        ("beta.yaml", "role"),
        ("empty", ""),
        ("missing.yaml", ""),
    ]
