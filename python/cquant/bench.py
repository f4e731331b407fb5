"""Benchmark harness: cquant int8 linear against numpy float32, torch and onnxruntime.

Run it as ``make bench``, ``python -m cquant.bench`` or ``cquant bench``; ``main(argv)`` is the entry point.

How it measures, and why:

* **One process per thread count.** numpy's OpenBLAS (and torch's OpenMP pool) read their thread count
  when the library loads; changing it afterwards is not reliable. So the parent process never measures
  anything: for each thread count it starts a child (``python -m cquant.bench --child ...``) with
  ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``CQUANT_NUM_THREADS`` set, the child
  also calls ``torch.set_num_threads(n)`` and gives onnxruntime ``intra_op_num_threads=n`` (inter-op 1),
  measures, and prints its results as JSON on stdout. The parent composes the tables. The thread counts
  each library actually reports are recorded in the JSON (``meta.threads_seen``) so a silent mismatch
  shows.
* **Interleaved, median.** Every contender is warmed up, then the contenders are called round-robin
  (one call each per round) until each has ``>= 7`` repetitions and about 0.3 s of run time (slow
  contenders stop earlier, at 3 repetitions or ~2 s), so a noisy neighbour on this shared machine hits
  all of them alike. The figure reported is the median.
* **No idle spinning.** Thread pools busy-wait after a call by default (OpenBLAS for ~2**28 cycles,
  libgomp under torch, onnxruntime's intra-op pool). Interleaved, a pool still spinning takes a core
  from the contender that runs next: on 2 cores that made numpy's 768x768 GEMV 80x slower and
  scrambled every 2-thread figure. So the children run with ``OPENBLAS_THREAD_TIMEOUT=4``,
  ``OMP_WAIT_POLICY=PASSIVE`` and onnxruntime's ``session.intra_op.allow_spinning=0`` (values the user
  set in the environment win; ``--allow-spin`` keeps the libraries' defaults).
* **Noisy neighbours.** The parent reads the machine-wide busy time around each child and reports the
  share of the CPUs other processes used meanwhile; above 10% it warns that the multi-thread figures
  are unreliable (a 2-thread kernel on 2 cores waits for whichever thread lost its core).
* **Ratios.** ``ratio = numpy_time / contender_time``: higher is better, numpy float32 ``x @ W.T + b``
  is 1.0.
* **Accuracy.** Each contender's output on the same Gaussian ``x`` is compared with a float64 reference:
  relative error ``||y - ref|| / ||ref||`` and cosine similarity.
* **Machine.** The report opens with the CPU model and the cquant ISA path (``meta.cpu``,
  ``meta.cquant_isa`` in the JSON).
* **Micro-kernels.** After the timing of a cell, the child calls each cquant contender once more and
  then ``cquant.last_kernel()`` (the micro-kernel the calling thread's last linear/gemm ran), recorded
  as ``kernel`` per cell and contender and printed in the table "Micro-kernels that ran". ``?`` (JSON
  ``null``): this cquant has no ``last_kernel``.
* **% of peak.** Each child measures, once, ``cquant.ops.peak_gmacs("int8")`` and ``("f32")``: the
  multiply-accumulates per second (GMAC/s) of a register-only loop of the active ISA's best int8
  dot-product / float32 FMA instruction on one core (``meta.peak_gmacs[threads]``). A cell of K, N, M
  timed at t seconds achieves ``K*N*M / t / 1e9`` GMAC/s (``gmacs``); ``pct_of_peak`` = achieved /
  (peak * threads), in percent: cquant dynamic against the int8 peak, weight_only against the f32
  peak. ``n/a`` (``null``): this cquant has no ``ops.peak_gmacs``. M=1 cells are bound by the weight
  stream, not by arithmetic, so a low figure there is expected.
* **Warnings.** The child ignores torch's deprecation chatter about ``torch.ao.quantization`` and
  quantized tensors (Deprecation/Future/UserWarning mentioning "quantiz" or "deprecat", raised in
  torch or attributed by torch to this module's calls into it); every other warning still shows.

The peers are optional: without torch, or without onnxruntime + onnx, their columns say
"not installed". ``pip install -r requirements-bench.txt`` (``make bench-deps``) brings them.
``CQUANT_BENCH_HIDE`` (comma-separated: ``torch``, ``onnxruntime``, ``last_kernel``, ``peak_gmacs``)
makes the child behave as if those were missing, for the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# numpy, torch and onnxruntime are imported inside functions, in the child, whose environment already
# holds the thread settings. The parent measures nothing, so what it imports does not matter.

DEFAULT_SHAPES: List[Tuple[int, int]] = [(768, 768), (4096, 4096), (4096, 11008)]
DEFAULT_M: List[int] = [1, 8, 64, 256]
DEFAULT_THREADS: List[int] = [1, 2]
QUICK_SHAPES: List[Tuple[int, int]] = [(256, 256), (768, 768)]
QUICK_M: List[int] = [1, 8]
QUANT_SHAPE: Tuple[int, int] = (4096, 11008)  # (K, N), as the shapes above: a weight of N rows, K columns
QUANT_TARGET_S = 0.1

# Contender keys, in table order. "numpy" is the baseline.
CONTENDERS: List[Tuple[str, str]] = [
    ("numpy", "numpy f32"),
    ("cquant_wo", "cquant weight_only"),
    ("cquant_dyn", "cquant dynamic"),
    ("cquant_wo4", "cquant int4 g32 weight_only"),
    ("cquant_dyn4", "cquant int4 g32 dynamic"),
    ("torch_f32", "torch f32"),
    ("torch_pt", "torch qint8 per-tensor"),
    ("torch_pc", "torch qint8 per-channel"),
    ("ort_pc", "ort dyn per-channel"),
]
CONTENDER_KEYS = [k for k, _ in CONTENDERS]
LABELS = dict(CONTENDERS)

THREAD_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CQUANT_NUM_THREADS")
# Idle thread pools that busy-wait steal cores from the contender that runs next (see the docstring).
# OPENBLAS_THREAD_TIMEOUT=n makes OpenBLAS workers spin 2**n cycles (clamped to 4..30; default 28,
# about 0.1 s) before sleeping; OMP_WAIT_POLICY=PASSIVE makes libgomp workers (torch) sleep at once.
SPIN_ENV_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}
SPIN_ENV_VARS = tuple(SPIN_ENV_DEFAULTS)

# Timing policy.
TARGET_S = 0.3      # aim for this much run time per contender and measurement
MIN_REPS = 7        # ... and at least this many repetitions
SLOW_MIN_REPS = 3   # a slow contender may stop at this many
SLOW_MAX_S = 2.0    # ... once its repetitions would pass this much time
MAX_REPS = 500

# cquant contenders whose micro-kernel and % of peak are reported, with the peak each is held against.
CQUANT_PEAK_KIND: Dict[str, str] = {"cquant_wo": "f32", "cquant_dyn": "int8", "cquant_wo4": "f32",
                                    "cquant_dyn4": "int8"}
# The int8 dot-product instruction whose peak ops.peak_gmacs("int8") measures, per cquant ISA path.
INT8_PEAK_INSN: Dict[str, str] = {"amx": "vpdpbusd", "avx512vnni": "vpdpbusd", "avx512": "vpmaddubsw ymm",
                                  "avxvnni": "vpmaddubsw ymm", "avx2": "vpmaddubsw"}


class Unavailable(Exception):
    """A contender that cannot run here (library not installed, or its setup failed)."""


# ----------------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------------

def _parse_int_list(text: str) -> List[int]:
    try:
        vals = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _parse_shape(text: str) -> Tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        k, n = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape KxN such as 4096x11008, got {text!r}")
    if k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape dimensions must be positive, got {text!r}")
    return k, n


def _parse_shapes(text: str) -> List[Tuple[int, int]]:
    shapes = [_parse_shape(t) for t in text.replace(" ", "").split(",") if t]
    if not shapes:
        raise argparse.ArgumentTypeError("no shape given")
    return shapes


def _parse_contenders(text: str) -> List[str]:
    keys = [t for t in text.replace(" ", "").split(",") if t]
    bad = [k for k in keys if k not in CONTENDER_KEYS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown contender(s) {bad}; choose from {CONTENDER_KEYS}")
    if "numpy" not in keys:
        keys.insert(0, "numpy")  # the baseline of every ratio
    return [k for k in CONTENDER_KEYS if k in keys]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cquant bench",
        description="Benchmark cquant int8 linear against numpy float32, torch and onnxruntime "
                    "(medians and ratios; ratio = numpy time / contender time, higher is better).",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"small subset for smoke tests: shapes {QUICK_SHAPES}, M {QUICK_M}, "
                        "shorter timing, quantize-time row on the largest selected shape")
    p.add_argument("--threads", type=_parse_int_list, default=None,
                   help="comma-separated thread counts, one child process each (default 1,2)")
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="comma-separated weight shapes KxN (in_features x out_features), "
                        "default 768x768,4096x4096,4096x11008")
    p.add_argument("--M", dest="M", type=_parse_int_list, default=None,
                   help="comma-separated batch sizes M (rows of x), default 1,8,64,256")
    p.add_argument("--contenders", type=_parse_contenders, default=None,
                   help=f"comma-separated subset of {CONTENDER_KEYS} (numpy is always included)")
    p.add_argument("--quant-shape", type=_parse_shape, default=None,
                   help="KxN of the quantize-time row (default 4096x11008)")
    p.add_argument("--no-quant-time", action="store_true", help="skip the quantize-time row")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON here")
    p.add_argument("--target-time", type=float, default=None,
                   help=f"seconds of run time to aim for per contender and measurement (default {TARGET_S})")
    p.add_argument("--min-reps", type=int, default=None, help=f"minimum repetitions (default {MIN_REPS})")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and activations")
    p.add_argument("--allow-spin", action="store_true",
                   help="keep the libraries' default busy-waiting thread pools (OpenBLAS, OpenMP, "
                        "onnxruntime); by default spinning is turned off, see the module docstring")
    # internal: run as the measuring child for one thread count, print JSON on stdout
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-quant-time", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-no-linear", action="store_true", help=argparse.SUPPRESS)
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick."""
    if args.threads is None:
        args.threads = [1] if args.quick else list(DEFAULT_THREADS)
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.M is None:
        args.M = list(QUICK_M if args.quick else DEFAULT_M)
    if args.contenders is None:
        args.contenders = list(CONTENDER_KEYS)
    if args.quant_shape is None:
        args.quant_shape = max(args.shapes, key=lambda s: s[0] * s[1]) if args.quick else QUANT_SHAPE
    if args.target_time is None:
        args.target_time = 0.05 if args.quick else TARGET_S
    if args.min_reps is None:
        args.min_reps = 3 if args.quick else MIN_REPS
    return args


