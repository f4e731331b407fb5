"""Post-training dynamic / weight-only int8 quantization of the Linear layers of a model.

Entry points::

    from cquant import Quantizer
    qmodel = Quantizer.quantize_dynamic(model, mode="dynamic", granularity="per_channel")

    q = Quantizer(mode="weight_only", granularity="per_group", group_size=64, exclude=["head"])
    qmodel = q.quantize(model, inplace=False)
    for rec in q.summary: ...                 # one LayerRecord per layer-like object seen
    print(format_report(report(qmodel)))      # what the quantized model holds, measured

Schemes
-------
``mode``/``granularity``/``group_size`` build the default :class:`cquant.scheme.QuantScheme`;
``scheme=`` takes one scheme or a mapping name/glob/class -> scheme (``None``: keep that layer in
float), see :mod:`cquant.scheme`. A layer whose K does not fit the group size gets per_channel with
the reason in its record (``strict=True``: an error instead). ``quantize_dynamic(model,
calibration=batches, smoothing=0.5)`` calibrates and smooths (:mod:`cquant.smoothing`) first;
``min_cosine=0.999`` (with ``calibration``) adds the accuracy budget (:mod:`cquant.budget`): the
fewest, most sensitive layers are kept in float (or moved to a finer scheme) so that the model output
on the calibration batches keeps that mean cosine; ``Quantizer.budget`` says what was chosen.

What is walked
--------------
``model`` may be a :mod:`cquant.nn` module tree or a duck-typed tree of plain Python objects. The
walk follows registered sub-modules and the other attributes of :class:`cquant.nn.Module` objects,
the attributes of plain objects (``vars()``, and ``__slots__``), and the items of lists, tuples and
dicts. Each object is visited once (cycles and shared sub-trees are safe: objects are tracked by
``id``). Layer paths are dotted: attribute names, list indices and dict keys, e.g.
``encoder.layer.0.attention.query``.

Static activations
------------------
``mode="static"`` (or a scheme with ``activations="static"``, e.g. ``"static per_channel"``) needs
``calibration=`` batches: the float model runs on them (again after smoothing, so a layer sees its
smoothed input, ``x * (1/s)`` inside a pre-scale wrapper) and each layer stores ``act_scale`` =
``max|x| / 127`` over every row of every batch (float32; :attr:`Quantizer.act_scales`). At run time
every row is quantized with that scale (codes clamped to [-127, 127]) instead of its own
``max|row| / 127``: no per-row max pass, but inputs larger than anything seen in calibration clip
and small rows get few codes, so it is usually less accurate than dynamic. Per-channel activation
ranges are evened out by smoothing (``smoothing=``: ``1/s`` folded into the preceding LayerNorm /
Linear where exact), which is how static works per channel. A selected layer the batches never
reached gets dynamic activations instead, the reason in its record (``strict=True``: an error
listing those layers). The scale travels with the layer: ``state_dict`` (``<name>.act_scale``),
checkpoints (:func:`cquant.save`), pickling, the torch adapter (a buffer) and its traced op.

Which layers are quantized (the recognition rule)
-------------------------------------------------
An object is a Linear layer when

1. it is a :class:`cquant.nn.Linear`, **or** its class name ends in ``"Linear"``, **or** it has both
   ``in_features`` and ``out_features`` attributes; and
2. it has a ``weight`` that is a 2-D floating-point numpy array, of shape
   ``(out_features, in_features)`` when those attributes exist (``y = x @ weight.T + bias``); and
3. it has a ``forward`` method or is callable; ``bias``, if present and not None, is a 1-D array of
   ``out_features`` values.

Never quantized as Linear layers, whatever ``include`` says: objects whose class name names an
embedding, a convolution or a normalization (``Embedding``, ``Conv*``/``Convolution``, ``*Norm``, e.g.
``LayerNorm``, ``RMSNorm``, GPT-2's transposed ``Conv1D``), and weights that are not 2-D (embedding
tables have their own opt-in, ``embeddings=``: see "Embedding tables" below).

``include`` / ``exclude`` are layer names or :func:`fnmatch.fnmatchcase` glob patterns matched
against the full dotted path (``"encoder.layer.0.attention.query"``, ``"*.query"``, ``"encoder.*"``;
``*`` also matches dots). When ``include`` is given, only layers matching it are quantized, and a
layer it names that the rule misses is taken if it has a 2-D floating ``weight`` and a ``forward``
(or ``__call__``); its layout is assumed to be ``(out, in)``. ``exclude`` wins over ``include``.

What quantizing a layer does
----------------------------
- All selected layers are checked first (finite weights and biases, then every weight quantized);
  a NaN/Inf weight raises :class:`cquant.errors.NonFiniteError` naming the layer and a bad
  ``group_size`` for a layer raises ``ValueError`` naming it — in both cases before the model is
  touched. Only then are layers replaced; should a replacement fail (say, a class whose
  ``__setattr__`` refuses), the changes already made are undone before the error propagates. Peak
  memory is therefore the float model plus its int8 copy.
- A :class:`cquant.nn.Linear` is replaced in its parent by a :class:`QuantizedLinear` module (same
  name, ``in_features``/``out_features``, ``bias``, ``qweight``). Any other layer (duck-typed, or a
  ``cquant.nn.Linear`` with no parent or held in a tuple) is converted in place:
  ``obj.forward = QuantizedLinearForward(...)``, ``obj.weight = None`` (the float32 array is
  released), and if its class defines ``__call__`` the object is given a subclass whose ``__call__``
  is ``self.forward`` (pickling and deep copies still rebuild it from the original class).
- Weights shared by several layers (the same ndarray object) are quantized once and the
  :class:`~cquant.ops.QuantizedWeight` is shared.
- A layer that is already quantized is skipped, so quantizing twice is harmless.
- ``inplace=False`` deep-copies the model first and leaves the original untouched.

Embedding tables (opt-in)
-------------------------
``embeddings=True`` (``Quantizer(..., embeddings=True)`` or ``quantize_dynamic(model,
embeddings=True)``; or names / globs of the tables, e.g. ``embeddings="*word_embeddings"``) also
stores embedding tables as int8 rows with one float32 scale each (:mod:`cquant.embedding`): a
:class:`cquant.nn.Embedding` becomes a :class:`cquant.embedding.QuantizedEmbedding`, a
``torch.nn.Embedding`` a ``QuantizedTorchEmbedding`` (:mod:`cquant.adapters.torch`). The default
(``False``) keeps every table in float. ``exclude`` applies to tables too; ``include`` and ``scheme``
select Linear layers only. Duck-typed trees (the ``"objects"`` front-end, a root that is not a
:class:`cquant.nn.Module`) have no embedding protocol: their tables are skipped, with that reason.
Tables whose class overrides ``forward`` (or a torch ``max_norm``) are skipped, with the reason.

Ties: a table whose weight is the very array (torch: Parameter) of a Linear being quantized
(GPT-2's ``lm_head.weight`` is ``wte.weight``) is quantized once: per-row int8 codes of the
``(vocab, dim)`` table are the per_channel int8 codes of the ``(out, in)`` Linear weight, whatever the
mode, so the table reads the Linear's :class:`~cquant.ops.QuantizedWeight` (measured bytes count it
once, a checkpoint stores it once). When that Linear gets another scheme (per_group, per_tensor,
int4: different codes), or stays float, the table is skipped with that reason instead of being
stored twice.

Every layer-like object seen (anything with a ``weight``, or a Linear by name) gets a
:class:`LayerRecord` in ``Quantizer.summary`` saying whether it was quantized or why it was skipped;
a one-line summary (and the skips, grouped by reason) goes to the ``"cquant"`` logger at INFO level.
"""
from __future__ import annotations

import copy
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import budget as _budget
from . import calibration as _calibration
from . import frontends as _frontends
from . import adapters, errors, nn, ops
from . import smoothing as _smoothing
from .frontends import (  # noqa: F401  (the walk and the recognition rule; io.py imports _walk from here)
    ReportRow, Patterns, _as_patterns, _check_layer, _children, _descendable, _display, _get, _has_forward,
    _looks_like_layer, _match, _never_reason, match_layer, _Site, _slot_names, _walk,
)
from .embedding import EMBEDDING_SCHEME, QuantizedEmbedding, can_share, resolve_ties
from .scheme import QuantScheme
from .scheme import normalize as _normalize_scheme
from .scheme import resolve as _resolve_scheme

__all__ = [
    "Quantizer", "QuantizedLinear", "QuantizedLinearForward", "LayerRecord", "ReportRow",
    "report", "format_report", "model_nbytes", "MODES", "GRANULARITIES",
]

logger = logging.getLogger("cquant")

MODES = ("dynamic", "weight_only", "static")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")

# --------------------------------------------------------------------------------------------------
# Quantized layers
# --------------------------------------------------------------------------------------------------

def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise errors.ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_act_scale(mode: str, act_scale: Any) -> Optional[float]:
    """The activation scale of a ``"static"`` layer as a Python float holding a float32 value
    (finite, > 0); None for the other modes (which take none)."""
    if mode != "static":
        if act_scale is not None:
            raise errors.ValueError(f"act_scale is only used with mode='static' (got mode={mode!r})")
        return None
    if act_scale is None:
        raise errors.ValueError("mode='static' needs act_scale, the calibrated activation scale (a float32 "
                                "> 0; cquant.calibrate(...).static_scale(name), or let the Quantizer "
                                "calibrate: quantize_dynamic(model, mode='static', calibration=batches))")
    a = np.asarray(act_scale)
    if a.size != 1 or a.dtype.kind not in "fiu":
        raise errors.TypeError(f"act_scale must be one real number, got {type(act_scale).__name__} "
                               f"{getattr(a, 'dtype', '')} of shape {a.shape}")
    with np.errstate(over="ignore"):
        v = np.float32(a.reshape(()))
    if not (np.isfinite(v) and v > 0):
        raise errors.ValueError(f"act_scale must be a finite float32 > 0, got {act_scale!r}")
    return float(v)


