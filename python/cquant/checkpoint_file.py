"""The checkpoint file layer, below :mod:`cquant.io`: format constants, the streaming safetensors
reader / writer (:class:`SafetensorsReader`, :class:`StreamWriter`), sharded checkpoints
(:class:`ShardedReader`, :func:`open_checkpoint`, :func:`resolve_checkpoint`) and atomic writes
(:class:`atomic_path`).

It imports nothing of cquant but :mod:`cquant.errors`, so modules that :mod:`cquant.io` imports (e.g.
:mod:`cquant.bert`, which reads Hugging Face safetensors files) can use it without an import cycle.
:mod:`cquant.io` re-exports every name; see its docstring for the file layout and for why cquant has
its own reader/writer.
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import signal
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import errors, ops
from .errors import CheckpointError

FORMAT_VERSION = "1"
KEY_VERSION = "cquant.format_version"
KEY_LAYERS = "cquant.layers"
KEY_MODEL = "cquant.model"
KEY_CQ_VERSION = "cquant.version"
KEY_TIED = "cquant.tied"  # {embedding table: the Linear layer whose per_channel int8 codes it shares}
# {"input": [layer, ...], "output": [layer, ...]}: the smoothing folds of the model (see FOLD_ATTRS)
KEY_FOLDS = "cquant.folds"

#: attributes of a smoothed model's root (set by :func:`cquant.smooth`, read by :func:`cquant.compare`):
#: layer name -> the ``s`` its input was divided by through a fold into the layer before it
#: ("input"), and Linear name -> the ``s`` its output was divided by (a fold into it, "output").
#: A checkpoint keeps them as float32 tensors ``fold_key(side, layer)``, listed under KEY_FOLDS.
FOLD_ATTRS = {"input": "_cquant_input_scales", "output": "_cquant_output_scales"}

PathLike = Union[str, "os.PathLike[str]"]


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


def metadata_json(path: str, key: str, raw: str) -> Any:
    """A metadata value that holds JSON (``cquant.layers``, ``cquant.tied``, ``cquant.model``,
    ``cquant.folds``), parsed: CheckpointError naming the file and the key for invalid JSON or a key
    given twice (which entry would win is not for the reader to guess)."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: metadata {key!r}: {e}") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON") from None


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