# ----------------------------------------------------------------------------------------------------
# machine and library information
# ----------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _hidden() -> set:
    """CQUANT_BENCH_HIDE=torch,onnxruntime: treat those as not installed (lets tests reach that path)."""
    return set(filter(None, os.environ.get("CQUANT_BENCH_HIDE", "").replace(" ", "").split(",")))


def _version(dist: str) -> Optional[str]:
    """Installed version of a distribution, without importing it (importing torch takes seconds)."""
    if dist in _hidden():
        return None
    try:
        from importlib import metadata
        return metadata.version(dist)
    except Exception:
        return None


def _openblas_threads() -> Optional[int]:
    """Threads the loaded OpenBLAS (numpy's) will use, read with threadpoolctl or ctypes."""
    try:
        import threadpoolctl  # type: ignore
        for info in threadpoolctl.threadpool_info():
            if info.get("internal_api") == "openblas" or info.get("user_api") == "blas":
                return int(info["num_threads"])
    except Exception:
        pass
    try:
        import ctypes
        paths = set()
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "openblas" in line.lower() and ".so" in line:
                    paths.add(line.split()[-1])
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for sym in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                        "openblas_get_num_threads"):
                fn = getattr(lib, sym, None)
                if fn is not None:
                    fn.restype = ctypes.c_int
                    return int(fn())
    except Exception:
        pass
    return None


