"""The ``cquant`` command (also ``python -m cquant``).

    cquant quantize IN -o OUT [--mode dynamic|weight_only]
                    [--granularity per_tensor|per_channel|per_group] [--group-size G] [--bits 8|4]
                    [--include PAT ...] [--exclude PAT ...] [--transposed PAT ...] [--embeddings]
                    [--max-shard-size SIZE]
    cquant report   CHECKPOINT [--reference FLOAT] [scheme options] [--top N]
    cquant bench    [bench options]          (the kernel benchmark, ``python -m cquant.bench``)
    cquant info                              (version, ISA in use, threads, optional packages)
    cquant --version

IN, CHECKPOINT, FLOAT: a ``.safetensors`` file, a sharded checkpoint's ``NAME.safetensors.index.json``
or a model folder holding ``model.safetensors`` / ``model.safetensors.index.json``. OUT: a
``.safetensors`` file, or ``NAME.safetensors.index.json`` for a sharded output (shards
``NAME-0000i-of-0000N.safetensors`` next to it, at most ``--max-shard-size`` each, default 2GB;
``--max-shard-size`` with ``-o NAME.safetensors`` writes ``NAME.safetensors.index.json``). A layer's
codes, scales and bias stay in one shard, and each shard is a cquant checkpoint of its own.

``quantize`` streams: the input is memory-mapped and read one tensor at a time as a zero-copy view,
each output tensor is written as soon as it is computed (the output header is computed up front),
and the input pages of a finished tensor are released, so peak memory is a small multiple of the
largest tensor, not of the checkpoint. The output goes to temporary files renamed at the end: an
error never leaves a partial file; outputs get the usual ``0o666 & ~umask`` permissions.

Which tensors are quantized: 2-D float tensors whose name ends in ``weight`` and does not look like
an embedding or a norm (``DEFAULT_EXCLUDE``); ``--include`` replaces that rule by patterns,
``--exclude`` adds to the exclusions; ``--embeddings`` also quantizes the embedding tables
(``EMBEDDING_PATTERNS``) as int8 rows with one float32 scale each (layer ``kind`` ``"embedding"``,
loaded back by ``cquant.load_into``), as does an ``--include`` that names one. Everything else is
copied through unchanged (BF16/F16 included); the bias of a quantized layer is written as F32.
Patterns are :func:`fnmatch.fnmatchcase` globs on the tensor name or the layer name (the tensor name
without ``.weight``); list options take every word up to the next option, are repeatable, and give
back the input when it was written after them. ``--transposed`` names weights stored ``(in, out)``
(GPT-2 ``Conv1D``); without it such weights are found from their bias length (a bias as long as the
second dimension), square ones from the other layers of the same name, and a weight whose
orientation cannot be told in a file that holds ``(in, out)`` weights is refused.

Errors (missing file, not a safetensors file, truncated file, a header or shard index that lies, a
FIFO or other non-regular file, a cquant checkpoint whose metadata does not match its tensors, a
non-float tensor selected, NaN/Inf weights, a bias that fits neither dimension, an output that is a
directory or the input itself through a link, bad options) print one line ``cquant: error: ...``
and exit with status 2. A closed standard output (``cquant info | head``) ends the command quietly
with status 141, as SIGPIPE would.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import __version__, bench, errors, ops
from .quantization import format_bytes
from .io import (_ST_SIZE, FORMAT_VERSION, INDEX_SUFFIX, KEY_CQ_VERSION, KEY_LAYERS, KEY_VERSION,
                 CheckpointError, StreamWriter, TensorInfo, atomic_path, check_format_version,
                 check_layer_tensors, check_layer_values, open_checkpoint, pack_int4, parse_layers,
                 unpack_int4)

__all__ = ["main", "build_parser", "select_tensor", "DEFAULT_EXCLUDE", "EMBEDDING_PATTERNS", "NORM_PATTERNS"]

#: Embedding tables (names as in HF BERT/GPT-2/LLaMA checkpoints): float unless --embeddings.
EMBEDDING_PATTERNS = ("*embed*", "*Embed*", "*emb.weight", "*_emb*", "*wte*", "*wpe*")
#: Norm weights: never quantized by default.
NORM_PATTERNS = ("*norm*", "*Norm*", "*ln_*", "ln_*")
#: Weights never quantized as Linear layers by default: embeddings, norms.
DEFAULT_EXCLUDE = ("*embed*", "*Embed*", "*emb.weight", "*_emb*", "*norm*", "*Norm*", "*ln_*", "ln_*", "*wte*", "*wpe*")
#: --max-shard-size when -o names an index without one (cquant.save_pretrained's default too).
DEFAULT_MAX_SHARD = 2 * 10**9


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
        if inc is not None and len(t.shape) != 1:  # a 1-D bias or norm matched by '*dense*': copied
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
    if getattr(args, "mode", None) == "static":
        raise CliError("--mode static needs calibration data (each layer's activation scale is measured on "
                       "real inputs), which the command line does not take: quantize in Python with "
                       "cquant.Quantizer.quantize_dynamic(model, mode='static', calibration=batches), then "
                       "cquant.save(model, path)")
    if args.granularity == "per_group":
        if not args.group_size:
            raise CliError("--granularity per_group needs --group-size (e.g. 32, 64 or 128)")
        if args.group_size <= 0 or args.group_size % 4:
            raise CliError(f"--group-size must be a positive multiple of 4, got {args.group_size}")
        if getattr(args, "bits", 8) == 4 and (args.group_size % 8 or args.group_size > 256):
            raise CliError(f"--bits 4 needs a --group-size that is a multiple of 8 up to 256 (e.g. 32, 64 or "
                           f"128), got {args.group_size}")
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
    kind: str = "linear"                 # "linear" | "embedding" (int8 rows, per_channel)
    bias: Optional[TensorInfo] = None    # the layer's bias, written as F32 next to its codes
    detected: str = ""                   # how a transposition was found without --transposed
    absorbed: bool = False               # a bias written with its quantized layer
    gran: str = ""                       # the layer's granularity where it differs from --granularity
                                         # (per_channel: K not a multiple of --group-size, as the API)

    def granularity(self, args: argparse.Namespace) -> str:
        return "per_channel" if self.kind == "embedding" else self.gran or args.granularity


def _is_embedding(name: str) -> bool:
    return _match(name, EMBEDDING_PATTERNS) is not None and _match(name, NORM_PATTERNS) is None


def _leaf(layer: str) -> str:
    return layer.rpartition(".")[2]


def _plan(r: Any, args: argparse.Namespace) -> List[_Job]:
    """Which tensors are quantized, how (Linear or embedding table), in which orientation, and which
    bias goes with each quantized layer. Raises CliError for what cannot be done right."""
    embeddings = bool(getattr(args, "embeddings", False))
    jobs: List[_Job] = []
    for t in r.infos.values():
        ok, why = select_tensor(t, args.include, args.exclude, args.granularity, None)
        kind = "linear"
        if ok and args.include and _is_embedding(t.name):
            kind = "embedding"               # an embedding table named by --include: stored as int8 rows
        elif (not ok and embeddings and not args.include and why.startswith("embedding/norm")
              and _is_embedding(t.name) and _match(t.name, args.exclude) is None and 0 not in t.shape):
            ok, why, kind = True, "", "embedding"
        jobs.append(_Job(t, ok, why, kind=kind))
    by_name = {j.info.name: j for j in jobs}

    # orientation: --transposed, else the bias length, else what the other layers of that name are
    evidence: Dict[str, set] = {}
    undetermined: List[_Job] = []
    any_detected = False
    for j in jobs:
        if not j.quantize or j.kind != "linear":
            continue
        t = j.info
        layer = _layer_name(t.name)
        a, b = t.shape
        explicit = _match(t.name, args.transposed)
        bj = by_name.get((layer + "." if layer else "") + "bias")
        ev = None
        if bj is not None:
            bt = bj.info
            if not bt.is_float or len(bt.shape) != 1:
                raise CliError(f"tensor {bt.name!r} ({bt.dtype} {list(bt.shape)}) is not a 1-D float bias, so "
                               f"{t.name!r} cannot be quantized with it; --exclude {layer or 'weight'!r} copies the "
                               "layer as it is")
            n = bt.shape[0]
            if n == a and n == b:
                ev = None
            elif n == a:
                ev = "out_in"
            elif n == b:
                ev = "in_out"
            else:
                raise CliError(f"tensor {bt.name!r} has {n} elements, which matches neither dimension of "
                               f"{t.name!r} {list(t.shape)}: it is not this layer's bias; --exclude "
                               f"{layer or 'weight'!r} copies the layer as it is")
            j.bias = bt
            bj.absorbed = True
        if explicit is not None:
            if ev == "out_in":
                raise CliError(f"--transposed {explicit!r} names {t.name!r}, but its bias ({a} elements) says it is "
                               f"stored (out, in) = {list(t.shape)}: leave it out of --transposed")
            j.transposed = True
        elif ev == "in_out":
            j.transposed, j.detected = True, "bias length"
            any_detected = True
        elif ev is None:
            undetermined.append(j)
            continue
        evidence.setdefault(_leaf(layer), set()).add("in_out" if j.transposed else "out_in")
    for j in undetermined:
        layer = _layer_name(j.info.name)
        votes = evidence.get(_leaf(layer), set())
        if votes == {"in_out"} and (any_detected or args.transposed):
            j.transposed, j.detected = True, f"as the other {_leaf(layer)!r} layers"
        elif any_detected and votes != {"out_in"}:
            raise CliError(f"cannot tell whether {j.info.name!r} {list(j.info.shape)} is stored (out, in) or "
                           f"(in, out), and this file holds GPT-2 style (in, out) weights "
                           f"({next(x.info.name for x in jobs if x.detected == 'bias length')!r}, found from its "
                           "bias): name the transposed ones with --transposed PAT, or --exclude this one")
    for j in jobs:
        if j.quantize and j.kind == "linear" and args.granularity == "per_group" and args.group_size:
            k = j.info.shape[0] if j.transposed else j.info.shape[1]
            if k % args.group_size:  # per_channel instead, as Quantizer does (README "Schemes")
                j.gran = "per_channel"
                j.reason = f"K={k} is not a multiple of group size {args.group_size}: per_channel instead"
    return jobs


def _shard_stem(index: str) -> Tuple[str, str]:
    """(folder, stem) of the shards of ``index``: out/model.safetensors.index.json -> (out, model)."""
    folder, base = os.path.split(index)
    base = base[:-len(INDEX_SUFFIX)]
    return folder, (base[:-len(".safetensors")] if base.endswith(".safetensors") else base) or "model"


def _shard_paths(index: str, n: int) -> List[str]:
    folder, stem = _shard_stem(index)
    return [os.path.join(folder, f"{stem}-{i:05d}-of-{n:05d}.safetensors") for i in range(1, n + 1)]


def _stale_shards(index: str, keep: Sequence[str], protect: Sequence[str]) -> List[str]:
    """Shards of an earlier sharded output at ``index`` (same stem, another count) that the new one
    does not rewrite; never a file of the input."""
    import re
    folder, stem = _shard_stem(index)
    pat = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
    keep_real = {os.path.realpath(p) for p in keep} | {os.path.realpath(p) for p in protect}
    out = []
    for name in os.listdir(folder or "."):
        p = os.path.join(folder, name)
        if pat.fullmatch(name) and os.path.realpath(p) not in keep_real and os.path.isfile(p):
            out.append(p)
    return out


def _output_plan(args: argparse.Namespace) -> Tuple[Optional[str], Optional[int]]:
    """(index path, max shard bytes) for a sharded output, (None, None) for one file."""
    out = args.output
    size = None
    if args.max_shard_size is not None:
        try:
            size = parse_size(args.max_shard_size)
        except ValueError as e:
            raise CliError(str(e)) from None
    if out.endswith(INDEX_SUFFIX):
        return out, size if size is not None else DEFAULT_MAX_SHARD
    if size is not None:
        if not out.endswith(".safetensors"):
            raise CliError(f"with --max-shard-size, -o names the index to write (e.g. {out}/model.safetensors"
                           f"{INDEX_SUFFIX}) or a .safetensors name (its index is NAME{INDEX_SUFFIX}); got {out}")
        return out + INDEX_SUFFIX, size
    return None, None


def parse_size(s: str) -> int:
    """'500MB', '2GB', '1GiB', '123' (bytes) -> bytes."""
    t = str(s).strip().upper()
    for unit, f in (("KIB", 2**10), ("MIB", 2**20), ("GIB", 2**30), ("KB", 10**3), ("MB", 10**6),
                    ("GB", 10**9), ("B", 1), ("", 1)):
        if t.endswith(unit):
            try:
                v = float(t[:len(t) - len(unit)])
            except ValueError:
                continue
            if v > 0 and math.isfinite(v) and int(v * f) >= 1:
                return int(v * f)
            break
    raise ValueError(f"--max-shard-size {s!r} is not a size such as 500MB, 2GB or 1GiB")


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_scheme(args)
    index_out, max_shard = _output_plan(args)
    out = args.output
    if os.path.isdir(out):
        raise CliError(f"{out}: is a directory; name the file to write, e.g. {os.path.join(out, 'model.safetensors')} "
                       f"(or {os.path.join(out, 'model.safetensors' + INDEX_SUFFIX)} for a sharded checkpoint)")
    t0 = time.perf_counter()
    with open_checkpoint(args.input) as r:
        src = r.path
        inputs = list(getattr(r, "files", [])) + [src]
        if index_out is None:
            for p in inputs:
                if _same_file(p, out):
                    raise CliError(f"the output {out} is the input {p} (the same file, through a link or another "
                                   "path): choose another -o")
        if KEY_VERSION in r.metadata:
            raise CliError(f"{src} is already a cquant checkpoint (format version {r.metadata[KEY_VERSION]})")
        if not any(t.is_float for t in r.infos.values()):
            raise CliError(f"{src} holds no float tensors: nothing to quantize")
        jobs = _plan(r, args)
        names = set(r.infos)
        groups: List[Tuple[_Job, List[Tuple[str, str, Tuple[int, ...]]]]] = []
        layers: Dict[str, Dict[str, Any]] = {}
        for j in jobs:
            t = j.info
            if j.absorbed:
                continue
            if not j.quantize:
                groups.append((j, [(t.name, t.dtype, t.shape)]))
                continue
            layer = _layer_name(t.name)
            pre = f"{layer}." if layer else ""
            for extra in (pre + "weight_q", pre + "weight_scale"):
                if extra in names:
                    raise CliError(f"{src}: tensor {extra!r} already exists; cannot quantize {t.name!r}")
            n, k = (t.shape[1], t.shape[0]) if j.transposed else t.shape
            gran = j.granularity(args)
            g = args.group_size if gran == "per_group" else None
            b4 = j.kind != "embedding" and args.bits == 4
            codes = ("U8", (n, (k + 1) // 2)) if b4 else ("I8", (n, k))  # int4: two codes a byte
            ent = [(pre + "weight_q",) + codes, (pre + "weight_scale", "F32", _scale_shape(gran, n, k, g))]
            if j.bias is not None:
                ent.append((j.bias.name, "F32", j.bias.shape))
            groups.append((j, ent))
            layers[layer] = {"mode": args.mode, "granularity": gran, "group_size": g, "shape": [n, k],
                             "bias": j.bias is not None, "layout": "in_out" if j.transposed else "out_in"}
            if j.kind == "embedding":
                layers[layer]["kind"] = "embedding"
            if b4:
                layers[layer]["bits"] = 4
        if not layers:
            print(f"cquant: warning: no tensor of {src} was selected for quantization; copying it as is",
                  file=sys.stderr)
        base_meta = {k: v for k, v in r.metadata.items() if not k.startswith("cquant.")}
        base_meta.update({KEY_VERSION: FORMAT_VERSION, KEY_CQ_VERSION: __version__})

        # shards: whole groups (a layer's codes, scales and bias stay in one file)
        def gbytes(ent: Sequence[Tuple[str, str, Tuple[int, ...]]]) -> int:
            return sum(math.prod(s) * _ST_SIZE[d] for _, d, s in ent)

        shards: List[List[int]] = [list(range(len(groups)))]
        if index_out is not None:
            shards = [[]]
            acc = 0
            for gi, (_, ent) in enumerate(groups):
                nb = gbytes(ent)
                if shards[-1] and acc + nb > (max_shard or DEFAULT_MAX_SHARD):
                    shards.append([])
                    acc = 0
                shards[-1].append(gi)
                acc += nb
        paths = [out] if index_out is None else _shard_paths(index_out, len(shards))
        if index_out is not None:
            for p in paths + [index_out]:
                for q in inputs:
                    if _same_file(q, p):
                        raise CliError(f"the output {p} is the input {q} (the same file, through a link or "
                                       "another path): choose another -o")
        bar = _progress(sum(t.nbytes for t in r.infos.values()), "quantize", args.progress)
        stats = {"quantized": [0, 0, 0], "embedding": [0, 0, 0], "copied": [0, 0, 0]}
        skipped: Dict[str, int] = {}
        float_emb = [0, 0]
        detected = 0
        try:
            with contextlib.ExitStack() as stack:
                index_tmp = stack.enter_context(atomic_path(index_out)) if index_out is not None else None
                weight_map: Dict[str, str] = {}
                for path, gis in zip(paths, shards):
                    tmp = stack.enter_context(atomic_path(path))
                    entries = [e for gi in gis for e in groups[gi][1]]
                    shard_layers = {_layer_name(groups[gi][0].info.name): layers[_layer_name(groups[gi][0].info.name)]
                                    for gi in gis if groups[gi][0].quantize}
                    meta = dict(base_meta, **{KEY_LAYERS: json.dumps(shard_layers, separators=(",", ":"))})
                    with open(tmp, "wb") as f:
                        w = StreamWriter(f, entries, meta)
                        for gi in gis:
                            j, ent = groups[gi]
                            detected += bool(j.detected)
                            _write_group(r, w, j, ent, args, stats, skipped, float_emb)
                            if bar is not None:
                                bar.update(j.info.nbytes + (j.bias.nbytes if j.bias is not None else 0))
                        w.close()
                    weight_map.update({e[0]: os.path.basename(path) for e in entries})
                if index_tmp is not None:
                    total = sum(gbytes(ent) for _, ent in groups)
                    with open(index_tmp, "w", encoding="utf-8") as f:
                        json.dump({"metadata": {"total_size": total, KEY_VERSION: FORMAT_VERSION,
                                                KEY_CQ_VERSION: __version__},
                                   "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
                        f.write("\n")
        finally:
            if bar is not None:
                bar.close()
        if index_out is not None:
            for p in _stale_shards(index_out, paths, inputs):
                try:
                    os.unlink(p)
                except OSError:
                    pass
    dt = time.perf_counter() - t0
    if not args.quiet:
        size_in = r.size
        size_out = sum(os.path.getsize(p) for p in paths + ([index_out] if index_out else []))
        rows = [["quantized (int8 codes + f32 scales)", str(stats["quantized"][0]), format_bytes(stats["quantized"][1]),
                 format_bytes(stats["quantized"][2])]]
        if stats["embedding"][0]:
            rows.append(["embedding tables (int8 rows + f32 scales)", str(stats["embedding"][0]),
                         format_bytes(stats["embedding"][1]), format_bytes(stats["embedding"][2])])
        fallback = sum(1 for j in jobs if j.quantize and j.gran)
        if fallback:
            rows.append([f"  of which per_channel (K not a multiple of {args.group_size})", str(fallback), "", ""])
        for why, cnt in sorted(skipped.items(), key=lambda kv: -kv[1]):
            rows.append([f"copied: {why}", str(cnt), "", ""])
        rows.append(["copied (total)", str(stats["copied"][0]), format_bytes(stats["copied"][1]),
                     format_bytes(stats["copied"][2])])
        rows.append(["file" if index_out is None else f"files ({len(paths)} shard(s) + index)", str(len(jobs)),
                     format_bytes(size_in), format_bytes(size_out)])
        scheme = f"int{args.bits} {args.mode} {args.granularity}" + (f"(g={args.group_size})" if args.granularity == "per_group" else "")
        print(f"{src} -> {index_out or out}  [{scheme}]")
        print(_table(("tensors", "count", "input", "output"), rows, right=(1, 2, 3)))
        if detected:
            print(f"{detected} layer(s) stored (in, out) (GPT-2 Conv1D) were found from their bias length and "
                  "transposed; --transposed PAT names them explicitly")
        if float_emb[0] and not getattr(args, "embeddings", False):
            print(f"{float_emb[0]} embedding table(s) kept as float ({format_bytes(float_emb[1])}); --embeddings "
                  "stores them as int8 rows too")
        print(f"output is {size_out / max(size_in, 1):.3f} of the input; {dt:.2f} s; "
              f"peak RSS {format_bytes(_peak_rss_bytes())}")
    return 0


def _write_group(r: Any, w: StreamWriter, j: _Job, ent: Sequence[Tuple[str, str, Tuple[int, ...]]],
                 args: argparse.Namespace, stats: Dict[str, List[int]], skipped: Dict[str, int],
                 float_emb: List[int]) -> None:
    t = j.info
    if not j.quantize:
        w.write(t.name, r.raw(t.name))
        st = stats["copied"]
        st[0] += 1
        st[1] += t.nbytes
        st[2] += t.nbytes
        skipped[j.reason] = skipped.get(j.reason, 0) + 1
        if t.is_float and len(t.shape) == 2 and _is_embedding(t.name):
            float_emb[0] += 1
            float_emb[1] += t.nbytes
        return
    wf = r.float32(t.name)
    if j.transposed:
        wf = np.ascontiguousarray(wf.T)
    gran = j.granularity(args)
    bits = 4 if j.kind != "embedding" and args.bits == 4 else 8
    try:
        q, s = ops.quantize(wf, gran, args.group_size if gran == "per_group" else None, name=t.name, bits=bits)
    except errors.QuantizationError as e:
        raise CliError(str(e)) from None
    del wf
    r.release(t.name)
    w.write(ent[0][0], pack_int4(q) if bits == 4 else q)
    w.write(ent[1][0], s)
    st = stats["embedding" if j.kind == "embedding" else "quantized"]
    st[0] += 1
    st[1] += t.nbytes
    st[2] += q.nbytes + s.nbytes
    if j.bias is not None:
        b = np.array(r.float32(j.bias.name), dtype=np.float32, copy=True)
        if not np.isfinite(b).all():
            raise CliError(f"tensor {j.bias.name!r} holds NaN or Inf")
        w.write(j.bias.name, b)
        r.release(j.bias.name)
        st[1] += j.bias.nbytes
        st[2] += b.nbytes


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def _metrics(w: np.ndarray, wq: np.ndarray) -> Tuple[float, float, float]:
    """(SQNR dB, max |error|, cosine) of a dequantized weight against the float one."""
    w = w.astype(np.float64, copy=False).ravel()
    d = wq.astype(np.float64, copy=False).ravel() - w
    sig, noise = float(w @ w), float(d @ d)
    sqnr = math.inf if noise == 0 else (10 * math.log10(sig / noise) if sig > 0 else -math.inf)
    wq64 = wq.astype(np.float64, copy=False).ravel()  # (a float32 norm overflows / underflows for |w| ~ 1e30 / 1e-24)
    nw, nq = math.sqrt(sig), math.sqrt(float(wq64 @ wq64))
    cos = float(w @ wq64) / (nw * nq) if nw > 0 and nq > 0 else (1.0 if nw == nq else 0.0)
    return sqnr, float(np.abs(d).max()) if d.size else 0.0, cos


def cmd_report(args: argparse.Namespace) -> int:
    _check_scheme(args)
    if args.top < 0:
        raise CliError(f"--top must be >= 0 (0: every layer), got {args.top}")
    rows: List[Tuple[float, List[str]]] = []
    with open_checkpoint(args.checkpoint) as r:
        path = r.path
        if KEY_VERSION in r.metadata:
            check_format_version(path, r.metadata)       # validated as cquant.load does
            specs = parse_layers(path, r.metadata)
            info = {name: (t.dtype, t.shape) for name, t in r.infos.items()}
            for spec in specs.values():
                check_layer_tensors(path, spec, info)
            ref = open_checkpoint(args.reference) if args.reference else None
            try:
                for layer, spec in specs.items():
                    q = r.tensor(spec.key("weight_q"))
                    s = r.tensor(spec.key("weight_scale"))
                    nbytes = q.nbytes + s.nbytes
                    if spec.bits == 4:
                        q = unpack_int4(q, spec.shape[1])
                    check_layer_values(path, spec, q, s, None)
                    scheme = (f"int{spec.bits} {spec.mode} {spec.granularity}"
                              + (f"(g={spec.group_size})" if spec.group_size else ""))
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
                        if not np.isfinite(w).all():  # the metrics of a NaN reference mean nothing
                            raise CliError(f"{args.reference}: tensor {wname!r} holds NaN or Inf")
                        if spec.layout == "in_out":
                            w = w.T
                        qw = ops.QuantizedWeight.from_codes(np.array(q), np.array(s), spec.granularity,
                                                            spec.group_size, bits=spec.bits)
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
            for j in _plan(r, args):
                if not j.quantize:
                    continue
                t = j.info
                w = r.float32(t.name)
                if j.transposed:
                    w = np.ascontiguousarray(w.T)
                gran = j.granularity(args)
                try:
                    qw = ops.quantize_weight(w, gran, args.group_size if gran == "per_group" else None, name=t.name,
                                             bits=4 if j.kind != "embedding" and args.bits == 4 else 8)
                except errors.QuantizationError as e:
                    raise CliError(str(e)) from None
                sq, mx, cos = _metrics(w, ops.dequantize(qw))
                del w
                r.release(t.name)
                scheme = f"int{qw.bits} {args.mode} {gran}" + (f"(g={args.group_size})" if gran == "per_group" else "")
                rows.append((sq, [_layer_name(t.name) or "<root>", "x".join(map(str, qw.shape)), scheme,
                                  format_bytes((qw.q.nbytes if qw.bits == 8 else qw.shape[0] * ((qw.shape[1] + 1) // 2)) + qw.scale.nbytes), f"{sq:.2f}", f"{mx:.3g}", f"{cos:.6f}"]))
            note = "  (float checkpoint: quantized in memory with the scheme in the table)"
    rows.sort(key=lambda kv: kv[0])  # worst (lowest SQNR) first
    shown = rows if not args.top else rows[:args.top]  # --top >= 0: checked before any file is read
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
    rows = [["cquant", __version__], ["C core", ops.native_version()], ["ISA in use", ops.isa()],
            ["ISAs available", ", ".join(ops.available_isas())], ["threads", str(ops.get_num_threads())],
            ["CQUANT_ISA", os.environ.get("CQUANT_ISA", "(unset)")], ["numpy", np.__version__],
            ["checkpoint format", FORMAT_VERSION]]
    for pkg in ("safetensors", "tqdm", "tokenizers", "torch", "transformers"):
        rows.append([pkg, _dist_version(pkg)])
    print(_table(("item", "value"), rows))
    return 0


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    return int(bench.main(list(rest)) or 0)


# --------------------------------------------------------------------------------------------------
# Parser / main
# --------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line + exit 2 (argparse prints usage first otherwise)
        raise CliError(message)


class _Patterns(argparse.Action):
    """``--include A B ...``: repeatable (values accumulate); each run is recorded so that a positional
    argument the run swallowed (``--include PAT model.safetensors -o out``) can be given back."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        runs = list(getattr(namespace, "_pattern_runs", []))
        runs.append((self.dest, option_string or self.dest, len(items), len(values)))
        setattr(namespace, "_pattern_runs", runs)
        setattr(namespace, self.dest, items + list(values))


