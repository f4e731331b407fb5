"""Int8 embedding tables: :class:`QuantizedEmbedding` (a :mod:`cquant.nn` layer) and the row lookup
shared with the torch adapter's ``QuantizedTorchEmbedding``, and :func:`resolve_ties`: the rule both
front-ends follow for a table whose weight is tied to other layers.

A table of ``(num_embeddings, embedding_dim)`` float weights is stored as int8 codes with one float32
scale per row: exactly a per_channel :class:`cquant.ops.QuantizedWeight` of the table seen as an
``(out, in)`` weight, so the table of a language model whose output Linear shares it (GPT-2's
``lm_head.weight`` is ``wte.weight``) has the same codes and scales as that Linear quantized
per_channel int8, in either mode. Such a tied pair holds one QuantizedWeight: the embedding reads
the codes of the Linear it is tied to (``tied_to``), and saves nothing of its own.

A lookup gathers only the requested rows of codes (straight from the packed buffer the kernels read,
see ``cquant.h``) and dequantizes them, ``float32(q) * scale``: the float table is never built, and
the result is bit-identical to ``cquant.ops.dequantize(qweight)[ids]``.

Quantizing is opt-in: ``cquant.Quantizer(..., embeddings=True)`` (or patterns naming the tables), see
:mod:`cquant.quantization`; :func:`cquant.bert.quantize_embeddings` is the BERT shortcut.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, TypeVar

import numpy as np

from . import errors, nn, ops

__all__ = ["QuantizedEmbedding", "EMBEDDING_SCHEME", "check_ids", "lookup", "gather_codes", "can_share",
           "padded_rows_view", "resolve_ties", "float_tie_reason"]

logger = logging.getLogger("cquant")

#: the scheme text of an int8 embedding table in summaries and reports
EMBEDDING_SCHEME = "int8 embedding per_channel"

_HEADER = 64                        # bytes of a packed buffer's header (cquant.h)
_NR = {"n16k4": 16, "n64k4": 64}    # int8 formats: rows per panel
_LAYOUT_OK: Dict[str, bool] = {}

_T = TypeVar("_T")  # a candidate table (a front-end's plan for one embedding module)
_P = TypeVar("_P")  # a quantized Linear's plan (anything with a ``name``: its dotted path)


def can_share(qw: Any, shape: Optional[Tuple[int, int]] = None) -> bool:
    """True if ``qw`` holds the codes of an int8 table with one scale per row (per_channel, 8 bits),
    of ``shape`` when given: the codes an embedding table and an output Linear can share."""
    return (isinstance(qw, ops.QuantizedWeight) and qw.granularity == "per_channel" and qw.bits == 8
            and (shape is None or tuple(int(d) for d in qw.shape) == tuple(int(d) for d in shape)))


def float_tie_reason(name: str, holder: Any) -> str:
    """Why a layer whose weight is also held by ``holder`` (at path ``name``), which stays float, is kept
    float too (a skip reason)."""
    return (f"weight tied to {name or '<root>'}.weight ({type(holder).__name__}, not quantized): kept float32 "
            "so that it is stored once")


def resolve_ties(tables: Mapping[int, _T], holders: Callable[[_T], Iterable[Tuple[str, Any]]],
                 plan_of: Callable[[Any], Optional[_P]], shareable: Callable[[_P], bool],
                 quantized: Optional[Callable[[Any], bool]] = None
                 ) -> Tuple[List[Tuple[_T, Optional[_P]]], List[Tuple[_T, str]]]:
    """The ties of the embedding tables selected for int8, for every front-end (nothing is modified).

    ``tables``: the candidate tables, in model order, keyed by ``id`` of the module each one is;
    ``holders(table)``: every ``(path, object)`` holding the table's weight array (the table's own
    module may be among them); ``plan_of(obj)``: the plan of ``obj`` if it is a quantized Linear, else None;
    ``shareable(plan)``: whether a table can read that plan's codes (per_channel int8 of an ``(out, in)``
    weight, see :func:`can_share`); ``quantized(obj)``: whether ``obj`` is quantized (default: it has a
    plan; the torch adapter's sub-layers of a quantized attention are, without a plan of their own).

    A table whose weight is also held by an object that stays float (neither quantized nor a candidate
    table) stays float: it would be stored twice. Otherwise a table held by a quantized Linear reads that
    Linear's codes if they can be shared, and stays float if not. A table left float is a float holder
    for the others, to a fixed point.

    Returns ``(kept, dropped)``: the tables still selected, in order, each with the plan whose codes it
    reads (None: quantized on its own, or sharing its array with another kept table only), and the tables
    kept float, in the order decided, each with the reason.
    """
    is_quantized = quantized if quantized is not None else (lambda obj: plan_of(obj) is not None)
    left: Dict[int, _T] = dict(tables)
    ties: Dict[int, _P] = {}
    dropped: List[Tuple[_T, str]] = []
    changed = True
    while changed:
        changed = False
        for key, table in list(left.items()):
            others = [(n, o) for n, o in holders(table) if id(o) != key and id(o) not in left]
            floats = [(n, o) for n, o in others if not is_quantized(o)]
            partners = [p for p in (plan_of(o) for _n, o in others if is_quantized(o)) if p is not None]
            why = ""
            if floats:
                why = float_tie_reason(*floats[0])
            elif partners:
                p = partners[0]
                if shareable(p):
                    ties[key] = p
                else:
                    why = (f"weight tied to {p.name or '<root>'!r}, which is not quantized per_channel int8: "
                           "its codes are not per-row int8, so the table cannot share them and would be stored "
                           "twice; kept float32 (quantize that layer per_channel int8 to share)")
            if why:
                del left[key]
                ties.pop(key, None)
                dropped.append((table, why))
                changed = True
    return [(t, ties.get(key)) for key, t in left.items()], dropped


def check_ids(ids: Any, num_embeddings: int) -> np.ndarray:
    """``ids`` as an integer array (any shape), every id in ``[0, num_embeddings)``; a cquant
    ``TypeError`` for non-integer ids (float, bool) and ``ValueError`` for ids out of range."""
    a = np.asarray(ids)
    if a.dtype.kind not in "iu":
        raise errors.TypeError(f"embedding ids must be integers, got dtype {a.dtype}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_embeddings:
            raise errors.ValueError(f"embedding ids must be in [0, {num_embeddings}), got range [{lo}, {hi}]")
    return a


def padded_rows_view(qw: ops.QuantizedWeight) -> Optional[Tuple[np.ndarray, int]]:
    """``(view, nr)``: the codes of an int8 packed weight as a ``(panels, ceil(K/4), nr, 4)`` view of
    its packed buffer (row ``r`` is ``view[r // nr, :, r % nr, :]``, K padded to a multiple of 4), or
    None for a format whose layout this does not read (then callers unpack)."""
    fmt = qw.format
    nr = _NR.get(fmt)
    if nr is None or not _layout_ok(fmt):
        return None
    n, k = qw.shape
    kp4 = -(-k // 4)
    panels = -(-n // nr)
    size = panels * kp4 * nr * 4
    return qw.packed[_HEADER:_HEADER + size].reshape(panels, kp4, nr, 4), nr


def _layout_ok(fmt: str) -> bool:
    """The packed layout of ``cquant.h`` (codes[((p * kp4 + t) * nr + j) * 4 + i] = q[nr*p + j][4t + i]
    after a 64-byte header), checked once per format on a small weight against the C unpacker."""
    ok = _LAYOUT_OK.get(fmt)
    if ok is None:
        nr = _NR[fmt]
        n, k = 2 * nr + 3, 7
        q = (np.arange(n * k, dtype=np.int64).reshape(n, k) % 251 - 125).astype(np.int8)
        qw = ops.QuantizedWeight.from_codes(q, np.ones(n, np.float32), "per_channel", format=fmt)
        kp4 = -(-k // 4)
        panels = -(-n // nr)
        view = qw.packed[_HEADER:_HEADER + panels * kp4 * nr * 4].reshape(panels, kp4, nr, 4)
        rows = np.arange(n)
        got = view[rows // nr, :, rows % nr, :].reshape(n, kp4 * 4)[:, :k]
        ok = bool(np.array_equal(got, q))
        if not ok:  # pragma: no cover - only if the C packed layout changed
            logger.warning("cquant.embedding: packed format %s is not laid out as expected; embedding "
                           "lookups unpack the whole table instead", fmt)
        _LAYOUT_OK[fmt] = ok
    return ok


def gather_codes(qw: ops.QuantizedWeight, ids: np.ndarray) -> np.ndarray:
    """The int8 codes of rows ``ids`` (checked ids, any shape) -> ``(*ids.shape, K)``, read from the
    packed buffer without unpacking the rest of the table."""
    k = int(qw.shape[1])
    v = padded_rows_view(qw)
    if v is None:
        return qw.q[ids]
    view, nr = v
    rows = view[ids // nr, :, ids % nr, :]                  # (*ids.shape, kp4, 4): a new array
    return rows.reshape(ids.shape + (rows.shape[-2] * 4,))[..., :k]


def lookup(qw: ops.QuantizedWeight, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of the dequantized table, float32 ``(*ids.shape, K)``: ``float32(q) * scale`` of
    the gathered rows only (bit-identical to ``ops.dequantize(qw)[ids]``)."""
    out = gather_codes(qw, ids).astype(np.float32)
    out *= qw.scale[ids][..., None]
    return out


def _check_padding_idx(padding_idx: Any, n: int) -> Optional[int]:
    if padding_idx is None:
        return None
    p = int(padding_idx)
    if not -n <= p < n:
        raise errors.ValueError(f"padding_idx {padding_idx} is not in [-{n}, {n})")
    return p + n if p < 0 else p


class TiedCodes:
    """The codes of an int8 embedding table (cquant.nn and torch): its own ``_qweight``, or those of
    the quantized Linear it is tied to (``_cquant_tie``, kept out of the module's children)."""

    @property
    def tied_to(self) -> Any:
        """The quantized layer whose codes this table reads, or None."""
        return self.__dict__.get("_cquant_tie")

    @property
    def qweight(self) -> ops.QuantizedWeight:
        tie = self.__dict__.get("_cquant_tie")
        return tie.qweight if tie is not None else self.__dict__["_qweight"]


class QuantizedEmbedding(TiedCodes, nn.Module):
    """An embedding table stored as int8 codes with one float32 scale per row.

    ``QuantizedEmbedding(weight_q, weight_scale)`` builds it from canonical ``(rows, dim)`` int8 codes
    and ``(rows,)`` scales; :meth:`from_embedding` quantizes a :class:`cquant.nn.Embedding`;
    :meth:`from_qweight` wraps a per_channel int8 :class:`~cquant.ops.QuantizedWeight`;
    :meth:`tied` reads the codes of a quantized Linear (anything with a ``qweight``), so a table
    tied to an output layer is stored once. ``forward(ids)``: integer ids, any shape ->
    ``(*ids.shape, embedding_dim)`` float32 (only those rows are dequantized; ``padding_idx`` is kept
    for reference: its row is zero in a table initialized that way, and zero stays exactly zero).

    ``state_dict()``: ``<name>.weight_q`` (int8 ``(rows, dim)``) and ``<name>.weight_scale``, or
    nothing for a tied table (its codes are the Linear's). Checkpoints store the table as a layer of
    kind ``"embedding"`` (see :mod:`cquant.io`).
    """

    _cquant_unwalked = ("_cquant_tie",)  # the Linear a tied table reads: not a child (cquant.frontends)

    def __init__(self, weight_q: Any = None, weight_scale: Any = None, padding_idx: Optional[int] = None, *,
                 qweight: Optional[ops.QuantizedWeight] = None, tie: Any = None):
        super().__init__()
        if sum(x is not None for x in (weight_q, qweight, tie)) != 1:
            raise errors.TypeError("QuantizedEmbedding needs exactly one of weight_q (with weight_scale), "
                                   "qweight= or tie=")
        if weight_q is not None:
            if weight_scale is None:
                raise errors.TypeError("QuantizedEmbedding(weight_q, weight_scale): weight_scale is missing")
            q = np.asarray(weight_q)
            if q.dtype != np.int8 or q.ndim != 2:
                raise errors.TypeError(f"weight_q must be a 2-D int8 array of codes, got {q.dtype} {q.shape}")
            qweight = ops.QuantizedWeight.from_codes(q, np.asarray(weight_scale, dtype=np.float32),
                                                     "per_channel")
        if tie is not None:
            qweight = getattr(tie, "qweight", None)
            if not can_share(qweight):
                raise errors.ValueError("a tied QuantizedEmbedding reads the codes of a quantized layer with "
                                        f"per_channel int8 codes; got {type(tie).__name__} holding {qweight!r}")
        elif not can_share(qweight):
            raise errors.ValueError(f"an embedding table needs per_channel int8 codes, got {qweight!r}")
        object.__setattr__(self, "_cquant_tie", tie)
        self._qweight = None if tie is not None else qweight
        self.num_embeddings, self.embedding_dim = (int(d) for d in qweight.shape)
        self.padding_idx = _check_padding_idx(padding_idx, self.num_embeddings)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "QuantizedEmbedding":
        """Quantize a :class:`cquant.nn.Embedding` (not modified): one scale per row."""
        ops.check_finite(np.asarray(emb.weight), "embedding weight")
        qw = ops.quantize_weight(emb.weight, granularity="per_channel", name="embedding")
        return cls(qweight=qw, padding_idx=getattr(emb, "padding_idx", None))

    @classmethod
    def from_qweight(cls, qweight: ops.QuantizedWeight, padding_idx: Optional[int] = None) -> "QuantizedEmbedding":
        return cls(qweight=qweight, padding_idx=padding_idx)

    @classmethod
    def tied(cls, layer: Any, padding_idx: Optional[int] = None) -> "QuantizedEmbedding":
        """A table that reads the codes of quantized layer ``layer`` (a ``QuantizedLinear`` or a
        ``QuantizedLinearForward`` quantized per_channel int8), now and after it is reloaded."""
        return cls(tie=layer, padding_idx=padding_idx)

    # -- the codes ----------------------------------------------------------------------------------
    @property
    def weight_q(self) -> np.ndarray:
        """Canonical ``(rows, dim)`` int8 codes (a new array, unpacked)."""
        return self.qweight.q

    @property
    def weight_scale(self) -> np.ndarray:
        """``(rows,)`` float32 scales."""
        return self.qweight.scale

    @property
    def scheme(self) -> str:
        return EMBEDDING_SCHEME

    def dequantized_weight(self) -> np.ndarray:
        """The ``(rows, dim)`` float32 table the layer effectively uses (a new array)."""
        return ops.dequantize(self.qweight)

    def forward(self, ids: Any) -> np.ndarray:
        """ids: integer array, any shape -> ``(*ids.shape, embedding_dim)`` float32."""
        qw = self.qweight
        return lookup(qw, check_ids(ids, int(qw.shape[0])))

    # -- state dict ---------------------------------------------------------------------------------
    def _save_to_state_dict(self, dest: Dict[str, np.ndarray], prefix: str, specs: bool = False) -> None:
        super()._save_to_state_dict(dest, prefix, specs)
        if self.tied_to is None:
            dest[prefix + "weight_q"] = np.empty(0, np.int8) if specs else self.qweight.q
            dest[prefix + "weight_scale"] = self.qweight.scale

    def _load_plan(self, state: Mapping[str, Any], prefix: str, plan: List[Callable[[], None]],
                   used: set, missing: List[str], mismatched: list) -> None:
        super()._load_plan(state, prefix, plan, used, missing, mismatched)
        if self.tied_to is not None:
            return  # the tied layer loads the codes
        kq, ks = prefix + "weight_q", prefix + "weight_scale"
        absent = [k for k in (kq, ks) if k not in state]
        missing.extend(absent)
        used.update(k for k in (kq, ks) if k in state)
        if absent:
            return
        q, s = np.asarray(state[kq]), np.asarray(state[ks])
        shape = (self.num_embeddings, self.embedding_dim)
        bad = False
        if q.shape != shape:
            mismatched.append((kq, shape, q.shape))
            bad = True
        if s.shape != (self.num_embeddings,):
            mismatched.append((ks, (self.num_embeddings,), s.shape))
            bad = True
        if bad:
            return
        if q.dtype != np.int8:
            raise errors.TypeError(f"{kq}: expected int8 codes, got dtype {q.dtype}")
        new = ops.QuantizedWeight.from_codes(q, s.astype(np.float32), "per_channel")
        plan.append(lambda: object.__setattr__(self, "_qweight", new))

    # -- pickles of earlier versions held the codes as parameters weight_q / weight_scale ------------
    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        params = OrderedDict(state.get("_parameters") or {})
        old_q, old_s = params.pop("weight_q", None), params.pop("weight_scale", None)
        state["_parameters"] = params
        state.setdefault("_modules", OrderedDict())
        state.setdefault("padding_idx", None)
        state.setdefault("_cquant_tie", None)
        self.__dict__.update(state)
        if state.get("_qweight") is None and state["_cquant_tie"] is None:
            if old_q is None or old_s is None:
                raise errors.ValueError("not a pickled QuantizedEmbedding: no codes")
            qw = ops.QuantizedWeight.from_codes(np.asarray(old_q), np.asarray(old_s, dtype=np.float32),
                                                "per_channel")
            self.__dict__["_qweight"] = qw
            self.__dict__["num_embeddings"], self.__dict__["embedding_dim"] = (int(d) for d in qw.shape)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + (", tied" if self.tied_to is not None else ""))