# ----------------------------------------------------------------------------------------------------
# contenders (child side)
# ----------------------------------------------------------------------------------------------------

def _import_cquant_ops():
    try:
        import cquant  # noqa: F401
        from cquant import ops
    except Exception as exc:  # not built, or broken: report instead of failing the whole run
        raise Unavailable(f"cquant not importable: {type(exc).__name__}: {exc}".splitlines()[0])
    return cquant, ops


def _make_numpy(W, b):
    def run(x):
        return x @ W.T + b
    return run


def _make_cquant(W, b, mode: str, bits: int = 8):
    _, ops = _import_cquant_ops()
    if bits == 8:
        qw = ops.quantize_weight(W, granularity="per_channel")
    else:  # int4: groups of 32 input columns (per-channel int4 loses too much accuracy to compare)
        qw = ops.quantize_weight(W, granularity="per_group", group_size=32, bits=bits)

    def run(x):
        return ops.linear(x, qw, b, mode=mode)
    return run


def _torch():
    try:
        import torch
    except ImportError:
        raise Unavailable("not installed")
    return torch


def _make_torch(W, b, kind: str, threads: int):
    torch = _torch()
    torch.set_num_threads(threads)
    K = W.shape[1]
    N = W.shape[0]
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
        lin.bias.copy_(torch.from_numpy(b))
    model = torch.nn.Sequential(lin).eval()
    if kind == "f32":
        qmodel = model
    else:
        from torch.ao.quantization import quantize_dynamic
        if kind == "pt":
            qmodel = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        else:
            from torch.ao.quantization import per_channel_dynamic_qconfig
            qmodel = quantize_dynamic(model, qconfig_spec={torch.nn.Linear: per_channel_dynamic_qconfig},
                                      dtype=torch.qint8)
        mod = qmodel[0]
        if "quantized" not in type(mod).__module__:
            raise Unavailable(f"quantize_dynamic left {type(mod).__name__} unquantized")

    def run(x):
        with torch.inference_mode():
            return qmodel(torch.from_numpy(x)).numpy()
    return run


class _OrtModel:
    """A one-MatMul+Add ONNX model, dynamically quantized by onnxruntime, in a temp dir."""

    def __init__(self, W, b, tmpdir: str):
        try:
            import onnx
            import onnxruntime  # noqa: F401
            from onnx import TensorProto, helper, numpy_helper
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError as exc:
            raise Unavailable(f"not installed ({exc.name or exc})")
        import numpy as np
        N, K = W.shape
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "wt"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])],
            "linear", [x], [y],
            [numpy_helper.from_array(np.ascontiguousarray(W.T), "wt"), numpy_helper.from_array(b, "b")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        f32_path = os.path.join(tmpdir, f"linear_{K}x{N}.onnx")
        q_path = os.path.join(tmpdir, f"linear_{K}x{N}.int8.onnx")
        onnx.save(model, f32_path)
        del model, graph
        # ORT's quantizer logs a "consider pre-processing" warning through the root logger; keep it quiet.
        root = logging.getLogger()
        old = root.level
        root.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_dynamic(f32_path, q_path, per_channel=True, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(old)
        os.unlink(f32_path)
        self.path = q_path
        self.op_types = [n.op_type for n in onnx.load(q_path, load_external_data=False).graph.node]

    def session(self, threads: int, allow_spin: bool = False):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's intra-op workers spin after each run by default; with contenders interleaved on a small
        # machine that spinning would steal cores from whoever runs next, so turn it off.
        if not allow_spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])

        def run(x):
            return sess.run(None, {"x": x})[0]
        return run


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------

def plan_reps(t_one: float, target_s: float, min_reps: int) -> int:
    """Repetitions for a contender whose single call takes about t_one seconds."""
    t_one = max(t_one, 1e-7)
    reps = max(min_reps, int(math.ceil(target_s / t_one)))
    reps = min(reps, MAX_REPS)
    if reps * t_one > SLOW_MAX_S:
        reps = max(min(SLOW_MIN_REPS, min_reps), int(SLOW_MAX_S / t_one))
    return reps


def measure_interleaved(fns: Dict[str, Callable[[Any], Any]], x, target_s: float,
                        min_reps: int) -> Tuple[Dict[str, List[float]], Dict[str, Any]]:
    """Warm every contender up, then time them round-robin. Returns (times in s, first outputs)."""
    pc = time.perf_counter
    outputs: Dict[str, Any] = {}
    t_est: Dict[str, float] = {}
    for name, fn in fns.items():
        t0 = pc()
        outputs[name] = fn(x)
        t1 = pc()
        if t1 - t0 < 0.05:  # cheap: a second warm-up call gives a better estimate
            fn(x)
            t1b = pc()
            t_est[name] = t1b - t1
        else:
            t_est[name] = t1 - t0
    reps = {name: plan_reps(t_est[name], target_s, min_reps) for name in fns}
    times: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    rnd = 0
    while True:
        pending = [n for n in names if len(times[n]) < reps[n]]
        if not pending:
            break
        # rotate the starting contender each round so none always runs right after the same one
        k = rnd % len(pending)
        for name in pending[k:] + pending[:k]:
            fn = fns[name]
            t0 = pc()
            fn(x)
            times[name].append(pc() - t0)
        rnd += 1
    return times, outputs


