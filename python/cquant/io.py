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
``L.weight_scale``     F32      (1,) / (N,) /        per_tensor / per_channel / per_group scales;
                                (N, K/g)             weight ~= weight_q * scale of its slice
``L.bias``             F32 (*)  (N,)                 optional bias
=====================  =======  ===================  ==================================================

(*) a checkpoint written by ``cquant quantize`` copies the bias with the dtype it had.
Every other tensor of the model (embeddings, norms, layers left in float) is stored under its usual
``state_dict`` name with its dtype unchanged. The header's ``__metadata__`` (string -> string) holds:

- ``cquant.format_version``: ``"1"``; ``cquant.version``: the writer's cquant version;
- ``cquant.layers``: JSON object ``{L: {"mode": "dynamic"|"weight_only",
  "granularity": "per_tensor"|"per_channel"|"per_group", "group_size": int|null, "shape": [N, K],
  "bias": bool, "layout": "out_in"|"in_out"}}``. ``layout`` says how the *source* layer stored its
  weight: ``in_out`` for GPT-2 style ``Conv1D`` (the codes are still (N, K));
- ``cquant.model`` (optional): JSON ``{"class": "module:QualName", "config": {...}}`` for a
  :mod:`cquant.nn` model that can rebuild itself (``from_cquant_config``), e.g. :class:`cquant.bert.BertModel`;
- anything the user passed as ``metadata=`` and, for ``cquant quantize``, the input file's metadata.

To use a layer from C: read ``weight_q`` (N*K bytes) and ``weight_scale``, then ``y = x @ (q*s).T + b``
(or the dynamic int8 path, cquant.h ``cq_linear``).

Why the CLI has its own reader/writer
-------------------------------------
``save``/``load`` use the ``safetensors`` package (numpy API). ``cquant quantize`` instead maps the
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
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import errors, ops

__all__ = ["save", "load", "load_into", "Checkpoint", "FORMAT_VERSION", "SafetensorsReader",
           "StreamWriter", "CheckpointError", "atomic_path"]

FORMAT_VERSION = "1"
KEY_VERSION = "cquant.format_version"
KEY_LAYERS = "cquant.layers"
KEY_MODEL = "cquant.model"
KEY_CQ_VERSION = "cquant.version"

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


class SafetensorsReader:
    """Validates a safetensors header and hands out tensors as zero-copy views of a read-only map.

    ``tensor(name)`` is a numpy view (BF16 comes back as uint16 bits; see :func:`bf16_to_f32`);
    ``release(name)`` drops that tensor's pages from this process (they stay in the OS page cache).
    Raises :class:`CheckpointError` for a missing, non-safetensors or truncated file.
    """

    MAX_HEADER = 100 * 2**20

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path}: is a directory, not a safetensors file") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self._parse()
        except Exception:
            self._f.close()
            raise

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
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{self.path}: bad __metadata__ (must map strings to strings)")
        self.metadata: Dict[str, str] = dict(meta)
        self.data_start = 8 + hlen
        data_size = size - self.data_start
        infos: List[TensorInfo] = []
        for name, e in header.items():
            try:
                dt, shape, (b, en) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
                b, en = int(b), int(en)
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: not a safetensors file (bad entry for {name!r})") from None
            if dt not in _ST_SIZE:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown dtype {dt!r}")
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if any(s < 0 for s in shape) or en - b != n * _ST_SIZE[dt] or b < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r}: offsets {b}..{en} do not match "
                                      f"{dt} {list(shape)}")
            if en > data_size:
                raise CheckpointError(f"{self.path}: truncated file (tensor {name!r} ends at byte "
                                      f"{self.data_start + en}, file has {size})")
            infos.append(TensorInfo(name, dt, shape, b, en))
        infos.sort(key=lambda t: t.begin)
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
            n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
            nb = n * _ST_SIZE[dt]
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


