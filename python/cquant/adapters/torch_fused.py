"""Fused transformer blocks for quantized torch models: :func:`fuse` (imports torch).

After :func:`cquant.Quantizer.quantize_dynamic` a transformers BERT-family model runs cquant's int8
linears, but everything between them (residual add + LayerNorm, GELU, attention softmax) is still
torch float32, about half of the encode time of all-MiniLM-L6-v2. ``fuse(model)`` swaps the blocks
around the quantized linears for modules that run those parts on cquant's C kernels too, in the
linear's output buffer (no extra tensor per op):

- ``*SelfOutput`` / ``*Output`` (``dense`` -> ``dropout`` -> ``LayerNorm(h + input)``):
  :func:`cquant.ops.add_layer_norm` over the linear's output, in place;
- ``*Intermediate`` (``dense`` -> exact GELU): the GELU inside the linear's kernel
  (``cquant.ops.linear(..., activation="gelu")``);
- ``*SelfAttention`` of transformers 5 (query / key / value, bidirectional, no cache):
  :func:`cquant.ops.attention` on the (B, T, H) projections, the padding mask as a key bias.

Each fused module is the original one with its class swapped for a subclass of it (the same
children, parameters, buffers and ``state_dict`` keys; a fused module pickles and deep-copies).
Outside the fast path (training mode, tracing / export / compile, a dtype other than float32, a
device other than the CPU, a mask or argument the fast path does not take) it runs the original
forward, unchanged. Under autograd the output joins the graph and refuses backward, as the
quantized linears do (a quantized model is for inference). Numerics: the C LayerNorm, GELU and
softmax are float32 like torch's but not bit-identical to them (a few ulps; the tests bound it).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import errors, ops
from ..quantization import linear_shared
from .torch_base import _NoBackward, _graph_mode, fused_base, fused_class
from .torch_smoothing import ResidualScaled, residual_base, residual_scaled_class

__all__ = ["fuse", "FusedOutput", "FusedIntermediate", "FusedSelfAttention"]

logger = logging.getLogger("cquant")


def _quantized_linear(mod: Any) -> bool:
    """A quantized linear (or one inside a smoothing pre-scale wrapper) the fast path can call."""
    if getattr(type(mod), "_cquant_smoothing_wrapper", False):
        mod = getattr(mod, "linear", None)
    return type(mod).__name__ == "QuantizedTorchLinear" and getattr(mod, "qforward", None) is not None


def _hooked(*mods: Any) -> bool:
    """Forward hooks anywhere they would fire on these linears (the fast path would skip them:
    then the original forward runs, so that calibration and user hooks see every call)."""
    from torch.nn.modules import module as _m
    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    for mod in mods:
        for m in (mod, getattr(mod, "linear", None)):
            if m is not None and (m._forward_hooks or m._forward_pre_hooks):
                return True
    return False


def _fast(x: Any) -> bool:
    """x can take the numpy fast path: a float32 CPU tensor, not traced, exported or compiled."""
    return (type(x) is torch.Tensor and x.dtype == torch.float32 and x.device.type == "cpu"
            and not _graph_mode(x))


def _out(y: np.ndarray, *inputs: "torch.Tensor") -> "torch.Tensor":
    """y as a tensor; joined to the inputs' autograd graph (refusing backward, as the quantized
    linears do) when one of them requires grad."""
    t = torch.from_numpy(y)
    if torch.is_grad_enabled():
        return _NoBackward.apply(next((x for x in inputs if x.requires_grad), inputs[0]), t)
    return t


def _np(x: "torch.Tensor") -> np.ndarray:
    return (x if x.is_contiguous() else x.contiguous()).detach().numpy()


def _linear_np(lin: Any, x: np.ndarray, activation: Any = None) -> np.ndarray:
    """The quantized linear's numpy forward (a fresh float32 array); a smoothing wrapper's 1/s
    goes into the kernel (x_mul), as the wrapper itself does; ``activation`` ("gelu", or an
    :class:`cquant.ops.AddLayerNorm`) too."""
    if getattr(type(lin), "_cquant_smoothing_wrapper", False):
        return lin.linear.qforward(x, x_mul=lin.inv_scale.detach().numpy(), x_hadamard=lin.block,
                                   activation=activation)
    return lin.qforward(x, activation=activation)


def _linears_np(lins: Any, x: np.ndarray) -> List[np.ndarray]:
    """The numpy forwards of linears that read the same x (query, key, value), with one activation
    pass (:func:`cquant.quantization.linear_shared`) where they can share it, else one by one.
    Bit-identical either way."""
    parts = [(lin.linear.qforward, lin.inv_scale.detach().numpy(), lin.block)
             if getattr(type(lin), "_cquant_smoothing_wrapper", False) else (lin.qforward, None, 0) for lin in lins]
    ys = linear_shared(parts, x)
    return ys if ys is not None else [_linear_np(lin, x) for lin in lins]


class _Fused:
    """Mixin of the fused classes: ``_hf_forward`` is the original class's forward."""

    _cquant_fused = True

    def _hf_forward(self, *args: Any, **kwargs: Any) -> Any:
        return _base_of(type(self)).forward(self, *args, **kwargs)

    def __reduce_ex__(self, protocol: int) -> Any:
        # the fused class is made per original class: pickled as (original class, fused kind, state,
        # whether it is residual-scaled: that class is made per original class too)
        base = _base_of(type(self))
        rs = issubclass(base, ResidualScaled)
        return (_rebuild, (residual_base(base) if rs else base, type(self).__mro__[1], self.__dict__.copy(), rs))


