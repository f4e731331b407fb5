"""Quantized checkpoints: ``cquant.save`` / ``cquant.load`` / ``cquant.load_into``, and a streaming
safetensors reader/writer used by the ``cquant quantize`` command.

File layout (format version 1)
------------------------------
A cquant checkpoint is an ordinary safetensors file (8-byte little-endian header length, a JSON
header, then the raw little-endian tensor bytes), so any safetensors reader opens it. For every
quantized Linear layer ``L`` (dotted module name; the prefix is empty for a model that is one layer):

=====================  =======  ===================  ==================================================
tensor                 dtype    shape                meaning
=====================  =======  ===================  ==================================================
``L.weight_q``         I8       (N, K)               codes in [-127, 127], row-major, canonical layout
                                                     (N = out_features, K = in_features), not packed
                       U8       (N, ceil(K/2))       int4 layers ("bits": 4): codes in [-7, 7], two per
                                                     byte, row-major: byte i of row r holds k = 2i in
                                                     its low nibble and k = 2i + 1 in its high nibble
                                                     (4-bit two's complement; an odd K pads with 0)
``L.weight_scale``     F32      (1,) / (N,) /        per_tensor / per_channel / per_group scales;
                                (N, K/g)             weight ~= weight_q * scale of its slice
``L.bias``             F32 (*)  (N,)                 optional bias
``L.act_scale``        F32      (1,)                 ``"static"`` layers only: the calibrated activation
                                                     scale (finite, > 0); every row of x is quantized
                                                     with it (codes clamped to [-127, 127])
=====================  =======  ===================  ==================================================

(*) always written as F32 (also from an F16/BF16 source); readers also accept an F16/BF16/F64 bias,
which earlier versions of ``cquant quantize`` copied unchanged.
Every other tensor of the model (embeddings, norms, layers left in float) is stored under its usual
``state_dict`` name with its dtype unchanged (BF16 and F16 included). An int8 embedding table
(``cquant quantize --embeddings``, or a model quantized with ``Quantizer(..., embeddings=True)``) is a
layer like the others (``kind`` ``"embedding"``: per_channel, no bias, shape (rows, dim)).
``load_into`` installs it as a :class:`cquant.embedding.QuantizedEmbedding` in a :mod:`cquant.nn`
model, and as a ``QuantizedTorchEmbedding`` in a torch model when the ``nn.Embedding`` can take one
(its forward is torch's, no ``max_norm``, and its weight is not tied to a module that stays float);
otherwise (and for a table stored as a ``"linear"`` layer) as the dequantized float table.
A table tied to a quantized Linear (GPT-2's ``wte`` and ``lm_head``: the same per_channel int8
codes) is stored once: ``cquant.tied`` (metadata, optional) is a JSON object ``{table: linear}``; the
table has no tensors and no ``cquant.layers`` entry of its own, ``linear`` must be a per_channel
int8 ``"linear"`` layer of the file, and loading makes the table read that layer's codes.
A *sharded* checkpoint is ``NAME.safetensors.index.json`` (``{"metadata": {...}, "weight_map":
{tensor: shard file}}``) plus the shards next to it; each shard is itself a cquant checkpoint
holding whole layers (its ``cquant.layers`` lists the layers it holds). :func:`open_checkpoint`,
:func:`load`, :func:`load_into` and the CLI take the index, a single file, or a model folder.
The header's ``__metadata__`` (string -> string) holds:

- ``cquant.format_version``: ``"1"``; ``cquant.version``: the writer's cquant version;
- ``cquant.layers``: JSON object ``{L: {"mode": "dynamic"|"weight_only"|"static",
  "granularity": "per_tensor"|"per_channel"|"per_group", "group_size": int|null, "shape": [N, K],
  "bias": bool, "layout": "out_in"|"in_out", "kind": "linear"|"embedding" (optional),
  "bits": 8|4 (optional, 8 when absent)}}``. ``layout`` says how the *source* layer stored its
  weight: ``in_out`` for GPT-2 style ``Conv1D`` (the codes are still (N, K));
- ``cquant.model`` (optional): JSON ``{"class": "module:QualName", "config": {...}}`` for a
  :mod:`cquant.nn` model that can rebuild itself (``from_cquant_config``), e.g. :class:`cquant.bert.BertModel`.
  ``cquant.load`` builds only classes in an explicit registry (:func:`register_loadable`), looked up
  by that string: nothing named in a file is ever imported;
- ``cquant.folds`` (optional, a smoothed model): JSON ``{"input": [layer, ...], "output": [...]}``
  listing the float32 tensors ``cquant_fold_input.<layer>`` / ``cquant_fold_output.<layer>``: the
  scales smoothing divided a layer's input (output) by through a fold into the layer before it
  (positive, finite; a quantized layer's K (N) of them). Loading records them on the model as
  :func:`cquant.smooth` does, so that :func:`cquant.compare` on the reloaded model feeds each layer
  as it was fed in memory;
- anything the user passed as ``metadata=`` and, for ``cquant quantize``, the input file's metadata.

To use a layer from C: read ``weight_q`` (N*K bytes) and ``weight_scale``, then ``y = x @ (q*s).T + b``
(or the dynamic int8 path, cquant.h ``cq_linear``).

Why the CLI has its own reader/writer
-------------------------------------
``save`` writes with :class:`StreamWriter` (BF16 tensors of a torch model stay BF16); ``load`` and
``cquant report`` read with
:class:`SafetensorsReader`, which checks every header field against the file (integer shapes with
Python arithmetic, offsets that tile the data section exactly once, regular files only) before
anything is read; then the cquant metadata is validated against the tensors (:func:`parse_layers`,
:func:`check_layer_tensors`, :func:`check_layer_values`). ``cquant quantize`` maps the
input with :mod:`mmap` and reads each tensor as a zero-copy numpy view, then releases those pages
(``madvise(MADV_DONTNEED)``) once the tensor is written; the output is written tensor by tensor after
a header computed up front. ``safetensors.safe_open`` copies each tensor out of its own map and leaves
the pages it touched mapped (counted in the process' RSS) until the file is closed, and
``safetensors.numpy.save_file`` serializes the whole output in memory first: both make peak memory
grow with the checkpoint, not with its largest tensor.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import __version__, errors, ops
from . import frontends as fe
from .bert import BertConfig, BertModel
from .checkpoint_file import (  # noqa: F401  (the file layer, re-exported: these names were defined here)
    CheckpointError, FORMAT_VERSION, KEY_VERSION, KEY_LAYERS, KEY_MODEL, KEY_CQ_VERSION, KEY_TIED, PathLike,
    _ST_TO_NP, _ST_SIZE, _NP_TO_ST, FLOAT_DTYPES, st_dtype, _short, BF16Bits, bf16_to_f32, TensorInfo,
    _open_regular, _is_int, _no_duplicate_keys, _MAX_DIMS, _MAX_ARRAY_BYTES, SafetensorsReader, INDEX_SUFFIX,
    CHECKPOINT_NAMES, _MAX_INDEX, resolve_checkpoint, is_index_path, _shard_name_ok, ShardedReader,
    open_checkpoint, StreamWriter, _umask, atomic_path, _layer_meta, pack_int4, unpack_int4, _stored_codes, _prefix,
    path_str, KEY_FOLDS, fold_tensors, read_folds, set_folds, metadata_json,
)
from .quantization import QuantizedLinearForward

__all__ = ["save", "load", "load_into", "Checkpoint", "FORMAT_VERSION", "SafetensorsReader",
           "StreamWriter", "CheckpointError", "atomic_path", "register_loadable", "LayerSpec",
           "parse_layers", "check_format_version", "check_layer_tensors", "check_layer_values",
           "ShardedReader", "open_checkpoint", "resolve_checkpoint", "INDEX_SUFFIX"]


# --------------------------------------------------------------------------------------------------
# Checkpoints in memory
# --------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded checkpoint: quantized layers and the other tensors, all numpy.

    ``layers``: name -> :class:`cquant.quantization.QuantizedLinearForward` (codes packed for the
    kernels, ready to call); ``layouts``: name -> "out_in"/"in_out"; ``tensors``: every other tensor
    by name; ``metadata``: the file's metadata (strings).
    """
    layers: Dict[str, Any] = field(default_factory=dict)
    layouts: Dict[str, str] = field(default_factory=dict)
    kinds: Dict[str, str] = field(default_factory=dict)  # name -> "embedding" (absent: a Linear)
    tensors: Dict[str, np.ndarray] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    #: embedding table -> the Linear layer whose codes it shares (``cquant.tied``); such a table is in
    #: ``layers`` (the same QuantizedWeight as that layer) but has no tensors of its own
    tied: Dict[str, str] = field(default_factory=dict)
    #: the smoothing folds of the saved model ({"input": {layer: s}, "output": {...}}, ``cquant.folds``),
    #: recorded on the model by load / load_into for :func:`cquant.compare`
    folds: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def format_version(self) -> Optional[str]:
        return self.metadata.get(KEY_VERSION)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise errors.TypeError(
            "this checkpoint holds quantized layers and tensors, not a runnable model: its model "
            "class does not describe itself (no cquant_config / from_cquant_config). Build the "
            "model as usual, then cquant.load_into(model, path) installs the quantized layers.")

    def layer_keys(self) -> List[str]:
        keys = []
        for name, qf in self.layers.items():
            if name in self.tied:
                continue
            p = _prefix(name)
            keys += [p + "weight_q", p + "weight_scale"] + ([p + "bias"] if qf.bias is not None else []) \
                + ([p + "act_scale"] if getattr(qf, "act_scale", None) is not None else [])
        return keys

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Flat name -> array, as stored in the file (codes canonical (N, K))."""
        out: Dict[str, np.ndarray] = {}
        for name, qf in self.layers.items():
            if name in self.tied:
                continue
            p = _prefix(name)
            out[p + "weight_q"] = _stored_codes(qf.qweight)
            out[p + "weight_scale"] = qf.qweight.scale
            if qf.bias is not None:
                out[p + "bias"] = qf.bias
            if getattr(qf, "act_scale", None) is not None:
                out[p + "act_scale"] = np.array([qf.act_scale], dtype=np.float32)
        out.update(self.tensors)
        return out

    def __repr__(self) -> str:
        return (f"Checkpoint(version={self.format_version}, {len(self.layers)} quantized layer(s), "
                f"{len(self.tensors)} other tensor(s))")


def save(obj: Any, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a quantized model (cquant.nn, torch via the adapter, duck-typed) or a mapping
    ``name -> array | quantized layer`` to ``path`` as a cquant checkpoint (see the module docstring
    for the layout). The file is written to a temporary name and renamed: never left half-written."""
    path = path_str(path)
    if is_index_path(path):
        raise CheckpointError(f"{path}: save writes one .safetensors file, and a name ending in {INDEX_SUFFIX!r} "
                              "is read back as a sharded checkpoint's index; name it .safetensors")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    reserved = sorted(k for k in meta if k.startswith("cquant."))
    if reserved:
        raise CheckpointError(f"{path}: metadata keys starting with 'cquant.' are the format's own "
                              f"(got {', '.join(reserved)}); name yours otherwise")
    state = fe.for_model(obj).state_tensors(obj)
    tensors, layers, model_meta, ties = state.tensors, state.layers, state.model_meta, state.ties
    try:
        folds, fold_listing = fold_tensors(obj, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if folds:
        tensors = {**tensors, **folds}
        meta[KEY_FOLDS] = json.dumps(fold_listing, separators=(",", ":"))
    if ties:
        meta[KEY_TIED] = json.dumps(ties, separators=(",", ":"))
    meta[KEY_VERSION] = FORMAT_VERSION
    meta[KEY_CQ_VERSION] = __version__
    meta[KEY_LAYERS] = json.dumps(layers, separators=(",", ":"))
    if model_meta is not None:
        meta[KEY_MODEL] = json.dumps(model_meta, separators=(",", ":"))
        if model_meta["class"] not in _LOADABLE:
            logging.getLogger("cquant").info(
                "cquant.save: %s is not registered with cquant.io.register_loadable, so cquant.load(path) "
                "will not rebuild it; register it, or rebuild the model and call cquant.load_into(model, "
                "path)", model_meta["class"])
    elif hasattr(obj, "named_modules"):
        logging.getLogger("cquant").info(
            "cquant.save: %s does not describe itself (cquant_config / from_cquant_config), so "
            "cquant.load(path) returns a Checkpoint; rebuild the model and call "
            "cquant.load_into(model, path)", type(obj).__name__)
    entries = [(k, "BF16" if isinstance(v, BF16Bits) else st_dtype(v), tuple(v.shape)) for k, v in tensors.items()]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            w = StreamWriter(f, entries, meta)
            for k, v in tensors.items():
                w.write(k, np.asarray(v))
            w.close()


# --------------------------------------------------------------------------------------------------
# Validating a checkpoint's metadata and quantized-layer tensors (load, load_into, cquant report)
# --------------------------------------------------------------------------------------------------

_MODES = ("dynamic", "weight_only", "static")  # "static": a L.act_scale tensor holds the activation scale
_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
_LAYOUTS = ("out_in", "in_out")
_KINDS = ("linear", "embedding")  # "embedding": an embedding table stored as int8 rows (per_channel)
_BIAS_DTYPES = ("F32", "F16", "F64", "BF16")  # `cquant quantize` copies a float bias as it was


@dataclass(frozen=True)
class LayerSpec:
    """One entry of ``cquant.layers``, validated (see :func:`parse_layers`)."""
    name: str
    mode: str
    granularity: str
    group_size: Optional[int]
    shape: Tuple[int, int]
    bias: bool
    layout: str
    kind: str = "linear"
    bits: int = 8

    def key(self, suffix: str) -> str:
        return _prefix(self.name) + suffix

    @property
    def scale_shape(self) -> Tuple[int, ...]:
        n, k = self.shape
        if self.granularity == "per_tensor":
            return (1,)
        if self.granularity == "per_channel":
            return (n,)
        return (n, k // int(self.group_size or 1))


def check_format_version(path: str, meta: Mapping[str, str]) -> None:
    """CheckpointError unless ``meta`` says this is a cquant checkpoint of a version this cquant reads."""
    ver = meta.get(KEY_VERSION)
    if ver is None:
        raise CheckpointError(f"{path}: not a cquant checkpoint (no {KEY_VERSION!r} in its metadata); "
                              "quantize a float checkpoint with `cquant quantize`")
    if ver != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ver[:40]} is not supported "
                              f"(this cquant reads version {FORMAT_VERSION})")


