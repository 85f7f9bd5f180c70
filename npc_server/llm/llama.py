"""A Llama decoder laid out for small-batch decoding on the CPU.

transformers' modules cost more in Python dispatch than a 135M model costs in arithmetic: every layer
runs seven projections, two RMSNorms through float32 and back, and recomputes the rotary table. Here each
layer is four matrix products (q, k and v fused; gate and up fused), RMSNorm is four elementwise ops (`_norm`),
and the rotary table is computed once per forward. The weights are the loaded model's own tensors, concatenated
once at start-up (the model's modules then run on views of the fused tensors).

The caller owns the KV cache: `forward` hands each layer's new keys and values to `write`, which returns
every key and value to attend to.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from npc_server.llm.adapters import FUSED, AdapterSet

# (layer, new keys [B, kv_heads, T, D], new values) -> (all keys, all values) to attend to
Write = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# LoRA for a forward: the adapter slot every row uses, or one slot per row [B] (0: none), and the adapters
Lora = tuple[int | torch.Tensor, AdapterSet] | None


# Up to this many rows (tokens in a step), a quantised copy of a weight is faster than the model's own: decoding
# reads every weight once a step, and memory bandwidth is what a step costs. The int4 kernel's time grows with
# each row; the int8 one's beyond four.
INT4_ROWS = 12
INT8_ROWS = 4
INT4_GROUP = 32  # weights in groups of 32 along a row, each with its own scale and offset (as GGUF's Q4_1)
LORA_FLOAT32_ROWS = 16  # up to this many rows, LoRA's products run in float32; beyond, in the model's dtype


class Weight:
    """A projection's weight [out, in], with an optional quantised copy for small batches: int4 in groups of
    32 where that reproduces the weight at least as closely as int8 does (a 4-bit GGUF's weights, dequantised,
    are such: 4x closer), else int8 with one scale per output row."""

    def __init__(self, w: torch.Tensor, quantize: bool) -> None:
        # detached: quantising a model's parameter (requires_grad) would otherwise keep an autograd graph, and
        # every float32 temporary it saved, alive with the quantised copy (~200 MiB for SmolLM2)
        self.w = w = w.detach()
        self.rows = 0  # the most rows the quantised copy serves
        self.small: Callable[[torch.Tensor], torch.Tensor] | None = None
        if quantize:
            self.small, self.rows = _int4(w) or _int8(w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.small is None or rows > self.rows:
            return F.linear(x, self.w)
        return self.small(x.reshape(rows, x.shape[-1])).view(*x.shape[:-1], -1)


Kernel = tuple[Callable[[torch.Tensor], torch.Tensor], int]


def _int8(w: torch.Tensor) -> Kernel:
    q, scale = _int8_levels(w)
    scale = scale.to(w.dtype)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale)), INT8_ROWS


def _int8_levels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1).float().clamp(min=1e-12) / 127
    q = torch.empty(w.shape, dtype=torch.int8)
    for rows in range(0, len(w), 1024):  # in blocks: no float32 copy of a whole embedding table
        block = slice(rows, rows + 1024)
        q[block] = torch.round(w[block].float() / scale[block, None])
    return q, scale


def _int4(w: torch.Tensor) -> Kernel | None:
    """The int4 kernel for w, or None where w's rows are not 4-bit levels in groups (int4 would lose more
    than int8) or its shape does not suit the kernel."""
    n, k = w.shape
    if n % 16 or k % INT4_GROUP:
        return None
    levels = torch.empty(w.shape, dtype=torch.int32)
    scale_zero = torch.empty(k // INT4_GROUP, n, 2, dtype=w.dtype)
    for rows in range(0, n, 1024):
        block = slice(rows, rows + 1024)
        groups = w[block].float().unflatten(1, (-1, INT4_GROUP))
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        step = (high - low) / 15
        level = ((groups - low) / step.clamp(min=1e-12)).round_().clamp_(0, 15)
        # the kernel computes (level - 8) * scale + zero, from scale and zero in the input's dtype
        scale, zero = step.to(w.dtype), (low + 8 * step).to(w.dtype)
        back = (level - 8) * scale.float() + zero.float()
        q8, scale8 = _int8_levels(w[block])
        if (back - groups).norm() > (q8.float() * scale8[:, None] - w[block].float()).norm():
            return None
        levels[block] = level.flatten(1).to(torch.int32)
        scale_zero[:, block] = torch.cat((scale, zero), dim=-1).transpose(0, 1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scale_zero)), INT4_ROWS


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: Weight  # [(heads + 2 * kv_heads) * head_dim, hidden]
    out: Weight
    mlp_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight


class PackedLlama:
    def __init__(self, model: Any, *, quantize: bool = False) -> None:
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        # RMSNorm's weights times sqrt(hidden), and its eps as a norm: see `_norm`
        scaled = self.hidden**0.5
        self.eps_norm = torch.tensor((self.hidden * config.rms_norm_eps) ** 0.5, dtype=inner.norm.weight.dtype)
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight * scaled
        self.lm_head = Weight(model.lm_head.weight, quantize)
        # Each fused part's weight shape, per layer, for laying adapters out the same way
        self.part_shapes = [
            {name: tuple(layer.get_submodule(name).weight.shape) for names in FUSED.values() for name in names}
            for layer in inner.layers
        ]
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    attn_norm=layer.input_layernorm.weight * scaled,
                    qkv=Weight(_fuse(attn.q_proj, attn.k_proj, attn.v_proj), quantize),
                    out=Weight(attn.o_proj.weight, quantize),
                    mlp_norm=layer.post_attention_layernorm.weight * scaled,
                    gate_up=Weight(_fuse(mlp.gate_proj, mlp.up_proj), quantize),
                    down=Weight(mlp.down_proj.weight, quantize),
                )
            )
        give_back_freed_memory()

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, write: Write, mask: torch.Tensor | None, lora: Lora = None
    ) -> torch.Tensor:
        """Hidden states after the final norm for ids [B, T] at positions [B, T]. `mask` (True: attend), or None
        where every query sees every key written."""
        x = F.embedding(ids, self.embed)
        if mask is not None:  # additive, made once here rather than by attention in every layer
            mask = torch.zeros(mask.shape, dtype=x.dtype).masked_fill_(~mask, float("-inf"))
        b, t, _ = x.shape
        cos, sin = self.rotary(x, positions)
        # Rotating half the dims: x * cos + cat(-x2, x1) * sin == x * cos + roll(x, half) * (sin with its
        # first half negated). [B, T, 1, D], to broadcast over the heads of q and k at once.
        half = self.head_dim // 2
        cos, sin = cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]
        qk_heads = self.heads + self.kv_heads
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.attn_norm)
            qkv = _lora(layer.qkv(h), h, lora, i, "qkv").view(b, t, qk_heads + self.kv_heads, self.head_dim)
            qk = qkv[:, :, :qk_heads]
            qk = (qk * cos + qk.roll(half, dims=-1) * sin).transpose(1, 2)  # [B, heads + kv_heads, T, D]
            keys, values = write(i, qk[:, self.heads :], qkv[:, :, qk_heads:].transpose(1, 2))
            a = F.scaled_dot_product_attention(qk[:, : self.heads], keys, values, attn_mask=mask, enable_gqa=True)
            a = a.transpose(1, 2).reshape(b, t, -1)
            x = x + _lora(layer.out(a), a, lora, i, "out")
            h = self._norm(x, layer.mlp_norm)
            gate, up = _lora(layer.gate_up(h), h, lora, i, "gate_up").chunk(2, dim=-1)
            h = F.silu(gate) * up
            x = x + _lora(layer.down(h), h, lora, i, "down")
        return self._norm(x, self.norm)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm: x / sqrt(mean(x^2) + eps) * w == x / hypot(||x||, sqrt(hidden * eps)) * (w * sqrt(hidden)).
        Four ops, ~5 us on one row, where F.rms_norm's composite of a dozen (up to float32 and back) takes ~20 us,
        61 times a step."""
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.eps_norm) * weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _lora(y: torch.Tensor, x: torch.Tensor, lora: Lora, layer: int, projection: str) -> torch.Tensor:
    """y (the projection of x [B, T, in]) plus the low-rank correction of each row's adapter, in place.

    A step's few rows multiply in float32 (x @ A.T on one row: ~3 us, against ~30 in bf16). A prompt's many
    rows multiply in the model's dtype, the second product added by addmm_: a [rows, out] float32 product added
    into bf16 in place (a slow path at this size) cost more than the projection itself."""
    if lora is None:
        return y
    slots, adapters = lora
    rows = x.numel() // x.shape[-1]
    few = rows <= LORA_FLOAT32_ROWS
    if isinstance(slots, int):  # one adapter for every row: A [r', in], B.T [r', out]
        parts = adapters.by_slot[slots][layer].get(projection)
        if parts is None:
            return y
        a, b = parts[:2] if few else parts[2:]
        t = F.linear(x.float() if few else x, a)
    else:  # all adapters side by side (A.T [in, slots * r']); each row keeps its own columns
        wide = adapters.side_by_side[layer].get(projection)
        if wide is None:
            return y
        a, b = wide[1:3] if few else wide[3:]
        t = ((x.float() if few else x) @ a).mul_(slots[:, None, None] == wide[0])
    if few:
        return y.add_(t @ b)
    y.view(rows, -1).addmm_(t.reshape(rows, -1), b)
    return y


def _fuse(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight for several projections of the same input. The modules keep working on views of it,
    so the model is not held twice in memory."""
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def give_back_freed_memory() -> None:
    """Packing frees the unfused weights and the quantisation's temporaries, but glibc keeps freed heap pages
    (and counts them in RSS) until asked to return them."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
