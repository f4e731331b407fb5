"""Array operations on the C core: the only module that touches ``ffi``/``lib``.

Each function checks its arguments (dtype, rank, shape, contiguity), converts what can be converted
safely, calls one C entry point with the GIL released (cffi's API mode does that), turns a status
code into an exception from :mod:`cquant.errors`, and returns numpy arrays.

Shapes: weights are ``(N, K)`` (out_features, in_features, like ``torch.nn.Linear``); activations
``x`` are ``(..., K)``; outputs ``(..., N)``. Outputs are always float32: float64/float16 inputs are
converted to float32 first (the kernels compute in float32; this is documented, not silent).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from . import errors
from ._native import ffi, lib

__all__ = [
    "QuantizedWeight", "quantize_weight", "quantize", "dequantize", "quantize_rows", "linear",
    "gemm_s8s8s32", "check_finite", "check_scales", "isa", "set_isa", "available_isas", "set_num_threads",
    "get_num_threads", "native_version", "GRANULARITIES", "MODES", "gelu", "layer_norm",
    "last_kernel", "best_format", "peak_gmacs", "quantize_rows_u8", "FORMATS",
    "softmax_rows", "gelu_inplace", "add_layer_norm", "attention", "AddLayerNorm",
]

GRANULARITIES = {"per_tensor": lib.CQ_PER_TENSOR, "per_channel": lib.CQ_PER_CHANNEL,
                 "per_group": lib.CQ_PER_GROUP}
MODES = {"weight_only": lib.CQ_MODE_WEIGHT_ONLY, "dynamic": lib.CQ_MODE_DYNAMIC}
# in the order of the paths (each runs the kernels of those before it where it has none of its own)
_ISAS = {"scalar": lib.CQ_ISA_SCALAR, "avx2": lib.CQ_ISA_AVX2, "avxvnni": lib.CQ_ISA_AVXVNNI,
         "avx512": lib.CQ_ISA_AVX512, "avx512vnni": lib.CQ_ISA_AVX512VNNI, "amx": lib.CQ_ISA_AMX}
FORMATS = {"n16k4": lib.CQ_FORMAT_N16K4, "n64k4": lib.CQ_FORMAT_N64K4,
           "n16k8i4": lib.CQ_FORMAT_N16K8I4, "n64k8i4": lib.CQ_FORMAT_N64K8I4}
_FORMAT_BITS = {lib.CQ_FORMAT_N16K4: 8, lib.CQ_FORMAT_N64K4: 8, lib.CQ_FORMAT_N16K8I4: 4, lib.CQ_FORMAT_N64K8I4: 4}
BITS = (8, 4)
_FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
MAX_K_S32 = lib.CQ_MAX_K_S32


def native_version() -> str:
    """Version of the compiled C core."""
    return ffi.string(lib.cq_version()).decode()


# ---- status codes -> exceptions ----------------------------------------------------------------
def _raise(status: int, what: str) -> None:
    msg = f"{what}: {ffi.string(lib.cq_strerror(status)).decode()}"
    if status == lib.CQ_ERR_NONFINITE:
        raise errors.NonFiniteError(msg)
    if status in (lib.CQ_ERR_SHAPE,):
        raise errors.ShapeError(msg)
    if status in (lib.CQ_ERR_GROUP, lib.CQ_ERR_ARG, lib.CQ_ERR_RANGE, lib.CQ_ERR_NULL):
        raise errors.ValueError(msg)
    if status == lib.CQ_ERR_OVERFLOW:
        raise errors.OverflowError(msg)
    if status == lib.CQ_ERR_ISA:
        raise errors.IsaError(_isa_message(msg))
    if status == lib.CQ_ERR_FORMAT:
        raise errors.ValueError(msg)
    if status == lib.CQ_ERR_ALIAS:
        raise errors.ValueError(f"{msg}: the output must be a separate array from x, bias and the weight")
    if status == lib.CQ_ERR_NOMEM:
        raise MemoryError(msg)
    raise errors.NativeError(msg)


def _check(status: int, what: str) -> None:
    if status != 0:
        _raise(status, what)


# ---- instruction set and threads ---------------------------------------------------------------
def _isa_message(prefix: str) -> str:
    env = os.environ.get("CQUANT_ISA")
    avail = available_isas()
    have = ", ".join(avail)
    if env and env.lower() not in (*_ISAS, "auto"):
        return (f"CQUANT_ISA={env!r} is not a known path; expected one of "
                f"{', '.join(_ISAS)} or auto (available here: {have})")
    if env and env.lower() != "auto":
        return (f"{prefix}. CQUANT_ISA={env!r} names a path this CPU or build cannot run "
                f"(available here: {have}); unset CQUANT_ISA to use the best one, or force one "
                f"that runs, e.g. cquant.set_isa({avail[-1]!r})")
    return f"{prefix} (available here: {have})"


def available_isas() -> list[str]:
    """Paths this build and CPU can run, best last."""
    return [name for name, code in _ISAS.items() if lib.cq_isa_supported(code)]


def isa() -> str:
    """Name of the instruction-set path the kernels use now ('scalar', 'avx2', 'avxvnni', 'avx512',
    'avx512vnni' or 'amx')."""
    code = lib.cq_get_isa()
    if code < 0:
        raise errors.IsaError(_isa_message("no usable kernel path"))
    return ffi.string(lib.cq_isa_name(code)).decode()


def set_isa(name: str) -> str:
    """Force a path by name, or 'auto' (CQUANT_ISA if set, else the best). Returns the path in use.

    Raises IsaError if this CPU or build cannot run it, ValueError for an unknown name."""
    if not isinstance(name, str):
        raise errors.TypeError(f"ISA name must be a str, got {type(name).__name__}")
    name = name.lower()
    if name == "auto":
        if lib.cq_set_isa(lib.CQ_ISA_AUTO) != 0:
            raise errors.IsaError(_isa_message("cannot select the kernel path"))
        return isa()
    if name not in _ISAS:
        raise errors.ValueError(f"unknown ISA {name!r}; expected one of {sorted(_ISAS)} or 'auto'")
    st = lib.cq_set_isa(_ISAS[name])
    if st == lib.CQ_ERR_ISA:
        raise errors.IsaError(f"ISA {name!r} is not available on this CPU or in this build "
                              f"(available here: {', '.join(available_isas())})")
    _check(st, f"cannot select ISA {name!r}")
    return isa()


def set_num_threads(n: int) -> None:
    """Threads the kernels use (1..256). Results do not depend on it. Safe while others compute."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise errors.TypeError(f"number of threads must be an int, got {type(n).__name__}")
    if not 1 <= int(n) <= 256:
        raise errors.ValueError(f"number of threads must be in 1..256, got {n}")
    _check(lib.cq_set_num_threads(int(n)), "set_num_threads")


def get_num_threads() -> int:
    return int(lib.cq_get_num_threads())