def parse_layers(path: str, meta: Mapping[str, str]) -> Dict[str, LayerSpec]:
    """The ``cquant.layers`` metadata, every field checked: CheckpointError naming the file, the layer
    and the field for anything malformed (not only what would crash: a mode or granularity this
    cquant does not know, a group size that does not divide K, ...)."""
    layers = metadata_json(path, KEY_LAYERS, meta.get(KEY_LAYERS, "{}"))
    if not isinstance(layers, dict):
        raise CheckpointError(f"{path}: metadata {KEY_LAYERS!r} must be a JSON object (layer name -> fields), "
                              f"got {type(layers).__name__}")
    out: Dict[str, LayerSpec] = {}
    for name, lm in layers.items():
        def bad(field_: str, why: str) -> CheckpointError:
            return CheckpointError(f"{path}: metadata {KEY_LAYERS!r}: layer {name!r}: field {field_!r} {why}")
        if not isinstance(lm, dict):
            raise CheckpointError(f"{path}: metadata {KEY_LAYERS!r}: layer {name!r} must be a JSON object, "
                                  f"got {_short(lm)}")
        for f in ("mode", "granularity", "shape", "bias"):
            if f not in lm:
                raise bad(f, "is missing")
        mode, gran, shape, bias = lm["mode"], lm["granularity"], lm["shape"], lm["bias"]
        if mode not in _MODES:
            raise bad("mode", f"is {_short(mode)}; expected one of {list(_MODES)}")
        if gran not in _GRANULARITIES:
            raise bad("granularity", f"is {_short(gran)}; expected one of {list(_GRANULARITIES)}")
        if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) and d > 0 for d in shape):
            raise bad("shape", f"is {_short(shape)}; expected [N, K], two positive integers")
        if not isinstance(bias, bool):
            raise bad("bias", f"is {_short(bias)}; expected true or false")
        n, k = shape
        g = lm.get("group_size")
        if gran == "per_group":
            if not _is_int(g) or g <= 0 or g % 4 or k % g:
                raise bad("group_size", f"is {_short(g)}; per_group needs a positive multiple of 4 that divides K={k}")
        elif g is not None:
            raise bad("group_size", f"is {_short(g)}; only per_group has a group size (null otherwise)")
        layout = lm.get("layout", "out_in")
        if layout not in _LAYOUTS:
            raise bad("layout", f"is {_short(layout)}; expected one of {list(_LAYOUTS)}")
        kind = lm.get("kind", "linear")
        if kind not in _KINDS:
            raise bad("kind", f"is {_short(kind)}; expected one of {list(_KINDS)}")
        if kind == "embedding" and (bias or layout != "out_in"):
            raise bad("kind", "is \"embedding\", which has no bias and is stored (rows, dim) (layout out_in)")
        bits = lm.get("bits", 8)
        if not _is_int(bits) or bits not in (8, 4):
            raise bad("bits", f"is {_short(bits)}; expected 8 or 4")
        if bits == 4 and (kind != "linear" or (gran == "per_group" and (g % 8 or g > 256))):
            raise bad("bits", "is 4, which needs a linear layer and, per group, a group size that is a "
                      f"multiple of 8 up to 256 (group_size {_short(g)})")
        out[name] = LayerSpec(name, mode, gran, g, (n, k), bias, layout, kind, bits)
    return out


