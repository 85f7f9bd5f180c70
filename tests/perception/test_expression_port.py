"""The torch mini-Xception must compute what the Keras graph in fer's hdf5 file computes.

The reference here is an independent numpy walk of that graph, driven by the file's own `model_config`
(layer types, padding, strides, inbound edges) and weights, written without the module under test.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from npc_server.perception.expression import EMBEDDING_DIM, load_mini_xception, to_input, weights_path
from npc_server.perception.types import EMOTIONS


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: str, fill: float):
    """Yield (i, j, shifted view) for each kernel tap over an NHWC tensor: out[n, y, x] sees x[n, y*s+i, x*s+j]."""
    (kh, kw), (sh, sw) = kernel, stride
    _, h, w, _ = x.shape
    if padding == "same":
        (t, b), (left, r) = _same_pads(h, kh, sh), _same_pads(w, kw, sw)
        x = np.pad(x, ((0, 0), (t, b), (left, r), (0, 0)), constant_values=fill)
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]


def keras_walk(path, images: np.ndarray) -> dict[str, np.ndarray]:
    """images: (N, 64, 64, 1) float64 -> every layer's output by layer name."""
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])["config"]
        weights = {}
        for name in f["model_weights"]:
            group = f["model_weights"][name]
            arrays: dict[str, np.ndarray] = {}
            group.visititems(
                lambda key, obj, arrays=arrays: (
                    arrays.__setitem__(key.split("/")[-1].split(":")[0], obj[()])
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
            weights[name] = {k: v.astype(np.float64) for k, v in arrays.items()}
    out: dict[str, np.ndarray] = {}
    for layer in config["layers"]:
        kind, cfg, name = layer["class_name"], layer["config"], layer["config"]["name"]
        inputs = [out[edge[0]] for node in layer["inbound_nodes"] for edge in node]
        w = weights.get(name, {})
        if kind == "InputLayer":
            y = images
        elif kind == "Conv2D":
            x = inputs[0]
            k = w["kernel"]
            y = sum(
                np.einsum("nhwc,co->nhwo", v, k[i, j])
                for i, j, v in _windows(x, cfg["kernel_size"], cfg["strides"], cfg["padding"], 0.0)
            )
            if cfg["use_bias"]:
                y = y + w["bias"]
        elif kind == "SeparableConv2D":
            x = inputs[0]
            dk = w["depthwise_kernel"]
            depth = sum(
                v * dk[i, j, :, 0] for i, j, v in _windows(x, cfg["kernel_size"], cfg["strides"], cfg["padding"], 0.0)
            )
            y = np.einsum("nhwc,co->nhwo", depth, w["pointwise_kernel"][0, 0])
        elif kind == "BatchNormalization":
            y = (inputs[0] - w["moving_mean"]) / np.sqrt(w["moving_variance"] + cfg["epsilon"]) * w["gamma"] + w["beta"]
        elif kind == "Activation" and cfg["activation"] == "relu":
            y = np.maximum(inputs[0], 0.0)
        elif kind == "Activation" and cfg["activation"] == "softmax":
            e = np.exp(inputs[0] - inputs[0].max(axis=-1, keepdims=True))
            y = e / e.sum(axis=-1, keepdims=True)
        elif kind == "MaxPooling2D":
            y = np.max(
                np.stack(
                    [v for _, _, v in _windows(inputs[0], cfg["pool_size"], cfg["strides"], cfg["padding"], -np.inf)]
                ),
                axis=0,
            )
        elif kind == "Add":
            y = sum(inputs)
        elif kind == "GlobalAveragePooling2D":
            y = inputs[0].mean(axis=(1, 2))
        else:  # pragma: no cover - the file holds nothing else
            raise AssertionError(f"unexpected layer {kind}")
        out[name] = y
    return out


@pytest.fixture(scope="module")
def model():
    return load_mini_xception()


def test_port_matches_numpy_walk_of_keras_graph(model) -> None:
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
    grey[2] = np.clip(np.linspace(0, 255, 64)[None, :] + rng.normal(0, 20, (64, 64)), 0, 255).astype(np.uint8)
    x = to_input(grey)
    with torch.inference_mode():
        logits, embedding = model(x)
    probs = torch.softmax(logits, dim=1).numpy()

    ref = keras_walk(weights_path(), x.numpy().astype(np.float64).transpose(0, 2, 3, 1))
    assert ref["predictions"].shape == (3, len(EMOTIONS))
    np.testing.assert_allclose(probs, ref["predictions"], atol=1e-5, rtol=0)
    last_block = ref["add_4"]  # (N, 4, 4, 128): what the embedding pools
    assert last_block.shape[1:] == (4, 4, EMBEDDING_DIM)
    np.testing.assert_allclose(embedding.numpy(), last_block.mean(axis=(1, 2)), atol=1e-4, rtol=1e-5)


def test_output_shapes_and_batch_independence(model) -> None:
    x = to_input(np.full((2, 64, 64), 128, dtype=np.uint8))
    with torch.inference_mode():
        logits, embedding = model(x)
        one, _ = model(x[:1])
    assert logits.shape == (2, len(EMOTIONS)) and embedding.shape == (2, EMBEDDING_DIM)
    torch.testing.assert_close(one[0], logits[0])
