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
import math
import mmap
import os
import stat
import struct
import tempfile
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import errors, ops

__all__ = ["save", "load", "load_into", "Checkpoint", "FORMAT_VERSION", "SafetensorsReader",
           "StreamWriter", "CheckpointError", "atomic_path", "register_loadable", "LayerSpec",
           "parse_layers", "check_format_version", "check_layer_tensors", "check_layer_values",
           "ShardedReader", "open_checkpoint", "resolve_checkpoint", "INDEX_SUFFIX"]

FORMAT_VERSION = "1"
KEY_VERSION = "cquant.format_version"
KEY_LAYERS = "cquant.layers"
KEY_MODEL = "cquant.model"
KEY_CQ_VERSION = "cquant.version"
KEY_TIED = "cquant.tied"  # {embedding table: the Linear layer whose per_channel int8 codes it shares}

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(errors.ValueError):
    """A file that is not a (valid, complete) safetensors / cquant checkpoint, or one that does not fit
    the model it is loaded into."""


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------

_ST_TO_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
             "U8": np.uint8, "BOOL": np.bool_}
_ST_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
            "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_NP_TO_ST = {np.dtype(v).str: k for k, v in _ST_TO_NP.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def st_dtype(a: np.ndarray) -> str:
    code = _NP_TO_ST.get(a.dtype.newbyteorder("<").str if a.dtype.byteorder == ">" else a.dtype.str)
    if code is None:
        raise CheckpointError(f"dtype {a.dtype} cannot be stored in a safetensors file")
    return code


def _short(v: Any, limit: int = 60) -> str:
    """repr of a (possibly huge or hostile) JSON value, cut to ``limit`` characters."""
    try:
        r = repr(v)
    except RecursionError:
        return "<deeply nested value>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


class BF16Bits(np.ndarray):
    """A uint16 array holding bfloat16 bit patterns, written as ``BF16`` (numpy has no bfloat16)."""

    @classmethod
    def wrap(cls, bits: np.ndarray) -> "BF16Bits":
        if bits.dtype != np.uint16:
            raise errors.TypeError(f"bfloat16 bits must be uint16, got {bits.dtype}")
        return bits.view(cls)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16 array) -> float32 (exact)."""
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------------------
# Streaming reader / writer (used by the CLI)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors code, e.g. "F32"
    shape: Tuple[int, ...]
    begin: int          # offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _open_regular(path: str) -> Any:
    """Open ``path`` for reading as a binary file object, refusing anything that is not a regular
    file: a FIFO would block ``open()`` forever (no writer), a device could be endless. The file is
    opened non-blocking first (which cannot block on a FIFO) and checked with ``fstat``, so nothing
    can swap the file in between."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{path}: is a directory, not a safetensors file")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device); "
                                  "give the path of a .safetensors file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float (8.7 or 8.0 is no dimension)


def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {k!r}")
        out[k] = v
    return out


_MAX_DIMS = 32          # numpy's limit before 2.0 (64 since)
_MAX_ARRAY_BYTES = 2**62  # numpy refuses an array whose (non-zero) dimensions multiply past ~2**63 bytes