def check_layer_tensors(path: str, spec: LayerSpec, info: Mapping[str, Tuple[str, Tuple[int, ...]]]) -> None:
    """The layer's tensors exist with the dtypes and shapes its metadata says (``info``: tensor name
    -> (safetensors dtype code, shape)); checked before any tensor is read."""
    codes = ("U8", (spec.shape[0], (spec.shape[1] + 1) // 2)) if spec.bits == 4 else ("I8", spec.shape)
    want = [("weight_q", (codes[0],), codes[1]), ("weight_scale", ("F32",), spec.scale_shape)]
    if spec.bias:
        want.append(("bias", _BIAS_DTYPES, (spec.shape[0],)))
    if spec.mode == "static":
        want.append(("act_scale", ("F32",), (1,)))
    elif spec.key("act_scale") in info:
        raise CheckpointError(f"{path}: tensor {spec.key('act_scale')!r} is a static activation scale, but layer "
                              f"{spec.name!r} has mode {spec.mode!r} (only \"static\" layers have one)")
    for suffix, dtypes, shape in want:
        key = spec.key(suffix)
        got = info.get(key)
        if got is None:
            raise CheckpointError(f"{path}: layer {spec.name!r} is listed in {KEY_LAYERS!r}"
                                  + (" with \"bias\": true" if suffix == "bias" else "")
                                  + (" with \"mode\": \"static\"" if suffix == "act_scale" else "")
                                  + f" but tensor {key!r} is missing")
        dt, shp = got
        if dt not in dtypes:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {dt}; a cquant checkpoint stores it as "
                                  + " or ".join(dtypes))
        if tuple(shp) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(shp)}; layer {spec.name!r} "
                                  f"({spec.granularity}, shape {list(spec.shape)}) needs {list(shape)}")