def path_str(path: Any) -> str:
    """``path`` (str, bytes or os.PathLike) as a str, or a cquant error naming it: a NUL byte (which
    no file name holds) or an object that is not a path."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise errors.TypeError(f"a path must be a str, bytes or os.PathLike, got {type(path).__name__}") from None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if "\0" in p:
        raise CheckpointError(f"{p!r}: a path cannot hold a NUL byte")
    return p


def resolve_checkpoint(path: PathLike) -> str:
    """The file to open for ``path``: ``path`` itself, or for a model folder the first of
    :data:`CHECKPOINT_NAMES` it holds. CheckpointError for a folder holding none of them."""
    p = path_str(path)
    if os.path.isdir(p):
        for n in CHECKPOINT_NAMES:
            c = os.path.join(p, n)
            if os.path.lexists(c):
                return c
        raise CheckpointError(f"{p}: is a directory holding no {' or '.join(CHECKPOINT_NAMES[:2])}; "
                              "give a .safetensors file or a sharded checkpoint's .index.json")
    return p


def is_index_path(path: PathLike) -> bool:
    return path_str(path).endswith(INDEX_SUFFIX)


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
        folds: Dict[str, List[Any]] = {}
        for r in self._readers:
            for k, v in r.metadata.items():
                if k not in (KEY_LAYERS, KEY_FOLDS):
                    meta.setdefault(k, v)
            if KEY_FOLDS in r.metadata:  # each shard lists the folds it holds: their union
                part = metadata_json(r.path, KEY_FOLDS, r.metadata[KEY_FOLDS])
                if not isinstance(part, dict):
                    raise CheckpointError(f"{r.path}: metadata {KEY_FOLDS!r} must be a JSON object")
                for side, names in part.items():
                    if not isinstance(names, list):
                        raise CheckpointError(f"{r.path}: metadata {KEY_FOLDS!r}: {side!r} must be a list")
                    folds.setdefault(side, []).extend(names)
            if KEY_LAYERS in r.metadata:
                part = metadata_json(r.path, KEY_LAYERS, r.metadata[KEY_LAYERS])
                if not isinstance(part, dict):
                    raise CheckpointError(f"{r.path}: metadata {KEY_LAYERS!r} must be a JSON object")
                for name, spec in part.items():
                    if name in layers:
                        raise CheckpointError(f"{self.path}: layer {name!r} is listed by two shards")
                    layers[name] = spec
        if folds:
            meta[KEY_FOLDS] = json.dumps(folds, separators=(",", ":"))  # read_folds checks the rest
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


_HELD_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))


def _hold_signals() -> Any:
    """On the main thread: record SIGTERM / SIGHUP / SIGINT instead of running their handlers (a
    handler that raises, as the CLI's do, must not land between a temporary file's creation and the
    code that removes it on failure); returns what :func:`_release_signals` needs. (Blocking them
    with pthread_sigmask held on the calling thread only: the kernel then gave the signal to a
    kernel-pool thread and Python ran the handler on the main thread all the same.)"""
    if threading.current_thread() is not threading.main_thread():
        return None
    got: List[int] = []
    saved = {}
    for sig in _HELD_SIGNALS:
        try:
            saved[sig] = signal.signal(sig, lambda s, _f: got.append(s))
        except (OSError, ValueError, TypeError):  # pragma: no cover - not settable here
            pass
    return saved, got


def _release_signals(held: Any) -> None:
    """Put the handlers back, then deliver what arrived meanwhile (its handler runs here, inside the
    caller's cleanup)."""
    if held is None:
        return
    saved, got = held
    for sig, h in saved.items():
        signal.signal(sig, h)
    saved.clear()
    while got:
        signal.raise_signal(got.pop(0))


class atomic_path:
    """Context manager: yields a temporary path next to ``path``; on success renames it over ``path``,
    on any failure (including the rename itself) removes it, so no partial or temporary file is ever
    left behind. The file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), or the
    mode of the file it replaces, not ``mkstemp``'s 0600. Refuses a ``path`` that is a directory or another non-regular file (a FIFO, a
    device: renaming over ``/dev/null`` would replace the device). A symbolic link is followed: the
    file it points to is replaced, the link stays. Errors name ``path``, never the temporary file."""

    def __init__(self, path: PathLike):
        self.path = path_str(path)
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
        if not os.path.isdir(d):  # the folder the file goes in: a link's target's, for a link
            link = target != os.path.abspath(self.path)
            raise CheckpointError(f"{self.path}: directory {d} does not exist"
                                  + (f" (the path is a link to {target})" if link else ""))
        # a signal handler that raises (the CLI's SIGTERM / SIGHUP) between the file's creation and
        # the with body would leave it behind (__exit__ never runs): those signals wait meanwhile
        held = _hold_signals()
        try:
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=d)
        except OSError as e:
            _release_signals(held)
            raise CheckpointError(f"{self.path}: cannot write in {d} ({e.strerror or e})") from None
        try:
            try:  # mkstemp creates 0600: give the file the mode a plain open() would (or the replaced file's)
                os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
            except (OSError, AttributeError):  # pragma: no cover - e.g. a filesystem without modes
                pass
            os.close(fd)
            fd = -1
            self.tmp, self.target = tmp, target
            _release_signals(held)  # a signal that waited is handled here, inside this try
            return tmp
        except BaseException:  # a signal (the CLI's SIGTERM) before the with body: __exit__ never runs
            _release_signals(held)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

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
# How a quantized layer is stored (cquant.io, the front-ends' checkpoint state, the CLI)
# --------------------------------------------------------------------------------------------------

def plain_tensor_problem(value: Any, target: Any) -> Optional[str]:
    """Why a checkpoint tensor that is not part of a quantized layer (a LayerNorm weight, a buffer)
    cannot be copied into the model's tensor of numpy dtype ``target``, or None if it can: a float
    tensor takes float values whose finite ones stay finite in its dtype (a float64 1e300 would
    become Inf in float32); an integer tensor integers in its range; a bool tensor bools. Copying
    casts silently (numpy ``copyto``, torch ``copy_``), so a file whose dtypes lie must be refused
    before, not discovered as NaN outputs."""
    v = np.asarray(value)
    t = np.dtype(target)
    if t.kind in "fc":
        if v.dtype.kind not in ("fc" if t.kind == "c" else "f"):
            return f"has dtype {v.dtype}; the model's tensor is {t}"
        with np.errstate(over="ignore", invalid="ignore"):
            lost = np.isfinite(v) & ~np.isfinite(v.astype(t))
        if lost.any():
            return f"holds {v[lost].flat[0].item()!r}, beyond the range of the model's {t}"
    elif t.kind in "iu":
        if v.dtype.kind not in "iu":
            return f"has dtype {v.dtype}; the model's tensor is {t}"
        info = np.iinfo(t)
        if v.size and (int(v.min()) < info.min or int(v.max()) > info.max):
            return f"holds values outside the range of the model's {t} [{info.min}, {info.max}]"
    elif t.kind == "b":
        if v.dtype.kind != "b":
            return f"has dtype {v.dtype}; the model's tensor is bool"
    elif v.dtype != t:
        return f"has dtype {v.dtype}; the model's tensor is {t}"
    return None


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