def _check_bias(bias: Optional[np.ndarray], out_features: int) -> Optional[np.ndarray]:
    if bias is None:
        return None
    b = np.asarray(bias)
    if b.dtype.kind != "f":
        raise errors.TypeError(f"bias must be floating-point, got dtype {b.dtype}")
    if b.shape != (out_features,):
        raise errors.ShapeError(f"bias shape {b.shape} is not (out_features,) = ({out_features},)")
    out = np.ascontiguousarray(b, dtype=np.float32)
    if not np.isfinite(out).all():  # (after the cast: a float64 1e300 is Inf in float32)
        raise errors.NonFiniteError("bias holds NaN, Inf or values beyond float32's range")
    return out


def _pickled_weight(state: Any, what: str) -> ops.QuantizedWeight:
    """The QuantizedWeight of a quantized layer's pickled state (``__setstate__``), or a ValueError:
    a pickle is data from elsewhere, so the layer is checked as its constructor checks it."""
    qw = state.get("qweight") if isinstance(state, dict) else None
    if not isinstance(qw, ops.QuantizedWeight):
        raise errors.ValueError(f"not a pickled {what}: its state must hold a QuantizedWeight 'qweight'")
    return qw


def _scheme(mode: str, qweight: ops.QuantizedWeight) -> str:
    """``"int8 dynamic per_group(64)"``: the :class:`QuantScheme` text of a layer."""
    return f"int{qweight.bits} {mode} {qweight.scheme}"


def _run(layer: Any, x: Any, x_mul: Optional[np.ndarray], x_hadamard: int = 0,
         activation: Optional[str] = None) -> np.ndarray:
    """The forward of both quantized Linear kinds: :func:`cquant.ops.linear` in the layer's mode; a
    static layer runs the dynamic kernel with its one calibrated scale."""
    if layer.act_scale is not None:
        return ops.linear(x, layer.qweight, layer.bias, mode="dynamic", x_mul=x_mul, x_scale=layer.act_scale,
                          x_hadamard=x_hadamard, activation=activation)
    return ops.linear(x, layer.qweight, layer.bias, mode=layer.mode, x_mul=x_mul, x_hadamard=x_hadamard,
                      activation=activation)


def forward_shared(layers: Sequence[Any], x: Any) -> Optional[List[np.ndarray]]:
    """The outputs of ``layers`` that all take the same input ``x`` (attention's query, key and
    value), computed with one activation pass (:func:`cquant.ops.linear_multi`) when they can share
    it: each a :class:`QuantizedLinear`, bare or in a smoothing wrapper with the same pre-scale
    (values) and rotation, all with the same mode, static scale, K and scheme, and none being watched
    (an instance-level ``forward`` / ``__call__``, as calibration and compare install). Otherwise None:
    the caller runs them one by one. Bit-identical to calling them one by one."""
    if not isinstance(x, np.ndarray):
        return None
    parts = []
    for layer in layers:
        d = getattr(layer, "__dict__", {})
        if "forward" in d or "__call__" in d:
            return None
        if type(layer) is _smoothing.Smoothed:
            lin = d["_modules"]["linear"]
            if "forward" in lin.__dict__ or "__call__" in lin.__dict__:
                return None
            parts.append((lin, d["_parameters"]["inv_scale"], int(d["_parameters"]["hadamard"][0])))
        elif type(layer) is QuantizedLinear:
            parts.append((layer, None, 0))
        else:
            return None
        if type(parts[-1][0]) is not QuantizedLinear:
            return None
    return linear_shared(parts, x)


def linear_shared(parts: Sequence[Tuple[Any, Optional[np.ndarray], int]], x: np.ndarray
                  ) -> Optional[List[np.ndarray]]:
    """One :func:`cquant.ops.linear_multi` call for quantized layers reading the same ``x``: ``parts``
    are ``(layer, x_mul or None, rotation block)`` with ``layer`` a quantized Linear of either front-end
    (``qweight``, ``bias``, ``mode``, ``act_scale``). None when they cannot share one activation pass
    (different mode, static scale, K, scheme, pre-scale values or rotation)."""
    q0, mul0, b0 = parts[0]
    w0 = q0.qweight
    for q, mul, b in parts[1:]:
        w = q.qweight
        if (b != b0 or (mul is not mul0 and (mul is None or mul0 is None or not np.array_equal(mul, mul0)))
                or q.mode != q0.mode or q.act_scale != q0.act_scale or w.shape[1] != w0.shape[1]
                or (w.granularity, w.group_size, w.bits) != (w0.granularity, w0.group_size, w0.bits)):
            return None
    mode = "dynamic" if q0.act_scale is not None else q0.mode
    return ops.linear_multi(x, [q.qweight for q, _m, _b in parts], [q.bias for q, _m, _b in parts], mode,
                            x_mul=mul0, x_scale=q0.act_scale, x_hadamard=b0)


