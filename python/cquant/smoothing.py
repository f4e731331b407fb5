"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before int8 quantization.

    from cquant.smoothing import smooth
    res = smooth(model, batches, alpha=0.5)      # cquant.nn or torch model, modified in place
    print(res.format())                          # what was smoothed, and how
    cquant.Quantizer.quantize_dynamic(model)     # or, all in one call:
    cquant.Quantizer.quantize_dynamic(model, calibration=batches, smoothing=0.5)

Why
---
Dynamic int8 quantizes each activation row with one scale, ``max|x_row| / 127``. Transformers'
activations have a few channels far larger than the rest (BERT's residual stream, LayerNorm gains),
so one large channel sets the step for the whole row and the small channels round to a few codes.
For a Linear ``y = x W^T`` and any positive per-input-channel ``s``, ``y = (x / s) (W diag(s))^T``
exactly; choosing ``s_j = max|x_j|^alpha / max_i|W_ij|^(1 - alpha)`` evens out the channel ranges of
the activations (alpha = 1: all into the weights; 0: none), and per-channel weight quantization
absorbs the rest.

Where ``1/s`` goes
------------------
Layers that receive the *same* input (e.g. query, key and value) form a group with one ``s``
(``max|W_ij|`` taken over all of them). The division by ``s`` must happen somewhere:

1. **Folded** into the layer that produced the input, when that is exact: a LayerNorm / RMSNorm
   (gain and bias divided by ``s``) or a Linear (its output rows and bias divided by ``s``), found by
   tracing which object each layer's input is; and, for attention, the value projection feeding
   the output projection (``*.self.value`` -> ``*.output.dense``, ``v_proj`` -> ``o_proj``/
   ``out_proj``), since attention mixes value rows per channel. Each candidate fold is *verified*:
   the first calibration batch is run again and the model output must match the output before
   smoothing (relative error < ``tolerance``); a fold that changes the model is undone. A fold
   costs nothing at run time.
   Where the LayerNorm's output is also a residual (post-norm BERT: the attention block's output
   feeds the FFN and is added back after it), the fold needs the residual multiplied back by ``s``
   where it is added: a block that can do that inside its add + LayerNorm pass
   (:meth:`cquant.frontends.FrontEnd.residual_blocks`: :class:`cquant.bert`'s output blocks, which
   get a ``residual_scale`` parameter; transformers' ``*Output`` blocks, swapped for a
   residual-scaled subclass with a ``residual_scale`` buffer) multiplies it back; the fold is
   verified as above, on every array the model returns (a transformers model's hidden states too:
   there a LayerNorm whose output is a layer's output, the residual stream, does not fold; the one
   inside each layer, in front of the FFN, does). In cquant.nn models the layers' own outputs
   (not returned) are then in the smoothed basis; the model output is unchanged.
2. Otherwise, with ``prescale=True``, each layer of the group is wrapped in :class:`Smoothed`
   (``linear(x * (1/s))``; for torch models a ``cquant.adapters.torch_smoothing.SmoothedTorchLinear``),
   whose multiply (and rotation, with ``rotate``) runs inside the quantized Linear's activation
   pass, not as a pass of its own. The quantizer quantizes the Linear inside the wrapper. With
   ``prescale=False`` such groups are left unsmoothed.

The model computes the same function as before (to float32 rounding) in every case; the float
model's output is checked at the end.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import calibration as _cal
from . import errors, nn, ops
from . import frontends as fe
from .checkpoint_file import FOLD_ATTRS
from .frontends import Patterns

__all__ = ["smooth", "Smoothed", "SmoothingResult", "SmoothedGroup", "smoothing_scales", "INPUT_SCALES_ATTR",
           "OUTPUT_SCALES_ATTR"]

#: attribute of the model root: layer name -> the ``s`` its input was divided by through a fold
#: (used by :func:`cquant.compare` to feed a smoothed layer from an unsmoothed model; checkpoints
#: keep it, see cquant.checkpoint_file.FOLD_ATTRS)
INPUT_SCALES_ATTR = FOLD_ATTRS["input"]
#: attribute of the model root: Linear name -> the ``s`` its output was divided by (a fold into it)
OUTPUT_SCALES_ATTR = FOLD_ATTRS["output"]


