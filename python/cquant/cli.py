"""The ``cquant`` command (also ``python -m cquant``).

    cquant quantize IN.safetensors -o OUT.safetensors [--mode dynamic|weight_only]
                    [--granularity per_tensor|per_channel|per_group] [--group-size G]
                    [--include PAT ...] [--exclude PAT ...] [--transposed PAT ...]
    cquant report   CHECKPOINT [--reference FLOAT.safetensors] [scheme options] [--top N]
    cquant bench    [bench options]          (the kernel benchmark, ``python -m cquant.bench``)
    cquant info                              (version, ISA in use, threads, optional packages)

``quantize`` streams: the input is memory-mapped and read one tensor at a time as a zero-copy view,
each output tensor is written as soon as it is computed (the output header is computed up front),
and the input pages of a finished tensor are released, so peak memory is a small multiple of the
largest tensor, not of the checkpoint. The output goes to a temporary file renamed over ``-o`` at the
end: an error never leaves a partial file. Which tensors are quantized: 2-D float tensors whose name
ends in ``weight`` and does not look like an embedding or a norm (``DEFAULT_EXCLUDE``); ``--include``
replaces that rule by patterns, ``--exclude`` adds to the exclusions. Everything else is copied
through unchanged. Patterns are :func:`fnmatch.fnmatchcase` globs on the tensor name or the layer
name (the tensor name without ``.weight``). ``--transposed`` names weights stored ``(in, out)``
(GPT-2 ``Conv1D``): they are transposed to the canonical ``(out, in)`` before quantization.

Errors (missing file, not a safetensors file, truncated file, a header that lies about shapes or
offsets, a FIFO or other non-regular file, a cquant checkpoint whose metadata does not match its
tensors, a non-float tensor selected, NaN/Inf weights, an output that is a directory or the input
itself through a link, bad options) print one line ``cquant: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import errors, ops
from .quantization import format_bytes
from .io import (FORMAT_VERSION, KEY_CQ_VERSION, KEY_LAYERS, KEY_VERSION, CheckpointError,
                 SafetensorsReader, StreamWriter, TensorInfo, atomic_path, check_format_version,
                 check_layer_tensors, check_layer_values, parse_layers)

__all__ = ["main", "build_parser", "select_tensor", "DEFAULT_EXCLUDE"]

#: Weights never quantized by default: embeddings, norms (names as in HF BERT/GPT-2/LLaMA checkpoints).
DEFAULT_EXCLUDE = ("*embed*", "*Embed*", "*emb.weight", "*_emb*", "*norm*", "*Norm*", "*ln_*", "ln_*", "*wte*", "*wpe*")


class CliError(Exception):
    """An error reported as one line with exit status 2."""


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    allrows = [list(header)] + [list(r) for r in rows]
    w = [max(len(r[i]) for r in allrows) for i in range(len(header))]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(r)).rstrip()

    rule = "  ".join("-" * x for x in w)
    return "\n".join([fmt(header), rule] + [fmt(r) for r in rows])


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _progress(total: int, desc: str, enabled: Optional[bool]) -> Any:
    """A tqdm bar if tqdm is installed (shown on a terminal, or always with --progress)."""
    if enabled is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if enabled is None else False, file=sys.stderr, leave=False)


def _layer_name(tensor: str) -> str:
    return tensor[:-len(".weight")] if tensor.endswith(".weight") else ("" if tensor == "weight" else tensor)


def _match(name: str, pats: Sequence[str]) -> Optional[str]:
    layer = _layer_name(name)
    for p in pats:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(layer, p):
            return p
    return None


def select_tensor(t: TensorInfo, include: Sequence[str], exclude: Sequence[str], granularity: str,
                  group_size: Optional[int], transposed: Sequence[str] = ()) -> Tuple[bool, str]:
    """(quantize?, reason). Raises CliError for a non-float tensor named by ``include``."""
    inc = _match(t.name, include) if include else None
    if include and inc is None:
        return False, "not matched by --include"
    if not t.is_float:
        if inc is not None:
            raise CliError(f"tensor {t.name!r} ({t.dtype}) matched --include {inc!r} but is not a float "
                           "tensor: only float weights can be quantized")
        return False, f"not a float tensor ({t.dtype})"
    if len(t.shape) != 2:
        if inc is not None:
            raise CliError(f"tensor {t.name!r} matched --include {inc!r} but has shape {list(t.shape)}: "
                           "only 2-D weights can be quantized")
        return False, f"{len(t.shape)}-D"
    if not include and not (t.name == "weight" or t.name.endswith(".weight")):
        return False, "not named like a Linear weight"
    if not include:
        d = _match(t.name, DEFAULT_EXCLUDE)
        if d is not None:
            return False, f"embedding/norm (default exclude {d!r})"
    e = _match(t.name, exclude)
    if e is not None:
        return False, f"excluded by {e!r}"
    if 0 in t.shape:
        return False, "empty"
    k = t.shape[0] if _match(t.name, transposed) else t.shape[1]
    if granularity == "per_group" and group_size and k % group_size:
        return False, f"K={k} is not a multiple of group size {group_size}"
    return True, ""


def _scale_shape(granularity: str, n: int, k: int, g: Optional[int]) -> Tuple[int, ...]:
    return {"per_tensor": (1,), "per_channel": (n,)}.get(granularity) or (n, k // int(g or 1))


def _resolve_input(path: str) -> str:
    """A file, or a model folder holding model.safetensors."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "model.safetensors")):
        return os.path.join(path, "model.safetensors")
    return path