class QuantizedLinearForward:
    """The forward of a quantized Linear: ``x: (..., in_features) -> (..., out_features)`` float32 via
    :func:`cquant.ops.linear`. Holds only numpy arrays (the QuantizedWeight, the float32 bias) and,
    in ``"static"`` mode, ``act_scale`` (a float: every row of x is quantized with it), so it pickles
    and deep-copies."""

    _cquant_qforward = True  # marker: cquant.frontends recognises quantized layers by it
    _cquant_x_mul = True     # marker: __call__ takes x_mul and x_hadamard (smoothing / rotation in the kernel)
    _cquant_activation = True  # marker: __call__ takes activation="gelu" (fused into the kernel's output)
    act_scale: Optional[float] = None  # static mode only (instances pickled before it existed: None)

    def __init__(self, qweight: ops.QuantizedWeight, bias: Optional[np.ndarray] = None,
                 mode: str = "dynamic", act_scale: Optional[float] = None):
        self.qweight = qweight
        self.mode = _check_mode(mode)
        self.bias = _check_bias(bias, qweight.shape[0])
        self.act_scale = _check_act_scale(self.mode, act_scale)

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def scheme(self) -> str:
        return _scheme(self.mode, self.qweight)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + scales + bias."""
        return int(self.qweight.nbytes + (self.bias.nbytes if self.bias is not None else 0))

    def __call__(self, x: Any, x_mul: Optional[np.ndarray] = None, x_hadamard: int = 0,
                 activation: Optional[str] = None) -> np.ndarray:
        """``x_mul``: a per-input-column factor applied inside the kernel (``x * x_mul``; smoothing);
        ``x_hadamard``: the input's block rotation (see :func:`cquant.ops.linear`), also in the kernel;
        ``activation``: None or ``"gelu"``, applied to the outputs inside the kernel."""
        return _run(self, x, x_mul, x_hadamard, activation)

    def __setstate__(self, state: Any) -> None:
        """Unpickling runs the constructor's checks (mode, bias shape and finite values, static
        scale): a tampered pickle is refused with a cquant error, not run as NaN outputs. (Unpickling
        still runs whatever code a hostile pickle names: load pickles only from sources you trust.)"""
        qw = _pickled_weight(state, "QuantizedLinearForward")
        self.__dict__.update(state)
        self.mode = _check_mode(state.get("mode"))
        self.bias = _check_bias(state.get("bias"), qw.shape[0])
        self.act_scale = _check_act_scale(self.mode, state.get("act_scale"))

    def as_module(self) -> "QuantizedLinear":
        """This layer as a :class:`cquant.nn` module (what ``load_into`` installs in a cquant.nn model)."""
        return QuantizedLinear(self.qweight, self.bias, self.mode, self.act_scale)

    def __repr__(self) -> str:
        act = f", act_scale={self.act_scale!r}" if self.act_scale is not None else ""
        return (f"QuantizedLinearForward(in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.scheme}{act}, bias={self.bias is not None})")


def _weight_from_state(q: Any, s: Any, like: ops.QuantizedWeight, kq: str, ks: str) -> ops.QuantizedWeight:
    """The QuantizedWeight of state_dict codes ``q`` and scales ``s`` in the scheme of ``like``;
    bad values (NaN / Inf / negative or integer scales, codes out of range) refused naming the key."""
    s = ops.check_scales(s, ks)
    try:
        return ops.QuantizedWeight.from_codes(np.asarray(q), s, like.granularity, like.group_size, bits=like.bits)
    except (errors.ValueError, errors.TypeError) as e:
        raise type(e)(f"{kq}: {e}") from None


class QuantizedLinear(nn.Module):
    """A :class:`cquant.nn.Linear` whose weight is int8: ``forward(x) = ops.linear(x, qweight, bias, mode)``.

    Attributes: ``in_features``, ``out_features``, ``qweight`` (:class:`cquant.ops.QuantizedWeight`),
    ``bias`` (float32 parameter or None), ``mode``, ``act_scale`` (``"static"`` mode: the calibrated
    activation scale, a float; else None). ``state_dict()`` stores the weight as ``<name>.weight_q``
    (canonical (N, K) int8 codes) and ``<name>.weight_scale``, and a static layer's scale as
    ``<name>.act_scale`` (float32, shape (1,)).
    """

    _cquant_qforward = True
    _cquant_x_mul = True
    _cquant_activation = True
    act_scale: Optional[float] = None

    def __init__(self, qweight: ops.QuantizedWeight, bias: Optional[np.ndarray] = None,
                 mode: str = "dynamic", act_scale: Optional[float] = None):
        super().__init__()
        self.in_features = int(qweight.shape[1])
        self.out_features = int(qweight.shape[0])
        self.mode = _check_mode(mode)
        self.qweight = qweight
        self.bias = _check_bias(bias, self.out_features)
        self.act_scale = _check_act_scale(self.mode, act_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "dynamic", granularity: str = "per_channel",
                    group_size: Optional[int] = None) -> "QuantizedLinear":
        """Quantize one Linear (the Linear itself is not modified)."""
        qw = ops.quantize_weight(linear.weight, granularity=granularity, group_size=group_size)
        return cls(qw, linear.bias, mode)

    @property
    def scheme(self) -> str:
        return _scheme(self.mode, self.qweight)

    def forward(self, x: Any, x_mul: Optional[np.ndarray] = None, x_hadamard: int = 0,
                activation: Optional[str] = None) -> np.ndarray:
        """x: (..., in_features) float -> (..., out_features) float32. ``x_mul`` (in_features,): the
        input is ``x * x_mul``, applied inside the kernel (a smoothing pre-scale: no extra pass);
        ``x_hadamard``: then rotated in blocks (see :func:`cquant.ops.linear`), in the same pass;
        ``activation`` (None or ``"gelu"``): applied to each block of outputs inside the kernel."""
        return _run(self, x, x_mul, x_hadamard, activation)

    def __setstate__(self, state: Any) -> None:
        """Unpickling checks the layer as the constructor does (its sizes are the weight's, mode,
        bias, static scale): a tampered pickle is a cquant error, not NaN outputs or a layer that
        reports sizes it does not have."""
        qw = _pickled_weight(state, "QuantizedLinear")
        self.__dict__.update(state)
        if (self.__dict__.get("in_features"), self.__dict__.get("out_features")) != (qw.shape[1], qw.shape[0]):
            raise errors.ValueError(f"pickled QuantizedLinear: in_features / out_features "
                                    f"{self.__dict__.get('in_features')!r} / {self.__dict__.get('out_features')!r} "
                                    f"do not match its weight (out, in) = {tuple(qw.shape)}")
        self.mode = _check_mode(self.__dict__.get("mode"))
        params = self.__dict__.get("_parameters")
        if not isinstance(params, dict) or set(params) - {"bias"}:
            raise errors.ValueError("pickled QuantizedLinear: its only parameter is 'bias'")
        if params.get("bias") is not None:
            params["bias"] = _check_bias(params["bias"], qw.shape[0])
        self.act_scale = _check_act_scale(self.mode, self.__dict__.get("act_scale"))

    def as_module(self) -> "QuantizedLinear":
        """A new QuantizedLinear with this one's weight, bias, mode and activation scale."""
        return QuantizedLinear(self.qweight, self.bias, self.mode, self.act_scale)

    def dequantized_weight(self) -> np.ndarray:
        """The (out, in) float32 weight the layer effectively uses (a new array)."""
        return ops.dequantize(self.qweight)

    def _save_to_state_dict(self, dest: Dict[str, np.ndarray], prefix: str, specs: bool = False) -> None:
        super()._save_to_state_dict(dest, prefix, specs)
        dest[prefix + "weight_q"] = np.empty(0, np.int8) if specs else self.qweight.q
        dest[prefix + "weight_scale"] = self.qweight.scale
        if self.act_scale is not None:
            dest[prefix + "act_scale"] = np.array([self.act_scale], dtype=np.float32)

    def _load_plan(self, state: Mapping[str, Any], prefix: str, plan: List[Callable[[], None]],
                   used: set, missing: List[str], mismatched: list) -> None:
        super()._load_plan(state, prefix, plan, used, missing, mismatched)
        kq, ks = prefix + "weight_q", prefix + "weight_scale"
        keys = (kq, ks) + ((prefix + "act_scale",) if self.act_scale is not None else ())
        absent = [k for k in keys if k not in state]
        missing.extend(absent)
        used.update(k for k in keys if k in state)
        if absent:
            return
        q, s = np.asarray(state[kq]), np.asarray(state[ks])
        act = None
        if self.act_scale is not None:
            a = np.asarray(state[prefix + "act_scale"])
            if a.shape not in ((1,), ()):
                mismatched.append((prefix + "act_scale", (1,), a.shape))
                return
            act = _check_act_scale("static", a)
        bad = False
        if q.shape != tuple(self.qweight.shape):
            mismatched.append((kq, tuple(self.qweight.shape), q.shape))
            bad = True
        if s.shape != self.qweight.scale.shape:
            mismatched.append((ks, self.qweight.scale.shape, s.shape))
            bad = True
        if bad:
            return
        new = _weight_from_state(q, s, self.qweight, kq, ks)
        kb = prefix + "bias"
        if self.bias is not None and kb in state:  # the values a checkpoint load refuses (io.check_layer_values)
            b = np.asarray(state[kb])
            if b.dtype.kind == "f" and not np.isfinite(b).all():
                raise errors.NonFiniteError(f"{kb} holds NaN or Inf")
        plan.append(lambda: setattr(self, "qweight", new))
        if act is not None:
            plan.append(lambda: setattr(self, "act_scale", act))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.scheme}"
                + (f", act_scale={self.act_scale!r}" if self.act_scale is not None else ""))


# --------------------------------------------------------------------------------------------------
# Duck-typed objects whose class defines __call__: give them a __call__ that goes to self.forward
# --------------------------------------------------------------------------------------------------

_CALL_SUBCLASSES: Dict[type, type] = {}


def _call_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    return self.forward(*args, **kwargs)


def _new_call_subclass_instance(base: type) -> Any:
    return object.__new__(_call_subclass(base))


def _reduce_call_subclass(self: Any, protocol: int) -> Any:
    # Rebuild from the original (importable) class; state applied after the object is memoized, so
    # reference cycles through the object survive pickling and deepcopy.
    return (_new_call_subclass_instance, (type(self)._cquant_base,), dict(self.__dict__))


def _call_subclass(base: type) -> type:
    sub = _CALL_SUBCLASSES.get(base)
    if sub is None:
        sub = type(base.__name__, (base,), {
            "__slots__": (), "__call__": _call_forward, "__reduce_ex__": _reduce_call_subclass,
            "_cquant_base": base, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        })
        _CALL_SUBCLASSES[base] = sub
    return sub


_quantized_forward_of = _frontends._tree_qforward  # a QuantizedLinear, or a converted duck layer's forward


# --------------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerRecord:
    """One layer-like object seen by :meth:`Quantizer.quantize`.

    ``status`` is ``"quantized"`` or ``"skipped"``; ``reason`` says why it was skipped (or notes a
    shared weight); bytes are measured from the arrays (``before``: weight + bias as they were;
    ``after``: packed codes + scales + bias, 0 for a weight already counted under another layer).
    """
    name: str
    shape: Optional[Tuple[int, ...]]
    status: str
    reason: str
    bytes_before: int
    bytes_after: int
    scheme: str


@dataclass
class _Plan:
    name: str
    obj: Any
    sites: List[Optional[_Site]]
    weight: np.ndarray
    bias: Optional[np.ndarray]
    qweight: Optional[ops.QuantizedWeight] = None
    shared_with: Optional[str] = None
    scheme: QuantScheme = QuantScheme()
    note: str = ""
    act_scale: Optional[float] = None  # static schemes: the calibrated activation scale


@dataclass
class _EmbPlan:
    """An embedding table to store as int8 rows (``tie``: the Linear plan whose codes it reads)."""
    name: str
    obj: Any
    sites: List[Optional[_Site]]
    weight: np.ndarray
    tie: Optional[_Plan] = None
    qweight: Optional[ops.QuantizedWeight] = None
    shared_with: Optional[str] = None


def _embedding_patterns(embeddings: Any) -> Tuple[str, ...]:
    """``embeddings=``: False/None (off), True (every table), or table names / globs."""
    if embeddings is None or embeddings is False:
        return ()
    if embeddings is True:
        return ("*",)
    if isinstance(embeddings, (bool, int, float)):
        raise errors.TypeError(f"embeddings must be True, False or table names / globs, got {embeddings!r}")
    pats = _as_patterns(embeddings, "embeddings")
    if not pats:
        raise errors.ValueError("embeddings=[] names no table; pass False to keep every table in float")
    return pats


