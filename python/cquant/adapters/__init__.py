"""Adapters that let cquant quantize models from other frameworks.

Only PyTorch for now (:mod:`cquant.adapters.torch`). Nothing here imports torch: an object can only be
a ``torch.nn.Module`` if the caller already imported torch, so :func:`is_torch_module` looks at
``sys.modules`` and never triggers the (slow, optional) import itself.
"""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["is_torch_module", "is_torch_tensor", "quantize_torch"]


def is_torch_module(obj: Any) -> bool:
    """True if ``obj`` is a ``torch.nn.Module`` (without importing torch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    nn = getattr(torch, "nn", None)
    return nn is not None and isinstance(obj, nn.Module)


def is_torch_tensor(obj: Any) -> bool:
    """True if ``obj`` is a ``torch.Tensor`` (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def quantize_torch(quantizer: Any, model: Any, inplace: bool = True) -> Any:
    """Quantize a ``torch.nn.Module`` with the settings of a :class:`cquant.Quantizer` (fills its
    ``summary``). The hook :meth:`cquant.Quantizer.quantize` calls for torch models."""
    from .torch import quantize_module  # optional dependency: torch
    return quantize_module(model, mode=quantizer.mode, granularity=quantizer.granularity,
                           group_size=quantizer.group_size, include=quantizer.include,
                           exclude=quantizer.exclude, inplace=inplace, quantizer=quantizer,
                           bits=getattr(quantizer, "bits", 8), embeddings=getattr(quantizer, "embeddings", ()),
                           act_scales=getattr(quantizer, "act_scales", None))
