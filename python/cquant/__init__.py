"""cquant: post-training int8 quantization for CPU inference.

    import cquant
    qmodel = cquant.Quantizer.quantize_dynamic(model)         # Linear layers -> int8 kernels
    cquant.isa(); cquant.set_num_threads(2)

The kernels are C (``csrc/``, compiled through cffi into ``cquant._native``); ``cquant.ops`` is the
array layer on top; everything else (Quantizer, nn, io, cli) is built on ``cquant.ops``.
"""
from __future__ import annotations

__version__ = "0.3.0"

try:
    from ._native import ffi as _ffi, lib as _lib
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "cquant's compiled core (cquant._native) is missing: build it with `make` (in place) or "
        f"install the package with `pip install .` ({exc})") from exc

_native_version = _ffi.string(_lib.cq_version()).decode()
if _native_version != __version__:  # a stale in-place build next to newer Python sources
    raise ImportError(
        f"cquant {__version__} found a C core of version {_native_version}: the extension is stale. "
        "Rebuild it (`make`, or `pip install .`).")

from . import errors, ops  # noqa: E402


def _check_thread_env() -> None:
    """The C core ignores a CQUANT_NUM_THREADS it cannot use (and takes OMP_NUM_THREADS or the CPU
    count); say so.
    Whether it can is decided by the C core's own parser (one rule), and the count in the warning
    is the one the C core then uses."""
    import os
    import warnings
    env = os.environ.get("CQUANT_NUM_THREADS")
    if not env:  # unset or empty: the default, as in C
        return
    try:
        ok = _lib.cq_parse_num_threads(os.fsencode(env)) > 0
    except ValueError:  # an embedded NUL byte: C's getenv would see a different string anyway
        ok = False
    if not ok:
        warnings.warn(f"CQUANT_NUM_THREADS={env!r} is not a whole number in 1..256 (digits, optionally "
                      f"surrounded by spaces): ignored, using {_lib.cq_get_num_threads()} thread(s)",
                      RuntimeWarning, stacklevel=2)


_check_thread_env()
from .errors import QuantizationError  # noqa: E402
from .ops import (  # noqa: E402
    QuantizedWeight, available_isas, get_num_threads, isa, last_kernel, set_isa, set_num_threads,
)

_LAZY = {
    "Quantizer": ("quantization", "Quantizer"),
    "QuantizedLinearForward": ("quantization", "QuantizedLinearForward"),
    "report": ("quantization", "report"),
    "format_report": ("quantization", "format_report"),
    "nn": ("nn", None),
    "quantization": ("quantization", None),
    "save": ("io", "save"),
    "load": ("io", "load"),
    "load_into": ("io", "load_into"),
    "save_pretrained": ("adapters.hf", "save_pretrained"),  # torch / transformers models (imports torch)
    "from_pretrained": ("adapters.hf", "from_pretrained"),
    "fuse": ("adapters.torch_fused", "fuse"),  # BERT-family blocks on cquant's C kernels (imports torch)
    "QuantScheme": ("scheme", "QuantScheme"),
    "calibrate": ("calibration", "calibrate"),
    "smooth": ("smoothing", "smooth"),
    "compare": ("compare", "compare"),
    "scheme": ("scheme", None),
    "calibration": ("calibration", None),
    "smoothing": ("smoothing", None),
    "qat": ("qat", None),  # quantization-aware training (imports torch)
    "budget": ("budget", None),
    "embedding": ("embedding", None),  # int8 embedding tables (Quantizer(..., embeddings=True))
}


def __getattr__(name):  # PEP 562: import the model layers on first use
    if name in _LAZY:
        import importlib
        mod_name, attr = _LAZY[name]
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'cquant' has no attribute {name!r}")


__all__ = ["__version__", "errors", "ops", "QuantizationError", "QuantizedWeight", "isa", "set_isa",
           "available_isas", "set_num_threads", "get_num_threads", "last_kernel", *_LAZY]