_base_of = fused_base  # the original (transformers) class a fused class was made from


def _rebuild(base: type, kind: type, state: Dict[str, Any], rs: bool = False) -> Any:
    obj = object.__new__(_fused_class(residual_scaled_class(base) if rs else base, kind))
    obj.__dict__.update(state)
    return obj


class FusedOutput(_Fused):
    """``LayerNorm(dropout(dense(h)) + input)`` with the add and LayerNorm in one C pass per row,
    written over the linear's output (a residual-scaled block's ``input * residual_scale`` formed in
    the same pass)."""

    def forward(self, hidden_states: Any, input_tensor: Any) -> Any:
        if self.training or not (_fast(hidden_states) and _fast(input_tensor)) \
                or input_tensor.shape[:-1] != hidden_states.shape[:-1] or _hooked(self.dense):
            return self._hf_forward(hidden_states, input_tensor)
        ln, dense = self.LayerNorm, self.dense
        qf = dense.linear.qforward if getattr(type(dense), "_cquant_smoothing_wrapper", False) else dense.qforward
        if tuple(hidden_states.shape[:-1]) + (int(qf.qweight.shape[0]),) != tuple(input_tensor.shape):
            return self._hf_forward(hidden_states, input_tensor)
        rs = self._buffers.get("residual_scale") if isinstance(self, ResidualScaled) else None
        # the add + LayerNorm inside the kernel, on each block of rows it finishes (cq_linear_add_ln)
        post = ops.AddLayerNorm(_np(input_tensor), ln.weight.detach().numpy(), ln.bias.detach().numpy(),
                                float(ln.eps), None if rs is None else rs.detach().numpy())
        return _out(_linear_np(dense, _np(hidden_states), post), hidden_states, input_tensor)


class FusedIntermediate(_Fused):
    """``gelu(dense(h))``, the exact (erf) GELU on each block of the linear's output inside the
    kernel (``cquant.ops.linear(..., activation="gelu")``: no second pass)."""

    def forward(self, hidden_states: Any) -> Any:
        if self.training or not _fast(hidden_states) or _hooked(self.dense):
            return self._hf_forward(hidden_states)
        return _out(_linear_np(self.dense, _np(hidden_states), "gelu"), hidden_states)


