"""Live accuracy report: which quantized layer hurts the model output, measured on real batches.

    float_model = copy.deepcopy(model)
    cquant.Quantizer.quantize_dynamic(model, ...)
    cmp = cquant.compare(float_model, model, batches)      # cquant.nn, duck-typed or torch models
    print(cmp.format())                                    # worst layer first
    cmp.layers[0].name, cmp.output_sqnr_db

Per layer (matched by name; a smoothing wrapper counts as its layer):

- ``sqnr_db``, ``cosine``, ``max_abs_error``: the quantized layer against the float layer *on the
  same input* (the float model's activations), so a layer's own error is not mixed with what earlier
  layers did: ``SQNR = 10 log10(sum y^2 / sum (y_q - y)^2)``.
- ``output_share``: the float model is run with only this layer quantized; its output error energy
  ``sum (out - out_float)^2`` over all layers' errors gives each layer's share (the shares add up to 1;
  errors of different layers are close to independent, so the shares predict well where the total
  error comes from). ``output_sqnr_db`` is the model output SQNR with only this layer quantized.

Rows are sorted worst first (largest share; by SQNR when ``sensitivity=False``). The whole quantized
model against the float one: ``output_sqnr_db``, ``output_cosine`` (over the flattened outputs),
``output_max_abs_error``. The sensitivity pass costs one model run per layer and batch; give a few
small batches, or ``sensitivity=False``.

A layer whose input was smoothed by a fold (:mod:`cquant.smoothing`) expects ``x / s``; the scales
recorded on the model by smoothing are applied when it is fed from the float model.
"""
from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from . import errors
from . import frontends as fe
from .smoothing import INPUT_SCALES_ATTR, OUTPUT_SCALES_ATTR

__all__ = ["compare", "Comparison", "LayerError"]


@dataclass(frozen=True)
class LayerError:
    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    output_share: float
    output_sqnr_db: float
    scheme: str


@dataclass
class Comparison:
    layers: List[LayerError]
    output_sqnr_db: float
    output_cosine: float
    output_max_abs_error: float
    batches: int
    unmatched: List[str] = field(default_factory=list)

    def format(self) -> str:
        head = ("layer", "scheme", "SQNR dB", "cosine", "max |err|", "share", "out SQNR dB")
        rows = [(r.name, r.scheme, f"{r.sqnr_db:.1f}", f"{r.cosine:.6f}", f"{r.max_abs_error:.3g}",
                 "-" if math.isnan(r.output_share) else f"{100 * r.output_share:.1f}%",
                 "-" if math.isnan(r.output_sqnr_db) else f"{r.output_sqnr_db:.1f}") for r in self.layers]
        table = [head] + rows
        w = [max(len(t[i]) for t in table) for i in range(len(head))]
        fmt = lambda t: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(t))  # noqa: E731
        lines = [fmt(head), "  ".join("-" * x for x in w)] + [fmt(t) for t in rows]
        lines.append(f"model output: SQNR {self.output_sqnr_db:.1f} dB, cosine {self.output_cosine:.6f}, "
                     f"max |err| {self.output_max_abs_error:.3g} ({self.batches} batches)")
        if self.unmatched:
            lines.append("not compared (no layer of that name in the float model): " + ", ".join(self.unmatched))
        return "\n".join(lines)


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


class _Acc:
    __slots__ = ("sig", "noise", "dot", "qq", "maxerr")

    def __init__(self) -> None:
        self.sig = self.noise = self.dot = self.qq = self.maxerr = 0.0

    def add(self, y: np.ndarray, yq: np.ndarray, what: str = "the model outputs") -> None:
        if np.shape(y) != np.shape(yq):
            raise errors.ShapeError(f"{what} differ in shape: float {np.shape(y)}, quantized {np.shape(yq)} "
                                    "(are the two models the same architecture?)")
        y = np.asarray(y, np.float64).ravel()
        yq = np.asarray(yq, np.float64).ravel()
        d = yq - y
        self.sig += float(y @ y)
        self.noise += float(d @ d)
        self.dot += float(y @ yq)
        self.qq += float(yq @ yq)
        if d.size:
            self.maxerr = max(self.maxerr, float(np.abs(d).max()))

    @property
    def cosine(self) -> float:
        den = math.sqrt(self.sig * self.qq)
        return self.dot / den if den > 0 else (1.0 if self.noise == 0 else 0.0)


def _units(model: Any, quantized: Optional[bool]) -> Dict[str, fe.LayerRef]:
    """Layer name -> the unit to compare: the Linear itself, or the smoothing wrapper around it."""
    out: Dict[str, fe.LayerRef] = {}
    front = fe.for_model(model)
    for r in front.layers(model, quantized=quantized):
        name, obj = r.name, r.obj
        if front.name != "objects" and name.endswith(".linear"):
            parent_name = name[: -len(".linear")]
            parent = fe.find_module(model, parent_name)
            if front.unwrap(parent) is not None:
                name, obj = parent_name, parent
        out[name] = fe.LayerRef(name, obj, r.in_features, r.out_features, r.quantized)
    return out


def _linear_of(obj: Any) -> Any:
    """A unit's Linear: ``obj`` itself, or the one it wraps if it is a smoothing wrapper."""
    inner = fe.for_model(obj).unwrap(obj)
    return obj if inner is None else inner