def use_openmp(path: "str | os.PathLike[str] | None") -> None:
    """Run the kernels' parallel loops on the thread team of an OpenMP runtime this process has
    already loaded (``path``: its shared library, e.g. torch's bundled ``libgomp.so.1``) instead of
    cquant's own pool; ``None``: back to the pool. The PyTorch adapter does this with torch's
    runtime (see :func:`cquant.adapters.torch.share_torch_openmp`): torch's OpenMP workers spin-wait
    after each torch op on the cores cquant's workers would need. Results do not depend on it.
    ValueError if ``path`` is not a loaded library exporting ``GOMP_parallel`` (nothing is loaded)."""
    if path is None:
        _check(lib.cq_use_openmp(ffi.NULL), "use_openmp")
        return
    if not isinstance(path, (str, os.PathLike)):
        raise errors.TypeError(f"path must be a str, an os.PathLike or None, got {type(path).__name__}")
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise errors.ValueError("path contains a NUL byte")
    if lib.cq_use_openmp(raw) != lib.CQ_OK:
        raise errors.ValueError(f"{os.fsdecode(raw)!r} is not an OpenMP runtime loaded in this process "
                                "(a shared library already mapped that exports GOMP_parallel)")


def using_openmp() -> bool:
    """True while an OpenMP runtime's team runs the parallel loops (:func:`use_openmp`)."""
    return bool(lib.cq_using_openmp())


def last_kernel() -> str:
    """Name of the micro-kernel the calling thread's last :func:`linear` / :func:`gemm_s8s8s32` ran,
    e.g. ``"qd8_f32_qc8w_gemm_6x64c4_avx512vnni"`` (type, tile, ISA); ``""`` before any call."""
    return ffi.string(lib.cq_last_kernel()).decode()


def best_format(n: int = 0) -> str:
    """Packed weight format the active path's best kernels read for a weight of n output rows
    ('n16k4' or 'n64k4'; small n keep panels of 16 so that padding stays small)."""
    n = _int_arg(n, "n")
    if n < 0:
        raise errors.ValueError(f"n (output rows) must be >= 0, got {n}")
    code = lib.cq_best_format(n)
    if code < 0:
        _raise(code, "best_format")
    return _FORMAT_NAMES[code]


def peak_gmacs(kind: str = "int8") -> float:
    """Measured peak multiply-accumulates per second of one core, GMAC/s, of the active path's int8
    dot-product instruction (``"int8"``: vpdpbusd zmm, or vpmaddubsw ymm on AVX2) or float32 FMA
    (``"f32"``): a ~60 ms register-only loop on the calling thread (tdpbssd on the amx path). For
    benchmarks' "% of peak"."""
    kinds = {"int8": 0, "f32": 1}
    if kind not in kinds:
        raise errors.ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
    out = ffi.new("double *")
    _check(lib.cq_peak_gmacs(kinds[kind], out), "peak_gmacs")
    return float(out[0])


# ---- argument checks ------------------------------------------------------------------------------
def _float_array(a, name: str) -> np.ndarray:
    """float32 C-contiguous view or copy of a float array; TypeError for anything not floating."""
    if type(a) is np.ndarray and a.dtype is _F32 and (f := a.flags).c_contiguous and f.aligned:
        return a  # the common case, as it is (np.errstate + np.require cost ~20 us a call)
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.floating):
        raise errors.TypeError(
            f"{name} must be a floating-point array (float32, float64 or float16), got dtype {arr.dtype}")
    # float64 beyond float32 becomes Inf: weights refuse it (quantize: "beyond the float32 range"),
    # activations take it as a non-finite row (NaN / Inf outputs for that row only, as for Inf in x)
    with np.errstate(over="ignore"):
        return np.require(arr, np.float32, _CA)


# The C kernels take float * / int32_t *: an array at an address that is not a multiple of its
# element size (np.frombuffer at an odd offset, a view of a packed record, the CLI's mmap of a
# file whose header length is odd) is copied first; dereferencing it in C is undefined behaviour
# (UBSan: "load of misaligned address"). np.require with "A" copies only such arrays.
_CA = ("C", "A")


_from_buffer = ffi.from_buffer  # read-only buffers are accepted (require_writable defaults to False)


def _ptr(ctype: str, arr: np.ndarray):
    return _from_buffer(ctype, arr)


def check_scales(scale, name: str = "scale") -> np.ndarray:
    """Weight scales as float32 (C-contiguous), refused unless float, finite and >= 0 (an integer
    array is a wrong tensor, not a rounding choice); errors name ``name``."""
    a = np.asarray(scale)
    if a.dtype.kind != "f":
        raise errors.TypeError(f"{name} must be a float array, got {a.dtype}")
    a = np.require(a, np.float32, _CA)
    if not np.isfinite(a).all():
        raise errors.NonFiniteError(f"{name} holds NaN or Inf; scales must be finite and >= 0")
    if (a < 0).any():
        raise errors.ValueError(f"{name} holds negative values; scales must be finite and >= 0")
    return a


def check_finite(a: np.ndarray, name: str = "array") -> None:
    """Raise NonFiniteError naming `name` if `a` holds NaN or Inf."""
    arr = np.asarray(a)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise errors.NonFiniteError(f"{name} holds {bad} NaN/Inf value(s); quantization needs finite weights")


def _bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise errors.ValueError(f"bits must be 8 or 4, got {bits!r}")
    return int(bits)


def _scheme(granularity: str, group_size: Optional[int], k: int, bits: int = 8) -> tuple[int, int]:
    if granularity not in GRANULARITIES:
        raise errors.ValueError(
            f"unknown granularity {granularity!r}; expected one of {sorted(GRANULARITIES)}")
    if granularity != "per_group":
        if group_size is not None:
            raise errors.ValueError(f"group_size is only meaningful with granularity='per_group' (got {group_size})")
        return GRANULARITIES[granularity], 0
    if group_size is None or isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise errors.ValueError(f"granularity='per_group' needs an integer group_size, got {group_size!r}")
    g = int(group_size)
    if g <= 0 or g % 4 != 0 or k % g != 0:
        raise errors.ValueError(
            f"group_size must be a positive multiple of 4 that divides K={k}, got {g}")
    if bits == 4 and (g % 8 != 0 or g > 256):
        raise errors.ValueError(f"int4 weights need a group_size that is a multiple of 8 and at most 256 "
                                f"(e.g. 32, 64, 128), got {g}")
    return lib.CQ_PER_GROUP, g


