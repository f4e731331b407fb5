"""Exceptions raised by cquant.

Every error cquant raises derives from :class:`QuantizationError`, and also from the builtin a user
would naturally catch (``ValueError``, ``TypeError``, ``RuntimeError``), so both ``except
cquant.QuantizationError`` and ``except ValueError`` work.
"""
from __future__ import annotations

import builtins


class QuantizationError(Exception):
    """Base class of every cquant error."""


class ValueError(builtins.ValueError, QuantizationError):  # noqa: A001 - deliberate shadowing
    """A bad value: wrong shape, bad group size, unknown mode, ..."""


class TypeError(builtins.TypeError, QuantizationError):  # noqa: A001
    """A bad type: integer activations, non-array input, ..."""


class NonFiniteError(ValueError):
    """NaN or Inf found where only finite numbers are allowed (weights)."""


class ShapeError(ValueError):
    """Shapes do not agree (e.g. the last dimension of x is not K)."""


class OverflowError(builtins.OverflowError, QuantizationError):  # noqa: A001
    """A size too large for the kernels (e.g. K beyond the exact int32 range of gemm_s8s8s32)."""


class IsaError(builtins.RuntimeError, QuantizationError):
    """A forced instruction-set path is not available on this CPU or in this build."""


class AutogradError(builtins.RuntimeError, QuantizationError):
    """A quantized layer was asked to train or to take part in a backward (it is inference only;
    raised by the PyTorch adapter, defined here so that it can be caught without importing torch)."""


class NativeError(builtins.RuntimeError, QuantizationError):
    """Any other status reported by the C core (out of memory, internal error)."""


class CheckpointError(ValueError):
    """A file that is not a (valid, complete) safetensors / cquant checkpoint, or one that does not fit
    the model it is loaded into. (Also importable as ``cquant.io.CheckpointError``.)"""