def _key_bias(mask: Any, b: int, t: int) -> Tuple[bool, Optional[np.ndarray]]:
    """(ok, (B, T) additive key bias or None) from a transformers attention mask: None (no
    padding), a (B, 1, T, T) / (B, 1, 1, T) bool mask (sdpa: True = attend) or float32 additive
    mask (eager: 0 or a large negative number) whose rows are all the same key mask. ok False: a
    mask the fast path does not take (causal, per-query, other dtypes or shapes), or a bool mask
    with a sequence whose keys are all masked: torch's sdpa gives that sequence a zero context
    (torch >= 2.5; NaN before), where an additive mask gives every key the same weight, so such a
    call runs the original forward, whatever its torch version does."""
    if mask is None:
        return True, None
    if (type(mask) is not torch.Tensor or mask.dtype not in (torch.bool, torch.float32)
            or tuple(mask.shape) not in ((b, 1, t, t), (b, 1, 1, t))):
        return False, None
    keys = mask[:, 0, :1, :]
    if mask.shape[2] > 1 and not bool((mask[:, 0] == keys).all()):
        return False, None
    keys = keys[:, 0].numpy()
    if mask.dtype == torch.float32:
        if not np.isfinite(keys).all() and not (np.isfinite(keys) | (keys == -np.inf)).all():
            return False, None
        return True, np.ascontiguousarray(keys, dtype=np.float32)
    if not keys.any(axis=-1).all():
        return False, None
    bias = np.where(keys, np.float32(0.0), np.finfo(np.float32).min).astype(np.float32)
    return True, bias


class FusedSelfAttention(_Fused):
    """Bidirectional self-attention: q, k, v by the quantized linears, then one C call
    (:func:`cquant.ops.attention`) for softmax(q k^T * scaling + key mask) v on every head."""

    def forward(self, hidden_states: Any, attention_mask: Any = None, cache: Any = None, **kwargs: Any) -> Any:
        extra = {k for k, v in kwargs.items() if v is not None} - {"position_ids", "encoder_hidden_states"}
        if (self.training or cache is not None or kwargs.get("encoder_hidden_states") is not None or extra
                or getattr(self, "is_decoder", False) or getattr(self, "is_causal", False)
                or not _fast(hidden_states) or hidden_states.dim() != 3
                or _hooked(self.query, self.key, self.value)):
            return self._hf_forward(hidden_states, attention_mask=attention_mask, cache=cache, **kwargs)
        b, t, _ = hidden_states.shape
        ok, bias = _key_bias(attention_mask, b, t)
        if not ok:
            return self._hf_forward(hidden_states, attention_mask=attention_mask, cache=cache, **kwargs)
        x = _np(hidden_states)
        q, k, v = _linears_np((self.query, self.key, self.value), x)  # one activation pass
        ctx = ops.attention(q, k, v, int(self.num_attention_heads), bias, scale=float(self.scaling))
        return _out(ctx, hidden_states), None


_fused_class = fused_class


def _children(mod: "torch.nn.Module") -> Dict[str, "torch.nn.Module"]:
    return dict(mod.named_children())