def _probe_layouts(plans: List[_Plan]) -> Tuple[List[_Plan], List[LayerRecord]]:
    """Duck-typed layers are recognised by their attributes, not by what their forward computes:
    one that stores its weight as (in, out) (``x @ W``) but passes the rule would be replaced by a
    forward computing ``x @ W.T``, silently wrong when W is square. So, before anything changes,
    each such layer's own forward runs once on a small deterministic input and must agree with
    ``x @ weight.T + bias``; a layer that does not is skipped (and said so), never replaced.
    ``cquant.nn.Linear`` layers need no probe."""
    keep: List[_Plan] = []
    skipped: List[LayerRecord] = []
    rng = np.random.default_rng(12345)
    for p in plans:
        finite = np.isfinite(p.weight).all() and (p.bias is None or np.isfinite(p.bias).all())
        if type(p.obj) is nn.Linear or not finite:  # non-finite: _prepare refuses it, naming it
            keep.append(p)
            continue
        w = np.asarray(p.weight, dtype=np.float64)
        x = rng.standard_normal((2, w.shape[1])).astype(np.float32)
        ref = x.astype(np.float64) @ w.T + (0.0 if p.bias is None else np.asarray(p.bias, np.float64))
        why = None
        try:
            fwd = getattr(p.obj, "forward", None) or p.obj
            with np.errstate(all="ignore"):
                got = np.asarray(fwd(x), dtype=np.float64)
            tol = 1e-3 * (np.abs(x.astype(np.float64)) @ np.abs(w).T + 1e-30)
            if got.shape != ref.shape:
                why = f"its forward returned shape {got.shape} for input {x.shape}, not {ref.shape}"
            elif not (np.abs(got - ref) <= tol + 1e-3 * np.abs(ref)).all():
                why = ("its forward does not compute x @ weight.T + bias (is the weight stored "
                       "(in, out)?); not replaced")
        except Exception as e:  # a forward that cannot take a plain float32 array
            why = f"its forward failed on a float32 probe input ({type(e).__name__}: {e})"
        if why is None:
            keep.append(p)
        else:
            nb = p.weight.nbytes + (p.bias.nbytes if p.bias is not None else 0)
            skipped.append(LayerRecord(_display(p.name), tuple(p.weight.shape), "skipped", why, nb, nb, ""))
    return keep, skipped


def _shared_scheme_conflicts(plans: List[Any], weight_key: Callable[[Any], Any], scheme_key: Callable[[Any], Any],
                             info: Callable[[Any], Tuple[str, Tuple[int, ...], int]]
                             ) -> Tuple[List[Any], List[LayerRecord]]:
    """Layers that share one weight but were given different schemes (per-layer rules) are kept in
    float, all of them, with the reason recorded and a warning: a shared weight is quantized once,
    with one scheme (quantizing it once per scheme held two int8 copies and the float one, and the
    report counted the float weight twice). As :func:`cquant.qat.prepare` does. Returns (the plans
    to quantize, the records of those kept float)."""
    by_weight: Dict[Any, List[Any]] = {}
    for p in plans:
        by_weight.setdefault(weight_key(p), []).append(p)
    drop: set = set()
    records: List[LayerRecord] = []
    for group in by_weight.values():
        if len({scheme_key(p) for p in group}) < 2:
            continue
        names = ", ".join(_display(info(p)[0]) for p in group)
        why = (f"its weight is shared by {names}, which were given different schemes: kept float32 "
               "(a shared weight is quantized once, with one scheme; give them one)")
        logger.warning("layers %s share one weight but were given different schemes: kept float32", names)
        for i, p in enumerate(group):
            drop.add(id(p))
            name, shape, nb = info(p)
            records.append(LayerRecord(_display(name), shape, "skipped", why, nb if i == 0 else 0, nb if i == 0 else 0, ""))
    return [p for p in plans if id(p) not in drop], records


