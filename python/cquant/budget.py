"""Accuracy budget: quantize as many Linear layers as possible while the model output stays close.

    q = cquant.Quantizer()
    qmodel = q.quantize(model, calibration=batches, smoothing=0.5, min_cosine=0.999)
    print(q.budget.format())          # what was kept in float / moved to a finer scheme, and the bytes
    # or in one call: Quantizer.quantize_dynamic(model, calibration=batches, min_cosine=0.999)

The measure
-----------
The model output on every calibration batch (:func:`cquant.frontends.run`: an array, a tensor, a
dict's ``last_hidden_state``/``logits``, a tuple's first item, or whatever a callable batch returns)
is read as rows along its last axis (one row per token of a ``(B, T, H)`` hidden state, one per
sentence of a ``(N, H)`` embedding matrix). Per row, the cosine between the quantized and the float
model's output; over all rows of all batches, the **mean** (what ``min_cosine`` bounds) and the
**min** (reported; bounded too with ``min_row_cosine=``). To budget a pooled or post-processed
output, give callable batches (``lambda m: encode(m, sentences)``).

How layers are chosen
---------------------
1. Every layer the Quantizer selects is quantized with its scheme (a copy of the model). If the
   budget is met, nothing changes: the result is what plain quantization gives.
2. Sensitivity: the float model is run with only one layer quantized (its quantized forward is
   swapped in by :func:`cquant.frontends.intercept`, the same machinery as :func:`cquant.compare`),
   once per layer and batch. Each layer gets the mean-cosine loss it causes alone and its share of
   the output error energy. Layers are ranked by the cosine loss (then the energy).
3. The ``k`` most sensitive layers are kept in float, for ``k = 1, 2, ...``, until the whole
   (otherwise quantized) model meets the budget: the fewest float layers in that ranking.
4. Each layer kept in float, least sensitive first, is tried with the finer schemes of ``refine``
   (default ``per_group(32)``, where K allows it); it takes the first one with which the budget
   still holds.
5. The choice becomes per-layer rules (``LayerRecord.reason`` says ``kept in float by the accuracy
   budget ...`` or names the finer scheme) and the model is quantized once, for real.

Cost: one model run per batch for the baseline, one per layer and batch for the sensitivities, one per
batch for each ``k`` tried and each refinement tried. A few short batches are enough.

An impossible budget
--------------------
When no choice with at least one quantized layer meets the budget (e.g. ``min_cosine=1.0``), every
layer is kept in float and a :class:`BudgetWarning` says so (also in the log);
``Quantizer.budget.met`` is False. ``min_cosine`` above 1 (or not in (0, 1]) is a ``ValueError``.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import errors
from . import frontends as fe
from .compare import _invoke, _linear_of, _scheme_of, _units

__all__ = ["BudgetResult", "LayerSensitivity", "BudgetWarning", "plan", "cosine_rows", "DEFAULT_REFINE"]

logger = logging.getLogger("cquant")

#: finer schemes tried, in order, for a layer the budget would keep in float
DEFAULT_REFINE = ("per_group(32)",)


class BudgetWarning(UserWarning):
    """The accuracy budget cannot be met with any layer quantized: everything stays float."""


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer, quantized alone: ``cosine_loss`` = 1 - mean row cosine of the model output,
    ``min_cosine`` = the worst row, ``share`` = its share of the output error energy (the shares
    of all layers add up to 1), ``choice``: ``"int8"`` (the layer's scheme), ``"float"`` or the
    finer scheme it was moved to; ``bytes_quantized`` / ``bytes_float`` / ``bytes_chosen``: the
    layer (weight + bias) with its scheme, in float32, as chosen."""
    name: str
    scheme: str
    cosine_loss: float
    min_cosine: float
    share: float
    choice: str
    bytes_quantized: int
    bytes_float: int
    bytes_chosen: int