def _kind(mod: "torch.nn.Module") -> Tuple[Optional[type], str]:
    """The fused kind a transformers block can take, or (None, why not)."""
    name = type(mod).__name__
    ch = _children(mod)
    if name.endswith("Output") and set(ch) == {"dense", "LayerNorm", "dropout"}:
        ln = ch["LayerNorm"]
        if not _quantized_linear(ch["dense"]):
            return None, "its dense layer is not quantized"
        if (type(ln) is not torch.nn.LayerNorm or len(ln.normalized_shape) != 1 or ln.weight is None
                or ln.bias is None or ln.weight.dtype != torch.float32):
            return None, "its LayerNorm is not a float32 affine LayerNorm over the last axis"
        if list(inspect.signature(type(mod).forward).parameters)[1:] != ["hidden_states", "input_tensor"]:
            return None, "unknown forward signature"
        return FusedOutput, ""
    if name.endswith("Intermediate") and set(ch) == {"dense", "intermediate_act_fn"}:
        act = ch["intermediate_act_fn"]
        exact = (type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu) \
            or (type(act) is torch.nn.GELU and act.approximate == "none")
        if not _quantized_linear(ch["dense"]):
            return None, "its dense layer is not quantized"
        if not exact:
            return None, f"activation {type(act).__name__} is not the exact GELU"
        return FusedIntermediate, ""
    if name.endswith("SelfAttention") and {"query", "key", "value"} <= set(ch):
        if not all(_quantized_linear(ch[n]) for n in ("query", "key", "value")):
            return None, "its projections are not all quantized"
        params = list(inspect.signature(type(mod).forward).parameters)
        if params[1:4] != ["hidden_states", "attention_mask", "cache"]:
            return None, "not the transformers 5 self-attention signature"
        if not all(hasattr(mod, a) for a in ("num_attention_heads", "scaling")):
            return None, "no num_attention_heads / scaling"
        cfg = getattr(mod, "config", None)
        if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
            return None, "relative position embeddings"
        return FusedSelfAttention, ""
    return None, ""


def _probe(mod: "torch.nn.Module", kind: type) -> str:
    """Run the original forward and the fused one on the same small random input; '' if they
    agree (the linears see identical inputs, so only LayerNorm / GELU / softmax rounding may
    differ), else why not. Structure and names alone cannot tell a block whose forward does
    something else with the same children (X-MOD's SelfOutput has a LayerNorm it does not apply)."""
    g = torch.Generator().manual_seed(0)
    ch = _children(mod)
    first = ch["query"] if kind is FusedSelfAttention else ch["dense"]
    first = getattr(first, "linear", first)
    k = int(first.in_features)
    x = torch.randn(2, 5, k, generator=g)
    args: Tuple[Any, ...] = (x,)
    if kind is FusedOutput:
        args = (x, torch.randn(2, 5, int(first.out_features), generator=g))
    base = type(mod)
    try:
        with torch.inference_mode():
            want = base.forward(mod, *args)
            mod.__class__ = _fused_class(base, kind)
            try:
                got = mod.forward(*args)
            finally:
                mod.__class__ = base
    except Exception as e:  # noqa: BLE001 - a block the fast path cannot run is simply not fused
        return f"probe failed: {type(e).__name__}: {e}"
    if kind is FusedSelfAttention:
        want, got = want[0], got[0]
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return "its forward returns something else"
    err = float((want - got).abs().max())
    scale = float(want.abs().max()) + 1e-30
    if not err <= 1e-4 * scale:
        return f"its forward differs from the fused computation (max |diff| {err:.3g} of {scale:.3g})"
    return ""


def fuse(model: "torch.nn.Module") -> List[str]:
    """Swap the BERT-family blocks of a quantized torch model (``*SelfOutput`` / ``*Output``,
    ``*Intermediate``, ``*SelfAttention``) for fused ones running on cquant's C kernels (see the
    module docstring). In place; returns the names of the fused modules. A candidate block is
    checked first: its original forward and the fused one must agree on a random input (else it is
    left as it is, logged with the reason, as is a block whose linears are not quantized)."""
    if not isinstance(model, torch.nn.Module):
        raise errors.TypeError(f"cquant.fuse expects a torch.nn.Module, got {type(model).__name__}")
    done: List[str] = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, _Fused):
            done.append(name)
            continue
        kind, why = _kind(mod)
        if kind is not None:
            why = _probe(mod, kind)
        if kind is None or why:
            if why:
                logger.info("fuse: %s (%s) left as it is: %s", name, type(mod).__name__, why)
            continue
        mod.__class__ = _fused_class(type(mod), kind)
        done.append(name)
    return done
