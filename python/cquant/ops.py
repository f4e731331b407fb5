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
    "gemm_s8s8s32", "check_finite", "isa", "set_isa", "available_isas", "set_num_threads",
    "get_num_threads", "native_version", "GRANULARITIES", "MODES", "gelu", "layer_norm",
]

GRANULARITIES = {"per_tensor": lib.CQ_PER_TENSOR, "per_channel": lib.CQ_PER_CHANNEL,
                 "per_group": lib.CQ_PER_GROUP}
MODES = {"weight_only": lib.CQ_MODE_WEIGHT_ONLY, "dynamic": lib.CQ_MODE_DYNAMIC}
_ISAS = {"scalar": lib.CQ_ISA_SCALAR, "avx2": lib.CQ_ISA_AVX2, "avx512vnni": lib.CQ_ISA_AVX512VNNI}
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
    """Name of the instruction-set path the kernels use now ('scalar', 'avx2', 'avx512vnni')."""
    code = lib.cq_get_isa()
    if code < 0:
        raise errors.IsaError(_isa_message("no usable kernel path"))
    return ffi.string(lib.cq_isa_name(code)).decode()


def set_isa(name: str) -> str:
    """Force a path by name, or 'auto' (CQUANT_ISA if set, else the best). Returns the path in use.

    Raises IsaError if this CPU or build cannot run it, ValueError for an unknown name."""
    name = name.lower() if isinstance(name, str) else name
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