def _same_file(a: str, b: str) -> bool:
    """Whether writing ``b`` would replace the file ``a``: the same path once symbolic links are
    resolved (``b`` may not exist yet), or the same file through a hard link."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def _check_scheme(args: argparse.Namespace) -> None:
    if args.granularity == "per_group":
        if not args.group_size:
            raise CliError("--granularity per_group needs --group-size (e.g. 32, 64 or 128)")
        if args.group_size <= 0 or args.group_size % 4:
            raise CliError(f"--group-size must be a positive multiple of 4, got {args.group_size}")
    elif args.group_size is not None:
        raise CliError("--group-size is only used with --granularity per_group")


# --------------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    info: TensorInfo
    quantize: bool
    reason: str
    transposed: bool = False


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_scheme(args)
    src = _resolve_input(args.input)
    out = args.output
    if _same_file(src, out):
        raise CliError(f"the output {out} is the input {src} (the same file, through a link or another "
                       "path): choose another -o")
    t0 = time.perf_counter()
    with SafetensorsReader(src) as r:
        if KEY_VERSION in r.metadata:
            raise CliError(f"{src} is already a cquant checkpoint (format version {r.metadata[KEY_VERSION]})")
        if not any(t.is_float for t in r.infos.values()):
            raise CliError(f"{src} holds no float tensors: nothing to quantize")
        jobs: List[_Job] = []
        for t in r.infos.values():
            ok, why = select_tensor(t, args.include, args.exclude, args.granularity, args.group_size,
                                    args.transposed)
            jobs.append(_Job(t, ok, why, ok and _match(t.name, args.transposed) is not None))
        entries: List[Tuple[str, str, Tuple[int, ...]]] = []
        layers: Dict[str, Dict[str, Any]] = {}
        names = set(r.infos)
        for j in jobs:
            t = j.info
            if not j.quantize:
                entries.append((t.name, t.dtype, t.shape))
                continue
            layer = _layer_name(t.name)
            pre = f"{layer}." if layer else ""
            for extra in (pre + "weight_q", pre + "weight_scale"):
                if extra in names:
                    raise CliError(f"{src}: tensor {extra!r} already exists; cannot quantize {t.name!r}")
            n, k = (t.shape[1], t.shape[0]) if j.transposed else t.shape
            entries.append((pre + "weight_q", "I8", (n, k)))
            entries.append((pre + "weight_scale", "F32", _scale_shape(args.granularity, n, k, args.group_size)))
            layers[layer] = {"mode": args.mode, "granularity": args.granularity,
                             "group_size": args.group_size if args.granularity == "per_group" else None,
                             "shape": [n, k], "bias": (pre + "bias") in names,
                             "layout": "in_out" if j.transposed else "out_in"}
        if not layers:
            print(f"cquant: warning: no tensor of {src} was selected for quantization; copying it as is",
                  file=sys.stderr)
        from . import __version__
        meta = {k: v for k, v in r.metadata.items() if not k.startswith("cquant.")}
        meta.update({KEY_VERSION: FORMAT_VERSION, KEY_CQ_VERSION: __version__,
                     KEY_LAYERS: json.dumps(layers, separators=(",", ":"))})
        bar = _progress(sum(t.nbytes for t in r.infos.values()), "quantize", args.progress)
        stats = {"quantized": [0, 0, 0], "copied": [0, 0, 0]}
        skipped: Dict[str, int] = {}
        try:
            with atomic_path(out) as tmp:
                with open(tmp, "wb") as f:
                    w = StreamWriter(f, entries, meta)
                    for j in jobs:
                        t = j.info
                        if j.quantize:
                            layer = _layer_name(t.name)
                            pre = f"{layer}." if layer else ""
                            wf = r.float32(t.name)
                            if j.transposed:
                                wf = np.ascontiguousarray(wf.T)
                            try:
                                q, s = ops.quantize(wf, args.granularity, args.group_size, name=t.name)
                            except errors.QuantizationError as e:
                                raise CliError(str(e)) from None
                            del wf
                            r.release(t.name)
                            w.write(pre + "weight_q", q)
                            w.write(pre + "weight_scale", s)
                            st = stats["quantized"]
                            st[0] += 1
                            st[1] += t.nbytes
                            st[2] += q.nbytes + s.nbytes
                            del q, s
                        else:
                            w.write(t.name, r.raw(t.name))
                            st = stats["copied"]
                            st[0] += 1
                            st[1] += t.nbytes
                            st[2] += t.nbytes
                            skipped[j.reason] = skipped.get(j.reason, 0) + 1
                        if bar is not None:
                            bar.update(t.nbytes)
                    w.close()
        finally:
            if bar is not None:
                bar.close()
    dt = time.perf_counter() - t0
    if not args.quiet:
        size_in, size_out = os.path.getsize(src), os.path.getsize(out)
        rows = [["quantized (int8 codes + f32 scales)", str(stats["quantized"][0]), format_bytes(stats["quantized"][1]),
                 format_bytes(stats["quantized"][2])]]
        for why, cnt in sorted(skipped.items(), key=lambda kv: -kv[1]):
            rows.append([f"copied: {why}", str(cnt), "", ""])
        rows.append(["copied (total)", str(stats["copied"][0]), format_bytes(stats["copied"][1]),
                     format_bytes(stats["copied"][2])])
        rows.append(["file", str(len(jobs)), format_bytes(size_in), format_bytes(size_out)])
        scheme = f"int8 {args.mode} {args.granularity}" + (f"(g={args.group_size})" if args.granularity == "per_group" else "")
        print(f"{src} -> {out}  [{scheme}]")
        print(_table(("tensors", "count", "input", "output"), rows, right=(1, 2, 3)))
        print(f"output is {size_out / max(size_in, 1):.3f} of the input; {dt:.2f} s; "
              f"peak RSS {format_bytes(_peak_rss_bytes())}")
    return 0


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def _metrics(w: np.ndarray, wq: np.ndarray) -> Tuple[float, float, float]:
    """(SQNR dB, max |error|, cosine) of a dequantized weight against the float one."""
    w = w.astype(np.float64, copy=False).ravel()
    d = wq.astype(np.float64, copy=False).ravel() - w
    sig, noise = float(w @ w), float(d @ d)
    sqnr = math.inf if noise == 0 else (10 * math.log10(sig / noise) if sig > 0 else -math.inf)
    nw, nq = math.sqrt(sig), float(np.linalg.norm(wq))
    cos = float(w @ wq.astype(np.float64).ravel()) / (nw * nq) if nw > 0 and nq > 0 else (1.0 if nw == nq else 0.0)
    return sqnr, float(np.abs(d).max()) if d.size else 0.0, cos


def cmd_report(args: argparse.Namespace) -> int:
    _check_scheme(args)
    path = _resolve_input(args.checkpoint)
    rows: List[Tuple[float, List[str]]] = []
    with SafetensorsReader(path) as r:
        if KEY_VERSION in r.metadata:
            check_format_version(path, r.metadata)       # validated as cquant.load does
            specs = parse_layers(path, r.metadata)
            info = {name: (t.dtype, t.shape) for name, t in r.infos.items()}
            for spec in specs.values():
                check_layer_tensors(path, spec, info)
            ref = SafetensorsReader(_resolve_input(args.reference)) if args.reference else None
            try:
                for layer, spec in specs.items():
                    q = r.tensor(spec.key("weight_q"))
                    s = r.tensor(spec.key("weight_scale"))
                    check_layer_values(path, spec, q, s, None)
                    nbytes = q.nbytes + s.nbytes
                    scheme = f"{spec.mode} {spec.granularity}" + (f"(g={spec.group_size})" if spec.group_size else "")
                    metrics = ["-", "-", "-"]
                    key = math.inf
                    if ref is not None:
                        wname = spec.key("weight")
                        if wname not in ref.infos:
                            raise CliError(f"{args.reference}: no tensor {wname!r} to compare with")
                        t = ref.infos[wname]
                        want = spec.shape[::-1] if spec.layout == "in_out" else spec.shape
                        if not t.is_float or tuple(t.shape) != tuple(want):
                            raise CliError(f"{args.reference}: tensor {wname!r} is {t.dtype} {list(t.shape)}; "
                                           f"layer {layer!r} of {path} needs a float tensor of shape {list(want)}")
                        w = ref.float32(wname)
                        if spec.layout == "in_out":
                            w = w.T
                        qw = ops.QuantizedWeight.from_codes(np.array(q), np.array(s), spec.granularity,
                                                            spec.group_size)
                        sq, mx, cos = _metrics(w, ops.dequantize(qw))
                        ref.release(wname)
                        metrics, key = [f"{sq:.2f}", f"{mx:.3g}", f"{cos:.6f}"], sq
                    rows.append((key, [layer or "<root>", "x".join(map(str, q.shape)), scheme,
                                       format_bytes(nbytes)] + metrics))
                    del q, s
                    r.release(spec.key("weight_q"))
            finally:
                if ref is not None:
                    ref.close()
            note = "" if args.reference else "  (error metrics need the float checkpoint: --reference FLOAT.safetensors)"
        else:
            for t in r.infos.values():
                ok, _ = select_tensor(t, args.include, args.exclude, args.granularity, args.group_size, args.transposed)
                if not ok:
                    continue
                w = r.float32(t.name)
                if _match(t.name, args.transposed):
                    w = np.ascontiguousarray(w.T)
                try:
                    qw = ops.quantize_weight(w, args.granularity, args.group_size, name=t.name)
                except errors.QuantizationError as e:
                    raise CliError(str(e)) from None
                sq, mx, cos = _metrics(w, ops.dequantize(qw))
                del w
                r.release(t.name)
                scheme = f"{args.mode} {args.granularity}" + (f"(g={args.group_size})" if args.granularity == "per_group" else "")
                rows.append((sq, [_layer_name(t.name) or "<root>", "x".join(map(str, qw.shape)), scheme,
                                  format_bytes(qw.q.nbytes + qw.scale.nbytes), f"{sq:.2f}", f"{mx:.3g}", f"{cos:.6f}"]))
            note = "  (float checkpoint: quantized in memory with the scheme in the table)"
    rows.sort(key=lambda kv: kv[0])  # worst (lowest SQNR) first
    shown = rows if not args.top else rows[:args.top]
    print(f"{path}: {len(rows)} quantized layer(s), worst first{note}")
    print(_table(("layer", "shape (out x in)", "scheme", "int8 bytes", "SQNR dB", "max|err|", "cosine"),
                 [r for _, r in shown], right=(3, 4, 5, 6)))
    return 0


# --------------------------------------------------------------------------------------------------
# info / bench
# --------------------------------------------------------------------------------------------------

def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version(name)
    except PackageNotFoundError:
        return "not installed"
    except Exception:  # noqa: BLE001 - metadata quirks never break `info`
        return "unknown"


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__
    rows = [["cquant", __version__], ["C core", ops.native_version()], ["ISA in use", ops.isa()],
            ["ISAs available", ", ".join(ops.available_isas())], ["threads", str(ops.get_num_threads())],
            ["CQUANT_ISA", os.environ.get("CQUANT_ISA", "(unset)")], ["numpy", np.__version__],
            ["checkpoint format", FORMAT_VERSION]]
    for pkg in ("safetensors", "tqdm", "tokenizers", "torch", "transformers"):
        rows.append([pkg, _dist_version(pkg)])
    print(_table(("item", "value"), rows))
    return 0


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from . import bench
    return int(bench.main(list(rest)) or 0)


# --------------------------------------------------------------------------------------------------
# Parser / main
# --------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line + exit 2 (argparse prints usage first otherwise)
        raise CliError(message)


def _scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=sorted(ops.MODES), default="dynamic",
                   help="how the layer runs: int8 activations at run time (dynamic) or float activations "
                        "with int8 weights (weight_only); stored per layer in the checkpoint")
    p.add_argument("--granularity", choices=("per_tensor", "per_channel", "per_group"), default="per_channel")
    p.add_argument("--group-size", type=int, default=None, help="columns per scale with per_group")
    p.add_argument("--include", nargs="+", default=[], metavar="PAT",
                   help="quantize only tensors/layers matching these globs (replaces the default rule)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PAT", help="never quantize these")
    p.add_argument("--transposed", nargs="+", default=[], metavar="PAT",
                   help="weights stored (in, out), e.g. GPT-2 Conv1D: '*.c_attn.weight'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cquant", description="int8 post-training quantization for CPU inference")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    q = sub.add_parser("quantize", help="quantize a safetensors checkpoint, streaming tensor by tensor")
    q.add_argument("input", help="float checkpoint (.safetensors, or a folder holding model.safetensors)")
    q.add_argument("-o", "--output", required=True, help="cquant checkpoint to write")
    _scheme_args(q)
    g = q.add_mutually_exclusive_group()
    g.add_argument("--progress", action="store_true", default=None, help="always show the progress bar")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")
    q.add_argument("-q", "--quiet", action="store_true", help="no summary table")
    rp = sub.add_parser("report", help="per-layer quantization error (SQNR, max error, cosine), worst first")
    rp.add_argument("checkpoint", help="a float checkpoint (quantized in memory) or a cquant checkpoint")
    rp.add_argument("--reference", help="for a cquant checkpoint: the float checkpoint it came from")
    rp.add_argument("--top", type=int, default=0, help="show only the N worst layers")
    _scheme_args(rp)
    sub.add_parser("bench", help="kernel benchmark (options: cquant bench --help)", add_help=False)
    sub.add_parser("info", help="version, ISA in use, threads, optional packages")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark's own parser
        return cmd_bench(argparse.Namespace(), argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "quantize":
            return cmd_quantize(args)
        if args.command == "report":
            return cmd_report(args)
        return cmd_info(args)
    except (CliError, CheckpointError, errors.QuantizationError) as e:
        print(f"cquant: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cquant: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("cquant: error: out of memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
