"""LoRA adapters (one per persona, from `npc-server finetune`) laid out for the packed Llama forward.

An adapter is peft's output (`adapter_config.json`, `adapter_model.safetensors`), read without peft. Each of
the forward's fused projections (q/k/v, o, gate/up, down) gets one low-rank pair: the A matrices of its parts
stacked, and a block-diagonal B with the scale alpha/r folded in, so a row's correction is two small products,
`(x @ A.T) @ B.T`, whichever of the parts were trained. Rows of a batch use different adapters or none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

# The forward's fused projections and the model's modules that make them, in the order they are fused.
FUSED = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "out": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}

LowRank = tuple[torch.Tensor, torch.Tensor]  # (A [r', in], B [out, r'])


@dataclass
class Adapter:
    name: str
    layers: list[dict[str, LowRank]]  # per layer: fused projection -> its pair (absent: not trained)


def load_adapter(name: str, folder: Path, shapes: list[dict[str, tuple[int, ...]]]) -> Adapter:
    """`shapes`: per layer, each part's weight shape, keyed like FUSED's module names."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    weights = load_file(str(folder / "adapter_model.safetensors"))
    layers: list[dict[str, LowRank]] = []
    for i, parts in enumerate(shapes):
        fused: dict[str, LowRank] = {}
        for projection, modules in FUSED.items():
            found = [_pair(weights, i, m) for m in modules]
            if all(f is None for f in found):
                continue
            rank = next(f for f in found if f is not None)[0].shape[0]
            a = torch.zeros(rank * len(modules), parts[modules[0]][1])
            b = torch.zeros(sum(parts[m][0] for m in modules), rank * len(modules))
            row = 0
            for k, (module, pair) in enumerate(zip(modules, found, strict=True)):
                out = parts[module][0]
                if pair is not None:
                    a[k * rank : (k + 1) * rank] = pair[0]
                    b[row : row + out, k * rank : (k + 1) * rank] = pair[1] * scale
                row += out
            fused[projection] = (a, b)  # float32 whatever the model's dtype: see llama._lora
        layers.append(fused)
    if not any(layers):
        raise ValueError(f"{folder}: no LoRA weights for this model's projections")
    return Adapter(name, layers)


def _pair(weights: dict[str, torch.Tensor], layer: int, module: str) -> LowRank | None:
    stem = f"base_model.model.model.layers.{layer}.{module}"
    a, b = weights.get(f"{stem}.lora_A.weight"), weights.get(f"{stem}.lora_B.weight")
    return None if a is None or b is None else (a.float(), b.float())