def _positional(args: argparse.Namespace, dest: str) -> None:
    """The required positional ``dest``: when a ``--include``-style list took it (argparse gives every
    word up to the next option to the list), the last word of the list that names an existing file or
    folder is the positional."""
    if getattr(args, dest, None) is not None:
        return
    found = []
    for opt_dest, opt, start, count in getattr(args, "_pattern_runs", []):
        vals = getattr(args, opt_dest)
        last = vals[start + count - 1]
        if count >= 2 and os.path.exists(last):
            found.append((opt_dest, opt, start + count - 1, last))
    if len(found) == 1:
        opt_dest, opt, i, last = found[0]
        del getattr(args, opt_dest)[i]
        setattr(args, dest, last)
        return
    raise CliError(f"the following arguments are required: {dest} (a list option such as --include takes "
                   "every word up to the next option: put the input first, or write --include=PAT)")


def _scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=sorted(ops.MODES) + ["static"], default="dynamic",
                   help="how the layer runs: int8 activations at run time (dynamic) or float activations "
                        "with int8 weights (weight_only); stored per layer in the checkpoint. static "
                        "(calibrated activation scales) needs calibration data: Python API only")
    p.add_argument("--granularity", choices=("per_tensor", "per_channel", "per_group"), default="per_channel")
    p.add_argument("--group-size", type=int, default=None, help="columns per scale with per_group")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8,
                   help="weight bits: 8, or 4 (codes in [-7, 7], two per byte in the file; groups of 32, "
                        "64 or 128 keep the accuracy; embedding tables stay int8)")
    p.add_argument("--include", nargs="+", default=[], metavar="PAT", action=_Patterns,
                   help="quantize only tensors/layers matching these globs (replaces the default rule; "
                        "an embedding table matched is stored as int8 rows)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PAT", action=_Patterns, help="never quantize these")
    p.add_argument("--transposed", nargs="+", default=[], metavar="PAT", action=_Patterns,
                   help="weights stored (in, out), e.g. GPT-2 Conv1D: '*.c_attn.weight' (without it, "
                        "found from the bias length; ambiguous ones are refused)")
    p.add_argument("--embeddings", action="store_true",
                   help="also quantize embedding tables (int8 rows, one f32 scale per row; cquant.load_into "
                        "installs them in cquant.nn and torch models)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cquant", description="int8 post-training quantization for CPU inference")
    p.add_argument("--version", action="version", version=f"cquant {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    q = sub.add_parser("quantize", help="quantize a safetensors checkpoint, streaming tensor by tensor")
    q.add_argument("input", nargs="?", help="float checkpoint: a .safetensors file, a sharded checkpoint's "
                   ".index.json, or a model folder holding either")
    q.add_argument("-o", "--output", required=True,
                   help="cquant checkpoint to write: a .safetensors file, or NAME.safetensors.index.json for "
                        "a sharded one (shards NAME-00001-of-0000N.safetensors next to it)")
    q.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="write shards of at most SIZE (e.g. 500MB, 2GB; default 2GB when -o is an .index.json)")
    _scheme_args(q)
    g = q.add_mutually_exclusive_group()
    g.add_argument("--progress", action="store_true", default=None, help="always show the progress bar")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")
    q.add_argument("-q", "--quiet", action="store_true", help="no summary table")
    rp = sub.add_parser("report", help="per-layer quantization error (SQNR, max error, cosine), worst first")
    rp.add_argument("checkpoint", nargs="?", help="a float checkpoint (quantized in memory) or a cquant "
                    "checkpoint (file, sharded .index.json, or model folder)")
    rp.add_argument("--reference", help="for a cquant checkpoint: the float checkpoint it came from")
    rp.add_argument("--top", type=int, default=0, help="show only the N worst layers")
    _scheme_args(rp)
    sub.add_parser("bench", help="kernel benchmark (options: cquant bench --help)", add_help=False)
    sub.add_parser("info", help="version, ISA in use, threads, optional packages")
    return p