def check_layer_values(path: str, spec: LayerSpec, q: np.ndarray, scale: np.ndarray,
                       bias: Optional[np.ndarray], act_scale: Optional[np.ndarray] = None) -> None:
    """Codes in [-127, 127], finite non-negative scales, a finite bias, a finite positive float32
    activation scale (static layers)."""
    if spec.bits == 4:
        if q.size and int(q.min()) < -7:
            raise CheckpointError(f"{path}: tensor {spec.key('weight_q')!r} holds the int4 code -8; codes must "
                                  "be in [-7, 7]")
    elif q.size and int(q.min()) == -128:
        raise CheckpointError(f"{path}: tensor {spec.key('weight_q')!r} holds -128; codes must be in [-127, 127]")
    if not np.isfinite(scale).all() or (scale < 0).any():
        raise CheckpointError(f"{path}: tensor {spec.key('weight_scale')!r} holds NaN, Inf or negative "
                              "scales; scales must be finite and >= 0")
    if bias is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # an F64 bias must fit float32, its run-time dtype
            finite = np.isfinite(np.asarray(bias, dtype=np.float32)).all()
        if not finite:
            raise CheckpointError(f"{path}: tensor {spec.key('bias')!r} holds NaN, Inf or values beyond "
                                  "float32's range")
    if act_scale is not None:
        a = np.asarray(act_scale)
        if a.dtype != np.float32 or a.size != 1 or not np.isfinite(a).all() or not (a > 0).all():
            raise CheckpointError(f"{path}: tensor {spec.key('act_scale')!r} is {_short(a.tolist())} "
                                  f"({a.dtype}); a static activation scale is one finite float32 > 0")


