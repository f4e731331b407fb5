"""``python -m cquant.demo`` (``make demo``): quantize the bundled model and compare it with float32.

Builds :func:`cquant.models.build_default_model` (~13M parameters), quantizes copies of it in both modes
(``weight_only`` and ``dynamic``; per-channel unless told otherwise) and prints one table:

- parameters, and bytes held by the model (measured by walking its arrays, not computed from shapes);
- output error against float32 over all tokens: relative error of each token's logit vector
  ``||y - y_ref|| / ||y_ref||`` (max and mean) and cosine similarity (min and mean);
- latency of a forward pass, median of ``--repeats`` timed runs after one warm-up, with the number of
  threads cquant's kernels use (``cquant.get_num_threads()``; numpy's BLAS threads the float32 path).
  Each model is timed in its own block (see :func:`time_blocks` for why not round-robin).

Options: ``--batch``, ``--seq``, ``--repeats``, ``--seed``, ``--granularity``, ``--group-size``,
``--small`` (a tiny model, for tests).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import cquant

from . import models, nn
from .quantization import GRANULARITIES, Quantizer, model_nbytes, report

__all__ = ["main", "run", "compare_outputs", "time_forward", "time_blocks"]


def _progress_bar(total: int) -> Any:
    """A tqdm bar on stderr, or None when tqdm is not installed."""
    try:
        from tqdm import tqdm  # optional dependency: tqdm (imported on use, not with cquant.demo)
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return tqdm(total=total, desc="cquant demo", file=sys.stderr, leave=False)


def compare_outputs(y: np.ndarray, y_ref: np.ndarray) -> Dict[str, float]:
    """Per-row (token) relative L2 error and cosine similarity of ``y`` against ``y_ref``.

    Rows are the last axis; returns ``max_rel``, ``mean_rel``, ``min_cos``, ``mean_cos``. Computed in
    float64 so the metric adds no error of its own.
    """
    a = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
    b = np.asarray(y_ref, np.float64).reshape(-1, y_ref.shape[-1])
    nb = np.linalg.norm(b, axis=1)
    na = np.linalg.norm(a, axis=1)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(nb, np.finfo(np.float64).tiny)
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, np.finfo(np.float64).tiny)
    return {"max_rel": float(rel.max()), "mean_rel": float(rel.mean()),
            "min_cos": float(cos.min()), "mean_cos": float(cos.mean())}


def time_forward(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    return time_blocks([fn], repeats, pause=0.0)[0]


def time_blocks(fns: Sequence[Callable[[], Any]], repeats: int, pause: float = 0.1) -> List[float]:
    """Median wall time of each of ``fns``: one warm-up call, then ``repeats`` timed calls in a row,
    with a short pause between functions.

    Timed in blocks, not round-robin, on purpose: idle worker threads of one thread pool (OpenBLAS for
    float32, cquant's for int8) may still be spinning when the other pool starts. On a loaded 2-core
    machine, float32 calls made right after int8 ones ran many times slower than in a block (and
    not with ``OPENBLAS_THREAD_TIMEOUT=4``). Each block's warm-up call and the pause absorb the
    hand-over, so every variant is measured in its own steady state.
    """
    out = []
    for fn in fns:
        time.sleep(pause)
        fn()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(batch: int = 4, seq: int = 64, repeats: int = 5, seed: int = 0, granularity: str = "per_channel",
        group_size: Optional[int] = None, small: bool = False, progress: bool = True,
        out: Any = None) -> Dict[str, Dict[str, float]]:
    """Run the demo, print the table to ``out`` (default stdout) and return the numbers by variant."""
    out = out or sys.stdout
    config = models.ModelConfig.small() if small else models.ModelConfig()
    seq = min(seq, config.max_seq)
    steps = ["build float32 model", "quantize weight_only", "quantize dynamic",
             "compare float32", "compare int8 weight_only", "compare int8 dynamic, then time all three"]
    bar = _progress_bar(len(steps)) if progress else None

    def step(i: int) -> None:
        if bar is not None:
            bar.set_postfix_str(steps[i])
            if i:
                bar.update(1)
        elif progress:
            print(f"[{i + 1}/{len(steps)}] {steps[i]} ...", file=sys.stderr, flush=True)

    step(0)
    model = models.build_default_model(seed, config)
    tokens = models.sample_inputs(batch, seq, seed + 1, config=config)
    variants: List[Tuple[str, Any]] = [("float32", model)]
    for i, mode in enumerate(("weight_only", "dynamic")):
        step(1 + i)
        q = Quantizer(mode=mode, granularity=granularity, group_size=group_size)
        variants.append((f"int8 {mode}", q.quantize(model, inplace=False)))

    results: Dict[str, Dict[str, float]] = {}
    y_ref = None
    for i, (name, m) in enumerate(variants):
        step(3 + i)
        y = m(tokens)
        if y_ref is None:
            y_ref = y
        r: Dict[str, float] = dict(compare_outputs(y, y_ref))
        r["bytes"] = model_nbytes(m)
        r["linear_bytes"] = _linear_bytes(m)
        results[name] = r
    latencies = time_blocks([lambda m=m: m(tokens) for _, m in variants], repeats)
    for (name, _), lat in zip(variants, latencies):
        results[name]["latency_s"] = lat
    if bar is not None:
        bar.update(1)
        bar.close()

    # the schemes the layers got (a layer whose K the group size does not divide falls back to
    # per_channel: the header says what ran, not what was asked)
    got: Dict[str, int] = {}
    for row in report(variants[-1][1]):
        g = row.scheme.split(" ")[-1]
        got[g] = got.get(g, 0) + 1
    asked = granularity + (f"({group_size})" if group_size else "")
    scheme = ", ".join(f"{g}" if len(got) == 1 else f"{n} {g}" for g, n in got.items()) or "none"
    if set(got) != {asked}:
        scheme += f"; asked {asked}"
    rows = []
    base = results["float32"]
    for name, r in results.items():
        rows.append([name, _fmt_bytes(int(r["bytes"])), f"{r['bytes'] / base['bytes']:.3f}",
                     _fmt_bytes(int(r["linear_bytes"])), f"{r['linear_bytes'] / base['linear_bytes']:.3f}",
                     f"{r['max_rel']:.2e}", f"{r['mean_rel']:.2e}", f"{r['min_cos']:.6f}",
                     f"{r['mean_cos']:.6f}", f"{r['latency_s'] * 1e3:.1f}",
                     f"{base['latency_s'] / r['latency_s']:.2f}x"])
    header = ["model", "model bytes", "vs fp32", "Linear bytes", "vs fp32", "max rel err", "mean rel err", "min cos", "mean cos",
              "latency ms", "speedup"]
    print(f"cquant demo: {model.num_parameters():,} parameters "
          f"({sum(got.values())} of {sum(1 for _ in _linear_layers(model))} Linear layers quantized, {scheme}); "
          f"input {batch} x {seq} tokens; ISA {cquant.isa()}, {cquant.get_num_threads()} thread(s); "
          f"latency = median of {repeats} runs", file=out)
    print(_table(header, rows), file=out)
    print("model bytes: every array the model holds (embeddings and LayerNorms stay float32); Linear bytes:\n"
          "weights + scales + biases of the Linear layers; rel err / cos: per token logit vector vs float32",
          file=out)
    return results


def _linear_bytes(model: Any) -> int:
    """Bytes held by the Linear layers: measured arrays (float weights+biases, or report() rows)."""
    rows = report(model)
    if rows:
        return sum(r.bytes_after for r in rows)
    seen: Dict[int, int] = {}
    for m in _linear_layers(model):
        for a in (m.weight, m.bias):
            if a is not None:
                seen[id(a)] = a.nbytes
    return sum(seen.values())


def _linear_layers(model: Any) -> Iterable[Any]:
    return (m for _, m in model.named_modules() if isinstance(m, nn.Linear))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cquant.demo", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--granularity", choices=GRANULARITIES, default="per_channel")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--small", action="store_true", help="tiny model (for tests)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("batch", "seq", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.group_size is not None and a.granularity != "per_group":
        p.error("--group-size is only used with --granularity per_group")
    if a.group_size is not None and (a.group_size <= 0 or a.group_size % 4):
        p.error(f"--group-size must be a positive multiple of 4, got {a.group_size}")
    if a.granularity == "per_group" and a.group_size is None:
        a.group_size = 64
    run(a.batch, a.seq, a.repeats, a.seed, a.granularity, a.group_size, a.small, not a.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