class SafetensorsReader:
    """Validates a safetensors header and hands out tensors as zero-copy views of a read-only map.

    ``tensor(name)`` is a numpy view (BF16 comes back as uint16 bits; see :func:`bf16_to_f32`);
    ``release(name)`` drops that tensor's pages from this process (they stay in the OS page cache).
    Raises :class:`CheckpointError` for a missing, non-regular, non-safetensors or truncated file,
    and for a header that lies: dtypes, shapes (integers, Python arithmetic: no wrap-around) and
    offsets are checked, and the tensors must cover the data section exactly once (no gap, no
    overlap, nothing after the last one), as the safetensors format requires.
    """

    MAX_HEADER = 100 * 2**20

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self._mm = None
        self._f = _open_regular(self.path)
        try:
            self._parse()
        except Exception:
            self._f.close()
            raise

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file ({what})")

    def _parse(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen < 2 or hlen > self.MAX_HEADER:
            raise CheckpointError(f"{self.path}: not a safetensors file (bad header length {hlen})")
        if 8 + hlen > size:
            raise CheckpointError(f"{self.path}: truncated file (header needs {8 + hlen} bytes, file has {size})")
        raw = self._f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except CheckpointError as e:
            raise self._bad(f"header: {e}") from None
        except (UnicodeDecodeError, ValueError):  # JSONDecodeError, and ints of > 4300 digits
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        except RecursionError:
            raise self._bad("header nests too deeply") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{self.path}: bad __metadata__ (must map strings to strings)")
        self.metadata: Dict[str, str] = dict(meta)
        self.data_start = 8 + hlen
        data_size = size - self.data_start
        infos: List[TensorInfo] = []
        for name, e in header.items():
            if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
                raise self._bad(f"tensor {name!r}: an entry needs dtype, shape and data_offsets")
            dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(dt, str) or dt not in _ST_SIZE:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown dtype {dt!r}")
            if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_int(s) and s >= 0 for s in shape):
                raise self._bad(f"tensor {name!r}: shape {_short(shape)} is not a list of at most "
                                f"{_MAX_DIMS} non-negative integers")
            if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
                raise self._bad(f"tensor {name!r}: data_offsets {_short(offs)} is not two integers")
            b, en = offs
            nbytes = math.prod(shape) * _ST_SIZE[dt]  # Python ints: no wrap-around
            if math.prod(s for s in shape if s) * _ST_SIZE[dt] > _MAX_ARRAY_BYTES:
                raise self._bad(f"tensor {name!r}: shape {shape} is too large for any array")
            if b < 0 or en < b or en - b != nbytes:
                raise CheckpointError(f"{self.path}: tensor {name!r}: offsets {b}..{en} do not match "
                                      f"{dt} {shape} ({nbytes} bytes)")
            if en > data_size:
                raise CheckpointError(f"{self.path}: truncated file (tensor {name!r} ends at byte "
                                      f"{self.data_start + en}, file has {size})")
            infos.append(TensorInfo(name, dt, tuple(shape), b, en))
        infos.sort(key=lambda t: (t.begin, t.end))
        pos, prev = 0, None
        for t in infos:  # the tensors tile the data section: each byte belongs to exactly one
            if t.begin < pos:
                raise self._bad(f"tensor {t.name!r} (bytes {t.begin}..{t.end}) overlaps {prev!r}")
            if t.begin > pos:
                raise self._bad(f"bytes {pos}..{t.begin} of the data section belong to no tensor "
                                f"(before {t.name!r})")
            if t.end > t.begin:
                pos, prev = t.end, t.name
        if pos != data_size:
            raise self._bad(f"{data_size - pos} byte(s) after the last tensor belong to no tensor")
        self.infos: Dict[str, TensorInfo] = {t.name: t for t in infos}
        self.size = size
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> List[str]:
        """Tensor names in file order."""
        return list(self.infos)

    def tensor(self, name: str) -> np.ndarray:
        t = self.infos[name]
        dt = np.uint16 if t.dtype == "BF16" else _ST_TO_NP.get(t.dtype)
        if dt is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {t.dtype}, which numpy cannot read")
        n = t.nbytes // np.dtype(dt).itemsize
        if n == 0:
            return np.zeros(t.shape, dtype=dt)
        a = np.frombuffer(self._mm, dtype=np.dtype(dt).newbyteorder("<"), count=n,
                          offset=self.data_start + t.begin)
        return a.reshape(t.shape)

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32 (zero-copy for F32; converted for F16/BF16/F64)."""
        t = self.infos[name]
        a = self.tensor(name)
        if t.dtype == "BF16":
            return bf16_to_f32(a)
        return a if t.dtype == "F32" else a.astype(np.float32)

    def raw(self, name: str, chunk: int = 16 * 2**20) -> Iterable[memoryview]:
        """The bytes of a tensor, in chunks (views into the map)."""
        t = self.infos[name]
        mv = memoryview(self._mm) if self._mm is not None else memoryview(b"")
        start = self.data_start + t.begin
        for off in range(0, t.nbytes, chunk):
            yield mv[start + off:start + min(t.nbytes, off + chunk)]
            self._drop(start + off, min(chunk, t.nbytes - off))

    def release(self, name: str) -> None:
        t = self.infos[name]
        self._drop(self.data_start + t.begin, t.nbytes)

    def _drop(self, start: int, length: int) -> None:
        if self._mm is None or length <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        a = (start // page) * page
        b = min(self.size, start + length)
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):  # pragma: no cover - best effort
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the map goes with it
                pass
            self._mm = None
        self._f.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints: NAME.safetensors.index.json + shards (the Hugging Face layout)
# --------------------------------------------------------------------------------------------------

#: ``model.safetensors.index.json``: ``{"metadata": {...}, "weight_map": {tensor: shard file}}``
INDEX_SUFFIX = ".index.json"
#: what a model folder is searched for, in this order (``cquant-model.*``: ``cquant.save_pretrained``)
CHECKPOINT_NAMES = ("model.safetensors", "model.safetensors.index.json", "cquant-model.safetensors",
                    "cquant-model.safetensors.index.json")
_MAX_INDEX = 64 * 2**20


def resolve_checkpoint(path: PathLike) -> str:
    """The file to open for ``path``: ``path`` itself, or for a model folder the first of
    :data:`CHECKPOINT_NAMES` it holds. CheckpointError for a folder holding none of them."""
    p = os.fspath(path)
    if os.path.isdir(p):
        for n in CHECKPOINT_NAMES:
            c = os.path.join(p, n)
            if os.path.lexists(c):
                return c
        raise CheckpointError(f"{p}: is a directory holding no {' or '.join(CHECKPOINT_NAMES[:2])}; "
                              "give a .safetensors file or a sharded checkpoint's .index.json")
    return p


def is_index_path(path: PathLike) -> bool:
    return os.fspath(path).endswith(INDEX_SUFFIX)


def _shard_name_ok(name: str) -> bool:
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and name.endswith(".safetensors"))


class ShardedReader:
    """A sharded checkpoint (``*.safetensors.index.json`` and the shard files next to it) read through
    one :class:`SafetensorsReader` per shard, with the same interface: ``infos`` (every tensor of
    every shard), ``metadata`` (the shards' metadata merged: ``cquant.layers`` is the union of the
    shards' layers), ``tensor``/``float32``/``raw``/``release``/``close``; ``size`` is the total of
    the shard files, ``files`` their paths.

    The index is checked like a header: a JSON object (no duplicate keys) whose ``weight_map`` maps
    tensor names to plain file names ending in ``.safetensors`` in the index's folder (no path, no
    ``..``); every tensor it lists must be in the shard it names and every tensor of a shard must be
    listed there (so no tensor is in two shards); shards must agree on the cquant format version.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self._readers: List[SafetensorsReader] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid sharded checkpoint index ({what})")

    def _open(self) -> None:
        with _open_regular(self.path) as f:
            raw = f.read(_MAX_INDEX + 1)
        if len(raw) > _MAX_INDEX:
            raise self._bad(f"larger than {_MAX_INDEX // 2**20} MiB")
        try:
            index = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except CheckpointError as e:
            raise self._bad(str(e)) from None
        except (UnicodeDecodeError, ValueError):
            raise self._bad("not JSON") from None
        except RecursionError:
            raise self._bad("nests too deeply") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise self._bad("no \"weight_map\" object")
        wmap: Dict[str, Any] = index["weight_map"]
        for name, shard in wmap.items():
            if not isinstance(shard, str) or not _shard_name_ok(shard):
                raise self._bad(f"tensor {_short(name)} maps to {_short(shard)}, not the file name of a "
                                ".safetensors shard in the index's folder")
        imeta = index.get("metadata", {})
        if imeta is None:
            imeta = {}
        if not isinstance(imeta, dict):
            raise self._bad("\"metadata\" is not an object")
        folder = os.path.dirname(self.path)
        shards = sorted(set(wmap.values()))
        self.files = [os.path.join(folder, s) for s in shards]
        self.infos: Dict[str, TensorInfo] = {}
        self._owner: Dict[str, SafetensorsReader] = {}
        for shard, fpath in zip(shards, self.files):
            r = SafetensorsReader(fpath)
            self._readers.append(r)
            for name, t in r.infos.items():
                if wmap.get(name) != shard:
                    raise CheckpointError(f"{fpath}: tensor {name!r} is not listed for this shard in {self.path}"
                                          + (f" (listed in {wmap[name]})" if name in wmap else ""))
                self.infos[name] = t
                self._owner[name] = r
        for name, shard in wmap.items():
            if name not in self._owner:
                raise CheckpointError(f"{self.path}: tensor {_short(name)} is listed in {shard} but that "
                                      "shard does not hold it")
        # the shards' own metadata is the truth about what they hold: cquant keys of the index are ignored
        self.metadata = self._merge_metadata({k: v for k, v in imeta.items()
                                              if isinstance(k, str) and isinstance(v, str) and not k.startswith("cquant.")})
        self.size = sum(r.size for r in self._readers)

    def _merge_metadata(self, meta: Dict[str, str]) -> Dict[str, str]:
        versions = {r.path: r.metadata.get(KEY_VERSION) for r in self._readers}
        if len(set(versions.values())) > 1:
            desc = ", ".join(f"{os.path.basename(p)}: {v or 'not cquant'}" for p, v in versions.items())
            raise CheckpointError(f"{self.path}: the shards disagree on the cquant format version ({desc[:300]})")
        layers: Dict[str, Any] = {}
        for r in self._readers:
            for k, v in r.metadata.items():
                if k != KEY_LAYERS:
                    meta.setdefault(k, v)
            if KEY_LAYERS in r.metadata:
                try:
                    part = json.loads(r.metadata[KEY_LAYERS], object_pairs_hook=_no_duplicate_keys)
                except CheckpointError as e:
                    raise CheckpointError(f"{r.path}: metadata {KEY_LAYERS!r}: {e}") from None
                except (ValueError, RecursionError):
                    raise CheckpointError(f"{r.path}: metadata {KEY_LAYERS!r} is not valid JSON") from None
                if not isinstance(part, dict):
                    raise CheckpointError(f"{r.path}: metadata {KEY_LAYERS!r} must be a JSON object")
                for name, spec in part.items():
                    if name in layers:
                        raise CheckpointError(f"{self.path}: layer {name!r} is listed by two shards")
                    layers[name] = spec
        if any(KEY_LAYERS in r.metadata for r in self._readers):
            meta[KEY_LAYERS] = json.dumps(layers, separators=(",", ":"))
        else:
            meta.pop(KEY_LAYERS, None)
        return meta

    def keys(self) -> List[str]:
        return list(self.infos)

    def tensor(self, name: str) -> np.ndarray:
        return self._owner[name].tensor(name)

    def float32(self, name: str) -> np.ndarray:
        return self._owner[name].float32(name)

    def raw(self, name: str, chunk: int = 16 * 2**20) -> Iterable[memoryview]:
        return self._owner[name].raw(name, chunk)

    def release(self, name: str) -> None:
        self._owner[name].release(name)

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []

    def __enter__(self) -> "ShardedReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(path: PathLike) -> Union[SafetensorsReader, ShardedReader]:
    """A reader for a .safetensors file, a sharded checkpoint's ``.index.json``, or a model folder
    holding either (:func:`resolve_checkpoint`)."""
    p = resolve_checkpoint(path)
    return ShardedReader(p) if is_index_path(p) else SafetensorsReader(p)