class atomic_path:
    """Context manager: yields a temporary path next to ``path``; on success renames it over ``path``,
    on any exception removes it, so no partial output file is ever left behind."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)

    def __enter__(self) -> str:
        d = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(d):
            raise CheckpointError(f"{self.path}: directory {d} does not exist")
        fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=d)
        os.close(fd)
        return self.tmp

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            os.replace(self.tmp, self.path)
        else:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------------------------------
# Checkpoints in memory
# --------------------------------------------------------------------------------------------------

def _layer_meta(mode: str, qw: ops.QuantizedWeight, has_bias: bool, layout: str = "out_in") -> Dict[str, Any]:
    return {"mode": mode, "granularity": qw.granularity, "group_size": qw.group_size,
            "shape": [int(qw.shape[0]), int(qw.shape[1])], "bias": bool(has_bias), "layout": layout}


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
    tensors: Dict[str, np.ndarray] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)

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
            p = _prefix(name)
            keys += [p + "weight_q", p + "weight_scale"] + ([p + "bias"] if qf.bias is not None else [])
        return keys

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Flat name -> array, as stored in the file (codes canonical (N, K))."""
        out: Dict[str, np.ndarray] = {}
        for name, qf in self.layers.items():
            p = _prefix(name)
            out[p + "weight_q"] = qf.qweight.q
            out[p + "weight_scale"] = qf.qweight.scale
            if qf.bias is not None:
                out[p + "bias"] = qf.bias
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
        tensors[p + "weight_q"] = qf.qweight.q
        tensors[p + "weight_scale"] = qf.qweight.scale
        if qf.bias is not None:
            tensors[p + "bias"] = np.ascontiguousarray(qf.bias, dtype=np.float32)
        layers[name] = _layer_meta(qf.mode, qf.qweight, qf.bias is not None, layout)

    if is_torch_module(obj):
        from .adapters.torch import QuantizedTorchLinear, to_numpy
        qnames = set()
        for name, m in obj.named_modules():
            if isinstance(m, QuantizedTorchLinear):
                add_layer(name, m.qforward, "in_out" if m.source == "Conv1D" else "out_in")
                qnames.add(name)
        for k, v in obj.state_dict().items():  # bfloat16 (no numpy dtype) is stored as float32
            tensors[k] = to_numpy(v, k) if str(v.dtype) == "torch.bfloat16" else v.detach().cpu().contiguous().numpy()
    elif isinstance(obj, nn.Module):
        for name, m in obj.named_modules():
            if isinstance(m, QuantizedLinear):
                layers[name] = _layer_meta(m.mode, m.qweight, m.bias is not None)
        for k, v in obj.state_dict().items():
            tensors[k] = v
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