class Quantizer:
    """Quantizes the Linear layers of a model (see the module docstring for the rules).

    ``Quantizer(mode, granularity, group_size, include, exclude)`` validates its arguments at once
    (``ValueError``/``TypeError``); :meth:`quantize` returns the quantized model and fills
    :attr:`summary` with one :class:`LayerRecord` per layer-like object.
    """

    def __init__(self, mode: str = "dynamic", granularity: str = "per_channel",
                 group_size: Optional[int] = None, include: Patterns = None, exclude: Patterns = None,
                 *, scheme: Any = None, strict: bool = False, embeddings: Any = False):
        base = QuantScheme.from_args(mode, granularity, group_size)
        default, rules = _normalize_scheme(scheme)
        if default is not None and (mode, granularity, group_size) != ("dynamic", "per_channel", None):
            # scheme= (one scheme, or a mapping with "*") names the default scheme: a mode /
            # granularity given beside it would be dropped (a mapping without "*" keeps them as the
            # default of the layers no rule names)
            raise errors.ValueError(
                f"give the scheme once: scheme={scheme!r} together with mode={mode!r}, granularity="
                f"{granularity!r}, group_size={group_size!r}; put the mode in the scheme text (e.g. "
                "\"int8 weight_only per_group(32)\") or leave scheme= out")
        #: the scheme of every layer that no per-layer rule names (a :class:`QuantScheme`)
        self.scheme: QuantScheme = default or base
        #: per-layer rules: ``((name, glob or class), QuantScheme or None), ...)``
        self.rules = rules
        self.strict = bool(strict)
        self.mode = self.scheme.mode
        self.granularity = self.scheme.granularity
        self.group_size = self.scheme.group_size
        self.include = _as_patterns(include, "include")
        self.exclude = _as_patterns(exclude, "exclude")
        #: embedding tables to store as int8 rows: () (the default: none), ("*",) (``embeddings=True``)
        #: or the names / globs given (see "Embedding tables" in the module docstring)
        self.embeddings: Tuple[str, ...] = _embedding_patterns(embeddings)
        self.summary: List[LayerRecord] = []
        self._used_rules: set = set()  # scheme rule keys that chose a layer in the last quantize
        #: what :meth:`quantize_dynamic` measured and did before quantizing (None if not asked)
        self.calibration: Optional[_calibration.Calibration] = None
        self.smoothing: Optional[_smoothing.SmoothingResult] = None
        #: what the accuracy budget measured and chose (``min_cosine=``; None if not asked)
        self.budget: Optional[_budget.BudgetResult] = None
        self._budget_rules: Dict[str, Tuple[Optional[QuantScheme], str]] = {}
        #: static schemes: layer name -> calibrated activation scale (``max|x| / 127`` over the
        #: calibration batches, measured after smoothing); None until calibration batches are given
        self.act_scales: Optional[Dict[str, float]] = None
        self._static_missing: List[str] = []
        self._static_blind: set = set()  # layers reached whose calibration inputs held no finite value

    def _uses_static(self) -> bool:
        return self.scheme.activations == "static" or any(
            v is not None and v.activations == "static" for _k, v in self.rules)

    def _static_fit(self, name: str, s: QuantScheme, note: str) -> Tuple[QuantScheme, str]:
        """A static scheme for a layer the calibration never reached: dynamic activations instead,
        the reason in ``note`` (the layer is remembered for ``strict``)."""
        if s.activations != "static" or (self.act_scales is not None and name in self.act_scales):
            return s, note
        self._static_missing.append(_display(name))
        why = ("static: the calibration inputs of this layer held no finite non-zero value (all zero, NaN / "
               "Inf or no rows): dynamic activations instead" if name in self._static_blind else
               "static: the calibration batches never reached this layer (no activation statistics): "
               "dynamic activations instead")
        return replace(s, activations="dynamic"), "; ".join(filter(None, [note, why]))

    def _check_static_missing(self) -> None:
        if self.strict and self._static_missing:
            names = self._static_missing
            raise errors.ValueError(
                f"static activations need calibration statistics, but the calibration batches never reached "
                f"(or gave no finite non-zero input to) {len(names)} selected layer(s): {', '.join(names[:20])}"
                + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")
                + " (strict=True; without it they get dynamic activations, the reason recorded)")

    def scheme_for(self, name: str, layer: Any, k: int) -> Tuple[Optional[QuantScheme], str]:
        """``(scheme, note)`` for layer ``name`` with ``k`` input columns: the per-layer rule or the
        default, with the per_channel fallback applied (``note`` says why; ``strict`` raises).
        ``(None, note)``: the rules keep this layer in float."""
        for n in (name, name[: -len(".linear")] if name.endswith(".linear") else None):
            if n is not None and n in self._budget_rules:  # chosen by the accuracy budget
                s, note = self._budget_rules[n]
                if s is None:
                    return None, note
                s2, fit = s.for_k(k, False, _display(name))
                return self._static_fit(name, s2, "; ".join(filter(None, [note, fit])))
        s, key = _resolve_scheme(name, layer, self.scheme, self.rules)
        if key == "" and name.endswith(".linear"):  # inside a smoothing wrapper: its name counts too
            s, key = _resolve_scheme(name[: -len(".linear")], layer, self.scheme, self.rules)
        self._used_rules.add(key)
        if s is None:
            return None, f"kept in float by scheme rule {key!r}"
        return self._static_fit(name, *s.for_k(k, self.strict, _display(name)))

    @classmethod
    def quantize_dynamic(cls, model: Any, mode: str = "dynamic", granularity: str = "per_channel",
                         group_size: Optional[int] = None, include: Patterns = None,
                         exclude: Patterns = None, inplace: bool = True, *, scheme: Any = None,
                         strict: bool = False, calibration: Any = None, smoothing: Any = None,
                         min_cosine: Optional[float] = None, min_row_cosine: Optional[float] = None,
                         refine: Sequence[Any] = _budget.DEFAULT_REFINE, embeddings: Any = False,
                         rotate: Any = False) -> Any:
        """One-call form: ``Quantizer(mode, ...).quantize(model, inplace, ...)``. Returns the model.

        ``embeddings``: also store embedding tables as int8 rows (``True``, or table names / globs;
        default ``False``: tables stay float). A table tied to a quantized output Linear shares its
        codes (see "Embedding tables" in the module docstring).

        ``calibration``: batches to run the float model on (arrays, tuples of positional arguments,
        or dicts of keyword arguments, e.g. a tokenizer's output); needed by ``smoothing`` and by
        ``mode="static"`` (static activations: each layer quantizes every input row with one scale,
        ``max|x| / 127`` over these batches, stored in the layer; see "Static activations" in the
        module docstring).
        ``smoothing``: SmoothQuant strength ``alpha`` in [0, 1] (``True`` = 0.5), or ``"auto"`` (the
        strength with the smallest int8 error, per group of layers sharing an input): activation outliers
        are moved into the weights before quantizing (:func:`cquant.smoothing.smooth`), folded into
        the preceding LayerNorm / Linear where that is exact.
        ``rotate`` (with ``smoothing``): also rotate the input of every smoothed group that has no
        exact fold (``True``, or a block size): a Walsh-Hadamard transform in blocks of up to 64
        columns spreads the remaining outlier channels before the per-row scale is taken, and the
        weights are rotated to match; the kernel does it in its activation pass
        (:func:`cquant.smoothing.smooth`). ``"all"``: the groups after a post-norm LayerNorm are
        rotated too, instead of folded (more accurate, slower).
        ``min_cosine``: accuracy budget (:mod:`cquant.budget`): the mean row cosine of the model output
        against the float model on the calibration batches must reach it; the fewest, most sensitive
        layers are kept in float (or moved to a finer scheme of ``refine``, default ``per_group(32)``)
        to get there. ``min_row_cosine`` also bounds the worst row. The per-layer summary goes to the
        ``"cquant"`` logger; build a :class:`Quantizer` and call :meth:`quantize` with the same
        arguments to keep the summary, calibration, smoothing and budget results as data, or call
        :func:`report` on the result.
        """
        q = cls(mode, granularity, group_size, include, exclude, scheme=scheme, strict=strict,
                embeddings=embeddings)
        return q.prepare_and_quantize(model, calibration=calibration, smoothing=smoothing, inplace=inplace,
                                      min_cosine=min_cosine, min_row_cosine=min_row_cosine, refine=refine,
                                      rotate=rotate)

    def prepare_and_quantize(self, model: Any, calibration: Any = None, smoothing: Any = None,
                             inplace: bool = True, min_cosine: Optional[float] = None,
                             min_row_cosine: Optional[float] = None,
                             refine: Sequence[Any] = _budget.DEFAULT_REFINE, rotate: Any = False) -> Any:
        """Calibrate and smooth (if asked), apply the accuracy budget (if asked), then quantize.
        Fills :attr:`calibration`, :attr:`smoothing`, :attr:`budget` and :attr:`summary` (and
        :attr:`act_scales` for static schemes)."""
        self.budget = None
        self._budget_rules = {}
        self.act_scales = None
        budgeted = min_cosine is not None or min_row_cosine is not None
        if budgeted:
            if min_cosine is None:
                raise errors.ValueError("min_row_cosine needs min_cosine (the bound on the mean) too")
            _budget.check_target(min_cosine)
            if min_row_cosine is not None:
                _budget.check_target(min_row_cosine, "min_row_cosine")
            refine = _check_refine(refine)
            if calibration is None:
                raise errors.ValueError("the accuracy budget needs calibration batches: "
                                        "quantize_dynamic(model, calibration=batches, min_cosine=0.999)")
        if smoothing is True:
            smoothing = 0.5
        if smoothing is not None and smoothing is not False:
            if smoothing != "auto" and (isinstance(smoothing, bool) or not isinstance(smoothing, (int, float))
                                        or not 0 <= smoothing <= 1):
                raise errors.ValueError(f"smoothing must be an alpha in [0, 1], 'auto' or True (0.5), "
                                        f"got {smoothing!r}")
            if calibration is None:
                raise errors.ValueError("smoothing needs calibration batches: "
                                        "quantize_dynamic(model, calibration=batches, smoothing=0.5)")
        elif rotate is not False and rotate is not None:
            raise errors.ValueError("rotate runs inside smoothing's pre-scale wrappers: give smoothing too, "
                                    "quantize_dynamic(model, calibration=batches, smoothing=0.5, rotate=True)")
        if calibration is None:
            return self._quantize(model, inplace=inplace)
        if not inplace:
            model = copy.deepcopy(model)
        batches = _calibration.batch_list(calibration)
        smoothed = smoothing is not None and smoothing is not False
        if smoothed:
            self.smoothing = _smoothing.smooth(model, batches, alpha=smoothing, include=self.include,
                                               exclude=self.exclude, rotate=rotate)
            self.calibration = self.smoothing.calibration
        else:
            self.calibration = _calibration.calibrate(model, batches, include=self.include, exclude=self.exclude)
        try:
            if self._uses_static() or (budgeted and any(r.activations == "static" for r in refine)):
                self.act_scales = self._static_scales(model, batches, smoothed)
            refs = None
            if budgeted:
                self._apply_budget(model, batches, float(min_cosine), min_row_cosine, refine)  # type: ignore[arg-type]
                if self.embeddings:  # the plan measures the Linear layers: the tables' error is measured after
                    refs = [_frontends.run(model, b) for b in batches]
            out = self._quantize(model, inplace=True)
            if refs is not None and self.budget is not None:
                self._measure_with_embeddings(out, batches, refs, float(min_cosine), min_row_cosine)
        except BaseException:
            # the model as it was before smoothing (quantization itself leaves it untouched when it
            # refuses: it plans every layer before installing any)
            if smoothed and self.smoothing is not None and self.smoothing._undo is not None:
                self.smoothing._undo()
                self.smoothing._undo = None
            raise
        if self.budget is not None:
            logger.info("%s", self.budget.summary())
        return out

    def _measure_with_embeddings(self, model: Any, batches: List[Any], refs: List[Any], min_cosine: float,
                                 min_row_cosine: Optional[float]) -> None:
        """The budget's cosines measured again on the returned model, int8 embedding tables included
        (the plan swaps Linear layers only): what ``budget`` reports is what the model does."""
        res = self.budget
        assert res is not None
        st = _budget._Stats()
        for b, yf in zip(batches, refs):
            st.add(_frontends.run(model, b), yf)
        met = _budget._meets(st, min_cosine, min_row_cosine)
        res.notes.append(f"measured on the returned model with its int8 embedding tables: mean {st.mean:.5f}, "
                         f"min {st.min:.5f} (the Linear layers alone: mean {res.mean:.5f}, min {res.min:.5f})")
        res.mean, res.min, res.met = st.mean, st.min, met
        if not met:
            logger.warning("accuracy budget not met once the embedding tables are int8 (mean cosine %.5f, min "
                           "%.5f): quantize with embeddings=False, or keep the tables that hurt in float",
                           st.mean, st.min)

    def _static_scales(self, model: Any, batches: List[Any], smoothed: bool) -> Dict[str, float]:
        """Layer name -> static activation scale ``max|x| / 127`` over ``batches`` (float32; at least the
        smallest normal float32). A layer whose calibration inputs were all zero gets none (its
        scale would be an arbitrary 1.0: a later input of size 1 kept ~1% of its precision):
        dynamic activations, with the reason. After smoothing the model runs again: the scales are those of
        the smoothed inputs (a layer in a pre-scale wrapper sees ``x * (1/s)``, the product its kernel
        quantizes)."""
        cal = _calibration.calibrate(model, batches) if smoothed or self.calibration is None else self.calibration
        tiny = np.finfo(np.float32).tiny
        # a layer reached whose inputs held no finite value (every row NaN / Inf, or no rows) has
        # no statistics either: dynamic activations, as for a layer never reached (_static_fit)
        self._static_blind = {name for name, st in cal.items() if not st.saw_finite or not st.tensor_absmax > 0}
        return {name: float(max(st.static_scale()[0], tiny)) for name, st in cal.items()
                if name not in self._static_blind}

    def _clone(self, scheme: Optional[QuantScheme] = None) -> "Quantizer":
        """A Quantizer with the same selection; ``scheme``: every selected layer on that scheme
        (the rules that keep a layer in float still apply)."""
        q = Quantizer(include=self.include or None, exclude=self.exclude or None, strict=False)
        q.scheme = scheme or self.scheme
        q.rules = self.rules if scheme is None else tuple((k, None) for k, v in self.rules if v is None)
        q.mode, q.granularity, q.group_size = q.scheme.mode, q.scheme.granularity, q.scheme.group_size
        q.act_scales = self.act_scales
        q._static_blind = self._static_blind
        q.embeddings = self.embeddings
        return q

    def _apply_budget(self, model: Any, batches: List[Any], min_cosine: float, min_row_cosine: Optional[float],
                      refine: Tuple[QuantScheme, ...]) -> None:
        by_name = {str(s): s for s in refine}
        quiet = logging.getLogger("cquant")

        def quantize_copy(spec: Optional[str]) -> Any:
            q = self._clone(None if spec is None else by_name[spec])
            level = quiet.level
            quiet.setLevel(max(level, logging.WARNING) if level != logging.NOTSET else logging.WARNING)
            try:
                return q._quantize(model, inplace=False)
            finally:
                quiet.setLevel(level)

        res = _budget.plan(model, batches, quantize_copy, min_cosine, min_row_cosine, tuple(by_name))
        self.budget = res
        rules: Dict[str, Tuple[Optional[QuantScheme], str]] = {}
        for name in res.kept_float:
            rules[name] = (None, _budget.reason(res, name))
        for name, spec in res.refined.items():
            rules[name] = (by_name[spec], _budget.reason(res, name))
        self._budget_rules = rules

    # -- the three phases -------------------------------------------------------------------------
    def _select(self, model: Any) -> Tuple[List[_Plan], List[LayerRecord], List[str]]:
        plans: Dict[int, _Plan] = {}
        order: List[_Plan] = []
        skipped: List[LayerRecord] = []
        matched_includes: set = set()

        def is_layer(obj: Any) -> bool:
            return _quantized_forward_of(obj) is not None or id(obj) in plans

        for path, obj, site, revisit in _walk(model, stop=is_layer):
            if revisit:
                if id(obj) in plans:
                    plans[id(obj)].sites.append(site)
                continue
            qf = _quantized_forward_of(obj)
            if qf is not None:
                skipped.append(LayerRecord(_display(path), (qf.out_features, qf.in_features), "skipped",
                                           "already quantized", 0, 0, qf.scheme))
                continue
            if not _looks_like_layer(obj) and not (self.include and _match(path, self.include)):
                continue
            # the layer inside a smoothing pre-scale wrapper is named by the wrapper's name too
            wrapped = path.endswith(".linear") and site is not None and \
                getattr(type(site.container), "_cquant_smoothing_wrapper", False) is True
            inc = match_layer(path, self.include, wrapped) if self.include else None
            if inc is not None:
                matched_includes.add(inc)
            ok, why = _check_layer(obj, relaxed=inc is not None)
            w = _get(obj, "weight")
            wb = w.nbytes if isinstance(w, np.ndarray) else 0
            b = _get(obj, "bias")
            bb = b.nbytes if isinstance(b, np.ndarray) else 0
            shape = tuple(w.shape) if isinstance(w, np.ndarray) else None
            if ok:
                exc = match_layer(path, self.exclude, wrapped)
                if exc is not None:
                    ok, why = False, f"excluded by pattern {exc!r}"
                elif self.include and inc is None:
                    ok, why = False, "not matched by include"
            if not ok:
                if wb or type(obj).__name__.endswith("Linear") or isinstance(obj, nn.Linear):
                    skipped.append(LayerRecord(_display(path), shape, "skipped", why, wb + bb, wb + bb, ""))
                continue
            scheme, note = self.scheme_for(path, obj, w.shape[1])
            if scheme is None:
                skipped.append(LayerRecord(_display(path), shape, "skipped", note, wb + bb, wb + bb, ""))
                continue
            plan = _Plan(path, obj, [site], w, b, scheme=scheme, note=note,
                         act_scale=self.act_scales[path] if scheme.activations == "static" else None)
            plans[id(obj)] = plan
            order.append(plan)
        unmatched = [p for p in self.include if p not in matched_includes]
        return order, skipped, unmatched

    def _prepare(self, plans: List[_Plan]) -> None:
        """Check and quantize every selected weight; raises before anything is modified."""
        for p in plans:
            ops.check_finite(p.weight, f"{_display(p.name)}.weight")
            if p.bias is not None:
                ops.check_finite(p.bias, f"{_display(p.name)}.bias")
        by_weight: Dict[Tuple[int, str, Optional[int], int], _Plan] = {}
        for p in plans:
            key = (id(p.weight), p.scheme.granularity, p.scheme.group_size, p.scheme.bits)
            first = by_weight.get(key)
            if first is not None:
                p.qweight, p.shared_with = first.qweight, first.name
                continue
            try:
                p.qweight = ops.quantize_weight(p.weight, granularity=p.scheme.granularity,
                                                group_size=p.scheme.group_size, bits=p.scheme.bits)
            except errors.QuantizationError as e:
                raise _renamed(e, f"layer {_display(p.name)!r}: {e}") from e
            by_weight[key] = p

    def _install(self, plan: _Plan, undo: List[Callable[[], None]]) -> Any:
        """Convert one layer; returns the object that now stands where the layer was.

        Every change is journalled in ``undo`` (callables restoring the previous state), so a failure
        half-way (e.g. a class whose ``__setattr__`` refuses) can put the whole model back.
        """
        obj, qw = plan.obj, plan.qweight
        assert qw is not None
        bias32 = None if plan.bias is None else np.ascontiguousarray(plan.bias, dtype=np.float32)
        replaceable = all(s is not None and s.kind != "tuple" for s in plan.sites)
        if isinstance(obj, nn.Linear) and replaceable:
            new = QuantizedLinear(qw, bias32, plan.scheme.mode, plan.act_scale)
            object.__setattr__(new, "training", obj.training)
            for s in plan.sites:
                assert s is not None
                _replace_at(s, obj, new, undo)
            return new
        if type(obj) is nn.Linear:
            # the model itself (or held in a tuple): no site to put a new layer in, so this object
            # becomes the QuantizedLinear (class and state), and its repr, state_dict and checkpoint
            # say so (a quantized forward on a plain Linear saved only its bias, silently)
            new = QuantizedLinear(qw, bias32, plan.scheme.mode, plan.act_scale)
            object.__setattr__(new, "training", obj.training)
            old_state = dict(obj.__dict__)

            def back(o: Any = obj, st: Dict[str, Any] = old_state) -> None:
                o.__dict__.clear()
                o.__dict__.update(st)
                object.__setattr__(o, "__class__", nn.Linear)
            obj.__dict__.clear()
            obj.__dict__.update(new.__dict__)
            object.__setattr__(obj, "__class__", QuantizedLinear)
            undo.append(back)
            return obj
        fwd = QuantizedLinearForward(qw, bias32, plan.scheme.mode, plan.act_scale)
        _set_attr(obj, "forward", fwd, undo)
        _set_attr(obj, "weight", None, undo)
        if plan.bias is not None and bias32 is not plan.bias:
            _set_attr(obj, "bias", fwd.bias, undo)
        cls = type(obj)
        if not isinstance(obj, nn.Module) and callable(obj) and not hasattr(cls, "_cquant_base"):
            try:
                obj.__class__ = _call_subclass(cls)
                undo.append(lambda: setattr(obj, "__class__", cls))
            except TypeError as e:  # exotic layout; obj.forward is still quantized
                logger.warning("%s: could not route __call__ to forward (%s); call .forward()",
                               _display(plan.name), e)
        return obj

    def quantize(self, model: Any, inplace: bool = True, *, calibration: Any = None, smoothing: Any = None,
                 min_cosine: Optional[float] = None, min_row_cosine: Optional[float] = None,
                 refine: Sequence[Any] = _budget.DEFAULT_REFINE, rotate: Any = False) -> Any:
        """Quantize ``model``'s Linear layers; returns the model (a deep copy if ``inplace=False``).

        Fills :attr:`summary`. Raises ``NonFiniteError`` / ``ValueError`` naming the layer, with the
        model unmodified, if a selected weight is not finite or cannot be quantized as asked.
        ``calibration``, ``smoothing``, ``min_cosine``, ``min_row_cosine``, ``refine``, ``rotate``:
        see :meth:`quantize_dynamic` (then :attr:`calibration`, :attr:`smoothing` and :attr:`budget`
        are filled too).
        """
        if rotate is not False and rotate is not None and smoothing is None:
            raise errors.ValueError("rotate runs inside smoothing's pre-scale wrappers: give smoothing too, "
                                    "quantize(model, calibration=batches, smoothing=0.5, rotate=True)")
        if calibration is None and smoothing is None and min_cosine is None and min_row_cosine is None:
            self.budget = None
            self._budget_rules = {}
            self.act_scales = None
            return self._quantize(model, inplace)
        return self.prepare_and_quantize(model, calibration=calibration, smoothing=smoothing, inplace=inplace,
                                         min_cosine=min_cosine, min_row_cosine=min_row_cosine, refine=refine,
                                         rotate=rotate)

    def _quantize(self, model: Any, inplace: bool = True) -> Any:
        if self.act_scales is None and self._uses_static():
            raise errors.ValueError(
                "static activations (mode='static') need calibration batches to measure each layer's "
                "activation scale: pass calibration=, e.g. Quantizer.quantize_dynamic(model, mode='static', "
                "calibration=batches) or Quantizer(mode='static').quantize(model, calibration=batches)")
        self._static_missing = []
        self._used_rules = set()
        out = _frontends.for_model(model).quantize(self, model, inplace)
        self._warn_unmatched()
        return out

    def _warn_unmatched(self) -> None:
        """A scheme rule or an exclude pattern that chose no layer is most likely a typo (as an
        include pattern that matched nothing, which is warned about where it is checked)."""
        for key, _s in self.rules:
            k = key.__name__ if isinstance(key, type) else key
            if k not in self._used_rules:
                logger.warning("scheme rule %r matched no layer", k)
        names = [r.name for r in (self.summary or [])]
        names += [n[: -len(".linear")] for n in names if n.endswith(".linear")]  # a smoothing wrapper's layer
        for pat in self.exclude:
            if not any(_match(n, (pat,)) is not None for n in names):
                logger.warning("exclude pattern %r matched no layer", pat)

    def _quantize_tree(self, model: Any, inplace: bool, front: "_frontends.FrontEnd") -> Any:
        """:meth:`FrontEnd.quantize` of the cquant.nn and duck-typed front-ends: walk, plan, install."""
        if model is None or isinstance(model, (np.ndarray, np.generic, int, float, complex, str, bytes)):
            raise errors.TypeError(f"expected a model (a cquant.nn module, a torch module or a tree of "
                                   f"objects with Linear layers), got {type(model).__name__}")
        if not inplace:
            model = copy.deepcopy(model)
        plans, skipped, unmatched = self._select(model)
        self._check_static_missing()
        plans, probe_skips = _probe_layouts(plans)
        skipped += probe_skips
        plans, conflicts = _shared_scheme_conflicts(
            plans, lambda p: id(p.weight), lambda p: (p.scheme.granularity, p.scheme.group_size, p.scheme.bits),
            lambda p: (p.name, tuple(p.weight.shape), p.weight.nbytes + (p.bias.nbytes if p.bias is not None else 0)))
        skipped += conflicts
        for pat in unmatched:
            logger.warning("include pattern %r matched no layer", pat)
        emb_plans, emb_skips = self._select_embeddings(model, plans, front)
        if emb_plans or emb_skips:  # their records replace the walk's "never quantized" ones
            seen = {r.name for r in emb_skips} | {_display(e.name) for e in emb_plans}
            skipped = [r for r in skipped if r.name not in seen] + emb_skips
        self._prepare(plans)
        self._prepare_embeddings(emb_plans)
        undo: List[Callable[[], None]] = []
        installed: Dict[int, Any] = {}
        try:
            for p in plans:
                new = self._install(p, undo)
                installed[id(p)] = new
                if p.name == "":
                    model = new
            for e in emb_plans:
                new = self._install_embedding(e, installed, undo)
                if e.name == "":
                    model = new
        except BaseException:
            failed = 0
            for step in reversed(undo):  # every step, even after one fails: the original error is what the user sees
                try:
                    step()
                except Exception:  # noqa: BLE001
                    failed += 1
                    logger.exception("quantize: undoing a change after a failure failed too")
            if failed:
                logger.error("quantize: %d change(s) could not be undone; the model may be partly converted", failed)
            raise
        records: List[LayerRecord] = []
        biases_seen: set = set()
        for p in plans:
            assert p.qweight is not None
            shared_bias = p.bias is not None and id(p.bias) in biases_seen  # counted under the first layer
            if p.bias is not None:
                biases_seen.add(id(p.bias))
            bb = p.bias.nbytes if p.bias is not None and not shared_bias else 0
            b32 = 4 * p.bias.size if p.bias is not None and not shared_bias else 0
            if p.shared_with is None:
                before, after = p.weight.nbytes + bb, p.qweight.nbytes + b32
                note = p.note
            else:
                before, after = bb, b32
                note = "; ".join(filter(None, [p.note, f"weight shared with {_display(p.shared_with)!r} "
                                                       f"(quantized once)"]))
            records.append(LayerRecord(_display(p.name), tuple(p.weight.shape), "quantized", note,
                                       int(before), int(after), _scheme(p.scheme.mode, p.qweight)))
        for e in emb_plans:
            assert e.qweight is not None
            if e.tie is not None:
                before = after = 0
                note = (f"weight tied to {_display(e.tie.name)!r}: quantized once, the table reads its "
                        "per_channel int8 codes")
            elif e.shared_with is not None:
                before = after = 0
                note = f"weight shared with {_display(e.shared_with)!r} (quantized once)"
            else:
                before, after, note = e.weight.nbytes, e.qweight.nbytes, ""
            records.append(LayerRecord(_display(e.name), tuple(e.weight.shape), "quantized", note,
                                       int(before), int(after), EMBEDDING_SCHEME))
        self.summary = records + skipped
        self._log_summary(records, skipped)
        return model

    def _select_embeddings(self, model: Any, plans: List[_Plan], front: "_frontends.FrontEnd"
                           ) -> Tuple[List[_EmbPlan], List[LayerRecord]]:
        """The embedding tables to quantize (``embeddings=``) and the records of those skipped; ties
        with the Linear ``plans`` resolved (see "Embedding tables" in the module docstring)."""
        if not self.embeddings:
            return [], []
        nn_front = front.embeddings  # the tree front-end with an embedding protocol (cquant.nn)
        by_obj = {id(p.obj): p for p in plans}
        holders: Dict[int, List[Tuple[str, Any]]] = {}   # id(weight array) -> (path, object) holding it
        cands: Dict[int, _EmbPlan] = {}
        skips: List[LayerRecord] = []

        def skip(path: str, w: Any, why: str) -> None:
            nb = w.nbytes if isinstance(w, np.ndarray) else 0
            shape = tuple(w.shape) if isinstance(w, np.ndarray) else None
            skips.append(LayerRecord(_display(path), shape, "skipped", why, nb, nb, ""))

        for path, obj, site, revisit in _walk(model, stop=lambda o: _quantized_forward_of(o) is not None):
            if revisit:
                if id(obj) in cands:
                    cands[id(obj)].sites.append(site)
                continue
            if _quantized_forward_of(obj) is not None:
                continue
            if isinstance(obj, QuantizedEmbedding):
                skips.append(LayerRecord(_display(path), (obj.num_embeddings, obj.embedding_dim), "skipped",
                                         "already quantized", 0, 0, EMBEDDING_SCHEME))
                continue
            w = _get(obj, "weight")
            if isinstance(w, np.ndarray):
                holders.setdefault(id(w), []).append((path, obj))
            never = _never_reason(obj) or ""
            if not never.startswith("embedding"):
                continue
            if not (isinstance(obj, nn.Embedding) and nn_front):
                if isinstance(w, np.ndarray):
                    skip(path, w, f"embedding ({type(obj).__name__}): embeddings= quantizes cquant.nn.Embedding "
                                  "tables of cquant.nn models and torch.nn.Embedding tables; duck-typed "
                                  "models have no embedding protocol")
                continue
            why = ""
            if type(obj).forward is not nn.Embedding.forward:
                why = f"{type(obj).__name__} overrides Embedding.forward: replacing it would change what it computes"
            elif not (isinstance(w, np.ndarray) and w.ndim == 2 and w.dtype.kind == "f" and w.size):
                why = "weight is not a non-empty 2-D float array"
            elif _match(path, self.exclude) is not None:
                why = f"excluded by pattern {_match(path, self.exclude)!r}"
            elif _match(path, self.embeddings) is None:
                why = f"not matched by embeddings={list(self.embeddings)!r}"
            if why:
                skip(path, w, why)
                continue
            cands[id(obj)] = _EmbPlan(path, obj, [site], w)
        # held in a tuple: cannot be replaced
        for key, e in list(cands.items()):
            if any(s is not None and s.kind == "tuple" for s in e.sites):
                skip(e.name, e.weight, "held in a tuple: the table cannot be replaced there")
                del cands[key]
        # ties, to a fixed point (a table skipped makes another one sharing its array float-tied)
        kept, dropped = resolve_ties(cands, lambda e: holders.get(id(e.weight), []), lambda o: by_obj.get(id(o)),
                                     lambda p: p.scheme.granularity == "per_channel" and p.scheme.bits == 8)
        for e, why in dropped:
            skip(e.name, e.weight, why)
        for e, tie in kept:
            e.tie = tie
        return [e for e, _tie in kept], skips

    def _prepare_embeddings(self, emb_plans: List[_EmbPlan]) -> None:
        """Check and quantize every selected table (after the Linears: a tied table takes its
        Linear's codes); raises naming the table before anything is modified."""
        first: Dict[int, _EmbPlan] = {}
        for e in emb_plans:
            if e.tie is not None:
                e.qweight = e.tie.qweight
                assert can_share(e.qweight, e.weight.shape)
                continue
            done = first.get(id(e.weight))
            if done is not None:
                e.qweight, e.shared_with = done.qweight, done.name
                continue
            ops.check_finite(e.weight, f"{_display(e.name)}.weight")
            try:
                e.qweight = ops.quantize_weight(e.weight, granularity="per_channel")
            except errors.QuantizationError as exc:
                raise _renamed(exc, f"embedding {_display(e.name)!r}: {exc}") from exc
            first[id(e.weight)] = e

    def _install_embedding(self, e: _EmbPlan, installed: Dict[int, Any], undo: List[Callable[[], None]]) -> Any:
        tie = _quantized_forward_of(installed[id(e.tie)]) if e.tie is not None else None
        new = QuantizedEmbedding(qweight=None if tie is not None else e.qweight, tie=tie,
                                 padding_idx=getattr(e.obj, "padding_idx", None))
        object.__setattr__(new, "training", e.obj.training)
        for s in e.sites:
            if s is not None:
                _replace_at(s, e.obj, new, undo)
        return new

    def _quantize_torch(self, model: Any, inplace: bool) -> Any:
        """A torch model goes through :func:`cquant.adapters.quantize_torch`, once per distinct
        scheme (the adapter takes one scheme per call; layers are named in ``include``)."""
        if not inplace:
            model = copy.deepcopy(model)
        groups: "OrderedDict[QuantScheme, List[str]]" = OrderedDict()
        notes: Dict[str, str] = {}
        kept: List[LayerRecord] = []
        selected: List[Any] = []
        chosen: List[Tuple[Any, QuantScheme]] = []
        for ref in _frontends.linear_layers(model, self.include or None, self.exclude, quantized=False):
            scheme, note = self.scheme_for(ref.name, ref.obj, ref.in_features)
            if scheme is None:
                w = ref.obj.weight
                nb = int(w.numel() * w.element_size())
                kept.append(LayerRecord(_display(ref.name), tuple(w.shape), "skipped", note, nb, nb, ""))
                continue
            chosen.append((ref, scheme))
            if note:
                notes[_display(ref.name)] = note
        # one adapter call per scheme: a weight shared by layers of two calls would be quantized twice
        chosen, conflicts = _shared_scheme_conflicts(
            chosen, lambda c: id(c[0].obj.weight), lambda c: c[1],
            lambda c: (c[0].name, tuple(c[0].obj.weight.shape), int(c[0].obj.weight.numel() * c[0].obj.weight.element_size())))
        kept += conflicts
        for ref, scheme in chosen:
            groups.setdefault(scheme, []).append(ref.name)
            selected.append(ref)
        fast = len(groups) <= 1 and not kept and not self.include
        if fast and self.strict and next(iter(groups), self.scheme).activations == "static":
            self._static_missing += _attention_parts_without_scales(model, self.exclude, self.act_scales or {})
        self._check_static_missing()
        if fast:
            only = next(iter(groups), self.scheme)
            return adapters.quantize_torch(_AdapterArgs(only, (), self.exclude, self, embeddings=self.embeddings,
                                                        act_scales=self.act_scales), model, True)
        # several in-place adapter calls, each atomic alone: a weight or bias that the second would
        # refuse must stop them before the first changes the model
        for ref in selected:
            for what in ("weight", "bias"):
                t = getattr(ref.obj, what, None)
                if t is not None:
                    try:
                        ops.check_finite(_frontends.as_numpy(t), f"{_display(ref.name)}.{what}")
                    except errors.QuantizationError as e:
                        raise _renamed(e, f"layer {_display(ref.name)!r}: {e}") from e
        records: List[LayerRecord] = []
        others: Dict[str, LayerRecord] = {}
        for scheme, names in groups.items():
            args = _AdapterArgs(scheme, tuple(_glob_escape(n) for n in names), self.exclude, None,
                                embeddings=self.embeddings, act_scales=self.act_scales, quiet=True)
            model = adapters.quantize_torch(args, model, True)
            records += [r for r in args.summary if r.status == "quantized"]
            for r in args.summary:
                if r.status != "quantized":
                    others.setdefault(r.name, r)
        done = {r.name for r in records}
        records = [r if r.name not in notes else LayerRecord(r.name, r.shape, r.status,
                   "; ".join(filter(None, [notes[r.name], r.reason])), r.bytes_before, r.bytes_after, r.scheme)
                   for r in records]
        skipped = kept + [r for name, r in others.items() if name not in done and r.reason != "already quantized"
                          and name not in {k.name for k in kept}]
        self.summary = records + skipped
        return model

    def _log_summary(self, done: List[LayerRecord], skipped: List[LayerRecord]) -> None:
        before = sum(r.bytes_before for r in done)
        after = sum(r.bytes_after for r in done)
        logger.info("quantized %d Linear layer(s) to %s%s: %s -> %s; skipped %d layer-like object(s)",
                    len(done), self.scheme, " (+ per-layer rules)" if self.rules else "", format_bytes(before), format_bytes(after), len(skipped))
        if not done:
            logger.warning("no Linear layer was quantized")
        for r in done:
            if "instead" in r.reason:
                logger.info("  %s: %s", r.name, r.reason)
        groups: "OrderedDict[str, List[str]]" = OrderedDict()
        for r in skipped:
            groups.setdefault(r.reason, []).append(r.name)
        for reason, names in groups.items():
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            logger.info("  skipped (%s): %s", reason, shown)