def accuracy(y, ref) -> Dict[str, float]:
    import numpy as np
    y64 = np.asarray(y, dtype=np.float64).reshape(ref.shape)
    if not np.all(np.isfinite(y64)):
        return {"rel_err": float("nan"), "cos": float("nan")}
    diff = np.linalg.norm(y64 - ref)
    nref = np.linalg.norm(ref)
    ny = np.linalg.norm(y64)
    rel = float(diff / nref) if nref > 0 else float(diff)
    cos = float(np.vdot(y64, ref) / (ny * nref)) if ny > 0 and nref > 0 else float("nan")
    return {"rel_err": rel, "cos": cos}


# ----------------------------------------------------------------------------------------------------
# child: measure everything for one thread count
# ----------------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _weights(rng, K: int, N: int):
    import numpy as np
    # Kaiming-like scale so y has O(1) entries; Gaussian bias.
    W = (rng.standard_normal((N, K), dtype=np.float32) / np.float32(math.sqrt(K))).astype(np.float32)
    b = rng.standard_normal(N, dtype=np.float32) * np.float32(0.1)
    return np.ascontiguousarray(W), np.ascontiguousarray(b)


def _quant_time(args, threads: int) -> Dict[str, Any]:
    """Time quantize_weight per_channel on one weight: cquant, a numpy reference, torch."""
    import numpy as np
    K, N = args.quant_shape
    rng = np.random.default_rng(args.seed + 1)
    W, _ = _weights(rng, K, N)
    fns: Dict[str, Callable[[Any], Any]] = {}
    status: Dict[str, str] = {}

    def numpy_ref(w):
        amax = np.max(np.abs(w), axis=1)
        scale = (amax / np.float32(127)).astype(np.float32)
        scale[scale == 0] = np.float32(1.0)
        return np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8), scale
    fns["numpy"] = numpy_ref
    try:
        _, ops = _import_cquant_ops()
        fns["cquant"] = lambda w: ops.quantize_weight(w, granularity="per_channel")
    except Unavailable as exc:
        status["cquant"] = str(exc)
    try:
        torch = _torch()
        Wt = torch.from_numpy(W)

        def torch_q(w):
            # the per-channel quantization torch's dynamic Linear does: scales from min/max, then quantize
            amax = Wt.abs().amax(dim=1)
            scale = (amax / 127).clamp_min(1e-12).double()
            zp = torch.zeros(N, dtype=torch.long)
            return torch.quantize_per_channel(Wt, scale, zp, 0, torch.qint8)
        fns["torch"] = torch_q
    except Unavailable as exc:
        status["torch"] = str(exc)
    out: Dict[str, Any] = {"K": K, "N": N, "threads": threads, "target_s": QUANT_TARGET_S, "contenders": {}}
    try:
        times, _ = measure_interleaved(fns, W, target_s=min(args.target_time, 0.3), min_reps=args.min_reps)
        for name, ts in times.items():
            out["contenders"][name] = {"status": "ok", "median_ms": statistics.median(ts) * 1e3,
                                       "min_ms": min(ts) * 1e3, "reps": len(ts)}
    except Exception as exc:
        for name in fns:
            out["contenders"][name] = {"status": "error: " + _short_error(exc)}
    for name, st in status.items():
        out["contenders"][name] = {"status": st}
    return out


def _filter_torch_warnings() -> None:
    """Ignore, in the child, torch's deprecation warnings about its quantization APIs, nothing else.

    Installed once, before torch is imported, so the timed calls carry no ``catch_warnings`` overhead.
    torch warns with stacklevel=2, so its DeprecationWarning about ``quantize_dynamic`` is attributed to
    the caller (this module, ``__main__`` in the child) and its C++ warnings ("Triggered internally")
    to the Python line that called into torch: the module pattern takes torch.* and this module only.
    """
    modules = r"(torch(\..*)?|%s|cquant\.bench)\Z" % re.escape(__name__)
    for cat in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", message=r"(?s).*(quantiz|deprecat)", category=cat, module=modules)


def _cquant_feature(obj: Any, name: str) -> Optional[Callable[..., Any]]:
    """obj.name if this cquant has it (and CQUANT_BENCH_HIDE does not name it), else None."""
    if name in _hidden():
        return None
    return getattr(obj, name, None)


def _measure_peaks() -> Dict[str, Any]:
    """One-core int8 and f32 peak GMAC/s from cquant.ops.peak_gmacs; None where unavailable."""
    out: Dict[str, Any] = {"int8": None, "f32": None}
    try:
        _, ops = _import_cquant_ops()
    except Unavailable as exc:
        out["status"] = str(exc)
        return out
    fn = _cquant_feature(ops, "peak_gmacs")
    if fn is None:
        out["status"] = "cquant.ops.peak_gmacs not available"
        return out
    def measure(kind: str, key: str) -> None:
        try:
            val = float(fn(kind))
            out[key] = val if math.isfinite(val) and val > 0 else None
        except Exception as exc:
            out["status"] = f"peak_gmacs({kind!r}): " + _short_error(exc)

    isa = ops.isa()
    if isa == "amx":
        # AMX cells are rated against tdpbssd, the VNNI cells of the same run (M < 16, M = 1,
        # per-group) against vpdpbusd: measure both (the vector one with the path capped below AMX)
        measure("int8", "amx")
        try:
            ops.set_isa("avx512vnni")
            measure("int8", "int8")
        finally:
            ops.set_isa(isa)
    else:
        measure("int8", "int8")
    measure("f32", "f32")
    return out


