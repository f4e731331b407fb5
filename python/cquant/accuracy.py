"""``python -m cquant.accuracy`` (``make accuracy``): how far each scheme is from float32.

For random weights and activations from a Gaussian and from a heavy-tailed Student-t (3 degrees
of freedom: a few large outliers per row, as in real activations), and for every mode and
granularity, prints the relative error ``||y - y_ref|| / ||y_ref||`` (Frobenius, over the whole
output) and the mean and minimum cosine similarity of output rows against the float64 product of
the float32 inputs. ``error_bound`` gives the worst-case elementwise bound that the tests assert:
it follows from the quantization step alone (each code is within half a step of its value).
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import ops

SCHEMES = [("per_tensor", None), ("per_channel", None), ("per_group", 128), ("per_group", 32)]
DISTRIBUTIONS = ("gaussian", "student_t3")


def sample(dist: str, shape, rng: np.random.Generator) -> np.ndarray:
    if dist == "gaussian":
        return rng.standard_normal(shape).astype(np.float32)
    if dist == "student_t3":
        return rng.standard_t(3, size=shape).astype(np.float32)
    raise ValueError(f"unknown distribution {dist!r}")


def _steps(qw: ops.QuantizedWeight) -> np.ndarray:
    """Quantization step of every weight element, (N, K)."""
    n, k = qw.shape
    s = qw.scale
    if qw.granularity == "per_tensor":
        return np.full((n, k), s[0], np.float64)
    if qw.granularity == "per_channel":
        return np.repeat(s.astype(np.float64)[:, None], k, axis=1)
    return np.repeat(s.astype(np.float64), qw.group_size, axis=1)


def error_bound(x: np.ndarray, w: np.ndarray, qw: ops.QuantizedWeight, mode: str) -> np.ndarray:
    """Elementwise bound on |y - x @ w.T| (M, N) from the rounding steps alone, plus float32
    accumulation (K terms): |dw| <= step_w / 2, and in dynamic mode |dx| <= step_x / 2."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    hw = _steps(qw) / 2
    bound = np.abs(x64) @ hw.T
    k = w.shape[1]
    mag = np.abs(x64) @ (np.abs(w64) + hw).T
    if mode == "dynamic":
        _, sx = ops.quantize_rows(x)
        hx = sx.astype(np.float64)[:, None] / 2
        bound = bound + hx * (np.abs(w64) + hw).sum(axis=1)[None, :]
        mag = mag + hx * (np.abs(w64) + hw).sum(axis=1)[None, :]
    eps = np.finfo(np.float32).eps
    return bound + (k + 8) * eps * mag


def measure(x: np.ndarray, w: np.ndarray, mode: str, granularity: str, group_size: Optional[int]) -> Dict[str, float]:
    qw = ops.quantize_weight(w, granularity, group_size)
    y = ops.linear(x, qw, mode=mode).astype(np.float64)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    cos = np.sum(y * ref, axis=1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
    within = bool((np.abs(y - ref) <= error_bound(x, w, qw, mode)).all())
    return {"rel": rel, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "within_bound": within}


def run(m: int = 64, k: int = 1024, n: int = 1024, seed: int = 0) -> List[Dict[str, object]]:
    rng = np.random.default_rng(seed)
    rows = []
    for dist in DISTRIBUTIONS:
        w = sample(dist, (n, k), rng)
        x = sample(dist, (m, k), rng)
        for mode in ("dynamic", "weight_only"):
            for gran, g in SCHEMES:
                r = measure(x, w, mode, gran, g)
                rows.append({"dist": dist, "mode": mode,
                             "scheme": gran if g is None else f"{gran}({g})", **r})
    return rows


def format_rows(rows: Sequence[Dict[str, object]]) -> str:
    head = f"{'weights & x':<12} {'mode':<12} {'scheme':<16} {'rel err':>9} {'mean cos':>9} {'min cos':>9} {'<= bound':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['dist']:<12} {r['mode']:<12} {r['scheme']:<16} {r['rel']:>9.2e} "
                   f"{r['mean_cos']:>9.6f} {r['min_cos']:>9.6f} {'yes' if r['within_bound'] else 'NO':>8}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"cquant accuracy vs float32 (float64 reference): M={a.m} K={a.k} N={a.n}, ISA {ops.isa()}")
    rows = run(a.m, a.k, a.n, a.seed)
    print(format_rows(rows))
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
