"""The torch counterpart of :class:`cquant.smoothing.Smoothed` (imports torch; used by
:func:`cquant.smoothing.smooth` on torch models only)."""
from __future__ import annotations

import numpy as np
import torch

from .. import errors, ops
from .torch_base import hadamard_torch

__all__ = ["SmoothedTorchLinear"]


class SmoothedTorchLinear(torch.nn.Module):
    """``linear(x * inv_scale)``: a Linear (or a quantized one, after the Quantizer ran) whose input
    channels were rescaled by smoothing. ``inv_scale`` is a float32 buffer (in ``state_dict``); it stays
    float32 when the model is cast (``.half()``), the product being formed in the input's dtype.

    With a rotation (``hadamard`` = block size b > 0, from ``smooth(..., rotate=True)``) the input is
    ``x * inv_scale`` rotated by the Walsh-Hadamard transform of each block of b columns (inside the
    kernel once quantized). ``hadamard`` is an int64 buffer of shape (1,) (0: none); a state_dict
    without it (written before rotation existed) loads as 0."""

    _cquant_smoothing_wrapper = True  # what FrontEnd.unwrap (cquant.frontends) recognises

    def __init__(self, linear: torch.nn.Module, inv_scale: np.ndarray, hadamard: int = 0):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", torch.from_numpy(np.array(inv_scale, dtype=np.float32)))
        self.block = self._check(int(hadamard))
        self.register_buffer("hadamard", torch.tensor([self.block], dtype=torch.int64))

    def _check(self, b: int, what: str = "hadamard") -> int:
        return ops.hadamard_block(b, self.inv_scale.numel(), what, allow_zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        if getattr(type(self.linear), "_cquant_x_mul", False) is True:  # quantized: inside the kernel
            return self.linear(x, x_mul=self.inv_scale, x_hadamard=b) if b else self.linear(x, x_mul=self.inv_scale)
        s = self.inv_scale if x.dtype == torch.float32 else self.inv_scale.to(x.dtype)
        return self.linear(hadamard_torch(x * s, b) if b else x * s)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "hadamard"
        if key not in state_dict:  # written before rotation existed (torch passes a copy of the dict)
            state_dict[key] = torch.zeros(1, dtype=torch.int64)
        else:
            v = state_dict[key]
            if not isinstance(v, torch.Tensor) or v.shape != (1,) or v.dtype.is_floating_point:
                raise errors.ValueError(f"{key} must be one integer, got {v!r}")
            self._check(int(v[0]), key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.block = int(self.hadamard[0])

    def _apply(self, fn, recurse=True):  # .half() / .to(dtype): the pre-scale stays float32
        keep = self.inv_scale
        out = super()._apply(fn, recurse)
        if self.inv_scale.dtype != torch.float32:  # the float32 values, not their rounded copy
            self.inv_scale = keep.to(device=self.inv_scale.device)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.inv_scale.numel()}" + (f", hadamard={self.block}" if self.block else "")