def _hide_modules_for_tests() -> None:
    """In the child only: make the imports named by CQUANT_BENCH_HIDE fail, as if not installed."""
    for name in _hidden():
        sys.modules[name] = None  # type: ignore[assignment]  # "import name" now raises ImportError


def run_child(args: argparse.Namespace) -> Dict[str, Any]:
    threads = args.child_threads
    _hide_modules_for_tests()
    _filter_torch_warnings()
    import numpy as np
    logging.getLogger().setLevel(logging.ERROR)
    meta: Dict[str, Any] = {"threads": threads,
                            "env": {v: os.environ.get(v) for v in THREAD_ENV_VARS + SPIN_ENV_VARS}}
    seen: Dict[str, Any] = {"openblas": _openblas_threads()}
    try:
        cquant, _ = _import_cquant_ops()
        if hasattr(cquant, "set_num_threads"):
            cquant.set_num_threads(threads)
        seen["cquant"] = cquant.get_num_threads() if hasattr(cquant, "get_num_threads") else None
    except Unavailable:
        seen["cquant"] = None
    except Exception as exc:
        seen["cquant"] = "error: " + _short_error(exc)
    try:
        torch = _torch()
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
            torch.set_num_interop_threads(1)
        seen["torch"] = torch.get_num_threads()
        meta["torch_qengine"] = torch.backends.quantized.engine
    except Unavailable:
        seen["torch"] = None
    meta["threads_seen"] = seen
    last_kernel: Optional[Callable[[], str]] = None
    with contextlib.suppress(Unavailable):
        cq, _ = _import_cquant_ops()
        last_kernel = _cquant_feature(cq, "last_kernel")
        with contextlib.suppress(Exception):
            meta["cquant_isa"] = cq.isa()
    # measured before any contender is set up, on a quiet process
    peaks = (_measure_peaks() if not args.child_no_linear and any(k in CQUANT_PEAK_KIND for k in args.contenders)
             else {})
    meta["peak_gmacs"] = peaks

    results: List[Dict[str, Any]] = []
    tmpdir = tempfile.mkdtemp(prefix="cquant-bench-")
    try:
        for si, (K, N) in enumerate([] if args.child_no_linear else args.shapes):
            rng = np.random.default_rng(args.seed * 1000 + si)
            W, b = _weights(rng, K, N)
            W64, b64 = W.astype(np.float64), b.astype(np.float64)
            fns: Dict[str, Callable[[Any], Any]] = {}
            status: Dict[str, str] = {}
            extra: Dict[str, Any] = {}
            t_setup: Dict[str, float] = {}
            for key in args.contenders:
                t0 = time.perf_counter()
                try:
                    if key == "numpy":
                        fns[key] = _make_numpy(W, b)
                    elif key == "cquant_wo":
                        fns[key] = _make_cquant(W, b, "weight_only")
                    elif key == "cquant_dyn":
                        fns[key] = _make_cquant(W, b, "dynamic")
                    elif key == "cquant_wo4":
                        fns[key] = _make_cquant(W, b, "weight_only", 4)
                    elif key == "cquant_dyn4":
                        fns[key] = _make_cquant(W, b, "dynamic", 4)
                    elif key == "torch_f32":
                        fns[key] = _make_torch(W, b, "f32", threads)
                    elif key == "torch_pt":
                        fns[key] = _make_torch(W, b, "pt", threads)
                    elif key == "torch_pc":
                        fns[key] = _make_torch(W, b, "pc", threads)
                    elif key == "ort_pc":
                        ortm = _OrtModel(W, b, tmpdir)
                        extra["ort_ops"] = ortm.op_types
                        fns[key] = ortm.session(threads, args.allow_spin)
                except Unavailable as exc:
                    status[key] = str(exc)
                except Exception as exc:
                    status[key] = "error: " + _short_error(exc)
                    _log(traceback.format_exc())
                t_setup[key] = time.perf_counter() - t0
            for M in args.M:
                x = rng.standard_normal((M, K), dtype=np.float32)
                _log(f"[threads={threads}] K={K} N={N} M={M} ...")
                # one contender failing at run time must not sink the others: probe each first
                live: Dict[str, Callable[[Any], Any]] = {}
                row_status = dict(status)
                for key, fn in fns.items():
                    try:
                        y = fn(x)
                        if tuple(np.shape(y)) != (M, N):
                            raise ValueError(f"output shape {np.shape(y)} != {(M, N)}")
                        live[key] = fn
                    except Exception as exc:
                        row_status[key] = "error: " + _short_error(exc)
                times, outs = measure_interleaved(live, x, args.target_time, args.min_reps)
                # the micro-kernel each cquant contender ran: call it once more, then ask this thread
                kernels: Dict[str, Any] = {}
                for key in CQUANT_PEAK_KIND:
                    if key not in times:
                        continue
                    if last_kernel is None:
                        kernels[key] = None
                        continue
                    try:
                        live[key](x)
                        kernels[key] = str(last_kernel())
                    except Exception as exc:
                        kernels[key] = "error: " + _short_error(exc)
                ref = None if args.no_accuracy else x.astype(np.float64) @ W64.T + b64
                row: Dict[str, Any] = {"K": K, "N": N, "M": M, "threads": threads, "contenders": {}}
                for key in args.contenders:
                    if key in times:
                        ts = times[key]
                        c: Dict[str, Any] = {"status": "ok", "median_ms": statistics.median(ts) * 1e3,
                                             "min_ms": min(ts) * 1e3, "reps": len(ts),
                                             "setup_s": t_setup.get(key)}
                        if ref is not None:
                            c.update(accuracy(outs[key], ref))
                        if key in CQUANT_PEAK_KIND:
                            c["kernel"] = kernels.get(key)
                            t_med = statistics.median(ts)
                            c["gmacs"] = K * N * M / t_med / 1e9 if t_med > 0 else None
                            kind = CQUANT_PEAK_KIND[key]
                            if kind == "int8" and "_amx" in str(c["kernel"] or "") and peaks.get("amx"):
                                kind = "amx"  # a tdpbssd kernel: rated against the AMX peak
                            peak = peaks.get(kind)
                            c["pct_of_peak"] = (100.0 * c["gmacs"] / (peak * threads)
                                                if peak and c["gmacs"] else None)
                        row["contenders"][key] = c
                    else:
                        row["contenders"][key] = {"status": row_status.get(key, "not run")}
                base = row["contenders"].get("numpy", {}).get("median_ms")
                for c in row["contenders"].values():
                    if base and c.get("median_ms"):
                        c["ratio"] = base / c["median_ms"]
                if extra:
                    row["extra"] = extra
                results.append(row)
                del outs, ref
            del fns, W, b, W64, b64
            gc.collect()
            for f in os.listdir(tmpdir):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(tmpdir, f))
        quant = None
        if args.child_quant_time:
            _log(f"[threads={threads}] quantize_weight {args.quant_shape[0]}x{args.quant_shape[1]} ...")
            quant = _quant_time(args, threads)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {"meta": meta, "results": results, "quant_time": quant}