@dataclass
class BudgetResult:
    """What :func:`plan` measured and chose (``Quantizer.budget``). Cosines are over the rows of
    the model outputs on the calibration batches (see the module docstring)."""
    target: float                      # min_cosine: bound on the mean row cosine
    target_min: Optional[float]        # min_row_cosine: bound on the worst row (None: not bounded)
    met: bool
    mean: float                        # with the choice made
    min: float
    base_mean: float                   # every selected layer quantized with its scheme
    base_min: float
    kept_float: List[str]
    refined: Dict[str, str]            # layer -> finer scheme
    layers: List[LayerSensitivity]     # most sensitive first (empty when the baseline met the budget)
    bytes_float: int                   # the candidate layers in float32
    bytes_all_quantized: int           # ... all with their scheme
    bytes_chosen: int                  # ... as chosen
    int8_share: float                  # share of the candidates' float32 weight bytes stored as integers
    evaluations: int                   # whole-model passes over the batches
    batches: int
    rows: int
    notes: List[str] = field(default_factory=list)

    @property
    def extra_bytes(self) -> int:
        """What the choice costs over quantizing every layer."""
        return self.bytes_chosen - self.bytes_all_quantized

    def summary(self) -> str:
        bound = f"mean cosine >= {self.target:.10g}" + (f", min >= {self.target_min:.10g}" if self.target_min is not None else "")
        kept = (f"{len(self.kept_float)} layer(s) kept in float" + (f" ({', '.join(self.kept_float)})" if self.kept_float else "")
                + (f", {len(self.refined)} moved to a finer scheme" if self.refined else ""))
        state = "met" if self.met else "NOT met"
        return (f"accuracy budget {bound}: {state} with {kept}; mean {self.mean:.5f}, min {self.min:.5f} "
                f"(all quantized: mean {self.base_mean:.5f}, min {self.base_min:.5f}) over {self.rows} output rows "
                f"of {self.batches} batch(es); integer weights {100 * self.int8_share:.1f}% of the Linear "
                f"weight bytes; {_fmt_bytes(self.bytes_chosen)} vs {_fmt_bytes(self.bytes_all_quantized)} all "
                f"quantized (+{_fmt_bytes(self.extra_bytes)}), {_fmt_bytes(self.bytes_float)} in float32")

    def format(self) -> str:
        lines = [self.summary()]
        if self.layers:
            head = ("layer", "scheme", "cos loss alone", "min cos alone", "err share", "choice")
            rows = [(r.name, r.scheme, f"{r.cosine_loss:.2e}", f"{r.min_cosine:.5f}", f"{100 * r.share:.1f}%",
                     r.choice) for r in self.layers]
            table = [head] + rows
            w = [max(len(t[i]) for t in table) for i in range(len(head))]
            fmt = lambda t: "  ".join(c.ljust(w[i]) if i in (0, 1, 5) else c.rjust(w[i])  # noqa: E731
                                      for i, c in enumerate(t))
            lines += [fmt(head), "  ".join("-" * x for x in w)] + [fmt(t) for t in rows]
        lines += self.notes
        return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0
    return f"{n:.2f} GiB"  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------

