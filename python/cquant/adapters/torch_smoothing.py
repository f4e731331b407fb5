"""The torch counterpart of :class:`cquant.smoothing.Smoothed` (imports torch; used by
:func:`cquant.smoothing.smooth` on torch models only)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["SmoothedTorchLinear"]


class SmoothedTorchLinear(torch.nn.Module):
    """``linear(x * inv_scale)``: a Linear (or a quantized one, after the Quantizer ran) whose input
    channels were rescaled by smoothing. ``inv_scale`` is a float32 buffer (in ``state_dict``); it stays
    float32 when the model is cast (``.half()``), the product being formed in the input's dtype."""

    def __init__(self, linear: torch.nn.Module, inv_scale: np.ndarray):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", torch.from_numpy(np.array(inv_scale, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(type(self.linear), "_cquant_x_mul", False) is True:  # quantized: inside the kernel
            return self.linear(x, x_mul=self.inv_scale)
        s = self.inv_scale if x.dtype == torch.float32 else self.inv_scale.to(x.dtype)
        return self.linear(x * s)

    def _apply(self, fn, recurse=True):  # .half() / .to(dtype): the pre-scale stays float32
        keep = self.inv_scale
        out = super()._apply(fn, recurse)
        if self.inv_scale.dtype != torch.float32:  # the float32 values, not their rounded copy
            self.inv_scale = keep.to(device=self.inv_scale.device)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.inv_scale.numel()}"