def _reader_array(r: Union[SafetensorsReader, ShardedReader], name: str) -> np.ndarray:
    """A tensor of an open reader as an array of its own (BF16 widened to float32). Its pages of the
    file mapping are handed back once copied (madvise): they stayed resident while the file was open,
    and cquant.load's peak was the whole file beside the packed model (2.3x the model)."""
    t = r.infos[name]
    if t.dtype == "BF16":
        a = bf16_to_f32(r.tensor(name))
    else:
        a = np.array(r.tensor(name), copy=True)
        a = a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in ("=", "|") else a
    r.release(name)
    return a


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read a cquant checkpoint into a :class:`Checkpoint` (no model built). Everything the file says
    is checked against what it holds first: CheckpointError naming the file and the field."""
    p = path_str(path)
    with open_checkpoint(p) as r:
        meta = dict(r.metadata)
        check_format_version(r.path, meta)
        p = r.path
        specs = parse_layers(p, meta)
        info = {name: (t.dtype, t.shape) for name, t in r.infos.items()}
        for spec in specs.values():
            check_layer_tensors(p, spec, info)
        for name, t in r.infos.items():
            if t.dtype not in _ST_TO_NP and t.dtype != "BF16":
                raise CheckpointError(f"{p}: tensor {name!r} has dtype {t.dtype}, which numpy cannot read")
        ck = Checkpoint(metadata=meta)
        used = set()
        # layer by layer: its codes are read, packed and dropped before the next layer's are read
        # (reading every tensor first held the whole file's codes beside their packed copies)
        for name, spec in specs.items():
            keys = [spec.key("weight_q"), spec.key("weight_scale")] + [spec.key("bias")] * spec.bias + \
                [spec.key("act_scale")] * (spec.mode == "static")
            used.update(keys)
            q = _reader_array(r, keys[0])
            if spec.bits == 4:
                q = unpack_int4(q, spec.shape[1])
            s = _reader_array(r, keys[1])
            b = _reader_array(r, spec.key("bias")) if spec.bias else None
            a = _reader_array(r, spec.key("act_scale")) if spec.mode == "static" else None
            check_layer_values(p, spec, q, s, b, a)
            try:
                qw = ops.QuantizedWeight.from_codes(q, s, spec.granularity, spec.group_size, bits=spec.bits)
                ck.layers[name] = QuantizedLinearForward(qw, None if b is None else b.astype(np.float32), spec.mode,
                                                         None if a is None else float(a.reshape(())))
            except errors.QuantizationError as e:
                raise CheckpointError(f"{p}: layer {name!r}: {e}") from None
            del q
            ck.layouts[name] = spec.layout
            if spec.kind != "linear":
                ck.kinds[name] = spec.kind
        arrays = {name: _reader_array(r, name) for name in r.infos if name not in used}
    _read_ties(p, meta, specs, ck, arrays)
    ck.folds = read_folds(p, meta.get(KEY_FOLDS), arrays, {n: s.shape for n, s in specs.items()})
    ck.tensors = arrays
    return ck


def _read_ties(path: str, meta: Mapping[str, str], specs: Mapping[str, "LayerSpec"], ck: "Checkpoint",
               arrays: Mapping[str, np.ndarray]) -> None:
    """``cquant.tied``: each table becomes a layer of ``ck`` sharing its Linear's QuantizedWeight."""
    raw = meta.get(KEY_TIED)
    if raw is None:
        return
    where = f"{path}: metadata {KEY_TIED!r}"
    ties = metadata_json(path, KEY_TIED, raw)
    if not isinstance(ties, dict):
        raise CheckpointError(f"{where} must be a JSON object (embedding table -> Linear layer)")
    for table, target in ties.items():
        if not isinstance(target, str):
            raise CheckpointError(f"{where}: table {table!r} maps to {_short(target)}, not a layer name")
        if table in specs or any(k in arrays for k in (_prefix(table) + "weight_q", _prefix(table) + "weight_scale")):
            raise CheckpointError(f"{where}: table {table!r} also has a layer or tensors of its own")
        spec = specs.get(target)
        if spec is None or target in ties:
            raise CheckpointError(f"{where}: table {table!r} is tied to {target!r}, which is not a layer of the file")
        if spec.kind != "linear" or spec.granularity != "per_channel" or spec.bits != 8:
            raise CheckpointError(f"{where}: table {table!r} is tied to {target!r}, which is not a per_channel int8 "
                                  "linear layer (a table shares only per-row int8 codes)")
        ck.layers[table] = QuantizedLinearForward(ck.layers[target].qweight, None, "weight_only")
        ck.layouts[table] = "out_in"
        ck.kinds[table] = "embedding"
        ck.tied[table] = target