def cosine_rows(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine per row (last axis) of ``y`` against ``ref`` (float64). A row that is zero in both
    counts 1; zero in one only counts 0."""
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    if y.shape != ref.shape:
        raise errors.ShapeError(f"quantized output shape {y.shape} differs from the float output's {ref.shape}")
    if y.ndim == 0:
        y, ref = y.reshape(1, 1), ref.reshape(1, 1)
    y2 = y.reshape(-1, y.shape[-1]) if y.ndim > 1 else y.reshape(1, -1)
    r2 = ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref.reshape(1, -1)
    dot = (y2 * r2).sum(axis=1)
    ny = np.sqrt((y2 * y2).sum(axis=1))
    nr = np.sqrt((r2 * r2).sum(axis=1))
    den = ny * nr
    out = np.where(den > 0, dot / np.where(den > 0, den, 1.0), np.where((ny == 0) & (nr == 0), 1.0, 0.0))
    return np.clip(np.nan_to_num(out, nan=0.0), -1.0, 1.0)


class _Stats:
    __slots__ = ("cos", "noise")

    def __init__(self) -> None:
        self.cos: List[np.ndarray] = []
        self.noise = 0.0

    def add(self, y: np.ndarray, ref: np.ndarray) -> None:
        self.cos.append(cosine_rows(y, ref))
        d = np.asarray(y, np.float64) - np.asarray(ref, np.float64)
        self.noise += float((d * d).sum())

    @property
    def mean(self) -> float:
        c = np.concatenate(self.cos) if self.cos else np.ones(1)
        return float(c.mean())

    @property
    def min(self) -> float:
        c = np.concatenate(self.cos) if self.cos else np.ones(1)
        return float(c.min())


class _Evaluator:
    """Runs the float model with some layers swapped for quantized forwards (see compare)."""

    def __init__(self, float_model: Any, batches: List[Any]):
        self.model = float_model
        self.batches = batches
        self.units = _units(float_model, quantized=None)
        self.refs = [fe.run(float_model, b) for b in batches]
        self.count = 0

    def __call__(self, swaps: Dict[str, Any]) -> _Stats:
        """``swaps``: unit name -> the quantized unit to use instead of the float one."""
        self.count += 1
        st = _Stats()
        refs = [self.units[n] for n in swaps]

        def swap(ref: Any, x: Any, forward: Any) -> Any:
            return _invoke(swaps[ref.name], x)

        with fe.intercept(refs, swap):
            for b, yf in zip(self.batches, self.refs):
                st.add(fe.run(self.model, b), yf)
        return st


def _nbytes(obj: Any) -> int:
    """Bytes a unit (a Linear, a quantized one, or a smoothing wrapper around one) holds in its
    weight + bias (the wrapper's pre-scale vector is not counted)."""
    obj = _linear_of(obj)
    qf = fe.quantized_forward_of(obj)
    if qf is not None:
        b = getattr(qf, "bias", None)
        return int(qf.qweight.nbytes) + (int(np.asarray(b).nbytes) if isinstance(b, np.ndarray) else
                                         int(b.numel() * b.element_size()) if fe.is_torch_tensor(b) else 0)
    total = 0
    for name in ("weight", "bias"):
        v = getattr(obj, name, None)
        if v is None:
            continue
        if fe.is_torch_tensor(v):
            total += int(v.numel() * v.element_size())
        else:
            total += int(np.asarray(v).nbytes)
    return total


def _float_weight_bytes(obj: Any) -> int:
    obj = _linear_of(obj)
    w = getattr(obj, "weight", None)
    if w is None:
        return 0
    return int(w.numel() * 4) if fe.is_torch_tensor(w) else int(np.asarray(w).size * 4)


def _meets(st: _Stats, target: float, target_min: Optional[float]) -> bool:
    return st.mean >= target and (target_min is None or st.min >= target_min)


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------

def check_target(min_cosine: Any, name: str = "min_cosine") -> float:
    if isinstance(min_cosine, bool) or not isinstance(min_cosine, (int, float, np.floating)) \
            or not math.isfinite(float(min_cosine)) or not 0.0 < float(min_cosine) <= 1.0:
        raise errors.ValueError(f"{name} must be a cosine in (0, 1] (e.g. 0.999), got {min_cosine!r}")
    return float(min_cosine)


def plan(float_model: Any, batches: Sequence[Any], quantize_copy: Callable[[Optional[str]], Any],
         min_cosine: float, min_row_cosine: Optional[float] = None,
         refine: Sequence[str] = DEFAULT_REFINE) -> BudgetResult:
    """Choose which layers to keep in float (or move to a finer scheme), see the module docstring.

    ``float_model``: the (calibrated, smoothed) float model, not modified. ``quantize_copy(scheme)``
    returns a quantized deep copy of it: with the Quantizer's own schemes for ``None``, else with
    every selected layer on ``scheme`` (a scheme name from ``refine``)."""
    target = check_target(min_cosine)
    target_min = None if min_row_cosine is None else check_target(min_row_cosine, "min_row_cosine")
    blist = list(batches)
    ev = _Evaluator(float_model, blist)
    qbase = quantize_copy(None)
    qunits = {n: r for n, r in _units(qbase, quantized=None).items()
              if n in ev.units and _scheme_of(r.obj) != "float"}
    names = list(qunits)
    bytes_q = {n: _nbytes(qunits[n].obj) for n in names}
    bytes_f = {n: _nbytes(ev.units[n].obj) for n in names}
    wbytes = {n: _float_weight_bytes(ev.units[n].obj) for n in names}
    rows = sum(int(cosine_rows(r, r).size) for r in ev.refs)

    def result(met: bool, st: _Stats, base: _Stats, kept: List[str], refined: Dict[str, str],
               layers: List[LayerSensitivity], chosen_bytes: Dict[str, int], notes: List[str]) -> BudgetResult:
        wq = sum(wbytes[n] for n in names if n not in kept)
        wt = sum(wbytes.values())
        return BudgetResult(target, target_min, met, st.mean, st.min, base.mean, base.min, kept, refined, layers,
                            sum(bytes_f.values()), sum(bytes_q.values()),
                            sum(chosen_bytes.get(n, bytes_q[n]) for n in names),
                            wq / wt if wt else 1.0, ev.count, len(blist), rows, notes)

    base = ev({n: qunits[n].obj for n in names})
    if not names:
        return result(True, base, base, [], {}, [], {}, ["no quantized layer: nothing to budget"])
    if _meets(base, target, target_min):
        return result(True, base, base, [], {}, [], {}, [])

    # sensitivity of each layer alone
    sens: Dict[str, _Stats] = {n: ev({n: qunits[n].obj}) for n in names}
    tot = sum(s.noise for s in sens.values())
    order = sorted(names, key=lambda n: (-(1.0 - sens[n].mean), -sens[n].noise, n))

    # fewest float layers, most sensitive first
    kept: List[str] = []
    best: Optional[_Stats] = None
    for k in range(1, len(order)):
        float_set = set(order[:k])
        st = ev({n: qunits[n].obj for n in names if n not in float_set})
        if _meets(st, target, target_min):
            kept, best = order[:k], st
            break
    chosen: Dict[str, str] = {n: "int8" for n in names}
    chosen_bytes: Dict[str, int] = {}
    notes: List[str] = []

    def layers_table() -> List[LayerSensitivity]:
        return [LayerSensitivity(n, _scheme_of(qunits[n].obj), 1.0 - sens[n].mean, sens[n].min,
                                 sens[n].noise / tot if tot > 0 else 0.0, chosen[n], bytes_q[n], bytes_f[n],
                                 chosen_bytes.get(n, bytes_q[n])) for n in order]

    if best is None:  # impossible: everything stays float
        for n in names:
            chosen[n], chosen_bytes[n] = "float", bytes_f[n]
        msg = (f"accuracy budget mean cosine >= {target:.10g}"
               + (f", min >= {target_min:.10g}" if target_min is not None else "")
               + f" cannot be met with any Linear layer quantized (all quantized: mean {base.mean:.6f}, "
               f"min {base.min:.6f}; all but the least sensitive layer in float does not meet it either): "
               f"every layer is kept in float")
        warnings.warn(msg, BudgetWarning, stacklevel=5)
        logger.warning("%s", msg)
        allf = _Stats()
        allf.cos = [np.ones(rows)]
        return result(False, allf, base, list(names), {}, layers_table(), chosen_bytes, [msg])

    for n in kept:
        chosen[n], chosen_bytes[n] = "float", bytes_f[n]

    # finer schemes for the float layers, least sensitive first
    refined: Dict[str, str] = {}
    if refine and kept:
        fine_units: Dict[str, Dict[str, Any]] = {}
        for spec in refine:
            qf = quantize_copy(spec)
            fine_units[spec] = {n: r.obj for n, r in _units(qf, quantized=None).items() if n in kept}
        current = {n: qunits[n].obj for n in names if n not in kept}
        for n in reversed(kept):
            for spec in refine:
                u = fine_units[spec].get(n)
                if u is None or _scheme_of(u) in ("float", _scheme_of(qunits[n].obj)):
                    continue  # the finer scheme does not fit this layer (fell back to the same scheme)
                st = ev({**current, n: u})
                if _meets(st, target, target_min):
                    current[n] = u
                    refined[n] = spec
                    chosen[n], chosen_bytes[n] = _scheme_of(u), _nbytes(u)
                    best = st
                    break
        kept = [n for n in kept if n not in refined]
    return result(True, best, base, kept, refined, layers_table(), chosen_bytes, notes)


def reason(res: BudgetResult, name: str) -> str:
    """The ``LayerRecord`` note of a layer the budget moved."""
    row = next((r for r in res.layers if r.name == name), None)
    alone = (f": quantized alone it costs {row.cosine_loss:.1e} of mean cosine and {100 * row.share:.1f}% of "
             f"the output error" if row is not None else "")
    bound = f"min_cosine={res.target:.10g}" + (f", min_row_cosine={res.target_min:.10g}" if res.target_min is not None else "")
    if name in res.refined:
        return f"{res.refined[name]} by the accuracy budget ({bound}){alone}"
    if res.met:
        return f"kept in float by the accuracy budget ({bound}){alone}"
    return f"kept in float: the accuracy budget ({bound}) cannot be met with any layer quantized"