def save(obj: Any, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a quantized model (cquant.nn, torch via the adapter, duck-typed) or a mapping
    ``name -> array | quantized layer`` to ``path`` as a cquant checkpoint (see the module docstring
    for the layout). The file is written to a temporary name and renamed: never left half-written."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ImportError("cquant.save needs the safetensors package: pip install safetensors") from None
    tensors, layers, model_meta = _collect(obj)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[KEY_VERSION] = FORMAT_VERSION
    from . import __version__
    meta[KEY_CQ_VERSION] = __version__
    meta[KEY_LAYERS] = json.dumps(layers, separators=(",", ":"))
    if model_meta is not None:
        meta[KEY_MODEL] = json.dumps(model_meta, separators=(",", ":"))
    elif hasattr(obj, "named_modules"):
        logging.getLogger("cquant").info(
            "cquant.save: %s does not describe itself (cquant_config / from_cquant_config), so "
            "cquant.load(path) returns a Checkpoint; rebuild the model and call "
            "cquant.load_into(model, path)", type(obj).__name__)
    for k, v in list(tensors.items()):
        if not v.flags.c_contiguous:
            tensors[k] = np.ascontiguousarray(v)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Read a cquant checkpoint into a :class:`Checkpoint` (no model built)."""
    from .quantization import QuantizedLinearForward
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file, safe_open
    except ImportError:
        raise ImportError("cquant.load needs the safetensors package: pip install safetensors") from None
    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{p}: no such file")
    try:
        with safe_open(p, framework="numpy") as f:
            meta = dict(f.metadata() or {})
        arrays = load_file(p)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    ver = meta.get(KEY_VERSION)
    if ver is None:
        raise CheckpointError(f"{p}: not a cquant checkpoint (no {KEY_VERSION!r} in its metadata); "
                              "quantize a float checkpoint with `cquant quantize`")
    if ver != FORMAT_VERSION:
        raise CheckpointError(f"{p}: checkpoint format version {ver} is not supported "
                              f"(this cquant reads version {FORMAT_VERSION})")
    try:
        layer_meta = json.loads(meta.get(KEY_LAYERS, "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{p}: metadata {KEY_LAYERS!r} is not valid JSON") from None
    ck = Checkpoint(metadata=meta)
    for name, lm in layer_meta.items():
        pre = _prefix(name)
        try:
            q = arrays.pop(pre + "weight_q")
            s = arrays.pop(pre + "weight_scale")
        except KeyError as e:
            raise CheckpointError(f"{p}: layer {name!r} is listed in the metadata but tensor {e} is missing") from None
        b = arrays.pop(pre + "bias", None) if lm.get("bias") else None
        if q.dtype != np.int8 or q.ndim != 2 or list(q.shape) != list(lm.get("shape", q.shape)):
            raise CheckpointError(f"{p}: {pre}weight_q must be int8 of shape {lm.get('shape')}, got {q.dtype} {q.shape}")
        try:
            qw = ops.QuantizedWeight.from_codes(q, s.astype(np.float32, copy=False), lm["granularity"],
                                                lm.get("group_size"))
            ck.layers[name] = QuantizedLinearForward(qw, None if b is None else b.astype(np.float32), lm["mode"])
        except (errors.QuantizationError, KeyError) as e:
            raise CheckpointError(f"{p}: layer {name!r}: {e}") from None
        ck.layouts[name] = lm.get("layout", "out_in")
    ck.tensors = arrays
    return ck


def _rebuild(ck: Checkpoint, path: str) -> Any:
    import importlib
    try:
        spec = json.loads(ck.metadata[KEY_MODEL])
        mod_name, qual = spec["class"].split(":")
    except (KeyError, ValueError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: metadata {KEY_MODEL!r} is malformed") from None
    if mod_name != "cquant" and not mod_name.startswith("cquant."):
        raise CheckpointError(f"{path}: refusing to import {mod_name!r} named in the file; build the model "
                              "yourself and call cquant.load_into(model, path)")
    cls: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        cls = getattr(cls, part)
    model = cls.from_cquant_config(spec.get("config", {}))
    load_into(model, ck)
    return model


def load(path: PathLike, build: bool = True) -> Any:
    """Read a cquant checkpoint.

    Returns the rebuilt :mod:`cquant.nn` model (quantized layers in place, ready to run) when the file
    names a cquant model class (``cquant.model`` metadata) and ``build`` is true; otherwise a
    :class:`Checkpoint` (quantized layers as callables + the other tensors) to install with
    :func:`load_into`. Needs only numpy and safetensors (no torch, no float32 weights).
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


def _load_into_nn(model: Any, ck: Checkpoint, strict: bool) -> Any:
    from . import nn
    from .quantization import QuantizedLinear
    replaced = []
    try:
        for name, qf in ck.layers.items():
            if not name:
                raise CheckpointError("a checkpoint of a single layer cannot be installed into a model; "
                                      "use Checkpoint.layers[''] directly")
            parent, mod, last = _nn_submodule(model, name)
            if not isinstance(mod, (nn.Linear, QuantizedLinear)):
                raise CheckpointError(f"checkpoint layer {name!r} is a Linear, the model has a {type(mod).__name__}")
            if (mod.out_features, mod.in_features) != tuple(qf.qweight.shape):
                raise CheckpointError(f"layer {name!r}: checkpoint shape {tuple(qf.qweight.shape)}, model "
                                      f"(out, in) = {(mod.out_features, mod.in_features)}")
            new = QuantizedLinear(qf.qweight, qf.bias, qf.mode)
            parent._modules[last] = new
            replaced.append((parent, last, mod))
        expected = set(model.state_dict())
        given = set(ck.tensors) | set(ck.layer_keys())
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if strict and (missing or unexpected):
            raise CheckpointError("checkpoint does not fit the model: " + "; ".join(
                s for s in (f"missing: {', '.join(missing[:10])}" if missing else "",
                            f"unexpected: {', '.join(unexpected[:10])}" if unexpected else "") if s))
        model.load_state_dict({k: v for k, v in ck.tensors.items() if k in expected}, strict=False)
    except Exception:
        for parent, last, mod in reversed(replaced):
            parent._modules[last] = mod
        raise
    return model


def _load_into_duck(model: Any, ck: Checkpoint) -> Any:
    for name, qf in ck.layers.items():
        obj = model
        for part in name.split(".") if name else []:
            if isinstance(obj, (list, tuple)):
                obj = obj[int(part)]
            elif isinstance(obj, dict):
                obj = obj[part]
            else:
                obj = getattr(obj, part)
        obj.forward = qf
        if hasattr(obj, "weight"):
            obj.weight = None
        if hasattr(obj, "bias"):
            obj.bias = qf.bias
    return model


def load_into(model: Any, path_or_checkpoint: Union[PathLike, Checkpoint], strict: bool = True) -> Any:
    """Install a checkpoint's quantized layers (and its other tensors) into ``model``; returns it.

    - :mod:`cquant.nn` model: each named ``Linear`` becomes a ``QuantizedLinear``; the other tensors
      are loaded with ``load_state_dict``. ``strict``: the keys must match exactly.
    - torch model: each named ``nn.Linear``/``Conv1D`` becomes a ``QuantizedTorchLinear``; the other
      tensors are copied into its parameters and buffers.
    - other (duck-typed) models: each named layer object gets the quantized ``forward``.
    Raises :class:`CheckpointError` naming the first layer that does not fit (the model is unchanged).
    """
    from . import nn
    from .adapters import is_torch_module
    ck = path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint) else read_checkpoint(path_or_checkpoint)
    if isinstance(model, nn.Module):
        return _load_into_nn(model, ck, strict)
    if is_torch_module(model):
        from .adapters.torch import install_checkpoint
        return install_checkpoint(model, ck, strict)
    return _load_into_duck(model, ck)