def _scheme_of(obj: Any) -> str:
    qf = fe.quantized_forward_of(_linear_of(obj))
    return getattr(qf, "scheme", "") if qf is not None else "float"


def _invoke(obj: Any, x: Any) -> Any:
    return obj(x) if callable(obj) else obj.forward(x)


def compare(float_model: Any, quantized_model: Any, batches: Any, sensitivity: bool = True) -> Comparison:
    """Per-layer and whole-model error of ``quantized_model`` against ``float_model`` on ``batches``
    (see the module docstring). Both models must be of the same front-end, with the same layer
    names; the float model is only run, never modified."""
    blist = fe.batch_list(batches)
    fkind, qkind = fe.for_model(float_model).name, fe.for_model(quantized_model).name
    if fkind != qkind:
        raise errors.TypeError(f"models of different kinds: {fkind} and {qkind}")
    if float_model is quantized_model:
        raise errors.ValueError("compare: the float model and the quantized model are the same object (quantizing "
                                "in place turns the float model into the quantized one): keep a float copy, e.g. "
                                "quantize with inplace=False or copy.deepcopy the model first")
    funits = _units(float_model, quantized=None)
    qunits = _units(quantized_model, quantized=None)
    already = sorted(n for n, u in funits.items() if u.quantized)
    if already:
        raise errors.ValueError(f"compare: the float model holds quantized layers ({', '.join(already[:5])}"
                                f"{', ...' if len(already) > 5 else ''}); compare against the float model it came from")
    pairs = [n for n in qunits if n in funits and (qunits[n].quantized or _scheme_of(qunits[n].obj) != "float")]
    unmatched = [n for n in qunits if n not in funits and qunits[n].quantized]
    if not pairs:
        raise errors.ValueError("no quantized layer of the quantized model has a float counterpart of the "
                                "same name in the float model")
    fs = dict(getattr(float_model, INPUT_SCALES_ATTR, None) or {})
    qs = dict(getattr(quantized_model, INPUT_SCALES_ATTR, None) or {})
    fo = dict(getattr(float_model, OUTPUT_SCALES_ATTR, None) or {})
    qo = dict(getattr(quantized_model, OUTPUT_SCALES_ATTR, None) or {})

    def rescale(x: Any, num: Any, den: Any) -> Any:
        if num is None and den is None:
            return x
        ratio = (num if num is not None else 1.0) / (den if den is not None else 1.0)
        if fe.is_torch_tensor(x):
            return x * fe._torch().from_numpy(np.asarray(ratio, np.float32)).to(x.dtype)
        return (np.asarray(x, np.float32) * ratio).astype(np.float32)

    def qlayer(name: str, x: Any) -> Any:
        """The quantized layer on the float model's input, its output in the float model's units
        (undoing folds of smoothing on either side)."""
        y = _invoke(qunits[name].obj, rescale(x, fs.get(name), qs.get(name)))
        return rescale(y, qo.get(name), fo.get(name))

    # whole model
    outs_f: List[np.ndarray] = []
    total = _Acc()
    for b in blist:
        yf = fe.run(float_model, b)
        outs_f.append(yf)
        total.add(yf, fe.run(quantized_model, b))

    # per layer, same input
    acc = {n: _Acc() for n in pairs}
    refs = [funits[n] for n in pairs]

    def local(ref: Any, x: Any, forward: Any) -> Any:
        y = forward(x)
        yq = qlayer(ref.name, x)
        acc[ref.name].add(fe.as_numpy(y), fe.as_numpy(yq), f"the outputs of layer {ref.name!r}")
        return y

    with fe.intercept(refs, local):
        for b in blist:
            fe.call(float_model, b)

    # sensitivity: only one layer quantized at a time
    energy: Dict[str, float] = {}
    out_sqnr: Dict[str, float] = {}
    if sensitivity:
        def swap(ref: Any, x: Any, forward: Any) -> Any:
            return qlayer(ref.name, x)
        for n in pairs:
            a = _Acc()
            with fe.intercept([funits[n]], swap):
                for b, yf in zip(blist, outs_f):
                    a.add(yf, fe.run(float_model, b))
            energy[n] = a.noise
            out_sqnr[n] = _sqnr(a.sig, a.noise)
    tot_e = sum(energy.values())
    rows = []
    for n in pairs:
        a = acc[n]
        share = (energy[n] / tot_e if tot_e > 0 else 0.0) if sensitivity else float("nan")
        rows.append(LayerError(n, _sqnr(a.sig, a.noise), a.cosine, a.maxerr, share,
                               out_sqnr.get(n, float("nan")), _scheme_of(qunits[n].obj)))
    if sensitivity:
        rows.sort(key=lambda r: (-r.output_share, r.sqnr_db))
    else:
        rows.sort(key=lambda r: r.sqnr_db)
    return Comparison(rows, _sqnr(total.sig, total.noise), total.cosine, total.maxerr, len(blist), unmatched)


class _CallableModule(types.ModuleType):
    """``cquant.compare`` is both this module and its function: once the module is imported the
    package attribute is the module, so calling it calls :func:`compare`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Comparison:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
