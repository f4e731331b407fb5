"""Numpy references for cquant, independent of it (this module never imports cquant).

Written from the numerics contract (README "Numerics", and the header csrc/include/cquant.h):

- weights: symmetric int8 codes in [-127, 127]; scale of a slice = max|w| / 127 in float32; an
  all-zero slice gets scale 1.0; q = clip(round_half_even(w / scale), -127, 127) with the division
  in float32.  (A slice whose float32 scale underflows to 0, i.e. max|w| < ~127 * 2^-150, is also
  given scale 1.0, as the C core does: the contract leaves w / 0 undefined.)
- activations: each row of x quantized by the same rule; a row holding NaN/Inf gets scale NaN and
  codes 0 (u8 codes: 0 + 128 = 128);
- dynamic linear: exact integer sums (int64 here), then a float32 epilogue;
- weight-only linear: y = x @ (q * scale).T + b, the reference in float64.

Float32 epilogue order (what the comparison relies on to be BIT-EXACT, not merely within 1 ulp; it
follows csrc/src/linear.c and the micro-kernels' cq_qd8_out contract in csrc/src/internal.h):

  direct  (per-channel / per-tensor, or per-group with a single group; any K, the int64 total of
          the int32 chunks past K = 131072):
          y = float32(acc) * min(sx * sw, FLT_MAX) + b          three float32 roundings, no FMA
  grouped (per-group with >= 2 groups):
          facc = 0; for each group g in order: facc = fma(float32(acc_g), min(sx * sw_g, FLT_MAX), facc)
          y = facc + b
          (sx inside each group's product: acc_g * sw_g first overflowed where the result is finite;
          the cap keeps an exact 0 sum at 0 where sx * sw overflows, instead of 0 * inf = NaN)
          Every micro-kernel folds a group with one fused multiply-add (_mm*_fmadd_ps; the scalar
          reference and the driver's int64 path with fmaf), so outputs are bit-identical on every
          path. `fma_groups=False` gives the two-rounding variant (kept to show the test can tell).

Every float32 operation below is done on float32 numpy arrays (each elementwise op rounds once to
float32, numpy never contracts a*b+c into an FMA), so each line matches one C operation.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

F32 = np.float32
CHUNK_K = 131072  # k per exact int32 chunk in the C core (CQ_CHUNK4 * 4); beyond it: int64 path
_FLT_MAX = np.finfo(np.float32).max


# ---- quantization ------------------------------------------------------------------------------
def _scale_of(amax: np.ndarray, qmax: int = 127) -> np.ndarray:
    """float32 max|w| / qmax; 1.0 where that is 0 (all-zero slice, or a scale that underflows)."""
    s = (np.asarray(amax, dtype=F32) / F32(qmax)).astype(F32)
    return np.where(s > 0, s, F32(1.0)).astype(F32)


def _codes(w: np.ndarray, s_full: np.ndarray, qmax: int = 127) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        r = np.round((w / s_full).astype(F32))  # float32 true division, round half to even
    return np.clip(r, -qmax, qmax).astype(np.int8)


def quantize(w, granularity: str = "per_channel", group_size: Optional[int] = None, bits: int = 8):
    """Codes and scales of a finite float weight w (N, K): (q int8 (N, K), scale float32) with
    scale shape (1,) per-tensor, (N,) per-channel, (N, K // group_size) per-group. bits=4: the
    same rule with 7 for 127 (codes in [-7, 7])."""
    qm = {8: 127, 4: 7}[bits]
    _scale_of_b = lambda amax: _scale_of(amax, qm)  # noqa: E731
    _codes_b = lambda w_, s_: _codes(w_, s_, qm)  # noqa: E731
    w = np.asarray(w, dtype=F32)
    if w.ndim != 2:
        raise ValueError("w must be 2-D")
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    n, k = w.shape
    a = np.abs(w)
    if granularity == "per_tensor":
        s = _scale_of_b(a.max()).reshape(1)
        return _codes_b(w, np.broadcast_to(s[0], w.shape)), s
    if granularity == "per_channel":
        s = _scale_of_b(a.max(axis=1))
        return _codes_b(w, s[:, None]), s
    if granularity == "per_group":
        g = int(group_size)
        if g <= 0 or k % g:
            raise ValueError("group_size must divide K")
        s = _scale_of_b(a.reshape(n, k // g, g).max(axis=2))
        return _codes_b(w, np.repeat(s, g, axis=1)), s
    raise ValueError(f"unknown granularity {granularity!r}")


def quantize_rows_s8(x):
    """Per-row quantization of x (M, K) -> (q int8 (M, K), scale float32 (M,)). A row with NaN/Inf
    (after conversion to float32) gets scale NaN and codes 0."""
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        x = x.astype(F32)
    bad = ~np.isfinite(x).all(axis=1)
    xs = np.where(bad[:, None], F32(0), x)
    s = _scale_of(np.abs(xs).max(axis=1))
    q = _codes(xs, s[:, None])
    q[bad] = 0
    s = s.copy()
    s[bad] = np.nan
    return q, s


def quantize_rows_static(x, scale):
    """Static activations: every row of x (M, K) with the one float32 scale, codes clamped to
    [-127, 127]; a row with NaN/Inf gets scale NaN and codes 0 -> (q, scale (M,))."""
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        x = x.astype(F32)
    bad = ~np.isfinite(x).all(axis=1)
    xs = np.where(bad[:, None], F32(0), x)
    q = _codes(xs, F32(scale))
    q[bad] = 0
    s = np.full(x.shape[0], F32(scale), dtype=F32)
    s[bad] = np.nan
    return q, s


def quantize_rows_u8(x):
    """As quantize_rows_s8, codes stored as uint8 q + 128 (NaN/Inf rows: 128)."""
    q, s = quantize_rows_s8(x)
    return (q.astype(np.int16) + 128).astype(np.uint8), s


def dequantize(q, scale, granularity: str = "per_channel", group_size: Optional[int] = None):
    """float32(q) * scale of its slice (one float32 rounding)."""
    q = np.asarray(q)
    n, k = q.shape
    s = np.asarray(scale, dtype=F32)
    if granularity == "per_tensor":
        full = np.broadcast_to(s.reshape(1)[0], q.shape)
    elif granularity == "per_channel":
        full = s.reshape(n)[:, None]
    else:
        full = np.repeat(s.reshape(n, k // int(group_size)), int(group_size), axis=1)
    with np.errstate(over="ignore"):  # 127 * (FLT_MAX / 127) may round past FLT_MAX: Inf, as in C
        return (q.astype(F32) * full).astype(F32)


# ---- integer sums ---------------------------------------------------------------------------------
def int_sums(qx, q, group_size: Optional[int] = None) -> np.ndarray:
    """Exact int64 sums: (M, N) = qx (M, K) @ q (N, K).T, or per group (M, N, K // group_size)."""
    a = np.asarray(qx).astype(np.int64)
    b = np.asarray(q).astype(np.int64)
    if group_size is None:
        return a @ b.T
    g = int(group_size)
    m, k = a.shape
    n = b.shape[0]
    return np.einsum("mgk,ngk->mng", a.reshape(m, k // g, g), b.reshape(n, k // g, g))


# ---- float helpers ----------------------------------------------------------------------------------
def fma32(a, b, c) -> np.ndarray:
    """Correctly rounded float32 fma(a, b, c) of float32 arrays (as vfmadd*ps computes it).

    a*b is exact in float64 (24 + 24 bits); the float64 sum is rounded to odd (TwoSum error term
    decides the sticky bit), and round-to-odd at 53 bits followed by round-to-nearest at 24 bits is
    the correctly rounded result (53 >= 24 + 2)."""
    a = np.asarray(a, dtype=F32).astype(np.float64)
    b = np.asarray(b, dtype=F32).astype(np.float64)
    c = np.asarray(c, dtype=F32).astype(np.float64)
    p = a * b
    p, c = np.broadcast_arrays(p, c)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c
        bb = s - p
        e = (p - (s - bb)) + (c - bb)
        even = (s.view(np.int64) & 1) == 0
        fix = np.isfinite(s) & np.isfinite(e) & (e != 0) & even
        s = np.where(fix, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
        return s.astype(F32)


def _sw_matrix(scale, granularity, n, ng):
    s = np.asarray(scale, dtype=F32)
    if granularity == "per_tensor":
        return np.full((n, ng), s.reshape(-1)[0], dtype=F32)
    return s.reshape(n, ng).astype(F32)


# ---- linears -------------------------------------------------------------------------------------------
def linear_dynamic(x, q, scale, granularity: str = "per_channel", group_size: Optional[int] = None,
                   bias=None, *, fma_groups: bool = False, x_scale=None) -> np.ndarray:
    """Dynamic linear of x (M, K) through codes q (N, K) with scales `scale`, float32 (M, N), in
    the epilogue order of the module docstring (bit-exact with cquant when `fma_groups` says
    whether the kernel that runs folds groups with an FMA: True for every SIMD kernel, False for
    the scalar "_ref" kernels). x_scale: static activations (one scale for every row)."""
    qx, sx = quantize_rows_s8(x) if x_scale is None else quantize_rows_static(x, x_scale)
    q = np.asarray(q)
    n, k = q.shape
    m = qx.shape[0]
    ng = k // int(group_size) if granularity == "per_group" else 1
    gs = k // ng
    sw = _sw_matrix(scale, granularity, n, ng)  # (N, ng)
    b = np.zeros(n, dtype=F32) if bias is None else np.asarray(bias, dtype=F32).reshape(n)
    with np.errstate(invalid="ignore", over="ignore"):
        if ng == 1:  # also past CHUNK_K: the int64 total, then the contract's order
            acc = int_sums(qx, q).astype(F32)  # int64 -> float32: one rounding (the C cast)
            s = np.minimum((sx[:, None] * sw[None, :, 0]).astype(F32), _FLT_MAX)
            return ((acc * s).astype(F32) + b[None, :]).astype(F32)
        acc = int_sums(qx, q, gs).astype(F32)  # (M, N, ng)
        use_fma = fma_groups
        facc = np.zeros((m, n), dtype=F32)
        for g in range(ng):
            sg = np.minimum((sx[:, None] * sw[None, :, g]).astype(F32), _FLT_MAX)
            if use_fma:
                facc = fma32(acc[:, :, g], sg, facc)
            else:
                facc = (facc + (acc[:, :, g] * sg).astype(F32)).astype(F32)
        return (facc + b[None, :]).astype(F32)


def linear_weight_only(x, q, scale, granularity: str = "per_channel",
                       group_size: Optional[int] = None, bias=None, fixed24: bool = False):
    """Weight-only linear in float64: (y float64 (M, N), budget float64 (M, N)).

    The weight is the float32 dequantized one (float32(q) * scale, which the kernels form exactly
    like this); x is taken as float32. `budget` bounds the float32 error of any summation order
    of the K products plus the bias (gamma_{K+2} * sum |x_k w_k| + |b|, u = 2^-24), a K-scaled
    budget rather than a magic number. fixed24: the int4 GEMV in integers (x24 kernels) rounds
    each x[k] to a multiple of 2^(e - 21), max|x| in [2^e, 2^(e+1)), so it may be off by
    2^-22 * max|x| more per element: + 2^-22 * max|x| * sum_k |w_k| (cquant.h)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x).astype(F32).astype(np.float64)
    w = dequantize(q, scale, granularity, group_size).astype(np.float64)
    k = w.shape[1]
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=F32).astype(np.float64)
    # einsum, not matmul: no BLAS threads (they contend with cquant's pool on small machines)
    y = np.einsum("mk,nk->mn", x, w) + b
    u = 2.0 ** -24
    gamma = (k + 2) * u / (1 - (k + 2) * u)
    budget = gamma * (np.einsum("mk,nk->mn", np.abs(x), np.abs(w)) + np.abs(b)) + 1e-300
    if fixed24:
        amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
        budget = budget + 2.0 ** -22 * (1 + gamma) * amax[:, None] * np.abs(w).sum(axis=1)[None, :]
    return y, budget


def hadamard_rows(x, block: int, mul=None) -> np.ndarray:
    """The x_hadamard rotation, written from its definition (cquant.h), independently of
    cquant.ops.hadamard: v = x * mul in float32, then for h = 1, 2, ..., block / 2 in turn every pair
    (i, i + h) with i % (2 h) < h becomes (v[i] + v[i + h], v[i] - v[i + h]), one float32 addition
    each (element by element, as the contract states it)."""
    v = np.array(x, dtype=np.float32, copy=True)
    if mul is not None:
        v = (v * np.asarray(mul, np.float32)).astype(np.float32)
    rows = v.reshape(-1, v.shape[-1])
    k = rows.shape[1]
    h = 1
    while h < block:
        lo = np.array([i for i in range(k) if i % (2 * h) < h])
        a, c = rows[:, lo].copy(), rows[:, lo + h].copy()
        rows[:, lo] = a + c
        rows[:, lo + h] = a - c
        h *= 2
    return rows.reshape(v.shape)