class LazyArray:
    """A tensor :func:`cquant.save` computes only when it writes it (dtype and shape known up front):
    a quantized layer's canonical codes, unpacked from its packed buffer one layer at a time (the
    whole model's codes unpacked at once made a save peak at twice the model)."""
    __slots__ = ("fn", "dtype", "shape")

    def __init__(self, fn: Any, dtype: Any, shape: Tuple[int, ...]):
        self.fn, self.dtype, self.shape = fn, np.dtype(dtype), tuple(int(d) for d in shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = np.asarray(self.fn())
        assert a.dtype == self.dtype and a.shape == self.shape, "LazyArray: not what it said"
        return a if dtype is None else a.astype(dtype)


def lazy_codes(qw: ops.QuantizedWeight) -> LazyArray:
    """``weight_q`` as a checkpoint stores it (see :func:`_stored_codes`), computed when written."""
    n, k = (int(d) for d in qw.shape)
    if qw.bits == 4:
        return LazyArray(lambda: _stored_codes(qw), np.uint8, (n, (k + 1) // 2))
    return LazyArray(lambda: _stored_codes(qw), np.int8, (n, k))


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


# --------------------------------------------------------------------------------------------------
# Smoothing folds (FOLD_ATTRS): what cquant.compare needs to compare a reloaded smoothed model
# --------------------------------------------------------------------------------------------------

def fold_key(side: str, layer: str) -> str:
    """Tensor name of a fold vector in a checkpoint (``side``: "input" or "output")."""
    return f"cquant_fold_{side}.{layer}"


def fold_tensors(model: Any, taken: Iterable[str] = ()) -> Tuple[Dict[str, np.ndarray], Dict[str, List[str]]]:
    """The fold vectors a smoothed model's root records: ({tensor name: float32 vector}, the
    KEY_FOLDS listing); ({}, {}) for a model that was not smoothed. CheckpointError if one of their
    names is among ``taken`` (the model's own tensor names)."""
    tensors: Dict[str, np.ndarray] = {}
    listing: Dict[str, List[str]] = {}
    for side, attr in FOLD_ATTRS.items():
        record = getattr(model, attr, None) or {}
        for layer, v in record.items():
            tensors[fold_key(side, str(layer))] = np.array(v, dtype=np.float32).reshape(-1)  # a copy: records share s
            listing.setdefault(side, []).append(str(layer))
    clash = sorted(set(tensors) & set(taken))
    if clash:
        raise CheckpointError(f"the model has a tensor named {clash[0]!r}, the name a checkpoint gives a "
                              "smoothing fold; rename that module")
    return tensors, listing


def read_folds(where: str, raw: Optional[str], arrays: Dict[str, np.ndarray],
               shapes: Mapping[str, Sequence[int]]) -> Dict[str, Dict[str, np.ndarray]]:
    """Parse the KEY_FOLDS listing (``raw``; None: no folds) and take its vectors out of ``arrays``:
    {"input": {layer: vector}, "output": {...}}. Each vector must be listed once, be there, and hold
    positive finite floats (a fold divides by it); a layer in ``shapes`` (name -> (N, K), the
    quantized layers of the file) has K input scales or N output scales."""
    out: Dict[str, Dict[str, np.ndarray]] = {side: {} for side in FOLD_ATTRS}
    if raw is None:
        return out
    listing = metadata_json(where, KEY_FOLDS, raw)
    where = f"{where}: metadata {KEY_FOLDS!r}"
    if not isinstance(listing, dict) or set(listing) - set(FOLD_ATTRS):
        raise CheckpointError(f"{where} must be a JSON object with \"input\" and/or \"output\" lists of layer names")
    for side, layers in listing.items():
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            raise CheckpointError(f"{where}: {side!r} must be a list of layer names, got {_short(layers)}")
        for layer in layers:
            key = fold_key(side, layer)
            if layer in out[side]:
                raise CheckpointError(f"{where}: {side} fold of layer {layer!r} listed twice")
            if key not in arrays:
                raise CheckpointError(f"{where}: lists the {side} fold of layer {layer!r}, but the file has "
                                      f"no tensor {key!r}")
            v = np.asarray(arrays.pop(key))
            if v.dtype != np.float32 or v.ndim != 1 or not v.size:
                raise CheckpointError(f"{where}: tensor {key!r} must be a non-empty 1-D float32 vector "
                                      f"(got {v.dtype} {tuple(v.shape)})")
            if not (np.isfinite(v).all() and (v > 0).all()):
                raise CheckpointError(f"{where}: tensor {key!r} must hold positive finite scales")
            if layer in shapes and v.size != int(shapes[layer][1 if side == "input" else 0]):
                raise CheckpointError(f"{where}: the {side} fold of layer {layer!r} has {v.size} scales; the layer "
                                      f"has {int(shapes[layer][1 if side == 'input' else 0])} {side} channels")
            out[side][layer] = np.array(v, dtype=np.float32)
    return out


def set_folds(model: Any, folds: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Record a checkpoint's folds on the model's root as :func:`cquant.smooth` does (a model whose
    weights now come from a file without folds loses the record its old weights had)."""
    for side, attr in FOLD_ATTRS.items():
        record = dict(folds.get(side) or {})
        try:
            if record:
                object.__setattr__(model, attr, record)
            elif getattr(model, attr, None) is not None:
                object.__delattr__(model, attr)
        except (AttributeError, TypeError):  # a root that takes no attributes (cquant.smooth could not
            pass                             # have recorded folds on it either)