def _attention_parts_without_scales(model: Any, exclude: Tuple[str, ...], scales: Mapping[str, float]) -> List[str]:
    """The projections of a torch model's ``nn.MultiheadAttention`` modules (quantized as
    ``<attn>.q_proj`` ...) that have no static activation scale: the calibration never sees them
    (the attention calls no Linear module)."""
    import torch  # the model is a torch module: torch is already imported
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.MultiheadAttention) and _match(name, exclude) is None:
            parts = [f"{name}.{p}" if name else p for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            out += [_display(p) for p in parts if p not in scales]
    return out


def _check_refine(refine: Any) -> Tuple[QuantScheme, ...]:
    """``refine=`` (schemes or names, tried in order before float) -> a tuple of QuantSchemes."""
    if refine is None:
        return ()
    if isinstance(refine, (str, QuantScheme)):
        refine = (refine,)
    out = []
    for r in refine:
        if isinstance(r, str):
            r = QuantScheme.parse(r)
        if not isinstance(r, QuantScheme):
            raise errors.TypeError(f"refine: expected QuantSchemes or scheme names, got {type(r).__name__}")
        out.append(r)
    return tuple(out)


@dataclass
class _AdapterArgs:
    """What :func:`cquant.adapters.quantize_torch` reads from a Quantizer (one scheme per call)."""
    scheme: QuantScheme
    include: Tuple[str, ...]
    exclude: Tuple[str, ...]
    owner: Optional["Quantizer"]
    summary: List[LayerRecord] = None  # type: ignore[assignment]
    embeddings: Tuple[str, ...] = ()   # embedding tables to quantize too (every call: ties resolve in one)
    act_scales: Optional[Dict[str, float]] = None  # static schemes: layer name -> activation scale
    quiet: bool = False  # one of several per-scheme calls: the Quantizer reports the whole (no per-call warnings)

    @property
    def mode(self) -> str:
        return self.scheme.mode

    @property
    def granularity(self) -> str:
        return self.scheme.granularity

    @property
    def group_size(self) -> Optional[int]:
        return self.scheme.group_size

    @property
    def bits(self) -> int:
        return self.scheme.bits

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "summary" and value is not None and self.owner is not None:
            self.owner.summary = value


def _glob_escape(name: str) -> str:
    """A layer name as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


_MISSING = object()


def _set_attr(obj: Any, name: str, value: Any, undo: List[Callable[[], None]]) -> None:
    """``setattr`` that journals how to restore the previous state."""
    if isinstance(obj, nn.Module):
        had = name in obj._parameters or name in obj._modules or name in vars(obj)
    else:
        had = name in vars(obj)
    # a data descriptor of the class (a property with a setter): setattr goes through it, and so must
    # the undo (there is no instance attribute to delete)
    had = had or hasattr(type(getattr(type(obj), name, None)), "__set__")
    old = getattr(obj, name) if had else _MISSING
    setattr(obj, name, value)
    undo.append(lambda: setattr(obj, name, old) if old is not _MISSING else delattr(obj, name))


def _replace_at(site: _Site, old: Any, new: Any, undo: List[Callable[[], None]]) -> None:
    if site.kind in ("module", "attr"):
        setattr(site.container, site.key, new)
        undo.append(lambda: setattr(site.container, site.key, old))
    else:
        site.container[site.key] = new
        undo.append(lambda: site.container.__setitem__(site.key, old))


def _renamed(e: Exception, message: str) -> Exception:
    """The same exception class with a message that names the layer."""
    try:
        return type(e)(message)
    except Exception:  # noqa: BLE001 - a class with an unusual constructor: keep the original
        return e


# --------------------------------------------------------------------------------------------------
# Reports and measured memory
# --------------------------------------------------------------------------------------------------

def report(model: Any) -> List[ReportRow]:
    """One :class:`ReportRow` per quantized layer of ``model`` (cquant.nn, duck-typed or torch), in
    model order (int8 embedding tables too: scheme ``"int8 embedding per_channel"``, shape
    ``(rows, dim)``): :meth:`cquant.frontends.FrontEnd.report` of its front-end."""
    return _frontends.for_model(model).report(model)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"`` (B, KiB, MiB, GiB); used by the reports and the CLI."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"  # pragma: no cover


def format_report(rows: Sequence[ReportRow]) -> str:
    """A plain-text table of :func:`report` rows with a total line."""
    header = ("layer", "shape (out, in)", "scheme", "fp32", "int8", "ratio")
    body = []
    for r in rows:
        ratio = f"{r.bytes_after / r.bytes_before:.3f}" if r.bytes_before else "-"
        name = r.name + (f" (shares {r.shared_with})" if r.shared_with else "")
        body.append((name, f"{r.shape[0]} x {r.shape[1]}", r.scheme, format_bytes(r.bytes_before),
                     format_bytes(r.bytes_after), ratio))
    tb = sum(r.bytes_before for r in rows)
    ta = sum(r.bytes_after for r in rows)
    total = (f"total ({len(rows)} layers)", "", "", format_bytes(tb), format_bytes(ta),
             f"{ta / tb:.3f}" if tb else "-")
    table = [header] + body + [total]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {3, 4, 5}

    def fmt(row: Tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule] + [fmt(r) for r in body] + [rule, fmt(total)])


_array_owner = ops._array_owner


def model_nbytes(model: Any) -> int:
    """Bytes of all numpy arrays reachable from ``model``, each memory block counted once.

    Measured, not computed from shapes: follows parameters, attributes, containers and the arrays
    inside quantized weights; views are charged to the array that owns the memory.
    """
    owners: Dict[int, int] = {}

    def visit(v: Any) -> None:
        if isinstance(v, np.ndarray):
            o = _array_owner(v)
            owners[id(o)] = o.nbytes

    def descend(o: Any) -> bool:
        return _descendable(o) or isinstance(o, (ops.QuantizedWeight, QuantizedLinearForward))

    visit(model)
    for _path, obj, _site, revisit in _walk(model, stop=lambda o: False, descend=descend):
        if revisit:
            continue
        if isinstance(obj, nn.Module):
            for p in obj._parameters.values():
                visit(p)
        for _name, child, _s in _children(obj):
            visit(child)
    return int(sum(owners.values()))