class Smoothed(nn.Module):
    """``linear(x * inv_scale)``: a Linear whose input channels were rescaled by smoothing (its weight
    columns multiplied by ``1 / inv_scale``, so in float the result is unchanged). Not Linear-like
    itself: the Quantizer quantizes the inner ``linear``; once it is quantized, ``inv_scale`` is
    applied inside its kernel (the activation quantizer's pass), not by a separate multiply.

    With a rotation (``hadamard`` = block size b > 0; ``smooth(..., rotate=True)``), the input is
    ``ops.hadamard(x, b, inv_scale)``: ``x * inv_scale`` rotated by the Walsh-Hadamard transform of
    each block of b columns (the weight was rotated to match), also inside the kernel once quantized.
    ``hadamard`` is a parameter (int64, shape (1,); 0: none), so it travels in state_dict and
    checkpoints; a state_dict without it (written before rotation existed) loads as 0."""

    _cquant_smoothing_wrapper = True  # what FrontEnd.unwrap (cquant.frontends) recognises
    _cquant_activation = True         # forward takes activation="gelu" (see QuantizedLinear)

    def __init__(self, linear: nn.Module, inv_scale: np.ndarray, hadamard: int = 0):
        super().__init__()
        self.linear = linear
        self.inv_scale = np.ascontiguousarray(inv_scale, dtype=np.float32)
        self.hadamard = np.array([_check_block(hadamard, self.inv_scale.shape[-1])], dtype=np.int64)

    def forward(self, x: np.ndarray, activation: Optional[str] = None) -> np.ndarray:
        # the registries read directly: this runs on every call of every smoothed layer
        d = self.__dict__
        p, lin = d["_parameters"], d["_modules"]["linear"]
        inv, b = p["inv_scale"], int(p["hadamard"][0])
        if activation is not None and not (getattr(type(lin), "_cquant_activation", False) is True
                                           and "forward" not in lin.__dict__ and "__call__" not in lin.__dict__):
            if type(activation) is ops.AddLayerNorm:  # a float or watched inner layer: the op after it
                return activation.apply(self.forward(x))
            if activation != "gelu":
                raise errors.ValueError(f"unknown activation {activation!r}; expected None, 'gelu' or an AddLayerNorm")
            return ops.gelu(self.forward(x))
        if getattr(type(lin), "_cquant_x_mul", False) is True:  # quantized: inside the kernel
            if activation is not None:
                return lin(x, x_mul=inv, x_hadamard=b, activation=activation)
            return lin(x, x_mul=inv, x_hadamard=b) if b else lin(x, x_mul=inv)
        if b:
            return lin(ops.hadamard(x, b, inv))
        return lin(x * inv)

    def _load_plan(self, state: Any, prefix: str, plan: List[Callable[[], None]], used: set,
                   missing: List[str], mismatched: list) -> None:
        key = prefix + "hadamard"
        if key not in state:  # a state_dict from before rotation: no rotation
            state = {**state, key: np.zeros(1, np.int64)}
        else:
            v = np.asarray(state[key])
            if v.shape != (1,) or v.dtype.kind not in "iu":
                raise errors.ValueError(f"{key} must be one integer, got {v.dtype} {v.shape}")
            _check_block(int(v[0]), self.inv_scale.shape[-1], key)
        super()._load_plan(state, prefix, plan, used, missing, mismatched)


fe.register_nn_wrapper(Smoothed)  # cquant.load_into wraps a hand-built model's layers with it


def check_residual_scale(scale: Any, what: str) -> np.ndarray:
    """A residual factor (``residual_scale``, a numpy array or a tensor) as float32, refused unless it
    is a 1-D float array of finite values > 0 (a NaN or 0 would silently wreck every output)."""
    a = fe.as_numpy(scale)
    if a.dtype.kind != "f" or a.ndim != 1 or not np.all(np.isfinite(a)) or not np.all(a > 0):
        raise errors.ValueError(f"{what} must be a 1-D float array of finite values > 0")
    return a


def _check_block(b: Any, k: int, what: str = "hadamard") -> int:
    """0 (no rotation), or a rotation block for ``k`` inputs (:func:`cquant.ops.hadamard_block`)."""
    return ops.hadamard_block(b, k, what, allow_zero=True)


#: largest rotation block ``rotate=True`` uses: on all-MiniLM-L6-v2 (smoothing 0.5, 16 calibration
#: sentences, 72 held-out), with every wrapper rotated (``rotate="all"``), blocks of 32 / 64 / 128
#: gave a minimum cosine of 0.99819 / 0.99863 / 0.99853 (mean 0.99968-0.9997), and each doubling
#: adds a stage to the kernel's pass (``rotate=True``: see README "Rotation")
ROTATE_BLOCK = 64