# --------------------------------------------------------------------------------------------------
# Models that rebuild themselves: an explicit registry (nothing is imported by a name from a file)
# --------------------------------------------------------------------------------------------------

ConfigCheck = Callable[[str, Dict[str, Any], "Checkpoint"], None]
# "module:QualName" as `cquant.save` writes it -> (a function returning the class, config check)
_LOADABLE: Dict[str, Tuple[Callable[[], type], Optional[ConfigCheck]]] = {}


def register_loadable(cls: type, check: Optional[ConfigCheck] = None) -> type:
    """Allow ``cquant.load`` to rebuild models of class ``cls`` (which has ``cquant_config()`` and a
    classmethod ``from_cquant_config(config)``) from a checkpoint's ``cquant.model`` metadata. Only
    registered classes are ever built; a file cannot name anything else.

    ``check(path, config, checkpoint)`` should raise :class:`CheckpointError` when the config does
    not fit the tensors the file holds (e.g. a vocabulary larger than its embedding table): it runs
    before ``from_cquant_config`` allocates anything. Without one, ``from_cquant_config`` must bound
    its own allocations. Usable as a decorator; returns ``cls``."""
    if not isinstance(cls, type) or not callable(getattr(cls, "from_cquant_config", None)):
        raise errors.TypeError(f"register_loadable needs a class with from_cquant_config, got {cls!r}")
    _LOADABLE[f"{cls.__module__}:{cls.__qualname__}"] = (lambda: cls, check)
    return cls