class _Terminated(BaseException):
    """SIGTERM / SIGHUP (``timeout``, ``kill``, systemd, a closed terminal): raised in the main thread
    so that the output being written is removed as on any failure (the temporary file was left)."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _cli_process() -> Any:
    """What the command line needs of its process, restored after (tests call :func:`main` in
    process): a closed stdout / stderr (cron, a daemon: ``>&-``) is /dev/null, not None; SIGTERM and
    SIGHUP end the command as an error does (outputs cleaned up)."""
    saved_streams = (sys.stdout, sys.stderr)
    opened = []
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            f = open(os.devnull, "w")  # noqa: SIM115 - closed in finally
            opened.append(f)
            setattr(sys, name, f)
    saved_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                saved_handlers[sig] = signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, h in saved_handlers.items():
            signal.signal(sig, h)
        sys.stdout, sys.stderr = saved_streams
        for f in opened:
            f.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    with _cli_process():
        return _main(argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark's own parser
            rc = cmd_bench(argparse.Namespace(), argv[1:])
            sys.stdout.flush()
            return rc
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command in ("quantize", "report"):
            _positional(args, "input" if args.command == "quantize" else "checkpoint")
        rc = cmd_quantize(args) if args.command == "quantize" else \
            cmd_report(args) if args.command == "report" else cmd_info(args)
        sys.stdout.flush()  # inside the try: a closed pipe (`cquant info | head`) is handled below
        return rc
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, as a command killed by SIGPIPE does; stdout is
        # pointed at /dev/null so the interpreter's final flush does not complain either
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        return 141
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
    except _Terminated as e:
        signum = int(e.args[0]) if e.args else 15
        print(f"cquant: terminated ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