# ----------------------------------------------------------------------------------------------------
# parent: spawn children, compose tables
# ----------------------------------------------------------------------------------------------------

def _child_env(threads: int, allow_spin: bool = False) -> Dict[str, str]:
    env = dict(os.environ)
    for var in THREAD_ENV_VARS:
        env[var] = str(threads)
    if not allow_spin:  # a value the user set explicitly wins
        for var, val in SPIN_ENV_DEFAULTS.items():
            env.setdefault(var, val)
    # make sure the child imports this same cquant package
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + old if old else "")
    return env


def _child_argv(args: argparse.Namespace, threads: int, quant_time: bool, linear: bool = True) -> List[str]:
    argv = [sys.executable, "-m", "cquant.bench", "--child", "--child-threads", str(threads),
            "--shapes", ",".join(f"{k}x{n}" for k, n in args.shapes),
            "--M", ",".join(str(m) for m in args.M),
            "--contenders", ",".join(args.contenders),
            "--quant-shape", f"{args.quant_shape[0]}x{args.quant_shape[1]}",
            "--target-time", repr(args.target_time), "--min-reps", str(args.min_reps),
            "--seed", str(args.seed)]
    if args.no_accuracy:
        argv.append("--no-accuracy")
    if args.allow_spin:
        argv.append("--allow-spin")
    if quant_time:
        argv.append("--child-quant-time")
    if not linear:
        argv.append("--child-no-linear")
    return argv


