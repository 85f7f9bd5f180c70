"""LoRA adapters at run time: the batched engine with an adapter gives what the model with the adapter merged
into its weights gives (fp32, greedy), rows with and without adapters share a batch, and KV computed without
an adapter is never reused for a prompt run with one."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from npc_server.llm.batched import BatchedEngine
from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.llm.local import LocalEngine
from npc_server.llm.weights import resolve_model
from tests.conftest import MODEL_CACHE

MESSAGES = [Message("system", "You are Brokk, a dwarven blacksmith."), Message("user", "Can you fix my sword?")]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base model folder, a random adapter saved by peft, the base with that adapter merged in)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = resolve_model("smollm2", MODEL_CACHE)
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # some parts of each fused projection
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data.mul_(0.3)  # a visible change that still leaves the model speaking
    peft_model.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    for file in base.iterdir():  # tokenizer, chat template, generation config
        if not (root / "merged" / file.name).exists():
            shutil.copy(file, root / "merged")
    return base, root / "adapter", root / "merged"


def run(engine: LocalEngine, params: SamplingParams = GREEDY) -> str:
    return "".join(engine.generate(MESSAGES, params, GenerationStats(), threading.Event()))


@pytest.fixture(scope="module")
def expected(made: tuple[Path, Path, Path]) -> tuple[str, str]:
    base, _, merged = made
    return run(LocalEngine(base, dtype="float32")), run(LocalEngine(merged, dtype="float32"))


# 8: prompts fill a few rows at a time (LoRA's step path); 256: whole prompts, several in one forward (its
# prompt path, one adapter or mixed)
@pytest.mark.parametrize("chunk", [8, 256])
def test_adapter_matches_merged_weights_and_shares_a_batch(
    made: tuple[Path, Path, Path], expected: tuple[str, str], chunk: int
) -> None:
    base, adapter, _ = made
    expected_base, expected_lora = expected
    assert expected_lora != expected_base  # the adapter changes what the model says

    engine = BatchedEngine(base, dtype="float32", max_batch=4, prefill_chunk=chunk)
    try:
        engine.load_adapter("brokk", adapter)
        engine.load_adapter("again", adapter)  # a second slot in the stacks, with the same weights
        assert run(engine) == expected_base  # cached without the adapter first...
        assert run(engine, SamplingParams(temperature=0.0, max_new_tokens=12, adapter="brokk")) == expected_lora
        out: dict[str, str] = {}

        def work(key: str, params: SamplingParams) -> None:
            out[key] = run(engine, params)

        jobs = [
            ("base", GREEDY),
            ("lora", SamplingParams(temperature=0.0, max_new_tokens=12, adapter="brokk")),
            ("base", GREEDY),
            ("lora", SamplingParams(temperature=0.0, max_new_tokens=12, adapter="again")),
        ]
        threads = [threading.Thread(target=work, args=(f"{k}{i}", p)) for i, (k, p) in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out["base0"] == out["base2"] == expected_base
        assert out["lora1"] == out["lora3"] == expected_lora
        with pytest.raises(ValueError, match="no adapter"):
            run(engine, SamplingParams(max_new_tokens=4, adapter="nobody"))
    finally:
        engine.close()


def test_only_adapters_trained_on_the_current_persona_file_load(tmp_path: Path) -> None:
    from npc_server.app import load_adapters
    from npc_server.finetune import adapter_dir, fingerprint
    from npc_server.personas.loader import load_personas
    from npc_server.settings import DEFAULT_PERSONAS, Settings

    personas, _ = load_personas(DEFAULT_PERSONAS)
    brokk, pip = personas["brokk"], personas["pip"]
    for persona, digest in ((brokk, fingerprint(brokk)), (pip, fingerprint(pip.model_copy(update={"name": "Old"})))):
        folder = adapter_dir(tmp_path, persona.id)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "training.json").write_text(f'{{"persona_sha256": "{digest}"}}')

    class Engine:
        def __init__(self) -> None:
            self.loaded: list[str] = []

        def load_adapter(self, name: str, folder: Path) -> None:
            self.loaded.append(name)

    engine = Engine()
    load_adapters(engine, personas, Settings(personas_dir=tmp_path))  # type: ignore[arg-type]
    assert engine.loaded == ["brokk"]  # pip's adapter was trained on an older version of its file
    engine.loaded.clear()
    load_adapters(engine, personas, Settings(personas_dir=tmp_path, adapters=False))  # type: ignore[arg-type]
    assert engine.loaded == []