def _bert_class() -> type:
    return BertModel


def _shape_in(ck: "Checkpoint", name: str) -> Optional[Tuple[int, ...]]:
    """(rows, cols) of the Linear or Embedding ``name`` as the checkpoint holds it (quantized layer,
    float weight or int8 table; also under ``name.linear``, where a smoothed layer keeps it)."""
    for n in (name, name + ".linear"):
        if n in ck.layers:
            return tuple(ck.layers[n].qweight.shape)
        for suffix in (".weight", ".weight_q"):
            t = ck.tensors.get(n + suffix)
            if t is not None:
                return tuple(t.shape)
    return None


def _check_bert_config(path: str, cfg: Dict[str, Any], ck: "Checkpoint") -> None:
    """A BertModel config must describe the tensors in the file: every size in it is read off a
    tensor before the model (zero-filled float32 tables, sized by the config) is allocated."""
    where = f"{path}: metadata {KEY_MODEL!r}: config"
    defaults = {f.name: getattr(BertConfig(), f.name) for f in fields(BertConfig)}
    c = {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size"):
        if not _is_int(c[f]) or c[f] < (0 if f == "num_hidden_layers" else 1):
            raise CheckpointError(f"{where} field {f!r} is {_short(c[f])}; expected a positive integer")
    if not isinstance(c["add_pooling_layer"], bool):
        raise CheckpointError(f"{where} field 'add_pooling_layer' is {_short(c['add_pooling_layer'])}; expected true/false")
    h = c["hidden_size"]
    if h % c["num_attention_heads"]:
        raise CheckpointError(f"{where} field 'num_attention_heads' is {c['num_attention_heads']}, which does not "
                              f"divide hidden_size {h}")
    if c["hidden_act"] not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{where} field 'hidden_act' is {_short(c['hidden_act'])}; BertModel runs \"gelu\", "
                              "\"gelu_new\" or \"gelu_pytorch_tanh\"")
    eps = c["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < float("inf")):
        raise CheckpointError(f"{where} field 'layer_norm_eps' is {_short(eps)}; expected a finite number >= 0")

    def need(tensor: str, shape: Tuple[int, int], fields_: str) -> None:
        got = _shape_in(ck, tensor)
        if got != shape:
            raise CheckpointError(f"{where} fields {fields_} say {tensor!r} is {list(shape)}, the file holds "
                                  + ("no such tensor" if got is None else f"{list(got)}"))

    need("embeddings.word_embeddings", (c["vocab_size"], h), "'vocab_size', 'hidden_size'")
    need("embeddings.position_embeddings", (c["max_position_embeddings"], h), "'max_position_embeddings', 'hidden_size'")
    need("embeddings.token_type_embeddings", (c["type_vocab_size"], h), "'type_vocab_size', 'hidden_size'")
    for i in range(c["num_hidden_layers"]):  # stops at the first layer the file does not hold
        need(f"encoder.layer.{i}.intermediate.dense", (c["intermediate_size"], h),
             "'num_hidden_layers', 'intermediate_size'")
    for f in ("smoothed", "quantized_embeddings", "residual_scaled"):
        names = cfg.get(f, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and _safe_path(n) for n in names):
            raise CheckpointError(f"{where} field {f!r} must be a list of module names")


_LOADABLE["cquant.bert:BertModel"] = (_bert_class, _check_bert_config)


def _safe_path(name: str) -> bool:
    return all(part and not part.startswith("_") for part in name.split("."))


def _rebuild(ck: Checkpoint, path: str) -> Any:
    where = f"{path}: metadata {KEY_MODEL!r}"
    spec = metadata_json(path, KEY_MODEL, ck.metadata[KEY_MODEL])
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise CheckpointError(f"{where} must be a JSON object with a \"class\" string")
    cfg = spec.get("config", {})
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: field 'config' must be a JSON object, got {_short(cfg)}")
    entry = _LOADABLE.get(spec["class"])
    if entry is None:
        raise CheckpointError(
            f"{where}: field 'class' names {_short(spec['class'])}, which is not a class cquant.load may "
            f"build (registered: {', '.join(sorted(_LOADABLE))}); build the model yourself and call "
            "cquant.load_into(model, path), or cquant.load(path, build=False)")
    get_cls, check = entry
    cls = get_cls()
    if check is not None:
        check(path, cfg, ck)
    try:
        model = cls.from_cquant_config(cfg)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the config did wrong, it is the file's fault
        raise CheckpointError(f"{where}: field 'config' does not build a {cls.__name__}: "
                              f"{type(e).__name__}: {e}") from None
    try:
        load_into(model, ck)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except errors.QuantizationError as e:
        raise CheckpointError(f"{path}: the tensors do not fit the {cls.__name__} its config builds: {e}") from None
    return model


def load(path: PathLike, build: bool = True) -> Any:
    """Read a cquant checkpoint.

    Returns the rebuilt :mod:`cquant.nn` model (quantized layers in place, ready to run) when the file
    names a cquant model class (``cquant.model`` metadata) and ``build`` is true; otherwise a
    :class:`Checkpoint` (quantized layers as callables + the other tensors) to install with
    :func:`load_into`. Needs only numpy (no torch, no float32 weights).

    Only classes in the registry (:func:`register_loadable`; :class:`cquant.bert.BertModel` is
    built in) are rebuilt, and only after their config was checked against the tensors in the file;
    every problem with the file is a :class:`CheckpointError` naming the file and the field.
    """
    ck = read_checkpoint(path)
    if build and KEY_MODEL in ck.metadata:
        return _rebuild(ck, path_str(path))
    return ck


# --------------------------------------------------------------------------------------------------
# Installing a checkpoint into a model
# --------------------------------------------------------------------------------------------------

def load_into(model: Any, path_or_checkpoint: Union[PathLike, Checkpoint], strict: bool = True) -> Any:
    """Install a checkpoint's quantized layers (and its other tensors) into ``model``; returns it.

    - :mod:`cquant.nn` model: each named ``Linear`` becomes a ``QuantizedLinear``; the other tensors
      are loaded with ``load_state_dict``. ``strict``: the keys must match exactly.
    - torch model: each named ``nn.Linear``/``Conv1D`` becomes a ``QuantizedTorchLinear``; the other
      tensors are copied into its parameters and buffers.
    - other (duck-typed) models: each named layer object (reached through list/tuple items, dict
      keys and its own attributes; private and dunder names are refused) gets the quantized
      ``forward``, after every layer was found and its (out, in) shape checked.
    Raises :class:`CheckpointError` naming the first layer that does not fit (the model is unchanged).
    """
    if isinstance(path_or_checkpoint, Checkpoint):
        ck, where = path_or_checkpoint, ""
    else:
        ck, where = read_checkpoint(path_or_checkpoint), path_str(path_or_checkpoint)
    try:
        model = fe.for_model(model).install(model, ck, strict)
        set_folds(model, ck.folds)
        return model
    except CheckpointError as e:
        if where and not str(e).startswith(where):
            raise CheckpointError(f"{where}: {e}") from None
        raise