# ---- argument checks ------------------------------------------------------------------------------
def _float_array(a, name: str) -> np.ndarray:
    """float32 C-contiguous view or copy of a float array; TypeError for anything not floating."""
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.floating):
        raise errors.TypeError(
            f"{name} must be a floating-point array (float32, float64 or float16), got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes Inf: refused later as non-finite
        return np.ascontiguousarray(arr, dtype=np.float32)


_from_buffer = ffi.from_buffer  # read-only buffers are accepted (require_writable defaults to False)


def _ptr(ctype: str, arr: np.ndarray):
    return _from_buffer(ctype, arr)


def check_finite(a: np.ndarray, name: str = "array") -> None:
    """Raise NonFiniteError naming `name` if `a` holds NaN or Inf."""
    arr = np.asarray(a)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise errors.NonFiniteError(f"{name} holds {bad} NaN/Inf value(s); quantization needs finite weights")


def _scheme(granularity: str, group_size: Optional[int], k: int) -> tuple[int, int]:
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
    return lib.CQ_PER_GROUP, g


def _scale_shape(granularity: str, n: int, k: int, group_size: Optional[int]) -> tuple:
    if granularity == "per_tensor":
        return (1,)
    if granularity == "per_channel":
        return (n,)
    return (n, k // int(group_size))


# ---- quantized weights ----------------------------------------------------------------------------
class QuantizedWeight:
    """An (N, K) int8 weight in the kernels' packed layout, with float32 scales.

    Holds only numpy arrays, so it pickles, deep-copies and crosses process boundaries as is.
    ``packed`` is the only copy of the codes; ``q`` unpacks the canonical (N, K) codes on demand.
    """

    __slots__ = ("packed", "scale", "shape", "granularity", "group_size", "_cache")

    def __init__(self, packed: np.ndarray, scale: np.ndarray, shape: tuple, granularity: str,
                 group_size: Optional[int] = None):
        n, k = (int(s) for s in shape)
        _scheme(granularity, group_size, k)
        size = lib.cq_packed_size(n, k)
        if size < 0:
            _raise(int(size), f"invalid weight shape {shape}")
        packed = np.asarray(packed)
        if packed.dtype != np.int8 or packed.ndim != 1 or packed.size != size:
            raise errors.ValueError(f"packed codes must be a 1-D int8 array of {size} bytes for shape {shape}")
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        if scale.shape != _scale_shape(granularity, n, k, group_size):
            raise errors.ShapeError(f"scale has shape {scale.shape}, expected "
                                    f"{_scale_shape(granularity, n, k, group_size)} for {granularity}")
        self.packed = np.ascontiguousarray(packed)
        self.scale = scale
        self.shape = (n, k)
        self.granularity = granularity
        self.group_size = None if group_size is None else int(group_size)
        self._cache = None

    @classmethod
    def from_codes(cls, q: np.ndarray, scale: np.ndarray, granularity: str = "per_channel",
                   group_size: Optional[int] = None) -> "QuantizedWeight":
        """Build from canonical (N, K) int8 codes in [-127, 127] (e.g. read from a checkpoint)."""
        q = np.asarray(q)
        if q.dtype != np.int8 or q.ndim != 2 or q.size == 0:
            raise errors.ValueError(f"codes must be a non-empty 2-D int8 array, got {q.dtype} {q.shape}")
        q = np.ascontiguousarray(q)
        n, k = q.shape
        packed = np.empty(int(lib.cq_packed_size(n, k)), dtype=np.int8)
        _check(lib.cq_pack(_ptr("int8_t[]", q), n, k, _ptr("int8_t[]", packed)), "pack")
        return cls(packed, scale, (n, k), granularity, group_size)

    @property
    def q(self) -> np.ndarray:
        """Canonical (N, K) int8 codes (a new array, unpacked from ``packed``)."""
        n, k = self.shape
        out = np.empty((n, k), dtype=np.int8)
        _check(lib.cq_unpack(_ptr("int8_t[]", self.packed), n, k, _ptr("int8_t[]", out)), "unpack")
        return out

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds (codes + scales), measured from its arrays."""
        return int(self.packed.nbytes + self.scale.nbytes)

    @property
    def scheme(self) -> str:
        return self.granularity if self.granularity != "per_group" else f"per_group({self.group_size})"

    def _native(self):
        """cffi pointers and C scheme, cached (not pickled): the hot path builds nothing per call."""
        c = self._cache
        if c is None:
            code, g = _scheme(self.granularity, self.group_size, self.shape[1])
            c = self._cache = (_ptr("int8_t[]", self.packed), _ptr("float[]", self.scale), code, g, None)
        return c

    def __getstate__(self):
        return {s: getattr(self, s) for s in self.__slots__ if s != "_cache"}

    def __setstate__(self, state):
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self._cache = None

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
             name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes and scales of w (N, K): ``(q int8 (N, K), scale float32)`` (scale shape as
    in QuantizedWeight). NonFiniteError if w holds NaN/Inf."""
    orig = w
    w = _weight_2d(w, name)
    n, k = w.shape
    code, g = _scheme(granularity, group_size, k)
    q = np.empty((n, k), dtype=np.int8)
    scale = np.empty(_scale_shape(granularity, n, k, group_size), dtype=np.float32)
    st = lib.cq_quantize(_ptr("float[]", w), n, k, code, g, _ptr("int8_t[]", q), _ptr("float[]", scale))
    if st == lib.CQ_ERR_NONFINITE:
        check_finite(orig, name)  # NaN/Inf in the caller's array: says how many
        raise errors.NonFiniteError(
            f"{name} holds values beyond the float32 range (|w| > 3.4e38), which float32 weights "
            "cannot represent")
    _check(st, f"quantize {name}")
    return q, scale


def quantize_weight(w, granularity: str = "per_channel", group_size: Optional[int] = None,
                    name: str = "weight") -> QuantizedWeight:
    """Quantize a float (N, K) weight into a packed QuantizedWeight (the float copy is not kept)."""
    q, scale = quantize(w, granularity, group_size, name)
    return QuantizedWeight.from_codes(q, scale, granularity, group_size)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """float32 (N, K) = codes * scale of their slice."""
    n, k = qw.shape
    q = qw.q
    out = np.empty((n, k), dtype=np.float32)
    _, _, code, g, _ = qw._native()
    _check(lib.cq_dequantize(_ptr("int8_t[]", q), _ptr("float[]", qw.scale), n, k, code, g,
                             _ptr("float[]", out)), "dequantize")
    return out


def quantize_rows(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-row activation quantization of x (M, K): ``(q int8 (M, K), scale float32 (M,))``.
    A row with NaN/Inf gets scale NaN and codes 0."""
    x = _float_array(x, "x")
    if x.ndim != 2 or x.size == 0:
        raise errors.ShapeError(f"x must be a non-empty 2-D array, got shape {x.shape}")
    m, k = x.shape
    q = np.empty((m, k), dtype=np.int8)
    s = np.empty(m, dtype=np.float32)
    _check(lib.cq_quantize_rows(_ptr("float[]", x), m, k, _ptr("int8_t[]", q), _ptr("float[]", s)),
           "quantize_rows")
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
_NULL = ffi.NULL
_cq_linear = lib.cq_linear


def linear(x, qw: QuantizedWeight, bias=None, mode: str = "dynamic") -> np.ndarray:
    """y (..., N) float32 = x (..., K) through the quantized weight, plus bias (N,).

    mode="dynamic": rows of x quantized to int8 at run time, exact integer sums, scaled to float32.
    mode="weight_only": float32 x times the weight dequantized inside the kernel.

    This is the per-call hot path of every quantized layer: it is kept lean (cached cffi pointers
    for the weight and the last bias, no per-call conversion of float32 C-contiguous inputs).
    """
    cache = qw._cache if type(qw) is QuantizedWeight else None
    if cache is None:
        if not isinstance(qw, QuantizedWeight):
            raise errors.TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
        cache = qw._native()
    mcode = MODES.get(mode) if type(mode) is str else None
    if mcode is None:
        raise errors.ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    if type(x) is not np.ndarray or x.dtype is not _F32 or not x.flags.c_contiguous:
        if np.ndim(x) == 0:
            raise errors.ShapeError(f"x must have at least one dimension (..., K={qw.shape[1]}), got a scalar")
        x = _float_array(x, "x")
    n, k = qw.shape
    shape = x.shape
    if not shape or shape[-1] != k:
        raise errors.ShapeError(f"x has shape {shape}; its last dimension must be K={k}")
    m = x.size // k
    y = np.empty(shape[:-1] + (n,), dtype=_F32)
    if m == 0:
        return y
    pk, ps, code, g, bias_cache = cache
    if bias is None:
        bp = _NULL
    elif bias_cache is not None and bias_cache[0] is bias:
        bp = bias_cache[1]
    else:
        b = bias
        if type(b) is not np.ndarray or b.dtype is not _F32 or not b.flags.c_contiguous:
            b = _float_array(b, "bias")
        if b.shape != (n,):
            raise errors.ShapeError(f"bias has shape {b.shape}, expected ({n},)")
        bp = _from_buffer("float[]", b)
        if b is bias:  # the layer's own float32 bias: keep its pointer (the buffer export pins it)
            qw._cache = (pk, ps, code, g, (bias, bp))
    st = _cq_linear(mcode, _from_buffer("float[]", x), m, k, pk, ps, code, g, n, bp,
                    _from_buffer("float[]", y))
    if st:
        _raise(st, "linear")
    return y


def gelu(x) -> np.ndarray:
    """Exact GELU ``x/2 * (1 + erf(x/sqrt 2))`` of a float array (any shape) -> float32, same shape.

    Absolute error <= 1e-6 + 3e-7 |x| against a float64 reference on every ISA path."""
    x = _float_array(x, "x")
    y = np.empty_like(x)
    _check(lib.cq_gelu(_ptr("float[]", x), x.size, _ptr("float[]", y)), "gelu")
    return y


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis of x (..., K) (biased variance, as torch), optional weight and
    bias (K,) -> float32, same shape. The mean and variance are summed in a numerically safe order
    (two passes, double at the end)."""
    x = _float_array(x, "x")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise errors.ShapeError(f"layer_norm needs a non-empty last axis, got shape {x.shape}")
    k = x.shape[-1]
    ptrs = []
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            ptrs.append(ffi.NULL)
            continue
        arr = _float_array(p, name)
        if arr.shape != (k,):
            raise errors.ShapeError(f"layer_norm {name} has shape {arr.shape}, expected ({k},)")
        ptrs.append(_ptr("float[]", arr))
    eps = float(eps)
    if not eps >= 0.0:
        raise errors.ValueError(f"eps must be >= 0, got {eps}")
    y = np.empty_like(x)
    _check(lib.cq_layer_norm(_ptr("float[]", x), x.size // k, k, ptrs[0], ptrs[1], eps,
                             _ptr("float[]", y)), "layer_norm")
    return y
