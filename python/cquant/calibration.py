"""Calibration: run the float model on user batches and record what each Linear layer sees.

    stats = cquant.calibrate(model, batches)        # cquant.nn, duck-typed or torch model
    stats["encoder.layer.0.attention.self.query"].absmax   # (in_features,) max |x| per input channel
    stats.static_scale(name)                        # per-tensor scale a static int8 scheme would use

``batches`` is an iterable of model inputs; each one is an array (``model(x)``), a tuple or list
(``model(*args)``) or a dict (``model(**kwargs)``, e.g. a tokenizer's output for a transformers
model). A bare array or dict is one batch; a bare tuple of integer arrays is refused as ambiguous
(one batch of several arguments, ``[(ids, mask)]``, or several batches, ``[ids, mask]``?). For a torch model numpy arrays are turned into tensors
and the model runs under ``torch.inference_mode()``.

The layers are watched, not modified (see :func:`cquant.frontends.intercept`: the instance's
``forward`` is wrapped for cquant.nn and duck-typed layers, a forward hook is registered on torch
ones), and the model is left exactly as it was, also when a batch raises.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np

from . import errors
from . import frontends as fe
from .frontends import Patterns, batch_list

__all__ = ["LayerStats", "Calibration", "calibrate", "batch_list"]


@dataclass
class LayerStats:
    """What one Linear layer's input looked like over the calibration batches.

    ``absmax``, ``min``, ``max``: per input channel (shape ``(in_features,)``, float32) over every
    row of every batch; ``rows``: rows seen (all leading dimensions flattened); ``calls``: forward
    calls seen; ``nonfinite``: NaN/Inf values seen (left out of the statistics); ``samples``: up to
    ``keep_rows`` input rows drawn uniformly from all rows seen (for searches that need real
    activations, e.g. SmoothQuant's per-layer alpha), or None.
    """
    name: str
    in_features: int
    absmax: np.ndarray
    min: np.ndarray
    max: np.ndarray
    rows: int = 0
    calls: int = 0
    nonfinite: int = 0
    keep_rows: int = 0
    samples: Optional[np.ndarray] = None

    @classmethod
    def empty(cls, name: str, k: int, keep_rows: int = 0) -> "LayerStats":
        return cls(name, k, np.zeros(k, np.float32), np.full(k, np.inf, np.float32),
                   np.full(k, -np.inf, np.float32), keep_rows=int(keep_rows))

    def _sample(self, x2: np.ndarray) -> None:
        """Reservoir sampling of rows (deterministic): each row seen is kept with equal probability."""
        rows = x2[np.isfinite(x2).all(axis=1)]
        if not rows.size:
            return
        seen = self.rows
        if self.samples is None:
            self.samples = np.empty((0, self.in_features), np.float32)
        room = self.keep_rows - self.samples.shape[0]
        if room > 0:
            self.samples = np.concatenate([self.samples, rows[:room]]).astype(np.float32)
            rows = rows[room:]
            seen += room
        if not rows.size:
            return
        rng = np.random.default_rng(seen)
        slot = (rng.random(rows.shape[0]) * (seen + 1 + np.arange(rows.shape[0]))).astype(np.int64)
        hit = slot < self.keep_rows
        self.samples[slot[hit]] = rows[hit]

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise errors.ShapeError(f"layer {self.name!r}: input of shape {x.shape} does not end in "
                                    f"in_features={self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        self.calls += 1
        if x2.shape[0] == 0:
            return
        x2 = x2.astype(np.float32, copy=False)
        finite = np.isfinite(x2)
        if not finite.all():
            self.nonfinite += int(x2.size - np.count_nonzero(finite))
            lo = np.where(finite, x2, np.inf).min(axis=0)
            hi = np.where(finite, x2, -np.inf).max(axis=0)
        else:
            lo, hi = x2.min(axis=0), x2.max(axis=0)
        np.minimum(self.min, lo, out=self.min)
        np.maximum(self.max, hi, out=self.max)
        amax = np.maximum(np.abs(lo), np.abs(hi))
        np.maximum(self.absmax, np.where(np.isfinite(amax), amax, 0), out=self.absmax)
        if self.keep_rows > 0:
            self._sample(x2)
        self.rows += int(x2.shape[0])

    @property
    def saw_finite(self) -> bool:
        """Whether any finite input value was seen (not: no rows, or NaN / Inf everywhere)."""
        return bool(np.isfinite(self.max).any())

    @property
    def tensor_absmax(self) -> float:
        """max |x| over all channels (what a per-tensor static scale needs)."""
        return float(self.absmax.max()) if self.absmax.size else 0.0

    def static_scale(self, per_channel: bool = False) -> np.ndarray:
        """Symmetric int8 scale(s) ``absmax / 127`` (1.0 where absmax is 0): shape ``(1,)`` per
        tensor, ``(in_features,)`` per channel."""
        a = self.absmax if per_channel else np.array([self.tensor_absmax], np.float32)
        return np.where(a > 0, a / np.float32(127), np.float32(1)).astype(np.float32)


@dataclass
class Calibration(Mapping[str, LayerStats]):
    """Layer name -> :class:`LayerStats`, in model order; ``batches``: batches run; ``frontend``:
    ``"nn"``, ``"objects"`` or ``"torch"``; ``skipped``: layers that were never called."""
    layers: Dict[str, LayerStats]
    batches: int
    frontend: str
    skipped: List[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def static_scale(self, name: str, per_channel: bool = False) -> np.ndarray:
        return self.layers[name].static_scale(per_channel)

    def __repr__(self) -> str:
        return (f"Calibration({len(self.layers)} layers, {self.batches} batches, frontend={self.frontend!r}"
                + (f", {len(self.skipped)} never called" if self.skipped else "") + ")")


def calibrate(model: Any, batches: Any, include: Patterns = None, exclude: Patterns = None,
              keep_rows: int = 0) -> Calibration:
    """Run ``model`` on ``batches`` and record the input statistics of its Linear layers (float or
    already quantized; ``include``/``exclude``: names or globs). Returns a :class:`Calibration`.
    ``keep_rows``: also keep up to that many input rows per layer (``LayerStats.samples``).

    Raises ``ValueError`` if the model has no Linear layer or ``batches`` is empty; whatever a batch
    raises propagates, with the model restored.
    """
    blist = batch_list(batches)
    front = fe.for_model(model)
    refs = front.layers(model, include, exclude)
    if not refs:
        sel = ", ".join(f"{k}={v!r}" for k, v in (("include", include), ("exclude", exclude)) if v)
        raise errors.ValueError(f"{type(model).__name__} has no Linear layer to calibrate"
                                + (f" matching {sel}" if sel else ""))
    stats = {r.name: LayerStats.empty(r.name, r.in_features, keep_rows) for r in refs}

    def watch(ref: Any, x: Any, forward: Any) -> Any:
        stats[ref.name].update(fe.as_numpy(x))
        return forward(x)

    with fe.intercept(refs, watch):
        for b in blist:
            fe.call(model, b)
    never = [n for n, s in stats.items() if s.calls == 0]
    return Calibration({n: s for n, s in stats.items() if s.calls}, len(blist), front.name, never)
