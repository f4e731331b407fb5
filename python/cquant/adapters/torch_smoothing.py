"""The torch counterparts of :class:`cquant.smoothing.Smoothed` and of cquant.bert's residual-scaled
output blocks (imports torch; used by :func:`cquant.smoothing.smooth` on torch models only)."""
from __future__ import annotations

import numpy as np
import torch

from .. import errors, ops
from ..smoothing import check_residual_scale
from .torch_base import fused_base, fused_class, hadamard_torch

__all__ = ["SmoothedTorchLinear", "ResidualScaled", "residual_block", "make_residual_scaled", "scale_residual"]


class SmoothedTorchLinear(torch.nn.Module):
    """``linear(x * inv_scale)``: a Linear (or a quantized one, after the Quantizer ran) whose input
    channels were rescaled by smoothing. ``inv_scale`` is a float32 buffer (in ``state_dict``); it stays
    float32 when the model is cast (``.half()``), the product being formed in the input's dtype.

    With a rotation (``hadamard`` = block size b > 0, from ``smooth(..., rotate=True)``) the input is
    ``x * inv_scale`` rotated by the Walsh-Hadamard transform of each block of b columns (inside the
    kernel once quantized). ``hadamard`` is an int64 buffer of shape (1,) (0: none); a state_dict
    without it (written before rotation existed) loads as 0."""

    _cquant_smoothing_wrapper = True  # what FrontEnd.unwrap (cquant.frontends) recognises
    #: as QuantizedTorchLinear.weight: code that reads ``layer.weight`` for its dtype sees None
    #: (transformers' T5 FFN), the wrapped layer's weight being scaled for the wrapper's input
    weight = None

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
        s = self.inv_scale if isinstance(x, torch.fx.Proxy) or x.dtype == torch.float32 else self.inv_scale.to(x.dtype)
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


# ---- residual-scaled output blocks (smoothing folded into a post-norm LayerNorm) -----------------

_RS_CLASSES: dict = {}


def residual_block(mod: torch.nn.Module) -> bool:
    """A transformers-style ``*Output`` block, ``LayerNorm(dropout(dense(h)) + input_tensor)``
    (children ``dense``, ``LayerNorm``, ``dropout``; ``forward(hidden_states, input_tensor)``; a torch
    LayerNorm): one that :func:`scale_residual` can make multiply its residual by a per-channel factor.
    What the forward really computes is checked by smoothing (the model output must not change)."""
    import inspect
    cls = type(mod)
    ch = dict(mod.named_children())
    if not cls.__name__.endswith("Output") or set(ch) != {"dense", "LayerNorm", "dropout"}:
        return False
    if not isinstance(ch["LayerNorm"], torch.nn.LayerNorm):
        return False
    try:
        params = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[1:] == ["hidden_states", "input_tensor"]


class ResidualScaled:
    """Mixin of the residual-scaled blocks (:func:`residual_scaled_class`): the original forward on
    ``input_tensor * residual_scale``. ``residual_scale`` is a float32 buffer (in ``state_dict``):
    smoothing divided the LayerNorm output that is this block's residual by it (the same output
    feeds the next Linears, whose weights took the factor), so the block multiplies it back. Under
    :func:`cquant.fuse` the product is formed inside the C add + LayerNorm pass instead."""

    _cquant_residual_arg = 1  # the residual is forward's second argument (cquant.smoothing's fold)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        rs = self.residual_scale
        r = input_tensor * (rs if rs.dtype == input_tensor.dtype else rs.to(input_tensor.dtype))
        return residual_base(type(self)).forward(self, hidden_states, r)

    def __reduce_ex__(self, protocol: int) -> object:
        # the class is made per original class: pickled as (original class, state)
        return (_rebuild_residual_scaled, (residual_base(type(self)), self.__dict__.copy()))

    def _apply(self, fn, recurse=True):  # .half() / .to(dtype): the factor stays float32
        keep = self.residual_scale
        out = super()._apply(fn, recurse)
        if self.residual_scale.dtype != torch.float32:
            self.residual_scale = keep.to(device=self.residual_scale.device)
        return out


def residual_base(cls: type) -> type:
    """The original block class of a residual-scaled (possibly also fused) class."""
    mro = cls.__mro__
    return mro[mro.index(ResidualScaled) + 1]


def residual_scaled_class(base: type) -> type:
    cls = _RS_CLASSES.get(base)
    if cls is None:
        name = f"ResidualScaled{base.__name__}"  # still ends with "Output" (cquant.fuse recognises it)
        cls = type(name, (ResidualScaled, base), {"__module__": __name__, "__qualname__": name})
        _RS_CLASSES[base] = cls
    return cls


def _rebuild_residual_scaled(base: type, state: dict) -> torch.nn.Module:
    obj = object.__new__(residual_scaled_class(base))
    obj.__dict__.update(state)
    return obj


def make_residual_scaled(mod: torch.nn.Module, scale: np.ndarray) -> None:
    """Give output block ``mod`` (:func:`residual_block`) a ``residual_scale`` buffer (float32, its
    hidden size), swapping its class for the residual-scaled subclass of it (of its original class,
    fused again, for a block :func:`cquant.fuse` already fused: the factor is applied once)."""
    check_residual_scale(np.asarray(scale, dtype=np.float32), "residual_scale")
    cls = type(mod)
    if not isinstance(mod, ResidualScaled):
        if getattr(cls, "_cquant_fused", False):
            mod.__class__ = fused_class(residual_scaled_class(fused_base(cls)), cls.__mro__[1])
        else:
            mod.__class__ = residual_scaled_class(cls)
    mod.register_buffer("residual_scale", torch.from_numpy(np.array(scale, dtype=np.float32)))


def residual_scales_in(model: torch.nn.Module, tensors: Any) -> dict:
    """``{key: block}`` for the ``<name>.residual_scale`` entries of checkpoint ``tensors`` whose
    block in ``model`` is an output block (:func:`residual_block`) without a factor yet, each value
    checked (shape, finite, > 0). Nothing is changed; :func:`make_residual_scaled` installs them."""
    subs = dict(model.named_modules())
    out = {}
    for key in tensors:
        blk = subs.get(key[: -len(".residual_scale")]) if key.endswith(".residual_scale") else None
        if blk is None or isinstance(blk, ResidualScaled) or not residual_block(blk):
            continue
        a = check_residual_scale(tensors[key], key)
        width = int(blk.LayerNorm.normalized_shape[-1])
        if a.shape != (width,):
            raise errors.ValueError(f"checkpoint tensor {key!r} has shape {tuple(a.shape)}, expected ({width},)")
        out[key] = blk
    return out


def scale_residual(mod: torch.nn.Module, s: np.ndarray):
    """Multiply ``mod``'s residual by ``s`` too (a residual-scaled block from then on); returns a
    function that undoes it."""
    cls = type(mod)
    old = mod._buffers.get("residual_scale") if isinstance(mod, ResidualScaled) else None
    new = s if old is None else old.numpy() * s
    make_residual_scaled(mod, new)

    def undo() -> None:
        if old is None:
            del mod._buffers["residual_scale"]
            mod.__class__ = cls
        else:
            mod.register_buffer("residual_scale", old)
    return undo