def _busy_cpu_seconds() -> Optional[float]:
    """Machine-wide busy CPU time so far (all processes), from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
        if fields[0] != "cpu":
            return None
        vals = [int(v) for v in fields[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + (vals[7] if len(vals) > 7 else 0)
        return busy / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _children_cpu_seconds() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


_JSON_BEGIN = "@@CQUANT-BENCH-JSON-BEGIN@@"
_JSON_END = "@@CQUANT-BENCH-JSON-END@@"


def _run_child_process(args: argparse.Namespace, threads: int, quant_time: bool,
                       linear: bool = True) -> Dict[str, Any]:
    busy0, own0, wall0 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(_child_argv(args, threads, quant_time, linear),
                          env=_child_env(threads, args.allow_spin),
                          stdout=subprocess.PIPE, stderr=None, text=True)
    busy1, own1, wall1 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    out = proc.stdout
    if proc.returncode != 0 or _JSON_BEGIN not in out:
        raise RuntimeError(f"benchmark child for threads={threads} failed (exit {proc.returncode}); "
                           f"stdout tail: {out[-2000:]!r}")
    payload = out.split(_JSON_BEGIN, 1)[1].split(_JSON_END, 1)[0]
    data = json.loads(payload)
    # How busy the machine was with *other* processes while this child measured: a noisy-neighbour gauge.
    wall = wall1 - wall0
    ncpu = os.cpu_count() or 1
    foreign = None
    if busy0 is not None and busy1 is not None and wall > 0:
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * ncpu)
    data["meta"]["load"] = {"wall_s": round(wall, 1), "own_cpu_s": round(own1 - own0, 1),
                            "foreign_cpu_fraction": None if foreign is None else round(foreign, 3)}
    return data


def collect_meta() -> Dict[str, Any]:
    meta: Dict[str, Any] = {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("numpy", "torch", "onnxruntime", "onnx")},
        "openblas_env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }
    try:
        import cquant
        meta["versions"]["cquant"] = getattr(cquant, "__version__", "unknown")
        meta["cquant_isa"] = cquant.isa()
    except Exception as exc:
        meta["cquant_isa"] = "unavailable (" + _short_error(exc) + ")"
    return meta


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


class _Notes:
    """Footnotes for cells whose status is too long for a table."""

    def __init__(self) -> None:
        self.texts: List[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def lines(self) -> List[str]:
        return [f"[{i + 1}] {t}" for i, t in enumerate(self.texts)]


def _status_cell(st: str, notes: _Notes) -> str:
    if st.startswith("not installed") or len(st) <= 16:
        return st.split(" (")[0]
    kind = "error" if st.startswith("error") else "n/a"
    return f"{kind} {notes.ref(st)}"


def _cell(c: Dict[str, Any], notes: _Notes) -> str:
    if c.get("status") != "ok":
        return _status_cell(c.get("status", "-"), notes)
    return f"{_fmt_ms(c['median_ms'])} ({c.get('ratio', float('nan')):.2f}x)"


def _kernel_name(c: Dict[str, Any]) -> str:
    if c.get("status") != "ok":
        return "-"
    name = c.get("kernel")
    if name is None:
        return "?"  # this cquant has no last_kernel()
    return name or "(none)"


def _kernel_table(report: Dict[str, Any]) -> List[str]:
    """Rows K x N, M; columns the cquant contenders. A thread count that ran another kernel than the
    lowest one is named in the cell."""
    keys = [k for k in report["contenders"] if k in CQUANT_PEAK_KIND]
    if not keys or not report["results"]:
        return []
    cells: Dict[Tuple[int, int, int], Dict[int, Dict[str, Any]]] = {}
    for r in report["results"]:
        cells.setdefault((r["K"], r["N"], r["M"]), {})[r["threads"]] = r["contenders"]
    lines = ["", "Micro-kernels that ran (cquant.last_kernel() after the timed calls; ? = not available)", ""]
    lines.append("| " + " | ".join(["K x N", "M"] + [LABELS[k] for k in keys]) + " |")
    lines.append("|" + "|".join(["---"] * (2 + len(keys))) + "|")
    for (K, N, M), by_thr in cells.items():
        row = [f"{K}x{N}", str(M)]
        thr = sorted(by_thr)
        for k in keys:
            first = _kernel_name(by_thr[thr[0]].get(k, {}))
            others = [f"thr {t}: {_kernel_name(by_thr[t].get(k, {}))}" for t in thr[1:]
                      if _kernel_name(by_thr[t].get(k, {})) != first]
            row.append(first + (f" ({'; '.join(others)})" if others else ""))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _fmt_gmacs(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _peak_table(report: Dict[str, Any]) -> List[str]:
    keys = [k for k in report["contenders"] if k in CQUANT_PEAK_KIND]
    if not keys or not report["results"]:
        return []
    meta = report["meta"]
    peaks: Dict[str, Dict[str, Any]] = meta.get("peak_gmacs", {})
    thr_keys = sorted(peaks, key=int)
    first = peaks[thr_keys[0]] if thr_keys else {}
    insn = INT8_PEAK_INSN.get(str(meta.get("cquant_isa")), "int8 dot")
    amx = (f", AMX tdpbssd peak {_fmt_gmacs(first.get('amx'))} GMAC/s/core for the *_amx kernels"
           if first.get("amx") else "")
    lines = ["", f"% of measured peak (int8 {insn} peak {_fmt_gmacs(first.get('int8'))} GMAC/s/core{amx}, "
                 f"f32 FMA peak {_fmt_gmacs(first.get('f32'))} GMAC/s/core)", "",
             "achieved GMAC/s = K*N*M / median time; % = achieved / (peak * threads); dynamic against "
             "the int8 peak, weight_only against the f32 peak"]
    for t in thr_keys[1:]:
        if peaks[t].get("int8") is None and peaks[t].get("f32") is None:
            continue
        lines.append(f"peak measured by the threads={t} child: int8 {_fmt_gmacs(peaks[t].get('int8'))}, "
                     f"f32 {_fmt_gmacs(peaks[t].get('f32'))} GMAC/s/core")
    if first.get("status"):
        lines.append(f"peak: {first['status']}")
    lines.append("")
    lines.append("| " + " | ".join(["K x N", "M", "thr"] + [LABELS[k] + " % (GMAC/s)" for k in keys]) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * len(keys)) + "|")
    for r in report["results"]:
        row = [f"{r['K']}x{r['N']}", str(r["M"]), str(r["threads"])]
        for k in keys:
            c = r["contenders"].get(k, {})
            if c.get("status") != "ok" or c.get("gmacs") is None:
                row.append("-")
                continue
            pct = c.get("pct_of_peak")
            row.append(("n/a" if pct is None else f"{pct:.1f}%") + f" ({c['gmacs']:.1f})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def format_tables(report: Dict[str, Any]) -> str:
    meta = report["meta"]
    keys: List[str] = report["contenders"]
    lines: List[str] = []
    notes = _Notes()
    lines.append(f"CPU: {meta['cpu']} ({meta['nproc']} logical CPUs)")
    lines.append(f"cquant ISA: {meta.get('cquant_isa')}")
    vers = ", ".join(f"{k} {v if v else 'not installed'}" for k, v in meta["versions"].items())
    lines.append(f"versions: python {meta['python']}, {vers}")
    if meta.get("torch_qengine"):
        lines.append(f"torch quantized engine: {meta['torch_qengine']}")
    if any(meta["openblas_env"].values()):
        lines.append(f"note: {meta['openblas_env']} is set (OpenBLAS may use a slower kernel)")
    for t, seen in sorted(meta.get("threads_seen", {}).items()):
        lines.append(f"threads={t}: reported by libraries: {seen}")
    for t, load in sorted(meta.get("load", {}).items()):
        frac = load.get("foreign_cpu_fraction")
        if frac is None:
            continue
        warn = ("  WARNING: the machine was busy with other work; multi-thread figures are unreliable"
                if frac > 0.10 else "")
        lines.append(f"threads={t}: other processes used {frac:.0%} of the CPUs during the "
                     f"{load['wall_s']} s run{warn}")
    lines.append("")
    lines.append("Median ms per call (ratio = numpy f32 time / contender time, higher is better)")
    lines.append("")
    header = ["K x N", "M", "thr"] + [LABELS[k] for k in keys]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * len(keys)) + "|")
    for row in report["results"]:
        cells = [f"{row['K']}x{row['N']}", str(row["M"]), str(row["threads"])]
        cells += [_cell(row["contenders"].get(k, {"status": "-"}), notes) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    thread_counts = sorted({r["threads"] for r in report["results"]})
    if thread_counts:
        lines.append("")
        lines.append("Geometric mean of the ratios over all shapes (higher is better)")
        lines.append("")
        lines.append("| thr | " + " | ".join(LABELS[k] for k in keys) + " |")
        lines.append("|---|" + "|".join(["---:"] * len(keys)) + "|")
        for t in thread_counts:
            cells = [str(t)]
            for k in keys:
                rs = [r["contenders"].get(k, {}).get("ratio") for r in report["results"] if r["threads"] == t]
                rs = [x for x in rs if x]
                cells.append(f"{math.exp(sum(math.log(x) for x in rs) / len(rs)):.2f}x" if rs else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines.extend(_kernel_table(report))
    lines.extend(_peak_table(report))
    acc_rows = [r for r in report["results"] if r["threads"] == min(rr["threads"] for rr in report["results"])]
    if acc_rows and any("rel_err" in c for r in acc_rows for c in r["contenders"].values()):
        lines.append("")
        lines.append(f"Accuracy vs float64 reference (Gaussian x, threads={acc_rows[0]['threads']}): "
                     "relative error / cosine")
        lines.append("")
        lines.append("| " + " | ".join(["K x N", "M"] + [LABELS[k] for k in keys]) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * len(keys)) + "|")
        for row in acc_rows:
            cells = [f"{row['K']}x{row['N']}", str(row["M"])]
            for k in keys:
                c = row["contenders"].get(k, {})
                if "rel_err" in c:
                    cells.append(f"{c['rel_err']:.2e} / {c['cos']:.6f}")
                else:
                    cells.append("-")
            lines.append("| " + " | ".join(cells) + " |")
    ort_ops = next((r["extra"]["ort_ops"] for r in report["results"] if "ort_ops" in r.get("extra", {})), None)
    if ort_ops:
        lines.append("")
        lines.append(f"onnxruntime quantized graph: {' -> '.join(ort_ops)}")
    q = report.get("quant_time")
    if q:
        lines.append("")
        lines.append(f"Quantize time, per_channel weight {q['N']}x{q['K']} (N x K), threads={q['threads']} "
                     f"(target for cquant < {q['target_s']} s)")
        lines.append("")
        lines.append("| contender | median ms | ratio vs numpy |")
        lines.append("|---|---:|---:|")
        base = q["contenders"].get("numpy", {}).get("median_ms")
        for name in ("cquant", "numpy", "torch"):
            c = q["contenders"].get(name)
            if c is None:
                continue
            if c.get("status") != "ok":
                lines.append(f"| {name} | {_status_cell(c.get('status', '-'), notes)} | - |")
                continue
            ratio = f"{base / c['median_ms']:.2f}x" if base else "-"
            mark = ""
            if name == "cquant":
                mark = " (ok)" if c["median_ms"] < q["target_s"] * 1e3 else " (OVER TARGET)"
            lines.append(f"| {name}{mark} | {_fmt_ms(c['median_ms'])} | {ratio} |")
        lines.append("")
        lines.append("numpy = np.round/np.clip reference of the same rule; torch = abs-max scales + "
                     "torch.quantize_per_channel")
    if notes.texts:
        lines.append("")
        lines.extend(notes.lines())
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _resolve(build_parser().parse_args(list(argv) if argv is not None else None))
    if args.child:
        data = run_child(args)
        sys.stdout.write(_JSON_BEGIN + json.dumps(data) + _JSON_END + "\n")
        sys.stdout.flush()
        return 0

    t_start = time.perf_counter()
    meta = collect_meta()
    meta["threads_seen"] = {}
    results: List[Dict[str, Any]] = []
    quant = None
    want_qt = not args.no_quant_time
    for i, threads in enumerate(args.threads):
        qt_here = want_qt and quant is None and threads == 1
        data = _run_child_process(args, threads, qt_here)
        meta["threads_seen"][str(threads)] = data["meta"]["threads_seen"]
        meta.setdefault("load", {})[str(threads)] = data["meta"]["load"]
        meta.setdefault("peak_gmacs", {})[str(threads)] = data["meta"].get("peak_gmacs", {})
        if data["meta"].get("torch_qengine"):
            meta["torch_qengine"] = data["meta"]["torch_qengine"]
        results.extend(data["results"])
        if data.get("quant_time"):
            quant = data["quant_time"]
    if want_qt and quant is None:  # no threads=1 child ran: a dedicated one for the quantize-time row
        quant = _run_child_process(args, 1, True, linear=False)["quant_time"]
    results.sort(key=lambda r: (args.shapes.index((r["K"], r["N"])), r["M"], r["threads"]))
    report = {
        "meta": meta,
        "config": {"threads": args.threads, "shapes": [list(s) for s in args.shapes], "M": args.M,
                   "quick": args.quick, "allow_spin": args.allow_spin, "target_time_s": args.target_time, "min_reps": args.min_reps,
                   "seed": args.seed},
        "contenders": args.contenders,
        "labels": {k: LABELS[k] for k in args.contenders},
        "results": results,
        "quant_time": quant,
        "wall_s": None,
    }
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(format_tables(report))
    print(f"\n(total {report['wall_s']} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, allow_nan=True)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
