"""Interleaved A/B of this checkout's cquant against another build of cquant, in one process.

    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py -q build_ext --inplace)
    CQUANT_ISA=avx2 python tools/ab_versions.py /tmp/old/python/cquant [--threads 2] [--seconds 1.5]

The other build's package is copied under the name ``cquant_other`` (its modules import each other
relatively, and its extension module loads under any package name), so both run in the same
process on the same inputs: the contenders alternate call by call (ABAB..., then BABA..), and the
figure is the median of the paired ratios old / new (> 1: this checkout is faster). Dynamic outputs
must be bit-identical (the integer sums are the contract); a difference stops the run.

Which package is imported first matters: a build against an identical copy of itself measured the
first-imported one 2-6% faster on some cells (Sapphire Rapids-class Xeon, 2026-11-30; memory
placement). So the tool runs every cell twice, in two child processes: this checkout imported
first, then the other build imported first (as ``cquant``, from its own folder, with this checkout
as the copy), and prints both ratios and their geometric mean, in which that bias cancels.
``--one-order`` keeps only the first. ``CQUANT_ISA`` applies to both builds. What was measured with
it is in README, "Measured performance".

``--bits 4`` and ``--group G`` quantize the bench shapes' weights to int4 and / or per group of G.
``--inputs a.npz,b.npz`` times dynamic calls on captured inputs instead of the bench's shapes (e.g.
a model layer's activations): each file holds ``x`` (M, K), ``w`` (N, K) float32 (quantized per
channel by each build), and optionally ``b``, ``x_mul`` and ``x_hadamard``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = [(768, 768), (4096, 4096), (4096, 11008)]
MS = [1, 8, 64, 256]


def _load_other(path: str):
    if not os.path.isfile(os.path.join(path, "__init__.py")):
        raise SystemExit(f"{path}: not a cquant package folder (no __init__.py)")
    root = tempfile.mkdtemp(prefix="cquant-ab-")
    shutil.copytree(path, os.path.join(root, "cquant_other"))
    sys.path.insert(0, root)
    import cquant  # noqa: F401  (this checkout first: its version check sees its own extension)
    import cquant_other
    return cquant_other


def _time_pair(fa, fb, seconds: float) -> tuple:
    ta, tb = [], []
    end = time.perf_counter() + seconds
    n = 0
    while (n < 7 or time.perf_counter() < end) and n < 400:
        for which in ((0, 1) if n % 2 == 0 else (1, 0)):
            f, t = (fa, ta) if which == 0 else (fb, tb)
            s = time.perf_counter()
            f()
            t.append(time.perf_counter() - s)
        n += 1
    a, b = np.array(ta), np.array(tb)
    return float(np.median(a)), float(np.median(b)), float(np.median(a / b))


def _child(args: list, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"] + args, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    out = {}
    for ln in r.stdout.splitlines():
        if ln.startswith("CELL\t"):
            _, key, t_other, t_this, ratio = ln.split("\t")
            out[key] = (float(t_other), float(t_this), float(ratio))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("other", help="the other build's python/cquant folder (built in place)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=1.5, help="time per cell and mode")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,... (the bench's)")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="M values (the bench's)")
    p.add_argument("--one-order", action="store_true", help="only this checkout imported first")
    p.add_argument("--no-check", action="store_true",
                   help="time builds whose dynamic outputs differ (an experiment that drops work)")
    p.add_argument("--inputs", default="", help="a.npz,b.npz: captured (x, w[, b, x_mul, x_hadamard]) instead")
    p.add_argument("--bits", type=int, default=8, help="weight bits of the bench shapes (8 or 4)")
    p.add_argument("--group", type=int, default=0, help="per-group weights of this group size (0: per channel)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.child:
        import cquant
        this_pkg = os.path.dirname(os.path.abspath(cquant.__file__))
        other_pkg = os.path.abspath(a.other)
        common = ["--threads", str(a.threads), "--seconds", str(a.seconds), "--shapes", a.shapes, "--ms", a.ms,
                  "--bits", str(a.bits), "--group", str(a.group)]
        if a.no_check:
            common += ["--no-check"]
        if a.inputs:
            common += ["--inputs", ",".join(os.path.abspath(f) for f in a.inputs.split(","))]
        first = _child([other_pkg] + common, os.path.dirname(this_pkg))
        second = {} if a.one_order else _child([this_pkg] + common, os.path.dirname(other_pkg))
        print(f"threads {a.threads}; ratio = other / this time, median of paired calls (> 1: this checkout faster)")
        split = 0
        for key, (t_o, t_t, r1) in first.items():
            line = f"{key:34s} other {t_o * 1e3:8.3f} ms  this {t_t * 1e3:8.3f} ms  this first {r1:.3f}"
            if key in second:
                r2 = 1.0 / second[key][2]  # there "this" was the other build
                line += f"  other first {r2:.3f}  both {float(np.sqrt(r1 * r2)):.3f}"
                if abs(np.log(r1 / r2)) > np.log(1.03):
                    line += "  (orders disagree)"
                    split += 1
            print(line, flush=True)
        if split:
            # seen on a Zen 3 VM (2026-12-01): one order 1.25, the other 1.00, for the same two builds
            print(f"{split} cell(s): the two import orders differ by more than 3%; their geometric mean "
                  "cancels a bias common to both, but small effects there are not resolved: repeat, or "
                  "measure in one process (e.g. examples/minilm.py --interleave)")
        return 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ms = [int(v) for v in a.ms.split(",")]
    other = _load_other(a.other)
    import cquant
    for m in (other, cquant):
        m.ops.set_num_threads(a.threads)
    def isa(m):
        return m.ops.isa() if hasattr(m.ops, "isa") else "?"
    print(f"ISA: other {isa(other)}, this {isa(cquant)}; threads {a.threads}")
    rng = np.random.default_rng(0)
    for f in filter(None, a.inputs.split(",")):
        d = np.load(f)
        x, w = d["x"], d["w"]
        kw = dict(mode="dynamic", x_mul=d["x_mul"] if "x_mul" in d else None,
                  x_hadamard=int(d["x_hadamard"]) if "x_hadamard" in d else 0)
        b = d["b"] if "b" in d else None
        qo, qn = other.ops.quantize_weight(w), cquant.ops.quantize_weight(w)
        def fo():
            return other.ops.linear(x, qo, b, **kw)

        def fn():
            return cquant.ops.linear(x, qn, b, **kw)
        if not a.no_check and not np.array_equal(fo(), fn()):
            raise SystemExit(f"{f}: dynamic outputs differ between the builds")
        to, tn, r = _time_pair(fo, fn, a.seconds)
        print(f"CELL\t{os.path.basename(f)} M={x.shape[0]}\t{to}\t{tn}\t{r}", flush=True)
    if a.inputs:
        return 0
    for k, n in shapes:
        w = rng.standard_normal((n, k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        # only what differs from the defaults (builds from before int4 take no bits argument)
        wq = dict(granularity="per_group", group_size=a.group) if a.group else {}
        if a.bits != 8:
            wq["bits"] = a.bits
        qo, qn = other.ops.quantize_weight(w, **wq), cquant.ops.quantize_weight(w, **wq)
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            for mode in ("dynamic", "weight_only"):
                def fo():
                    return other.ops.linear(x, qo, b, mode=mode)

                def fn():
                    return cquant.ops.linear(x, qn, b, mode=mode)
                if mode == "dynamic" and not a.no_check and not np.array_equal(fo(), fn()):
                    raise SystemExit(f"({k}, {n}) M={m}: dynamic outputs differ between the builds")
                to, tn, r = _time_pair(fo, fn, a.seconds)
                print(f"CELL\t{k}x{n} M={m} {mode}\t{to}\t{tn}\t{r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