def rotation_block(k: int, rotate: Any) -> int:
    """The block size for a layer of ``k`` inputs: ``rotate`` True: the largest power of two <=
    :data:`ROTATE_BLOCK` dividing k (0 if that is 1); an int: that size if it divides k, else 0."""
    if rotate is True:
        b = ROTATE_BLOCK
        while b > 1 and k % b:
            b //= 2
        return b if b >= 2 else 0
    return rotate if k % rotate == 0 else 0


def _dtype_eps(w: Any) -> float:
    """The machine epsilon of a weight's float dtype (numpy or torch; 0 if unknown)."""
    dt = getattr(w, "dtype", None)
    if dt is None:
        return 0.0
    if fe.is_torch_tensor(w):
        return float(fe._torch().finfo(dt).eps) if dt.is_floating_point else 0.0
    try:
        return float(np.finfo(dt).eps)
    except (TypeError, ValueError):
        return 0.0


def _hadamard64(a: np.ndarray, b: int) -> np.ndarray:
    """``a @ blockdiag(H_b)`` in float64 (columns in blocks of b; H_b unnormalised, symmetric)."""
    return ops.hadamard_stages(np.array(a, dtype=np.float64, order="C", copy=True), b)


def rotation_signs(k: int) -> np.ndarray:
    """The fixed random +-1 per input column that goes with a rotation (seeded by k: the same for
    every run): without them a block's rotation of a constant channel pattern would be sparse."""
    return np.where(np.random.default_rng(k).random(k) < 0.5, -1.0, 1.0)


@dataclass
class SmoothedGroup:
    """Layers sharing one input and one smoothing scale ``scale`` (``s``, shape ``(K,)``).
    ``how``: ``"layernorm"`` / ``"linear"`` (``1/s`` folded into ``folded_into``; ``residual``: the
    blocks that multiply that LayerNorm's output back by ``s`` where they add it as a residual),
    ``"prescale"`` (wrappers) or ``"none"`` (left as it was; ``note`` says why)."""
    layers: List[str]
    scale: np.ndarray
    how: str
    folded_into: Optional[str] = None
    note: str = ""
    hadamard: int = 0     # "prescale" with rotate: the rotation's block size
    residual: List[str] = field(default_factory=list)


@dataclass
class SmoothingResult:
    alpha: Any                    # a float, or "auto"
    groups: List[SmoothedGroup]
    calibration: _cal.Calibration
    max_rel_change: float = 0.0   # float model output change over the first batch (rounding only)
    # undoes every change smooth() made to the model (prepare_and_quantize calls it when a later
    # step fails, so the model is left as it was); None once used or for a result made by hand
    _undo: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)

    @property
    def smoothed_layers(self) -> List[str]:
        return [n for g in self.groups if g.how != "none" for n in g.layers]

    def format(self) -> str:
        lines = [f"SmoothQuant alpha={self.alpha}: {len(self.smoothed_layers)} layer(s) smoothed "
                 f"(float output change {self.max_rel_change:.1e})"]
        for g in self.groups:
            folded = f"folded into {g.folded_into}" + (
                f", residual scaled back in {', '.join(g.residual)}" if g.residual else "")
            how = {"layernorm": folded, "linear": folded,
                   "prescale": "pre-scale wrapper" + (f", rotated in blocks of {g.hadamard}" if g.hadamard else ""),
                   "none": "not smoothed"}[g.how]
            lines.append(f"  {', '.join(g.layers)}: {how}" + (f" ({g.note})" if g.note else ""))
        return "\n".join(lines)