def _scale_shape(granularity: str, n: int, k: int, group_size: Optional[int]) -> tuple:
    if granularity == "per_tensor":
        return (1,)
    if granularity == "per_channel":
        return (n,)
    return (n, k // int(group_size))


# ---- quantized weights ----------------------------------------------------------------------------
def _array_owner(a: np.ndarray) -> np.ndarray:
    """The array owning a's memory (a itself unless a is a view of another array)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _empty64(size: int) -> np.ndarray:
    """An uninitialised int8 array of `size` bytes starting on a 64-byte boundary. numpy aligns to
    16 bytes: a packed weight 16 bytes off made every 64-byte row the kernels load straddle two
    cache lines (AMX (4096, 4096) M = 256: 6.4 -> 5.3 ms, measured in C)."""
    if size < _ALIGN_MIN:  # small weights: no 64-byte slack, which would outweigh the gain
        return np.empty(size, dtype=np.int8)
    buf = np.empty(size + 64, dtype=np.int8)
    off = -buf.ctypes.data % 64
    return buf[off:off + size]


_ALIGN_MIN = 16384


def _pack(q: np.ndarray, granularity: str, group_size: Optional[int], fmt: int = 0) -> np.ndarray:
    """Packed buffer of canonical codes q (N, K) in format fmt (0: the best for the active path)."""
    n, k = q.shape
    g = int(group_size) if granularity == "per_group" else 0
    size = lib.cq_packed_size(fmt, n, k, g)
    if size < 0:
        _raise(int(size), f"invalid weight shape {q.shape}")
    packed = _empty64(int(size))
    _check(lib.cq_pack(fmt, _ptr("int8_t[]", q), n, k, g, _ptr("int8_t[]", packed)), "pack")
    return packed


class QuantizedWeight:
    """An (N, K) int8 weight in a packed format of the kernels, with float32 scales.

    Holds only numpy arrays, so it pickles, deep-copies and crosses process boundaries as is.
    ``packed`` is the only copy of the codes (a self-describing buffer: header, codes in panels,
    per-column sums); ``q`` unpacks the canonical (N, K) codes on demand. A weight packed in a format
    other than the best one for the path in use (pickled on another machine, or the path forced
    with ``set_isa``) is repacked from its codes on its next use, so memory stays one packed copy.
    """

    __slots__ = ("packed", "scale", "shape", "granularity", "group_size", "_cache")

    def __init__(self, packed: np.ndarray, scale: np.ndarray, shape: tuple, granularity: str,
                 group_size: Optional[int] = None):
        n, k = (int(s) for s in shape)
        _scheme(granularity, group_size, k)
        packed = np.asarray(packed)
        if packed.dtype != np.int8 or packed.ndim != 1:
            raise errors.ValueError(f"packed codes must be a 1-D int8 array, got {packed.dtype} {packed.shape}")
        packed = np.ascontiguousarray(packed)
        dims = ffi.new("int64_t[3]")
        fmt = lib.cq_packed_info(_ptr("int8_t[]", packed), packed.size, dims, dims + 1, dims + 2)
        want_g = int(group_size) if granularity == "per_group" and int(group_size) != k else 0
        if fmt < 0 or (dims[0], dims[1]) != (n, k) or dims[2] != want_g:
            raise errors.ValueError(
                f"packed is not a packed weight of shape {(n, k)} for {granularity}"
                + (f" (group_size {group_size})" if granularity == "per_group" else ""))
        scale = check_scales(scale)
        if scale.shape != _scale_shape(granularity, n, k, group_size):
            raise errors.ShapeError(f"scale has shape {scale.shape}, expected "
                                    f"{_scale_shape(granularity, n, k, group_size)} for {granularity}")
        self.packed = packed
        self.scale = scale
        self.shape = (n, k)
        self.granularity = granularity
        self.group_size = None if group_size is None else int(group_size)
        self._cache = None

    @classmethod
    def from_codes(cls, q: np.ndarray, scale: np.ndarray, granularity: str = "per_channel",
                   group_size: Optional[int] = None, format: Optional[str] = None,
                   bits: Optional[int] = None) -> "QuantizedWeight":
        """Build from canonical (N, K) int8 codes in [-127, 127] (bits=8) or [-7, 7] (bits=4; two
        codes per byte once packed), e.g. read from a checkpoint, packed in ``format`` ('n16k4',
        'n64k4', 'n16k8i4', 'n64k8i4'; default: the best for the active path and bits)."""
        q = np.asarray(q)
        if q.dtype != np.int8 or q.ndim != 2 or q.size == 0:
            raise errors.ValueError(f"codes must be a non-empty 2-D int8 array, got {q.dtype} {q.shape}")
        q = np.ascontiguousarray(q)
        if format is not None and format not in FORMATS:
            raise errors.ValueError(f"unknown format {format!r}; expected one of {sorted(FORMATS)}")
        fbits = _FORMAT_BITS[FORMATS[format]] if format else None
        bits = _bits(bits if bits is not None else (fbits or 8))
        if fbits is not None and fbits != bits:
            raise errors.ValueError(f"format {format!r} holds {fbits}-bit codes, not {bits}-bit")
        _scheme(granularity, group_size, q.shape[1], bits)
        if bits == 4 and (int(q.min()) < -7 or int(q.max()) > 7):
            raise errors.ValueError("int4 codes must lie in [-7, 7]")
        fmt = FORMATS[format] if format else lib.cq_best_format_bits(q.shape[0], bits)
        if fmt < 0:
            _raise(int(fmt), "best format")
        packed = _pack(q, granularity, group_size, fmt)
        return cls(packed, scale, q.shape, granularity, group_size)

    @property
    def format(self) -> str:
        """The packed format ('n16k4' or 'n64k4')."""
        code = int(lib.cq_packed_info(_ptr("int8_t[]", self.packed), self.packed.size,
                                      ffi.NULL, ffi.NULL, ffi.NULL))
        if code < 0:
            _raise(code, "QuantizedWeight.format")
        return _FORMAT_NAMES[code]

    @property
    def bits(self) -> int:
        """Bits per code: 8, or 4 (two codes per byte in the packed buffer)."""
        return _FORMAT_BITS[FORMATS[self.format]]

    @property
    def q(self) -> np.ndarray:
        """Canonical (N, K) int8 codes (a new array, unpacked from ``packed``)."""
        n, k = self.shape
        out = np.empty((n, k), dtype=np.int8)
        _check(lib.cq_unpack(_ptr("int8_t[]", self.packed), n, k, _ptr("int8_t[]", out)), "unpack")
        return out

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds (packed codes with their header and column sums + scales),
        measured from its arrays: each charged with the memory block it views (the packed codes
        sit in a block up to 64 bytes larger, for their 64-byte alignment)."""
        return int(_array_owner(self.packed).nbytes + _array_owner(self.scale).nbytes)

    @property
    def scheme(self) -> str:
        return self.granularity if self.granularity != "per_group" else f"per_group({self.group_size})"

    def _native(self):
        """cffi pointers and C scheme, cached (not pickled): the hot path builds nothing per call.
        The cache remembers the format it was made for; a path whose best format differs repacks."""
        c = self._cache
        bits = c[6] if c is not None else self.bits
        best = lib.cq_best_format_bits(self.shape[0], bits)
        if c is None or c[5] != best:
            code, g = _scheme(self.granularity, self.group_size, self.shape[1], bits)
            if best > 0 and lib.cq_packed_info(_ptr("int8_t[]", self.packed), self.packed.size,
                                               ffi.NULL, ffi.NULL, ffi.NULL) != best:
                self.packed = _pack(self.q, self.granularity, self.group_size, best)
            elif self.packed.ctypes.data % 64 and self.packed.size >= _ALIGN_MIN:  # unpickled or loaded
                aligned = _empty64(self.packed.size)
                aligned[...] = self.packed
                self.packed = aligned
            c = self._cache = (_ptr("int8_t[]", self.packed), _ptr("float[]", self.scale), code, g, None, best, bits)
        return c

    def __getstate__(self):
        return {s: getattr(self, s) for s in self.__slots__ if s != "_cache"}

    def __setstate__(self, state):
        """Rebuild from a pickle with the checks of ``__init__`` and more: a pickle is data from
        elsewhere, and the C kernels trust the packed buffer (a shape larger than the buffer would
        read past it). Dtypes are checked, not converted; the packed buffer must hold exactly the
        weight its shape says (header, size, -128-free codes, column sums: it must equal the packing
        of its own codes); scales must be finite. Anything else is a cquant ValueError/TypeError.
        (Unpickling still runs whatever code a hostile pickle names, as every pickle does: load
        pickles only from sources you trust; checkpoints are the safe format.)"""
        if not isinstance(state, dict) or set(state) != {"packed", "scale", "shape", "granularity", "group_size"}:
            raise errors.ValueError("not a pickled QuantizedWeight: its state must hold packed, scale, shape, "
                                    "granularity and group_size")
        packed, scale, shape = state["packed"], state["scale"], state["shape"]
        gran, g = state["granularity"], state["group_size"]
        if type(packed) is not np.ndarray or packed.dtype != np.int8 or packed.ndim != 1:
            raise errors.TypeError(f"pickled QuantizedWeight: packed must be a 1-D int8 ndarray, got "
                                   f"{type(packed).__name__} {getattr(packed, 'dtype', '')}")
        if type(scale) is not np.ndarray or scale.dtype != np.float32:
            raise errors.TypeError(f"pickled QuantizedWeight: scale must be a float32 ndarray, got "
                                   f"{type(scale).__name__} {getattr(scale, 'dtype', '')}")
        if (not isinstance(shape, tuple) or len(shape) != 2
                or not all(type(d) is int and d > 0 for d in shape)):
            raise errors.ValueError(f"pickled QuantizedWeight: shape must be two positive ints, got {shape!r}")
        if not isinstance(gran, str) or not (g is None or type(g) is int):
            raise errors.TypeError("pickled QuantizedWeight: granularity must be a str and group_size an int or None")
        try:  # header vs shape, size, scheme, scale shape and values
            self.__init__(packed, scale, shape, gran, g)
        except errors.NonFiniteError as e:
            raise errors.NonFiniteError(f"pickled QuantizedWeight: {e}") from None
        q = self.q  # codes back out of the (now size-checked) buffer
        if q.size and int(q.min()) == -128:
            raise errors.ValueError("pickled QuantizedWeight: codes hold -128; codes must be in [-127, 127]")
        fmt = lib.cq_packed_info(_ptr("int8_t[]", self.packed), self.packed.size, _NULL, _NULL, _NULL)
        if not np.array_equal(_pack(q, gran, g, int(fmt)), self.packed):
            raise errors.ValueError("pickled QuantizedWeight: packed buffer is inconsistent (its padding or "
                                    "column sums are not those of its codes)")

    def __repr__(self) -> str:
        return f"QuantizedWeight(shape={self.shape}, scheme={self.scheme}, nbytes={self.nbytes})"


def _weight_2d(w, name: str = "weight") -> np.ndarray:
    arr = np.asarray(w)
    if arr.ndim != 2:
        raise errors.ShapeError(f"{name} must be 2-D (out_features, in_features), got shape {arr.shape}")
    if arr.size == 0:
        raise errors.ShapeError(f"{name} is empty (shape {arr.shape})")
    return _float_array(arr, name)


def quantize(w, granularity: str = "per_channel", group_size: Optional[int] = None,
             name: str = "weight", bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes and scales of w (N, K): ``(q int8 (N, K), scale float32)`` (scale shape as
    in QuantizedWeight). bits=8: codes in [-127, 127], scale max|w| / 127; bits=4: codes in
    [-7, 7], scale max|w| / 7 (the same rule with 7 for 127). NonFiniteError if w holds NaN/Inf."""
    orig = w
    bits = _bits(bits)
    w = _weight_2d(w, name)
    n, k = w.shape
    code, g = _scheme(granularity, group_size, k, bits)
    q = np.empty((n, k), dtype=np.int8)
    scale = np.empty(_scale_shape(granularity, n, k, group_size), dtype=np.float32)
    st = lib.cq_quantize_bits(bits, _ptr("float[]", w), n, k, code, g, _ptr("int8_t[]", q), _ptr("float[]", scale))
    if st == lib.CQ_ERR_NONFINITE:
        check_finite(orig, name)  # NaN/Inf in the caller's array: says how many
        raise errors.NonFiniteError(
            f"{name} holds values beyond the float32 range (|w| > 3.4e38), which float32 weights "
            "cannot represent")
    _check(st, f"quantize {name}")
    return q, scale


def quantize_weight(w, granularity: str = "per_channel", group_size: Optional[int] = None,
                    name: str = "weight", bits: int = 8) -> QuantizedWeight:
    """Quantize a float (N, K) weight into a packed QuantizedWeight (the float copy is not kept);
    bits=4 packs two codes per byte."""
    q, scale = quantize(w, granularity, group_size, name, bits)
    return QuantizedWeight.from_codes(q, scale, granularity, group_size, bits=bits)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """float32 (N, K) = codes * scale of their slice."""
    n, k = qw.shape
    q = qw.q
    out = np.empty((n, k), dtype=np.float32)
    _, _, code, g, _, _, _ = qw._native()
    _check(lib.cq_dequantize(_ptr("int8_t[]", q), _ptr("float[]", qw.scale), n, k, code, g,
                             _ptr("float[]", out)), "dequantize")
    return out


def quantize_rows(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-row activation quantization of x (M, K): ``(q int8 (M, K), scale float32 (M,))``.
    A row with NaN/Inf gets scale NaN and codes 0; zero rows give empty results."""
    x = _float_array(x, "x")
    if x.ndim != 2 or x.shape[1] == 0:
        raise errors.ShapeError(f"x must be a 2-D array with K >= 1 columns, got shape {x.shape}")
    m, k = x.shape
    q = np.empty((m, k), dtype=np.int8)
    s = np.empty(m, dtype=np.float32)
    if m == 0:
        return q, s
    _check(lib.cq_quantize_rows(_ptr("float[]", x), m, k, _ptr("int8_t[]", q), _ptr("float[]", s)),
           "quantize_rows")
    return q, s


def quantize_rows_u8(x) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`quantize_rows`, with the codes stored as u8 ``q + 128`` (what the AVX-512 VNNI
    kernels read): ``(uint8 (M, K), scale float32 (M,))``."""
    x = _float_array(x, "x")
    if x.ndim != 2 or x.shape[1] == 0:
        raise errors.ShapeError(f"x must be a 2-D array with K >= 1 columns, got shape {x.shape}")
    m, k = x.shape
    q = np.empty((m, k), dtype=np.uint8)
    s = np.empty(m, dtype=np.float32)
    if m == 0:
        return q, s
    _check(lib.cq_quantize_rows_u8(_ptr("float[]", x), m, k, _ptr("uint8_t[]", q), _ptr("float[]", s)),
           "quantize_rows_u8")
    return q, s


def _int8_2d(a, name: str, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != np.int8:
        raise errors.TypeError(f"{name} must be int8, got dtype {arr.dtype}")
    if arr.ndim != 2 or (arr.size == 0 and not allow_empty):
        raise errors.ShapeError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if (arr == -128).any():
        raise errors.ValueError(f"{name} holds -128; int8 codes must be in [-127, 127]")
    return np.ascontiguousarray(arr)


def gemm_s8s8s32(a, b) -> np.ndarray:
    """Exact int32 (M, N) = int8 a (M, K) @ int8 b (N, K).T. Codes in [-127, 127];
    K <= MAX_K_S32 (133144), beyond which int32 could overflow (OverflowError)."""
    a = _int8_2d(a, "a", allow_empty=True)
    b = _int8_2d(b, "b", allow_empty=True)
    (m, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise errors.ShapeError(f"a is {a.shape} and b is {b.shape}: their K differ")
    if m == 0 or n == 0 or k == 0:  # empty product: sums over nothing are 0
        return np.zeros((m, n), dtype=np.int32)
    if k > MAX_K_S32:
        raise errors.OverflowError(f"K={k} > {MAX_K_S32}: int32 sums could overflow")
    c = np.empty((m, n), dtype=np.int32)
    _check(lib.cq_gemm_s8s8s32(_ptr("int8_t[]", a), _ptr("int8_t[]", b), m, n, k, _ptr("int32_t[]", c)),
           "gemm_s8s8s32")
    return c


_F32 = np.dtype(np.float32)
_FLT_MAX = float(np.finfo(np.float32).max)
_NULL = ffi.NULL
_cq_linear = lib.cq_linear
#: ``linear(..., activation=)`` names -> C post-op codes
_POSTS = {"gelu": lib.CQ_POST_GELU}


class AddLayerNorm:
    """The post-op ``y = LayerNorm(y + residual * residual_mul)`` of :func:`linear` (``activation=``):
    BERT's output blocks. ``residual``: y's shape; ``weight`` / ``bias`` / ``residual_mul``: (N,) or
    None; ``eps`` >= 0. Checked and converted once, here; :meth:`apply` is the separate pass (bit for
    bit what ``linear`` does inside its kernel's units)."""

    __slots__ = ("residual", "weight", "bias", "eps", "residual_mul")

    def __init__(self, residual, weight=None, bias=None, eps: float = 1e-5, residual_mul=None):
        self.residual = _float_array(residual, "residual")
        self.weight = None if weight is None else _float_array(weight, "weight")
        self.bias = None if bias is None else _float_array(bias, "bias")
        self.residual_mul = None if residual_mul is None else _float_array(residual_mul, "residual_mul")
        eps = _float_arg(eps, "eps")
        if not eps >= 0.0:
            raise errors.ValueError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def apply(self, y: np.ndarray) -> np.ndarray:
        """The add + LayerNorm as its own pass, over y in place."""
        return add_layer_norm(y, self.residual, self.weight, self.bias, self.eps, out=y,
                              residual_mul=self.residual_mul)

    def _pointers(self, y_shape: tuple, n: int) -> tuple:
        if self.residual.shape != y_shape:
            raise errors.ShapeError(f"residual has shape {self.residual.shape}, expected {y_shape}")
        ptrs = [_ptr("float[]", self.residual)]
        for name, a in (("residual_mul", self.residual_mul), ("weight", self.weight), ("bias", self.bias)):
            if a is not None and a.shape != (n,):
                raise errors.ShapeError(f"layer_norm {name} has shape {a.shape}, expected ({n},)")
            ptrs.append(_NULL if a is None else _ptr("float[]", a))
        return tuple(ptrs)
_best_format_bits = lib.cq_best_format_bits


def linear(x, qw: QuantizedWeight, bias=None, mode: str = "dynamic", *, x_mul=None,
           x_scale=None, x_hadamard: int = 0, activation: Optional[str] = None) -> np.ndarray:
    """y (..., N) float32 = x (..., K) through the quantized weight, plus bias (N,).

    mode="dynamic": rows of x quantized to int8 at run time, exact integer sums, scaled to float32.
    mode="weight_only": float32 x times the weight dequantized inside the kernel.

    x_mul (K,) float32: the layer's input is ``x * x_mul`` (SmoothQuant's ``1/s`` where it could not
    be folded away), applied inside the activation quantizer in dynamic mode (no extra pass over x).
    x_scale (float > 0, dynamic mode only): static activations: every row quantized with this scale
    (codes clamped to [-127, 127]) instead of its own ``max|row| / 127``.
    x_hadamard (0, or a power of two b >= 2 dividing K): the input (``x * x_mul``) is rotated by the
    unnormalised Walsh-Hadamard transform of each block of b columns (:func:`hadamard` gives it) in
    the same pass; the weight must have been rotated to match (see :mod:`cquant.smoothing`).
    activation (None or "gelu"): y = :func:`gelu` (y), applied to each block of outputs as the
    kernel finishes it (C ``cq_linear_post``: no second pass over y), bit for bit the same as
    ``gelu(linear(...))``. Or an :class:`AddLayerNorm`: ``y = LayerNorm(y + residual *
    residual_mul)`` on each block of whole rows as the kernel finishes it (C ``cq_linear_add_ln``),
    bit for bit ``add_layer_norm(linear(...), ...)``.

    This is the per-call hot path of every quantized layer: it is kept lean (cached cffi pointers
    for the weight and the last bias, no per-call conversion of float32 C-contiguous inputs).
    """
    cache = _weight_cache(qw)
    mcode = _mode_code(mode)
    add_ln = activation if type(activation) is AddLayerNorm else None
    if activation is not None and add_ln is None and (type(activation) is not str or activation not in _POSTS):
        raise errors.ValueError(f"unknown activation {activation!r}; expected None, one of {sorted(_POSTS)} "
                                "or an AddLayerNorm")
    n, k = qw.shape
    x = _x_rows(x, k)
    shape = x.shape
    m = x.size // k
    y = np.empty(shape[:-1] + (n,), dtype=_F32)
    if m == 0:
        return y
    pk, ps, code, g, bias_cache, fmt, bits = cache
    if bias is None:
        bp = _NULL
    elif bias_cache is not None and bias_cache[0] is bias:
        bp = bias_cache[1]
    else:
        b = _bias_array(bias, n)
        bp = _from_buffer("float[]", b)
        if b is bias:  # the layer's own float32 bias: keep its pointer (the buffer export pins it)
            qw._cache = (pk, ps, code, g, (bias, bp), fmt, bits)
    if add_ln is not None:
        rp, rmp, gp, bep = add_ln._pointers(y.shape, n)
        mp, xs, hb = _act_args(x_mul, x_scale, x_hadamard, k, mcode)
        st = lib.cq_linear_add_ln(mcode, _from_buffer("float[]", x), m, k, pk, ps, code, g, n, bp, mp, hb, xs,
                                  rp, rmp, gp, bep, add_ln.eps, _from_buffer("float[]", y))
    elif x_mul is None and x_scale is None and not x_hadamard and activation is None:
        st = _cq_linear(mcode, _from_buffer("float[]", x), m, k, pk, ps, code, g, n, bp,
                        _from_buffer("float[]", y))
    else:
        mp, xs, hb = _act_args(x_mul, x_scale, x_hadamard, k, mcode)
        st = lib.cq_linear_post(mcode, _from_buffer("float[]", x), m, k, pk, ps, code, g, n, bp, mp, hb, xs,
                                _POSTS[activation] if activation is not None else lib.CQ_POST_NONE,
                                _from_buffer("float[]", y))
    if st:
        _linear_error(st, "linear", x_mul)
    return y


def _weight_cache(qw) -> tuple:
    """The weight's cached cffi pointers and scheme codes, (re)made where its packed format is not
    the one the active path reads best."""
    cache = qw._cache if type(qw) is QuantizedWeight else None
    if cache is None or cache[5] != _best_format_bits(qw.shape[0], cache[6]):
        if not isinstance(qw, QuantizedWeight):
            raise errors.TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
        cache = qw._native()
    return cache


def _mode_code(mode) -> int:
    mcode = MODES.get(mode) if type(mode) is str else None
    if mcode is None:
        raise errors.ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    return mcode


def _x_rows(x, k: int) -> np.ndarray:
    """x as a float32 C-contiguous array whose last dimension is K (float32 C-contiguous input as
    it is: no copy on the hot path)."""
    if type(x) is not np.ndarray or x.dtype is not _F32 or not (xf := x.flags).c_contiguous or not xf.aligned:
        if np.ndim(x) == 0:
            raise errors.ShapeError(f"x must have at least one dimension (..., K={k}), got a scalar")
        x = _float_array(x, "x")
    if not x.shape or x.shape[-1] != k:
        raise errors.ShapeError(f"x has shape {x.shape}; its last dimension must be K={k}")
    return x


def _bias_array(b, n: int) -> np.ndarray:
    if type(b) is not np.ndarray or b.dtype is not _F32 or not (bf := b.flags).c_contiguous or not bf.aligned:
        b = _float_array(b, "bias")
    if b.shape != (n,):
        raise errors.ShapeError(f"bias has shape {b.shape}, expected ({n},)")
    return b


def _act_args(x_mul, x_scale, x_hadamard, k: int, mcode: int) -> tuple:
    """(x_mul pointer, x_scale, x_hadamard) for cq_linear_ex / cq_linear_multi, checked. A layer's
    own pre-scale array keeps its pointer (``_XMUL_PTRS``)."""
    mp = _NULL
    if x_mul is not None:
        hit = _XMUL_PTRS.get(id(x_mul))
        if hit is not None and hit[0] is x_mul and hit[0].shape == (k,) and hit[0].dtype is _F32:
            mp = hit[1]
        else:
            xm = x_mul
            if type(xm) is not np.ndarray or xm.dtype is not _F32 or not xm.flags.c_contiguous \
                    or not xm.flags.aligned:
                xm = _float_array(xm, "x_mul")
            if xm.shape != (k,):
                raise errors.ShapeError(f"x_mul has shape {xm.shape}, expected ({k},)")
            mp = _from_buffer("float[]", xm)
            if xm is x_mul:  # a layer's own pre-scale (read through the pointer on each call): keep it
                if len(_XMUL_PTRS) >= 256:
                    _XMUL_PTRS.clear()
                _XMUL_PTRS[id(xm)] = (xm, mp)
    xs = 0.0
    if x_scale is not None:
        xs = _float_arg(x_scale, "x_scale")
        if not (0.0 < xs <= _FLT_MAX) or np.float32(xs) == 0:  # finite and > 0 in float32
            raise errors.ValueError(f"x_scale must be a finite float32 > 0, got {x_scale!r}")
        if mcode != MODES["dynamic"]:
            raise errors.ValueError("x_scale (static activations) needs mode='dynamic'")
    hb = hadamard_block(x_hadamard, k) if x_hadamard else 0
    return mp, xs, hb


def _linear_error(st: int, what: str, x_mul) -> None:
    if st == lib.CQ_ERR_NONFINITE and x_mul is not None:  # the only non-finite input C refuses here
        raise errors.NonFiniteError(f"{what}: x_mul holds NaN or Inf (a smoothing pre-scale must be finite)")
    _raise(st, what)


def linear_multi(x, qws, biases=None, mode: str = "dynamic", *, x_mul=None, x_scale=None,
                 x_hadamard: int = 0) -> list:
    """``[linear(x, qws[i], biases[i], mode, x_mul=..., x_scale=..., x_hadamard=...) for i]``, bit for
    bit, with one activation pass for all of them (C ``cq_linear_multi``): attention's query, key and
    value projections read the same x, so it is quantized (pre-scaled, rotated) once instead of three
    times. The weights must share K and their scheme (granularity, group size, bits); ``biases``: None
    or one entry (or None) per weight. Returns a list of float32 arrays (..., N_i)."""
    if isinstance(qws, QuantizedWeight) or not isinstance(qws, (list, tuple)):
        raise errors.TypeError(f"linear_multi takes a list or tuple of QuantizedWeight, got {type(qws).__name__}")
    qws = list(qws)
    if not all(isinstance(q, QuantizedWeight) for q in qws):
        raise errors.TypeError("linear_multi: every weight must be a QuantizedWeight")
    if biases is not None and not isinstance(biases, (list, tuple)):
        raise errors.TypeError(f"linear_multi: biases must be None or a list / tuple, got {type(biases).__name__}")
    if not qws or len(qws) > lib.CQ_MULTI_MAX:
        raise errors.ValueError(f"linear_multi needs 1 to {lib.CQ_MULTI_MAX} weights, got {len(qws)}")
    caches = [_weight_cache(qw) for qw in qws]
    bl = [None] * len(qws) if biases is None else list(biases)
    if len(bl) != len(qws):
        raise errors.ValueError(f"{len(bl)} biases for {len(qws)} weights")
    k = qws[0].shape[1]
    key = (qws[0].granularity, qws[0].group_size, qws[0].bits)
    for qw in qws[1:]:
        if qw.shape[1] != k or (qw.granularity, qw.group_size, qw.bits) != key:
            raise errors.ValueError("linear_multi: the weights must share K and the scheme; got "
                                    f"{[(q.shape, q.scheme) for q in qws]}")
    mcode = _mode_code(mode)
    x = _x_rows(x, k)
    m = x.size // k
    ys = [np.empty(x.shape[:-1] + (qw.shape[0],), dtype=_F32) for qw in qws]
    if m == 0:
        return ys
    bs = [None if b is None else _bias_array(b, qw.shape[0]) for qw, b in zip(qws, bl)]
    mp, xs, hb = _act_args(x_mul, x_scale, x_hadamard, k, mcode)
    pk = ffi.new("void *[]", [ffi.cast("void *", c[0]) for c in caches])
    ps = ffi.new("float *[]", [c[1] for c in caches])
    ns = ffi.new("int64_t[]", [qw.shape[0] for qw in qws])
    bp = ffi.new("float *[]", [_NULL if b is None else _from_buffer("float[]", b) for b in bs])
    yp = ffi.new("float *[]", [_from_buffer("float[]", y) for y in ys])
    st = lib.cq_linear_multi(mcode, _from_buffer("float[]", x), m, k, len(qws), pk, ps, caches[0][2], caches[0][3],
                             ns, bp, mp, hb, xs, yp)
    if st:
        _linear_error(st, "linear_multi", x_mul)
    return ys


#: id -> (array, cffi pointer) of the last x_mul arrays seen by linear() (the smoothing wrappers'
#: pre-scales, passed on every call): the array is held, so the id cannot be reused while cached
_XMUL_PTRS: dict = {}


def hadamard_block(b, k: int, what: str = "x_hadamard", allow_zero: bool = False) -> int:
    """``b`` checked as a rotation block for K = ``k``: an int, a power of two >= 2 dividing k (or 0,
    no rotation, where ``allow_zero``); TypeError / ValueError naming ``what`` otherwise."""
    b = _int_arg(b, what)
    if (b or not allow_zero) and (b < 2 or b & (b - 1) or k % b):
        raise errors.ValueError(f"{what} must be {'0 or ' if allow_zero else ''}a power of two >= 2 that divides "
                                f"K={k}, got {b}")
    return b


def hadamard(x, block: int, x_mul=None) -> np.ndarray:
    """The rotation of ``linear(..., x_hadamard=block)`` as a float32 array: ``v = x * x_mul`` (or x),
    then the unnormalised Walsh-Hadamard transform of each block of ``block`` consecutive columns,
    in the kernel's order of float32 operations (bit-identical to what the kernel quantizes; numpy,
    for float paths and tests). ``H_b`` is symmetric and ``H_b @ H_b = block * I``."""
    v = _float_array(x, "x")
    if v.ndim == 0:
        raise errors.ShapeError("x must have at least one dimension (the rotated columns are its last)")
    k = v.shape[-1]
    b = hadamard_block(block, k, "block")
    if x_mul is not None:
        xm = _float_array(x_mul, "x_mul")
        if xm.shape != (k,):  # as linear(): no broadcasting of a short pre-scale
            raise errors.ShapeError(f"x_mul has shape {xm.shape}, expected ({k},)")
        v = v * xm
    else:
        v = v.copy()
    return hadamard_stages(v, b)


def hadamard_stages(v: np.ndarray, block: int) -> np.ndarray:
    """The stages h = 1, 2, ..., block / 2 of the rotation applied to ``v`` in place (in its own
    dtype: float32 for the kernel's values, float64 to rotate weights); returns ``v``. ``v`` is
    C-contiguous and its last dimension a multiple of ``block``."""
    shape = v.shape
    k = shape[-1]
    h = 1
    while h < block:
        w = v.reshape(-1, k // (2 * h), 2, h)
        a, c = w[:, :, 0, :].copy(), w[:, :, 1, :].copy()
        w[:, :, 0, :] = a + c
        w[:, :, 1, :] = a - c
        h *= 2
    return v


def _int_arg(value, name: str) -> int:
    """An integer argument (Python or numpy int, not bool, not a float to truncate)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise errors.TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _float_arg(value, name: str) -> float:
    """A real number argument (int or float, not bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise errors.TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _not_scalar(x, name: str) -> None:
    if np.ndim(x) == 0:
        raise errors.ShapeError(f"{name} must have at least one dimension, got a scalar")


def gelu(x) -> np.ndarray:
    """Exact GELU ``x/2 * (1 + erf(x/sqrt 2))`` of a float array (any shape) -> float32, same shape.

    Absolute error <= 1e-6 + 3e-7 |x| against a float64 reference on every ISA path."""
    _not_scalar(x, "x")
    x = _float_array(x, "x")
    y = np.empty_like(x)
    _check(lib.cq_gelu(_ptr("float[]", x), x.size, _ptr("float[]", y)), "gelu")
    return y


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis of x (..., K) (biased variance, as torch), optional weight and
    bias (K,) -> float32, same shape. The mean and variance are summed in a numerically safe order
    (two passes, double at the end). :func:`add_layer_norm` without a residual."""
    return add_layer_norm(x, None, weight, bias, eps)


# ---- float kernels of the transformer layers (in place / fused) -------------------------------
def _writable_f32(x, name: str) -> np.ndarray:
    """x itself if it is a writable C-contiguous float32 ndarray (in-place kernels), else TypeError."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise errors.TypeError(f"{name} must be a float32 numpy array (written in place), got "
                               f"{type(x).__name__} {getattr(x, 'dtype', '')}")
    if not x.flags.c_contiguous or not x.flags.writeable:
        raise errors.TypeError(f"{name} must be C-contiguous and writable (written in place)")
    if not x.flags.aligned:
        raise errors.TypeError(f"{name} is not aligned to 4 bytes (written in place, so it cannot be "
                               "copied); pass an aligned array, e.g. a copy")
    return x


def softmax_rows(x: np.ndarray, bias=None, rows_per_bias: Optional[int] = None,
                 scale: float = 1.0) -> np.ndarray:
    """In place: ``x[r] = softmax(x[r] * scale + bias[r // rows_per_bias])`` over the last axis of
    ``x`` (a C-contiguous float32 array, K = x.shape[-1] >= 1, M rows); returns ``x``.

    ``bias``: None or an additive mask with K values per row, any shape of size NB * K (e.g. (B, T)
    for attention scores (B, heads, T, T): each of its rows serves ``rows_per_bias`` consecutive
    rows of x, by default M // NB, with no broadcast copy). A row with a NaN, or all -Inf, becomes
    NaN (as torch)."""
    x = _writable_f32(x, "x")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise errors.ShapeError(f"softmax_rows needs a non-empty last axis, got shape {x.shape}")
    k = x.shape[-1]
    m = x.size // k
    bptr, rpb = ffi.NULL, 1
    if bias is not None:
        b = _float_array(bias, "bias")
        if b.size == 0 or b.size % k:
            raise errors.ShapeError(f"softmax_rows bias of shape {b.shape} is not rows of {k}")
        nb = b.size // k
        if rows_per_bias is None:
            if m % nb:
                raise errors.ShapeError(f"{m} rows do not split evenly over {nb} bias rows; pass rows_per_bias")
            rpb = max(m // nb, 1)
        else:
            rpb = _int_arg(rows_per_bias, "rows_per_bias")
            if rpb < 1:
                raise errors.ShapeError(f"rows_per_bias must be >= 1, got {rows_per_bias}")
            rpb = min(rpb, max(m, 1))  # more than M rows per bias row: all of them use the first
            if m and (m - 1) // rpb >= nb:
                raise errors.ShapeError(f"{m} rows at {rpb} per bias row need {(m - 1) // rpb + 1} bias rows, got {nb}")
        bptr = _ptr("float[]", b)
    sc = _float_arg(scale, "scale")
    if not np.isfinite(np.float32(sc)):
        raise errors.ValueError(f"scale must be a finite float32, got {scale!r}")
    _check(lib.cq_softmax_rows(_ptr("float[]", x), m, k, bptr, rpb, sc), "softmax_rows")
    return x


def gelu_inplace(x: np.ndarray) -> np.ndarray:
    """:func:`gelu` written over ``x`` (a C-contiguous writable float32 array); returns ``x``."""
    x = _writable_f32(x, "x")
    _check(lib.cq_gelu(_ptr("float[]", x), x.size, _ptr("float[]", x)), "gelu")
    return x


def add_layer_norm(x, residual=None, weight=None, bias=None, eps: float = 1e-5,
                   out: Optional[np.ndarray] = None, residual_mul=None) -> np.ndarray:
    """``LayerNorm(x + residual)`` over the last axis in one C pass per row (residual None: plain
    :func:`layer_norm`), optional weight and bias (K,). ``out``: a C-contiguous float32 array of
    x's shape to write (may be x or residual), else a new array. ``residual_mul`` (K,): the
    residual's columns scaled first, ``LayerNorm(x + residual * residual_mul)`` (the float32
    product, then the sum), in the same pass; it needs a residual. float32, x's shape."""
    _not_scalar(x, "x")
    x = _float_array(x, "x")
    if x.shape[-1] == 0:
        raise errors.ShapeError(f"layer_norm needs a non-empty last axis, got shape {x.shape}")
    k = x.shape[-1]
    rptr = ffi.NULL
    if residual is not None:
        residual = _float_array(residual, "residual")
        if residual.shape != x.shape:
            raise errors.ShapeError(f"residual has shape {residual.shape}, expected {x.shape}")
        rptr = _ptr("float[]", residual)
    mptr = ffi.NULL
    if residual_mul is not None:
        if residual is None:
            raise errors.ValueError("add_layer_norm: residual_mul needs a residual")
        rm = _float_array(residual_mul, "residual_mul")
        if rm.shape != (k,):
            raise errors.ShapeError(f"residual_mul has shape {rm.shape}, expected ({k},)")
        mptr = _ptr("float[]", rm)
    ptrs = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            ptrs.append(ffi.NULL)
            continue
        arr = _float_array(p, name)
        if arr.shape != (k,):
            raise errors.ShapeError(f"layer_norm {name} has shape {arr.shape}, expected ({k},)")
        ptrs.append(_ptr("float[]", arr))
    eps = _float_arg(eps, "eps")
    if not eps >= 0.0:
        raise errors.ValueError(f"eps must be >= 0, got {eps}")
    if out is None:
        out = np.empty_like(x)
    else:
        out = _writable_f32(out, "out")
        if out.shape != x.shape:
            raise errors.ShapeError(f"out has shape {out.shape}, expected {x.shape}")
        for other in (x, residual):  # the very same buffer is fine (in place); a partial overlap is not
            if other is not None and np.may_share_memory(out, other) and not (
                    isinstance(other, np.ndarray) and out.__array_interface__["data"][0]
                    == other.__array_interface__["data"][0] and out.strides == other.strides):
                raise errors.ValueError("add_layer_norm out partly overlaps x or residual; pass the "
                                        "same array (in place) or a separate one")
    if residual_mul is not None and np.may_share_memory(out, rm):
        raise errors.ValueError("add_layer_norm out overlaps residual_mul")
    _check(lib.cq_add_layer_norm_ex(_ptr("float[]", x), rptr, mptr, x.size // k, k, ptrs[0], ptrs[1], eps,
                                    _ptr("float[]", out)), "add_layer_norm")
    return out


def _rows_view(a: np.ndarray, shape: tuple) -> Optional[int]:
    """Row stride (floats) of a float32 (B, T, W) array whose rows are evenly spaced with unit
    column stride (C-contiguous, or a column slice of a fused projection), else None."""
    if a.dtype != np.float32 or a.shape != shape or not a.flags.aligned:
        return None
    if a.flags.c_contiguous:
        return shape[2]
    _, t, w = shape
    st = a.strides
    if st[2] != 4 or st[1] % 4 or st[1] < 4 * w or st[0] != t * st[1]:
        return None
    return st[1] // 4


def attention(q, k, v, num_heads: int, mask_bias=None, scale: Optional[float] = None,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Multi-head scaled dot-product attention on (B, T, H) projections, heads split from H with no
    reshape or transpose: ``softmax(q_h k_h^T * scale + mask_bias[b]) v_h`` per batch and head,
    written as (B, T, H) (heads side by side, as BERT's output projection reads them).

    q, k, v: float32 (B, T, H) arrays with the same strides: C-contiguous, or column slices of one
    fused (B, T, 3H) projection (read in place); anything else is copied. ``mask_bias``: None or
    an additive key mask of size B * T ((B, T) or (B, 1, 1, T)): 0 for tokens, a large negative
    number or -Inf for padding. ``scale`` defaults to 1/sqrt(H / num_heads). ``out``: a C-contiguous
    float32 (B, T, H) array not overlapping q, k, v, else a new one."""
    arrs = [np.asarray(a) for a in (q, k, v)]
    for name, a in zip("qkv", arrs):
        if not np.issubdtype(a.dtype, np.floating):
            raise errors.TypeError(f"attention {name} must be a floating-point array, got dtype {a.dtype}")
        if a.ndim != 3 or a.shape != arrs[0].shape:
            raise errors.ShapeError(f"attention needs q, k, v of one (B, T, H) shape, got "
                                    f"{[x.shape for x in arrs]}")
    shape = arrs[0].shape
    bsz, t, h = shape
    heads = _int_arg(num_heads, "num_heads")
    if h == 0:
        raise errors.ShapeError(f"attention needs a non-empty hidden size H, got shape {shape}")
    if heads < 1 or h % heads:
        raise errors.ShapeError(f"hidden size {h} is not a multiple of num_heads {num_heads}")
    dh = h // heads
    lds = [_rows_view(a, shape) for a in arrs]
    if lds[0] is None or len(set(lds)) != 1:
        arrs = [np.require(a, np.float32, _CA) for a in arrs]
        ld = h
    else:
        ld = lds[0]
    bptr = ffi.NULL
    if mask_bias is not None:
        mb = _float_array(mask_bias, "mask_bias")
        if mb.size != bsz * t:
            raise errors.ShapeError(f"mask_bias of shape {mb.shape} is not one value per (batch, key) "
                                    f"of ({bsz}, {t})")
        bptr = _ptr("float[]", mb)
    if out is None:
        out = np.empty(shape, np.float32)
    else:
        out = _writable_f32(out, "out")
        if out.shape != shape:
            raise errors.ShapeError(f"out has shape {out.shape}, expected {shape}")
    if any(np.may_share_memory(out, a) for a in arrs):
        raise errors.ValueError("attention out must not overlap q, k or v")
    sc = 1.0 / float(np.sqrt(dh)) if scale is None else _float_arg(scale, "scale")
    ptrs = [ffi.cast("float *", a.ctypes.data) for a in arrs]  # arrs keeps the buffers alive
    _check(lib.cq_attention(ptrs[0], ptrs[1], ptrs[2], ld, bsz, t, heads, dh, bptr, sc,
                            _ptr("float[]", out), h), "attention")
    return out