class StreamWriter:
    """Writes a safetensors file whose tensor list (names, dtypes, shapes) is known up front, one
    tensor at a time, so nothing but the tensor being written is in memory.

    ``entries``: ``[(name, dtype code, shape)]`` in the order they will be written. Call
    :meth:`write` once per entry, in that order, with an array (or bytes chunks), then :meth:`close`.
    """

    def __init__(self, f: Any, entries: Sequence[Tuple[str, str, Tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.f = f
        header: Dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self._expect: List[Tuple[str, int]] = []
        for name, dt, shape in entries:
            nb = math.prod(int(d) for d in shape) * _ST_SIZE[dt]
            header[name] = {"dtype": dt, "shape": [int(s) for s in shape], "data_offsets": [off, off + nb]}
            self._expect.append((name, nb))
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        self._i = 0

    def write(self, name: str, data: Union[np.ndarray, Iterable[Union[bytes, memoryview]]]) -> None:
        exp_name, nb = self._expect[self._i]
        if name != exp_name:
            raise CheckpointError(f"internal: expected tensor {exp_name!r}, got {name!r}")
        if isinstance(data, np.ndarray):
            arr = np.ascontiguousarray(data)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            chunks: Iterable[Any] = [memoryview(arr).cast("B")] if arr.nbytes else []
        else:
            chunks = data
        written = 0
        for c in chunks:
            self.f.write(c)
            written += len(c) if not isinstance(c, memoryview) else c.nbytes
        if written != nb:
            raise CheckpointError(f"internal: tensor {name!r} wrote {written} bytes, expected {nb}")
        self._i += 1

    def close(self) -> None:
        if self._i != len(self._expect):
            raise CheckpointError(f"internal: {len(self._expect) - self._i} tensor(s) not written")


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


class atomic_path:
    """Context manager: yields a temporary path next to ``path``; on success renames it over ``path``,
    on any failure (including the rename itself) removes it, so no partial or temporary file is ever
    left behind. The file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), or the
    mode of the file it replaces, not ``mkstemp``'s 0600. Refuses a ``path`` that is a directory or another non-regular file (a FIFO, a
    device: renaming over ``/dev/null`` would replace the device). A symbolic link is followed: the
    file it points to is replaced, the link stays. Errors name ``path``, never the temporary file."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self.tmp: Optional[str] = None

    def __enter__(self) -> str:
        target = os.path.realpath(self.path)
        try:
            st: Optional[os.stat_result] = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot write ({e.strerror or e})") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{self.path}: is a directory; name the file to write")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{self.path}: exists and is not a regular file (a FIFO, socket or "
                                  "device); refusing to replace it")
        d = os.path.dirname(target)
        if not os.path.isdir(d):
            raise CheckpointError(f"{self.path}: directory {os.path.dirname(os.path.abspath(self.path))} "
                                  "does not exist")
        try:
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=d)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot write in {d} ({e.strerror or e})") from None
        try:  # mkstemp creates 0600: give the file the mode a plain open() would (or the replaced file's)
            os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        except (OSError, AttributeError):  # pragma: no cover - e.g. a filesystem without modes
            pass
        os.close(fd)
        self.tmp, self.target = tmp, target
        return tmp

    def _remove_tmp(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            try:
                os.replace(self.tmp, self.target)
            except OSError as e:
                self._remove_tmp()
                raise CheckpointError(f"{self.path}: cannot write ({e.strerror or e})") from None
            self.tmp = None
            return
        tmp = self.tmp
        self._remove_tmp()
        if isinstance(ev, OSError) and tmp is not None and ev.filename == tmp:  # name the user's path
            raise CheckpointError(f"{self.path}: cannot write ({ev.strerror or ev})") from None


# --------------------------------------------------------------------------------------------------
# Checkpoints in memory
# --------------------------------------------------------------------------------------------------

def _layer_meta(mode: str, qw: ops.QuantizedWeight, has_bias: bool, layout: str = "out_in") -> Dict[str, Any]:
    meta = {"mode": mode, "granularity": qw.granularity, "group_size": qw.group_size,
            "shape": [int(qw.shape[0]), int(qw.shape[1])], "bias": bool(has_bias), "layout": layout}
    if qw.bits != 8:
        meta["bits"] = qw.bits
    return meta


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 codes (N, K) in [-7, 7] -> uint8 (N, ceil(K/2)): k = 2i in the low nibble of byte i, k =
    2i + 1 in the high one (the checkpoint layout; the kernels' packed format is another)."""
    n, k = q.shape
    u = (q.astype(np.uint8) & 15)
    if k % 2:
        u = np.concatenate([u, np.zeros((n, 1), np.uint8)], axis=1)
    return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_int4(b: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 codes (N, k) in [-8, 7] (-8 is refused by the caller)."""
    b = np.asarray(b, dtype=np.uint8)
    q = np.empty((b.shape[0], 2 * b.shape[1]), dtype=np.int8)
    q[:, 0::2] = (((b & 15) ^ 8).astype(np.int16) - 8).astype(np.int8)
    q[:, 1::2] = (((b >> 4) ^ 8).astype(np.int16) - 8).astype(np.int8)
    return np.ascontiguousarray(q[:, :k])


def _stored_codes(qw: ops.QuantizedWeight) -> np.ndarray:
    """``weight_q`` as a checkpoint stores it: int8 codes, or int4 codes two per byte."""
    return pack_int4(qw.q) if qw.bits == 4 else qw.q


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


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


def _collect(obj: Any) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(tensors, layer metadata, model metadata) of a model or state mapping."""
    from . import nn
    from .adapters import is_torch_module
    from .quantization import QuantizedLinear, QuantizedLinearForward

    tensors: Dict[str, np.ndarray] = {}
    layers: Dict[str, Dict[str, Any]] = {}
    model_meta = None

    def add_layer(name: str, qf: Any, layout: str = "out_in") -> None:
        p = _prefix(name)
        tensors[p + "weight_q"] = _stored_codes(qf.qweight)
        tensors[p + "weight_scale"] = qf.qweight.scale
        if qf.bias is not None:
            tensors[p + "bias"] = np.ascontiguousarray(qf.bias, dtype=np.float32)
        if getattr(qf, "act_scale", None) is not None:
            tensors[p + "act_scale"] = np.array([qf.act_scale], dtype=np.float32)
        layers[name] = _layer_meta(qf.mode, qf.qweight, qf.bias is not None, layout)

    if is_torch_module(obj):
        import torch
        from .adapters.torch import QuantizedTorchLinear
        for k, v in obj.state_dict().items():  # bfloat16 (no numpy dtype) is stored as BF16 bits
            v = v.detach().cpu().contiguous()
            tensors[k] = (BF16Bits.wrap(v.view(torch.int16).numpy().view(np.uint16))
                          if v.dtype == torch.bfloat16 else v.numpy())
        for name, m in obj.named_modules():  # after the state_dict: codes, f32 scales and an f32 bias
            if isinstance(m, QuantizedTorchLinear):
                add_layer(name, m.qforward, "in_out" if m.source == "Conv1D" else "out_in")
    elif isinstance(obj, nn.Module):
        for name, m in obj.named_modules():
            if isinstance(m, QuantizedLinear):
                layers[name] = _layer_meta(m.mode, m.qweight, m.bias is not None)
        for k, v in obj.state_dict().items():
            tensors[k] = v
        for name, m in obj.named_modules():  # int4 codes: two per byte in the file
            if isinstance(m, QuantizedLinear) and m.qweight.bits == 4:
                tensors[_prefix(name) + "weight_q"] = _stored_codes(m.qweight)
        cfg = getattr(obj, "cquant_config", None)
        if callable(cfg) and hasattr(type(obj), "from_cquant_config"):
            model_meta = {"class": f"{type(obj).__module__}:{type(obj).__qualname__}", "config": cfg()}
    elif isinstance(obj, Mapping) and all(
            isinstance(v, (np.ndarray, QuantizedLinear, QuantizedLinearForward)) or np.isscalar(v)
            for v in obj.values()):  # a state mapping (else: a duck-typed model held in a dict)
        for k, v in obj.items():
            if isinstance(v, (QuantizedLinear, QuantizedLinearForward)):
                add_layer(str(k), v)
            elif isinstance(v, np.ndarray) or np.isscalar(v):
                tensors[str(k)] = np.asarray(v)
            else:
                raise errors.TypeError(f"cannot save {k!r}: {type(v).__name__} is neither an array nor a quantized layer")
    else:  # a duck-typed model quantized by cquant.Quantizer: its quantized layers
        from .quantization import _quantized_forward_of, _walk
        for path, o, _site, revisit in _walk(obj, stop=lambda o: _quantized_forward_of(o) is not None):
            qf = _quantized_forward_of(o)
            if qf is not None and not revisit:
                add_layer(path, qf)
        if not layers:
            raise errors.TypeError(f"nothing to save: {type(obj).__name__} is not a cquant.nn module, a torch "
                                   "module, a mapping, nor a model with quantized layers")
    return tensors, layers, model_meta


def _embedding_layers(obj: Any, tensors: Dict[str, np.ndarray], layers: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """The int8 embedding tables of a :mod:`cquant.nn` or torch model: a ``"kind": "embedding"`` entry
    in ``layers`` for each (its codes and scales are in ``tensors``, from the ``state_dict``), except a
    table tied to a quantized Linear of the model, which is not stored: returned as ``{table: linear}``
    (``cquant.tied``). A tied table whose Linear is not in the model is stored with codes of its own."""
    from . import nn
    from .adapters import is_torch_module
    from .embedding import QuantizedEmbedding
    if is_torch_module(obj):
        from .adapters.torch_embedding import QuantizedTorchEmbedding
        cls: type = QuantizedTorchEmbedding
    elif isinstance(obj, nn.Module):
        cls = QuantizedEmbedding
    else:
        return {}
    mods = list(obj.named_modules())
    name_of = {id(m): n for n, m in mods}
    ties: Dict[str, str] = {}
    for name, m in mods:
        if not isinstance(m, cls):
            continue
        qw = m.qweight
        tie = m.tied_to
        if tie is not None:
            target = name_of.get(id(tie))
            if target is not None and target in layers and layers[target].get("kind", "linear") == "linear" \
                    and name not in layers:
                ties[name] = target
                continue
            p = _prefix(name)
            tensors[p + "weight_q"] = qw.q
            tensors[p + "weight_scale"] = qw.scale
        layers[name] = {**_layer_meta("weight_only", qw, False), "kind": "embedding"}
    return ties


def save(obj: Any, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a quantized model (cquant.nn, torch via the adapter, duck-typed) or a mapping
    ``name -> array | quantized layer`` to ``path`` as a cquant checkpoint (see the module docstring
    for the layout). The file is written to a temporary name and renamed: never left half-written."""
    tensors, layers, model_meta = _collect(obj)
    ties = _embedding_layers(obj, tensors, layers)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if ties:
        meta[KEY_TIED] = json.dumps(ties, separators=(",", ":"))
    meta[KEY_VERSION] = FORMAT_VERSION
    from . import __version__
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
    raw = meta.get(KEY_LAYERS, "{}")
    try:
        layers = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: metadata {KEY_LAYERS!r} is not valid JSON") from None
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
    if bias is not None and not np.isfinite(bias).all():
        raise CheckpointError(f"{path}: tensor {spec.key('bias')!r} holds NaN or Inf")
    if act_scale is not None:
        a = np.asarray(act_scale)
        if a.dtype != np.float32 or a.size != 1 or not np.isfinite(a).all() or not (a > 0).all():
            raise CheckpointError(f"{path}: tensor {spec.key('act_scale')!r} is {_short(a.tolist())} "
                                  f"({a.dtype}); a static activation scale is one finite float32 > 0")


def _reader_array(r: Union[SafetensorsReader, ShardedReader], name: str) -> np.ndarray:
    """A tensor of an open reader as an array of its own (BF16 widened to float32)."""
    t = r.infos[name]
    if t.dtype == "BF16":
        return bf16_to_f32(r.tensor(name))
    a = np.array(r.tensor(name), copy=True)
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in ("=", "|") else a


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read a cquant checkpoint into a :class:`Checkpoint` (no model built). Everything the file says
    is checked against what it holds first: CheckpointError naming the file and the field."""
    from .quantization import QuantizedLinearForward
    p = os.fspath(path)
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
        arrays = {name: _reader_array(r, name) for name in r.infos}
    ck = Checkpoint(metadata=meta)
    for name, spec in specs.items():
        q = arrays.pop(spec.key("weight_q"))
        if spec.bits == 4:
            q = unpack_int4(q, spec.shape[1])
        s = arrays.pop(spec.key("weight_scale"))
        b = arrays.pop(spec.key("bias")) if spec.bias else None
        a = arrays.pop(spec.key("act_scale")) if spec.mode == "static" else None
        check_layer_values(p, spec, q, s, b, a)
        try:
            qw = ops.QuantizedWeight.from_codes(q, s, spec.granularity, spec.group_size, bits=spec.bits)
            ck.layers[name] = QuantizedLinearForward(qw, None if b is None else b.astype(np.float32), spec.mode,
                                                     None if a is None else float(a.reshape(())))
        except errors.QuantizationError as e:
            raise CheckpointError(f"{p}: layer {name!r}: {e}") from None
        ck.layouts[name] = spec.layout
        if spec.kind != "linear":
            ck.kinds[name] = spec.kind
    _read_ties(p, meta, specs, ck, arrays)
    ck.tensors = arrays
    return ck


def _read_ties(path: str, meta: Mapping[str, str], specs: Mapping[str, "LayerSpec"], ck: "Checkpoint",
               arrays: Mapping[str, np.ndarray]) -> None:
    """``cquant.tied``: each table becomes a layer of ``ck`` sharing its Linear's QuantizedWeight."""
    from .quantization import QuantizedLinearForward
    raw = meta.get(KEY_TIED)
    if raw is None:
        return
    where = f"{path}: metadata {KEY_TIED!r}"
    try:
        ties = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where} is not valid JSON") from None
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
    from .bert import BertModel
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
    from dataclasses import fields as dc_fields
    from .bert import BertConfig
    where = f"{path}: metadata {KEY_MODEL!r}: config"
    defaults = {f.name: getattr(BertConfig(), f.name) for f in dc_fields(BertConfig)}
    c = {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size"):
        if not _is_int(c[f]) or c[f] < (0 if f == "num_hidden_layers" else 1):
            raise CheckpointError(f"{where} field {f!r} is {_short(c[f])}; expected a positive integer")
    if not isinstance(c["add_pooling_layer"], bool):
        raise CheckpointError(f"{where} field 'add_pooling_layer' is {_short(c['add_pooling_layer'])}; expected true/false")
    h = c["hidden_size"]

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
    for f in ("smoothed", "quantized_embeddings"):
        names = cfg.get(f, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and _safe_path(n) for n in names):
            raise CheckpointError(f"{where} field {f!r} must be a list of module names")


_LOADABLE["cquant.bert:BertModel"] = (_bert_class, _check_bert_config)


def _safe_path(name: str) -> bool:
    return all(part and not part.startswith("_") for part in name.split("."))


def _rebuild(ck: Checkpoint, path: str) -> Any:
    where = f"{path}: metadata {KEY_MODEL!r}"
    try:
        spec = json.loads(ck.metadata[KEY_MODEL])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where} is not valid JSON") from None
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
        return _rebuild(ck, os.fspath(path))
    return ck


# --------------------------------------------------------------------------------------------------
# Installing a checkpoint into a model
# --------------------------------------------------------------------------------------------------

def _nn_submodule(model: Any, name: str) -> Tuple[Any, Any, str]:
    """(parent, module, last name) for a dotted path in a cquant.nn tree."""
    parent, mod, last = None, model, ""
    for part in name.split("."):
        nxt = mod._modules.get(part) if hasattr(mod, "_modules") else None
        if nxt is None:
            raise CheckpointError(f"the model has no sub-module {name!r} (checkpoint layer)")
        parent, mod, last = mod, nxt, part
    return parent, mod, last


def _embedding_table(name: str, qf: Any, rows_dim: Tuple[int, int]) -> None:
    """A checkpoint layer installed into an embedding: same (rows, dim), no bias."""
    if tuple(int(d) for d in qf.qweight.shape) != tuple(rows_dim):
        raise CheckpointError(f"layer {name!r}: checkpoint shape {tuple(qf.qweight.shape)}, the model's embedding "
                              f"(num_embeddings, embedding_dim) = {tuple(rows_dim)}")
    if qf.bias is not None:
        raise CheckpointError(f"layer {name!r} has a bias; the model has an embedding there")


def _load_into_nn(model: Any, ck: Checkpoint, strict: bool) -> Any:
    from . import nn
    from .embedding import QuantizedEmbedding, can_share
    from .quantization import QuantizedLinear
    replaced = []
    ck_tensors = dict(ck.tensors)
    layer_keys = set(ck.layer_keys())
    tied = getattr(ck, "tied", {})
    installed: Dict[str, Any] = {}
    try:
        # tied tables after the Linears whose codes they read
        for name, qf in sorted(ck.layers.items(), key=lambda kv: kv[0] in tied):
            if not name:
                raise CheckpointError("a checkpoint of a single layer cannot be installed into a model; "
                                      "use Checkpoint.layers[''] directly")
            parent, mod, last = _nn_submodule(model, name)
            if name in tied and not isinstance(mod, (nn.Embedding, QuantizedEmbedding)):
                raise CheckpointError(f"layer {name!r} is an embedding table tied to {tied[name]!r}; the model has "
                                      f"a {type(mod).__name__} there")
            if isinstance(mod, (nn.Embedding, QuantizedEmbedding)):
                # an int8 table (Quantizer(embeddings=...), `cquant quantize --embeddings`, or --include):
                # int8 rows with one scale each is QuantizedEmbedding's own format; other scales are dequantized
                _embedding_table(name, qf, (mod.num_embeddings, mod.embedding_dim))
                pad = getattr(mod, "padding_idx", None)
                if name in tied:
                    target = installed.get(tied[name])
                    if not isinstance(target, QuantizedLinear):
                        raise CheckpointError(f"embedding {name!r} is tied to {tied[name]!r}, which is not a "
                                              "Linear layer of the model")
                    new_e: Any = QuantizedEmbedding(tie=target, padding_idx=pad)
                elif can_share(qf.qweight):
                    new_e = QuantizedEmbedding(qweight=qf.qweight, padding_idx=pad)
                else:
                    new_e = nn.Embedding(mod.num_embeddings, mod.embedding_dim, rng=0)
                    p = _prefix(name)
                    layer_keys -= {p + "weight_q", p + "weight_scale"}
                    layer_keys.add(p + "weight")
                    ck_tensors[p + "weight"] = ops.dequantize(qf.qweight).astype(np.float32)
                parent._modules[last] = new_e
                replaced.append((parent, last, mod))
                continue
            if not isinstance(mod, (nn.Linear, QuantizedLinear)):
                raise CheckpointError(f"checkpoint layer {name!r} is a Linear, the model has a {type(mod).__name__}")
            if (mod.out_features, mod.in_features) != tuple(qf.qweight.shape):
                raise CheckpointError(f"layer {name!r}: checkpoint shape {tuple(qf.qweight.shape)}, model "
                                      f"(out, in) = {(mod.out_features, mod.in_features)}")
            new = QuantizedLinear(qf.qweight, qf.bias, qf.mode, qf.act_scale)
            parent._modules[last] = new
            installed[name] = new
            replaced.append((parent, last, mod))
        expected = set(model.state_dict())
        given = set(ck_tensors) | layer_keys
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if strict and (missing or unexpected):
            raise CheckpointError("checkpoint does not fit the model: " + "; ".join(
                s for s in (f"missing: {', '.join(missing[:10])}" if missing else "",
                            f"unexpected: {', '.join(unexpected[:10])}" if unexpected else "") if s))
        try:
            model.load_state_dict({k: v for k, v in ck_tensors.items() if k in expected}, strict=False)
        except nn.StateDictError as e:
            raise CheckpointError(f"checkpoint does not fit the model: {e}") from None
    except Exception:
        for parent, last, mod in reversed(replaced):
            parent._modules[last] = mod
        raise
    return model


_MISSING = object()
_NOT_LAYERS = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
               np.ndarray, np.generic, list, tuple, dict, str, bytes, bytearray, int, float, complex, bool,
               type(None))


def _own_attr(obj: Any, name: str) -> Any:
    """``obj``'s own attribute ``name`` (instance ``__dict__`` or a slot), never a class attribute,
    property or ``__getattr__`` result: the names a checkpoint can reach are the ones the
    Quantizer walks. ``_MISSING`` if absent."""
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict) and name in d:
        return d[name]
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        if name in ((slots,) if isinstance(slots, str) else slots):
            return getattr(obj, name, _MISSING)
    return _MISSING


def _duck_layer(model: Any, name: str) -> Any:
    """The object at dotted path ``name`` of a duck-typed model (list/tuple index, dict key or own
    attribute). Private and dunder components (``_x``, ``__class__``) are refused: installing a
    forward there would change a class, not a layer."""
    obj = model
    for part in name.split(".") if name else []:
        if not part or part.startswith("_"):
            raise CheckpointError(f"checkpoint layer {name!r}: path component {part!r} is empty, private or "
                                  "a dunder; refusing to install there")
        if isinstance(obj, (list, tuple)):
            if not (part.isascii() and part.isdigit()) or int(part) >= len(obj):
                raise CheckpointError(f"the model has no layer {name!r} (no item {part!r} in a "
                                      f"{type(obj).__name__} of {len(obj)})")
            obj = obj[int(part)]
        elif isinstance(obj, dict):
            if part not in obj:
                raise CheckpointError(f"the model has no layer {name!r} (no key {part!r})")
            obj = obj[part]
        else:
            nxt = _own_attr(obj, part)
            if nxt is _MISSING:
                raise CheckpointError(f"the model has no layer {name!r} ({type(obj).__name__} has no "
                                      f"attribute {part!r})")
            obj = nxt
    if isinstance(obj, _NOT_LAYERS):
        raise CheckpointError(f"checkpoint layer {name!r} names a {type(obj).__name__}, not a layer object")
    return obj


def _duck_shape(obj: Any, layout: str) -> Optional[Tuple[int, int]]:
    """(out, in) of a duck-typed layer: from its weight ((out, in), or (in, out) for an ``in_out``
    layer), a quantized forward already installed, or in_features/out_features."""
    from .quantization import QuantizedLinearForward
    w = _own_attr(obj, "weight")
    if w is not _MISSING and w is not None:
        try:
            shp = tuple(int(d) for d in np.shape(w))
        except Exception:  # noqa: BLE001 - an object numpy cannot size: no shape
            shp = ()
        if len(shp) == 2:
            return (shp[1], shp[0]) if layout == "in_out" else (shp[0], shp[1])
        return None
    fwd = _own_attr(obj, "forward")
    if isinstance(fwd, QuantizedLinearForward):
        return (fwd.out_features, fwd.in_features)
    fi, fo = _own_attr(obj, "in_features"), _own_attr(obj, "out_features")
    if isinstance(fi, (int, np.integer)) and isinstance(fo, (int, np.integer)):
        return (int(fo), int(fi))
    return None


def _load_into_duck(model: Any, ck: Checkpoint) -> Any:
    """Validate every layer first (path, type, shape), then install all; a failure while installing
    (e.g. a class that refuses an attribute) puts back what was changed, so the model is either
    fully loaded or untouched."""
    if getattr(ck, "tied", None):
        raise CheckpointError(f"layer(s) {', '.join(sorted(ck.tied))} are embedding tables tied to a Linear layer; "
                              "duck-typed models have no embedding layer: load this checkpoint into the "
                              "cquant.nn or torch model it was saved from")
    plan = []
    for name, qf in ck.layers.items():
        obj = _duck_layer(model, name)
        want = tuple(int(d) for d in qf.qweight.shape)
        got = _duck_shape(obj, ck.layouts.get(name, "out_in"))
        if got is None:
            raise CheckpointError(f"layer {name!r}: cannot tell the (out, in) shape of the model's "
                                  f"{type(obj).__name__} (no 2-D weight, no in_features/out_features); "
                                  "refusing to install an unchecked layer")
        if got != want:
            raise CheckpointError(f"layer {name!r}: checkpoint shape (out, in) = {want}, the model's layer "
                                  f"has {got}")
        plan.append((obj, qf))
    undo: List[Callable[[], None]] = []

    def put(obj: Any, attr: str, value: Any) -> None:
        old = _own_attr(obj, attr)
        setattr(obj, attr, value)
        undo.append(lambda: delattr(obj, attr) if old is _MISSING else setattr(obj, attr, old))

    try:
        for obj, qf in plan:
            put(obj, "forward", qf)
            if _own_attr(obj, "weight") is not _MISSING:
                put(obj, "weight", None)
            if _own_attr(obj, "bias") is not _MISSING:
                put(obj, "bias", qf.bias)
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort; the original error is what matters
                pass
        raise
    return model


def _embeddings_as_tensors(model: Any, ck: Checkpoint) -> Checkpoint:
    """For a torch model: checkpoint layers that are embedding tables in the model stay layers (the
    adapter installs a ``QuantizedTorchEmbedding``) when they are int8 tables (kind ``"embedding"``,
    per-row int8 codes) and the ``nn.Embedding`` can take one (torch's forward, no ``max_norm``, a
    weight not tied to a module that stays float); the others become float tensors ``L.weight``
    (dequantized rows) copied into the table (a tie to a float module is kept)."""
    import torch
    from .adapters.torch import _param_owners
    from .adapters.torch_embedding import QuantizedTorchEmbedding, embedding_problem
    from .embedding import can_share
    subs = dict(model.named_modules())
    emb = {n: m for n, m in subs.items() if n in ck.layers
           and isinstance(m, (torch.nn.Embedding, QuantizedTorchEmbedding))}
    if not emb:
        return ck
    owners = _param_owners(model)
    out = Checkpoint(layers=dict(ck.layers), layouts=dict(ck.layouts), kinds=dict(ck.kinds),
                     tensors=dict(ck.tensors), metadata=ck.metadata, tied=dict(getattr(ck, "tied", {})))
    for name, m in emb.items():
        qf = out.layers[name]
        _embedding_table(name, qf, (m.num_embeddings, m.embedding_dim))
        if isinstance(m, QuantizedTorchEmbedding):  # already int8: the codes are installed as they are
            out.kinds[name] = "embedding"
            continue
        floats = [n for n, o in owners.get(id(m.weight), []) if o is not m and n not in ck.layers]
        if (ck.kinds.get(name) == "embedding" and can_share(qf.qweight) and qf.bias is None
                and not embedding_problem(m) and not floats):
            continue
        out.layers.pop(name)
        out.layouts.pop(name, None)
        out.kinds.pop(name, None)
        out.tied.pop(name, None)
        out.tensors[_prefix(name) + "weight"] = ops.dequantize(qf.qweight).astype(np.float32)
    return out


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
    from . import nn
    from .adapters import is_torch_module
    if isinstance(path_or_checkpoint, Checkpoint):
        ck, where = path_or_checkpoint, ""
    else:
        ck, where = read_checkpoint(path_or_checkpoint), os.fspath(path_or_checkpoint)
    try:
        if isinstance(model, nn.Module):
            return _load_into_nn(model, ck, strict)
        if is_torch_module(model):
            from .adapters.torch import install_checkpoint
            return install_checkpoint(model, _embeddings_as_tensors(model, ck), strict)
        return _load_into_duck(model, ck)
    except CheckpointError as e:
        if where and not str(e).startswith(where):
            raise CheckpointError(f"{where}: {e}") from None
        raise