def smoothing_scales(absmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = absmax_j^alpha / wmax_j^(1-alpha)``, 1 where either is 0, clipped to [1e-4, 1e4]."""
    a = np.asarray(absmax, np.float64)
    w = np.asarray(wmax, np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Weights of the two front-ends, read as (out, in) float32 numpy and written back as new arrays
# (never in place: a weight tied to another module keeps its values there)
# --------------------------------------------------------------------------------------------------

def _get_param(mod: Any, name: str) -> Optional[np.ndarray]:
    p = getattr(mod, name, None)
    if p is None:
        return None
    return np.array(fe.as_numpy(p), dtype=np.float32, copy=True)


def _weight(front: fe.FrontEnd, mod: Any) -> np.ndarray:
    w = _get_param(mod, "weight")
    assert w is not None
    return np.ascontiguousarray(w.T) if front.weight_in_out(mod) else w


def _set_weight(front: fe.FrontEnd, mod: Any, w: np.ndarray) -> None:
    front.set_param(mod, "weight", np.ascontiguousarray(w.T) if front.weight_in_out(mod) else w)


def _weight_holders(model: Any) -> Dict[int, List[str]]:
    """id(parameter) -> the names of the modules that register it (cquant.nn and torch modules
    both keep theirs in ``_parameters``): more than one name means a shared (tied) weight."""
    out: Dict[int, List[str]] = {}
    for name, mod in model.named_modules():
        for p in getattr(mod, "_parameters", {}).values():
            if p is not None:
                out.setdefault(id(p), []).append(name)
    return out


def _attr_restore(obj: Any, attr: str) -> Callable[[], None]:
    """A step that puts ``obj.attr`` back as it is now (absent: deleted again)."""
    missing = object()
    old = obj.__dict__.get(attr, missing)

    def restore() -> None:
        if old is missing:
            obj.__dict__.pop(attr, None)
        else:
            object.__setattr__(obj, attr, old)
    return restore


class _Journal:
    """Undo log of parameter / module changes."""

    def __init__(self, front: fe.FrontEnd) -> None:
        self.front = front
        self.steps: List[Callable[[], None]] = []

    def param(self, mod: Any, name: str, value: np.ndarray) -> None:
        old = getattr(mod, name)
        self.front.set_param(mod, name, value)
        self.steps.append(lambda: setattr(mod, name, old))

    def weight(self, mod: Any, w: np.ndarray) -> None:
        self.param(mod, "weight", np.ascontiguousarray(w.T) if self.front.weight_in_out(mod) else w)

    def undo(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


# --------------------------------------------------------------------------------------------------
# smooth()
# --------------------------------------------------------------------------------------------------

_ATTN_PAIRS = ((re.compile(r"^(.*)\.output\.dense$"), (r"\1.self.value",)),
               (re.compile(r"^(.*)\.(out_proj|o_proj)$"), (r"\1.v_proj",)))


def _attention_value(name: str, linears: Dict[str, fe.LayerRef]) -> Optional[str]:
    """The value projection whose (attention-mixed) output is the input of layer ``name``."""
    for pat, subs in _ATTN_PAIRS:
        if pat.match(name):
            for sub in subs:
                cand = pat.sub(sub, name)
                if cand in linears:
                    return cand
    return None


def _rel_change(y: np.ndarray, ref: np.ndarray) -> float:
    """Relative change of ``y`` from ``ref`` over the finite entries of ``ref``; inf if the shapes or
    the non-finite entries differ (a NaN in a calibration row gives NaN outputs in that row, before
    and after smoothing: those are not a change)."""
    if y.shape != ref.shape:
        return float("inf")
    fin = np.isfinite(ref)
    if not np.array_equal(np.isfinite(y), fin):
        return float("inf")
    d = np.linalg.norm((y.astype(np.float64)[fin] - ref.astype(np.float64)[fin]).ravel())
    n = np.linalg.norm(ref.astype(np.float64)[fin].ravel())
    if not np.isfinite(d):
        return float("inf")
    return float(d / n) if n > 0 else float(d)


#: the strengths ``alpha="auto"`` tries for each group (plus "no smoothing")
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: input rows per layer kept for the ``"auto"`` search
AUTO_ROWS = 512


def _group_error(members: Sequence[str], x: np.ndarray, weights: Dict[str, np.ndarray],
                 s: Optional[np.ndarray]) -> float:
    """Relative squared error of the group's int8 (dynamic, per-channel) outputs on rows ``x`` with
    smoothing scales ``s`` (None: unsmoothed), summed over the members."""
    xs = x if s is None else np.ascontiguousarray(x / s, dtype=np.float32)
    total = 0.0
    for m in members:
        w = weights[m]
        y = x.astype(np.float64) @ w.astype(np.float64).T
        ws = w if s is None else w * s[None, :]
        yq = ops.linear(xs, ops.quantize_weight(np.ascontiguousarray(ws, dtype=np.float32)), None, "dynamic")
        den = float((y * y).sum())
        total += float(((yq - y) ** 2).sum()) / den if den > 0 else 0.0
    return total


def _choose_alpha(members: Sequence[str], x: np.ndarray, absmax: np.ndarray, weights: Dict[str, np.ndarray],
                  wmax: np.ndarray) -> Tuple[Optional[float], np.ndarray, str]:
    """The alpha of :data:`ALPHA_GRID` (or None = leave unsmoothed) with the smallest int8 error of
    the group on its calibration rows."""
    best: Tuple[float, Optional[float], np.ndarray] = (_group_error(members, x, weights, None), None,
                                                       np.ones_like(absmax))
    base = best[0]
    for a in ALPHA_GRID:
        s = smoothing_scales(absmax, wmax, a)
        e = _group_error(members, x, weights, s)
        if e < best[0]:
            best = (e, a, s)
    gain = base / best[0] if best[0] > 0 else float("inf")
    note = (f"alpha {best[1]}: int8 error x{1 / gain:.2f} of unsmoothed" if best[1] is not None
            else "smoothing does not lower this group's int8 error")
    return best[1], best[2], note


def smooth(model: Any, batches: Any, alpha: Any = 0.5, include: Patterns = None, exclude: Patterns = None,
           prescale: bool = True, tolerance: float = 1e-4, rotate: Any = False) -> SmoothingResult:
    """Smooth the float Linear layers of ``model`` (a :mod:`cquant.nn` or torch model), in place.

    ``batches``: calibration inputs (see :func:`cquant.calibrate`); the first one is also used to
    trace which layer feeds which and to verify folds. ``alpha``: the migration strength in [0, 1],
    or ``"auto"``: per group, the strength of :data:`ALPHA_GRID` (or none) that gives the smallest
    int8 (dynamic, per-channel) output error on up to :data:`AUTO_ROWS` calibration rows.
    ``include``/``exclude``: names or globs of the Linear layers to smooth. ``rotate``: also rotate
    the input of every group that gets a pre-scale wrapper (no exact fold): True (blocks of up to
    :data:`ROTATE_BLOCK`) or a block size (a power of two); ``"all"``: as True, and the groups whose
    fold would need the residual scaled back (post-norm LayerNorm outputs, see the module docstring)
    take a rotated wrapper instead (more accurate, a rotation pass more per call); the wrapper's input becomes
    ``hadamard((x / s) * d / sqrt(b))`` (``d`` fixed random signs) and the weights
    ``(W diag(s d)) H_b / sqrt(b)``, so the float model is unchanged, while an outlier channel is spread
    over its block of b columns before the per-row int8 scale is taken (QuaRot-style). The quantized
    layer does it in the activation quantizer's pass (``cq_linear_ex``'s ``x_hadamard``). Returns a
    :class:`SmoothingResult` (its ``calibration`` holds the statistics measured before smoothing).
    """
    auto = alpha == "auto"
    if not auto and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0):
        raise errors.ValueError(f"alpha must be in [0, 1] or 'auto', got {alpha!r}")
    rotate_all = isinstance(rotate, str) and rotate == "all"
    if rotate_all:
        rotate = True
    if rotate is not True and rotate is not False and rotate is not None:
        if isinstance(rotate, bool) or not isinstance(rotate, (int, np.integer)) or rotate < 2 or rotate & (rotate - 1):
            raise errors.ValueError(f"rotate must be True, False, 'all' or a power of two >= 2, got {rotate!r}")
        rotate = int(rotate)
    if rotate and not prescale:
        raise errors.ValueError("rotate needs prescale=True (the rotation runs in the pre-scale wrapper)")
    front = fe.for_model(model)
    kind = front.name
    if not front.smoothable:
        raise errors.TypeError("smoothing needs a cquant.nn or torch model (it replaces and rescales "
                               f"modules); got {type(model).__name__}")
    done_before = sorted(n for n, m in model.named_modules()
                         if getattr(type(m), "_cquant_smoothing_wrapper", False) is True
                         or getattr(m, "residual_scale", None) is not None)
    if done_before or getattr(model, INPUT_SCALES_ATTR, None):
        # a second smoothing of folded LayerNorms and wrappers is not verified to keep the float
        # model (it used to fail its own check with "this is a bug"): one smoothing per float model
        raise errors.ValueError("this model was smoothed already (" + (", ".join(done_before[:3]) + (", ..."
                                if len(done_before) > 3 else "") if done_before else "folded scales") +
                                "): smooth the float model once, e.g. quantize_dynamic(float_model, "
                                "calibration=batches, smoothing=0.5) without an earlier smooth()")
    blist = fe.batch_list(batches)
    refs = front.layers(model, quantized=False)
    if not refs:
        raise errors.ValueError(f"{type(model).__name__} has no float Linear layer to smooth")
    linears = {r.name: r for r in refs}
    selected = {r.name for r in front.layers(model, include, exclude, quantized=False)}
    for name in sorted(selected):  # as quantization refuses them, before anything is changed
        ops.check_finite(_weight(front, linears[name].obj), f"layer {name!r} weight")
    norms = front.norm_layers(model)
    norm_refs = [fe.LayerRef(n, m, 0, 0, False) for n, m in norms]

    # one pass per batch: statistics of every layer input; on the first batch also which object
    # each layer received and produced (references held until the pass ends, so ids are unique)
    stats = {r.name: _cal.LayerStats.empty(r.name, r.in_features, AUTO_ROWS if auto else 0) for r in refs}
    first_in: Dict[str, Any] = {}
    produced: Dict[int, Tuple[str, str]] = {}
    keep: List[Any] = []
    tracing = [True]

    def watch(ref: Any, x: Any, forward: Callable[[Any], Any]) -> Any:
        y = forward(x)
        if ref.name in stats:
            stats[ref.name].update(fe.as_numpy(x))
        if tracing[0]:
            if ref.name in stats:
                first_in.setdefault(ref.name, x)
                kind_ = "linear"
            else:
                kind_ = "layernorm"
            produced.setdefault(id(y), (kind_, ref.name))
            keep.extend((x, y))
        return y

    # blocks that can scale their residual (FrontEnd.residual_blocks: cquant.bert's output blocks,
    # transformers' *Output blocks): which object each received as its residual on the first batch
    residual_of: Dict[int, List[Tuple[str, Any]]] = {}
    with fe.intercept(list(refs) + norm_refs, watch), \
            _watch_residuals(front, model, residual_of, produced, {n for n, _ in norms}, keep, tracing):
        for b in blist:
            fe.run(model, b)
            tracing[0] = False
    calibration = _cal.Calibration({n: s for n, s in stats.items() if s.calls}, len(blist), kind,
                                   [n for n, s in stats.items() if not s.calls])

    # groups: layers that received the same object on the first batch
    by_input: Dict[int, List[str]] = {}
    for name in linears:
        if name in first_in:
            by_input.setdefault(id(first_in[name]), []).append(name)
    first_in.clear()
    keep.clear()
    groups: List[SmoothedGroup] = []
    record: Dict[str, np.ndarray] = dict(getattr(model, INPUT_SCALES_ATTR, None) or {})
    record_out: Dict[str, np.ndarray] = dict(getattr(model, OUTPUT_SCALES_ATTR, None) or {})

    # every array the model returns (transformers: the hidden states too, which a fold into a
    # LayerNorm that produces the residual stream would change), before anything is changed
    ref_all = fe.run_all(model, blist[0])

    # the verification's tolerance: ``tolerance``, or a few roundings of the model's own dtype where
    # that is coarser (a bfloat16 weight times s rounds to bf16: a fold changes a bf16 model's output
    # by ~2 of its eps, 7e-3, which is noise there, not a wrong fold)
    eps = max([_dtype_eps(getattr(linears[n].obj, "weight", None)) for n in selected] or [0.0])
    tolerance = max(float(tolerance), 4.0 * eps)
    def check() -> Tuple[float, str]:
        """(the largest relative change of the model's outputs on the first batch, ""), or (inf, why)
        when the model no longer runs (its forward reads a wrapped layer's weight directly, say)."""
        try:
            outs = fe.run_all(model, blist[0])
        except Exception as e:  # noqa: BLE001 - the change is undone; the model ran before it
            return float("inf"), f"{type(e).__name__}: {e}"
        if len(outs) != len(ref_all):
            return float("inf"), ""
        return max(_rel_change(a, b) for a, b in zip(outs, ref_all)), ""

    # every change below goes into one journal: a failure anywhere (here, or in a later step of
    # the caller: SmoothingResult._undo) puts the model back as it was
    journal = _Journal(front)
    try:
        holders = _weight_holders(model)
        for key, members in by_input.items():
            if not any(m in selected for m in members):
                continue
            # a weight shared with another module: rescaling it would untie it (a tied lm_head would
            # become a second, quantized copy)
            tied = [(m, [n for n in holders.get(id(linears[m].obj.weight), ()) if n != m]) for m in members]
            tied = [(m, others) for m, others in tied if others]
            if tied:
                m, others = tied[0]
                groups.append(SmoothedGroup(members, np.ones(linears[members[0]].in_features, np.float32), "none",
                                            note=f"{m}'s weight is shared with {', '.join(others[:3])}: not smoothed"))
                continue
            absmax = np.max([stats[m].absmax for m in members], axis=0)
            weights = {m: _weight(front, linears[m].obj) for m in members}
            wmax = np.max([np.abs(weights[m]).max(axis=0) for m in members], axis=0)
            if auto:
                x = stats[members[0]].samples
                if x is None or not x.size:
                    groups.append(SmoothedGroup(members, np.ones_like(absmax), "none", note="no calibration rows"))
                    continue
                chosen, s, why = _choose_alpha(members, x, absmax, weights, wmax)
                if chosen is None:
                    groups.append(SmoothedGroup(members, s, "none", note=why))
                    continue
            else:
                s, why = smoothing_scales(absmax, wmax, alpha), ""
            if np.all(s == 1):
                groups.append(SmoothedGroup(members, s, "none", note="nothing to move (all-zero input or weight)"))
                continue
            # fold candidates: (kind, producer, the blocks that must scale that output back where they
            # add it as a residual: a LayerNorm output that is also a residual; a plain fold would change
            # the model there)
            candidates: List[Tuple[str, str, List[Tuple[str, Any]]]] = []
            notes: List[str] = []
            prod = produced.get(key)
            residual = residual_of.get(key, []) if prod is not None and prod[0] == "layernorm" else []
            if residual and rotate_all:  # a rotated wrapper instead of the fold with the residual scaled back
                notes.append(f"not folded into {prod[1]} (rotate='all')")
            elif prod is not None:
                candidates.append((prod[0], prod[1], residual))
            if len(members) == 1:
                v = _attention_value(members[0], linears)
                if v is not None and linears[v].out_features == linears[members[0]].in_features \
                        and not any(c[:2] == ("linear", v) for c in candidates):
                    candidates.append(("linear", v, []))
            done = False
            for how, src, res_blocks in candidates:
                j = _Journal(front)
                journal.steps.append(j.undo)  # a failure in this attempt undoes it too (undo empties j)
                if not _fold(model, j, how, src, s, linears, dict(norms)):
                    notes.append(f"cannot fold into {src}")
                    continue
                for _, blk in res_blocks:
                    j.steps.append(front.scale_residual(blk, s))
                for m in members:
                    j.weight(linears[m].obj, _weight(front, linears[m].obj) * s[None, :])
                change, failed = check()
                if change <= tolerance:  # kept: j stays in the journal, undone only if the whole smoothing is
                    groups.append(SmoothedGroup(members, s, how, src, note=why, residual=[n for n, _ in res_blocks]))
                    for m in members:
                        record[m] = record[m] * s if m in record else s.copy()
                    if how == "linear":
                        record_out[src] = record_out[src] * s if src in record_out else s.copy()
                    done = True
                    break
                j.undo()
                notes.append(f"folding into {src} would change the model output ({change:.1e})" if not failed else
                             f"the model fails with the fold into {src} ({failed})")
            if done:
                continue
            if not prescale:
                groups.append(SmoothedGroup(members, s, "none", note="; ".join(notes + ["no exact fold, prescale=False"])))
                continue
            block = rotation_block(s.shape[0], rotate) if rotate else 0
            if block:
                d = rotation_signs(s.shape[0])
                inv = (d / (s.astype(np.float64) * np.sqrt(block))).astype(np.float32)
                notes.append(f"rotated in blocks of {block}")
            else:
                inv = (1.0 / s).astype(np.float32)
                if rotate:
                    notes.append(f"not rotated: in_features {s.shape[0]} is odd" if rotate is True else
                                 f"not rotated: the block size {rotate} does not divide in_features {s.shape[0]}")
            j = _Journal(front)
            journal.steps.append(j.undo)
            for m in members:
                mod = linears[m].obj
                w = _weight(front, mod)
                if block:
                    w = (_hadamard64(w.astype(np.float64) * (s.astype(np.float64) * d)[None, :], block)
                         / np.sqrt(block)).astype(np.float32)
                else:
                    w = w * s[None, :]
                j.weight(mod, w)
                wrapper = front.smoothed(mod, inv, block)
                if wrapper is None:  # the front-end has no wrapper of its own: a cquant.nn one
                    wrapper = Smoothed(mod, inv, block)
                if front.replace(model, mod, wrapper) == 0:  # the model is the layer itself
                    raise errors.ValueError(f"cannot wrap {m!r}: it is not a registered sub-module")
                j.steps.append(lambda _w=wrapper, _m=mod: front.replace(model, _w, _m))
                j.steps.append(front.wrappers_placed(model))
            # verified as a fold is: a forward that reads a wrapped layer's weight directly (F.linear(x,
            # self.a.weight)) runs the scaled weight without the wrapper's 1/s, or fails on its None
            change, failed = check()
            if change > 10 * tolerance:
                j.undo()
                groups.append(SmoothedGroup(members, s, "none", note="; ".join(notes + [
                    f"the model fails with a pre-scale wrapper here ({failed})" if failed else
                    f"a pre-scale wrapper here changes the model output ({change:.1e}): its forward may read "
                    "the layer's weight directly"])))
                continue
            groups.append(SmoothedGroup(members, s, "prescale", note="; ".join([why] * bool(why) + notes),
                                        hadamard=block))
        if rotate is not True and rotate and any(g.how == "prescale" for g in groups) and \
                not any(g.hadamard for g in groups):
            logging.getLogger("cquant").warning("rotate=%d rotated no layer: the block size divides no pre-scaled "
                                                "layer's in_features (rotate=True picks a block per layer)", rotate)
        change, failed = check()
        if change > 10 * tolerance:
            if failed:
                raise errors.QuantizationError(f"the smoothed float model fails to run ({failed}); "
                                               "this is a bug, please report it")
            raise errors.QuantizationError(f"smoothing changed the float model output by {change:.1e} "
                                           f"(> {10 * tolerance:.0e}); this is a bug, please report it")
        for attr, value in ((INPUT_SCALES_ATTR, record), (OUTPUT_SCALES_ATTR, record_out)):
            if value:
                journal.steps.append(_attr_restore(model, attr))
                object.__setattr__(model, attr, value)
    except BaseException:
        journal.undo()
        raise
    return SmoothingResult(alpha if auto else float(alpha), groups, calibration, change, _undo=journal.undo)


@contextlib.contextmanager
def _watch_residuals(front: fe.FrontEnd, model: Any, seen: Dict[int, List[Tuple[str, Any]]],
                     produced: Dict[int, Tuple[str, str]], norm_names: set, keep: List[Any],
                     tracing: List[bool]) -> Iterator[None]:
    """While active (and ``tracing[0]``), a call of a block that can scale its residual
    (:meth:`FrontEnd.residual_blocks`) records ``id(residual) -> [(name, block)]`` in ``seen``, and
    its output as produced by its ``LayerNorm`` child (cquant.bert's blocks run that LayerNorm's
    parameters in their own add + LayerNorm pass, over the dense layer's output buffer, so the
    LayerNorm module is never called). Arguments and outputs are kept alive in ``keep``, so ids
    stay unique."""
    undo: List[Callable[[], None]] = []

    def record(name: str, block: Any, i: int, args: Tuple[Any, ...], out: Any) -> None:
        if tracing[0] and len(args) > i:
            seen.setdefault(id(args[i]), []).append((name, block))
            if f"{name}.LayerNorm" in norm_names:
                produced[id(out)] = ("layernorm", f"{name}.LayerNorm")
            keep.extend((args[i], out))
    try:
        for name, mod, i in front.residual_blocks(model):
            undo.append(front.watch_calls(mod, lambda args, out, _n=name, _m=mod, _i=i: record(_n, _m, _i, args, out)))
        yield
    finally:
        for step in reversed(undo):
            step()


def _fold(model: Any, j: _Journal, how: str, src: str, s: np.ndarray, linears: Dict[str, fe.LayerRef],
          norms: Dict[str, Any]) -> bool:
    """Divide the output channels of ``src`` by ``s`` (journalled). False if it cannot."""
    if how == "layernorm":
        mod = norms.get(src)
        w = None if mod is None else _get_param(mod, "weight")
        if w is None or w.shape != s.shape:
            return False
        j.param(mod, "weight", w / s)
        b = _get_param(mod, "bias")
        if b is not None:
            j.param(mod, "bias", b / s)
        return True
    ref = linears.get(src)
    if ref is None or ref.out_features != s.shape[0]:
        return False
    j.weight(ref.obj, _weight(j.front, ref.obj) / s[:, None])
    b = _get_param(ref.obj, "bias")
    if b is not None:
        j.param(ref.obj, "bias", b / s)
    return True
