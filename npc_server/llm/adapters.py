"""LoRA adapters (one per persona, from `npc-server finetune`) laid out for the packed Llama forward.

An adapter is peft's output (`adapter_config.json`, `adapter_model.safetensors`), read without peft. Each of
the forward's fused projections (q/k/v, o, gate/up, down) gets one low-rank pair: the A matrices of its parts
stacked, and a block-diagonal B with the scale alpha/r folded in, so a row's correction is two small products,
`(x @ A.T) @ B.T`, whichever of the parts were trained. The stacks hold A (as peft does, [r', in]: one row's
product with it is ~3 us against ~9 us with A.T, whose one-row product takes a slow path) and B.T, contiguous per
adapter: one adapter's pair is then a plain view.

Every loaded adapter sits in one stack per projection, index 0 being "no adapter" (zeros). A forward whose
rows use different adapters multiplies by all of them at once: x @ [A_1.T | A_2.T | ...] gives every
adapter's r' columns, a mask keeps each row's own, and @ [B_1.T; B_2.T; ...] finishes, so two products
and a mask per projection, however many adapters the batch mixes (gathering each row's matrices instead
copied megabytes per step). The products run in float32: this small, they cost a few us each on the CPU
against ~30 us in bf16. A prompt's many rows take both products in the model's dtype instead (A and B are
kept in it too): see `llama._lora`.
"""

from __future__ import annotations

import json
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

LowRank = tuple[torch.Tensor, torch.Tensor]  # (A [.., r', in], B.T [.., r', out])


class AdapterSet:
    """The loaded adapters, by name, stacked per layer and projection: A [n + 1, r', in], B.T [n + 1, r', out]."""

    def __init__(self, shapes: list[dict[str, tuple[int, ...]]], dtype: torch.dtype = torch.float32) -> None:
        self.shapes = shapes  # per layer, each part's weight shape, keyed like FUSED's module names
        self.dtype = dtype  # the model's: A and B are also kept in it, for the products of prompts' many rows
        self.index: dict[str, int] = {}
        self.layers: list[dict[str, LowRank]] = [{} for _ in shapes]
        # Per layer and projection, every slot side by side: the slot each of the slots * r' columns belongs to,
        # A.T [in, slots * r'] and B.T [slots * r', out], then both again in the model's dtype.
        self.side_by_side: list[dict[str, tuple[torch.Tensor, ...]]] = [{} for _ in shapes]
        # Per slot, layer and projection, that slot's A [r', in] and B.T [r', out] in float32 (views), then A and
        # B.T in the model's dtype, made once (indexing the stacks costs ~5 us, 240 times a step).
        self.by_slot: list[list[dict[str, tuple[torch.Tensor, ...]]]] = [[{} for _ in shapes]]

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __len__(self) -> int:
        return len(self.index)

    def load(self, name: str, folder: Path) -> None:
        """Add (or replace) adapter `name` from peft's files in `folder`."""
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = float(config["lora_alpha"]) / float(config["r"])
        weights = load_file(str(folder / "adapter_model.safetensors"))
        pairs = [self._fused(weights, i, scale) for i in range(len(self.shapes))]
        if not any(pairs):
            raise ValueError(f"{folder}: no LoRA weights for this model's projections")
        slot = self.index.setdefault(name, len(self.index) + 1)
        for stacked, wide, new in zip(self.layers, self.side_by_side, pairs, strict=True):
            for projection, (a, b) in new.items():
                stacked[projection] = a_all, b_all = _put(stacked.get(projection), slot, a, b)
                slots, rank, inner = a_all.shape
                owner = torch.arange(slots).repeat_interleave(rank)
                a_wide, b_wide = a_all.reshape(-1, inner).T.contiguous(), b_all.reshape(slots * rank, -1)
                wide[projection] = (owner, a_wide, b_wide, a_wide.to(self.dtype), b_wide.to(self.dtype))
        self.by_slot = [
            [
                {
                    p: (a[s], b[s], a[s].to(self.dtype), wide[p][4][s * a.shape[1] : (s + 1) * a.shape[1]])
                    for p, (a, b) in stacked.items()
                }
                for stacked, wide in zip(self.layers, self.side_by_side, strict=True)
            ]
            for s in range(len(self.index) + 1)
        ]

    def _fused(self, weights: dict[str, torch.Tensor], layer: int, scale: float) -> dict[str, LowRank]:
        parts, fused = self.shapes[layer], {}
        for projection, modules in FUSED.items():
            found = [_pair(weights, layer, m) for m in modules]
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
            fused[projection] = (a, b.T)
        return fused


def _put(stacked: LowRank | None, slot: int, a: torch.Tensor, b: torch.Tensor) -> LowRank:
    """The stack with (a [r', in], b [r', out]) at `slot`, grown (more slots, a larger rank padded with zeros) as
    needed."""
    old_a, old_b = stacked if stacked is not None else (torch.zeros(1, 0, a.shape[1]), torch.zeros(1, 0, b.shape[1]))
    n, rank = max(old_a.shape[0], slot + 1), max(old_a.shape[1], a.shape[0])
    new_a, new_b = torch.zeros(n, rank, a.shape[1]), torch.zeros(n, rank, b.shape[1])
    new_a[: old_a.shape[0], : old_a.shape[1]] = old_a
    new_b[: old_b.shape[0], : old_b.shape[1]] = old_b
    new_a[slot] = 0
    new_b[slot] = 0
    new_a[slot, : a.shape[0]] = a
    new_b[slot, : b.shape[0]] = b
    return new_a, new_b


def _pair(weights: dict[str, torch.Tensor], layer: int, module: str) -> LowRank | None:
    stem = f"base_model.model.model.layers.{layer}.{module}"
    a, b = weights.get(f"{stem}.lora_A.weight"), weights.get(f"{stem}.lora_B.weight")
    return None if a is None or b is None else (a.float(), b.float())
