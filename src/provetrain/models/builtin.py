"""Built-in models for ``provetrain train``: an MLP, a small CNN for square images, a tiny GPT.

Each factory takes the data's facts (``input_shape``, ``num_classes``) plus its own keyword options, so
a config names a model and the data decides its input and output sizes. Options are checked before any
layer is built: a bad one raises :class:`~provetrain.data.sources.ArgumentError` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from provetrain.data.sources import ArgumentError, DataSplits, call_user_function, check_arguments

__all__ = ["BUILTIN_MODELS", "build_model", "cnn", "mlp", "tiny_gpt"]


def mlp(input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (128, 64)) -> nn.Module:
    """Flatten, then Linear+ReLU layers of the ``hidden`` widths, then a Linear to the class logits."""
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
        raise ArgumentError("hidden", f"hidden must be a list of layer widths, got {hidden!r}")
    for index, size in enumerate(hidden):
        _check_size(f"hidden[{index}]", size)
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int], num_classes: int, *, channels: int = 16) -> nn.Module:
    """Two 3x3 conv layers on a square single-channel image (a flat input of side*side is reshaped)."""
    _check_size("channels", channels)
    side = math.isqrt(math.prod(input_shape))
    if side * side != math.prod(input_shape):
        raise ValueError(f"cnn needs square single-channel images; input shape {tuple(input_shape)} is not")
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)) if len(input_shape) == 1 else nn.Identity(),
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * channels, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """A decoder-only transformer (nanoGPT's shape, pre-norm blocks) returning next-token logits."""

    def __init__(self, vocab_size: int, block_size: int, *, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        _check_size("vocab_size", vocab_size)
        _check_size("block_size", block_size)
        _check_size("width", width)
        _check_size("layers", layers, minimum=0)
        _check_size("heads", heads)
        if width % heads:
            raise ArgumentError("heads", f"width {width} must be divisible by heads {heads}")
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(block_size, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.blocks(self.token(ids) + self.position(positions))))


def tiny_gpt(
    input_shape: Sequence[int], num_classes: int, *, width: int = 64, layers: int = 2, heads: int = 4
) -> nn.Module:
    """A :class:`TinyGPT` sized from the data: vocabulary ``num_classes``, context ``input_shape[0]``."""
    if len(input_shape) != 1:
        raise ValueError(f"tiny-gpt needs token sequences (data: text); input shape {tuple(input_shape)} is not")
    return TinyGPT(num_classes, input_shape[0], width=width, layers=layers, heads=heads)


def _check_size(name: str, value: Any, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(name, f"{name} must be an integer >= {minimum}, got {value!r}")


BUILTIN_MODELS: Mapping[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "tiny-gpt": tiny_gpt}


def build_model(spec: str, data: DataSplits, arguments: Mapping[str, Any] | None = None) -> nn.Module:
    """A built-in model sized from ``data``, or ``module:function`` called with ``arguments`` as keywords."""
    arguments = dict(arguments or {})
    if spec in BUILTIN_MODELS:
        factory = BUILTIN_MODELS[spec]
        check_arguments(factory, arguments, f"model {spec!r}", supplied=("input_shape", "num_classes"))
        return factory(data.input_shape, data.num_classes, **arguments)
    model = call_user_function(spec, "model", arguments)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model function {spec!r} returned {type(model).__name__}; expected a torch.nn.Module")
    return model
