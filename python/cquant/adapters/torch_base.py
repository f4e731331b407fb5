"""What every torch adapter module shares (imports torch): the inference-only error and message, and
the small helpers the quantized modules use. The lowest of the torch adapter modules: it imports
nothing of cquant but :mod:`cquant.errors`, so :mod:`cquant.adapters.torch`,
:mod:`~cquant.adapters.torch_ops`, :mod:`~cquant.adapters.torch_embedding` and
:mod:`~cquant.adapters.torch_fused` import it (and each other) at module level without a cycle.
:class:`AutogradError` stays importable from :mod:`cquant.adapters.torch`.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Iterable, List, Tuple

import numpy as np
import torch

from .. import errors

__all__ = ["AutogradError", "inference_only_message"]


AutogradError = errors.AutogradError  # (defined in cquant.errors: catchable without torch)


def inference_only_message(what: str = "this model") -> str:
    return (f"cquant: {what} is quantized for inference only: the int8 kernels have no backward. "
            "Run it in eval mode under torch.inference_mode() or torch.no_grad(). To train, fine-tune "
            "the float32 model and quantize it again, or use quantization-aware training (QAT): "
            "cquant.qat.prepare(float_model, scheme), train, then cquant.qat.convert(model).")


def hadamard_torch(x: "torch.Tensor", block: int) -> "torch.Tensor":
    """:func:`cquant.ops.hadamard` in torch (differentiable, traceable): the unnormalised
    Walsh-Hadamard transform of each block of ``block`` columns, in the kernel's order of operations
    (bit-identical to it in float32)."""
    shape = x.shape
    k = shape[-1]
    h = 1
    while h < block:
        v = x.reshape(-1, k // (2 * h), 2, h)
        a, c = v[:, :, 0, :], v[:, :, 1, :]
        x = torch.stack((a + c, a - c), dim=2).reshape(shape)
        h *= 2
    return x


def _shared_tensor(a: np.ndarray) -> "torch.Tensor":
    """A torch tensor sharing ``a``'s memory (read-only arrays too: cquant never writes through it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _functorch_wrapped(x: Any) -> bool:
    f = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(f is not None and isinstance(x, torch.Tensor) and f(x))


def _functorch_active() -> bool:
    """A torch.func transform (vmap, grad, ...) is running."""
    f = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(f is not None and f())


def _graph_mode(x: Any) -> bool:
    """True when the forward is being captured (trace, export, compile, fx) or transformed
    (torch.func: vmap, grad, jacrev) rather than run: the custom operator's path."""
    return (type(x) is not torch.Tensor or torch._C._get_tracing_state() is not None
            or torch.compiler.is_compiling() or _functorch_wrapped(x))


class _NoBackwardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, box):  # type: ignore[override]
        # y comes in a list, not as an input: an input returned as the output would be a view of
        # itself to autograd, and an in-place op on it (ReLU(inplace=True) after the layer) refused
        return box[0]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise AutogradError(inference_only_message("a model with cquant quantized layers"))


#: joins an output to the graph when nothing upstream requires grad (an all-quantized model): in
#: grad mode the output then requires grad as the float model's would, and backward() says why it
#: cannot run instead of torch's "element 0 of tensors does not require grad"
_GRAD_ANCHOR = torch.zeros((), requires_grad=True)


class _NoBackward:
    """``apply(x, y)``: ``y`` (a tensor the layer made from x) joined to the autograd graph of ``x``
    (or, when x does not require grad, of a fixed leaf), so that it requires grad in grad mode, as
    the float layer's output would, and its ``backward()`` raises :class:`AutogradError`."""

    @staticmethod
    def apply(x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        return _NoBackwardFn.apply(x if x.requires_grad else _GRAD_ANCHOR, [y])


def _finite_floats(t: "torch.Tensor") -> bool:
    """A float tensor of finite values (what a bias must be, as checkpoints require)."""
    return t.is_floating_point() and bool(torch.isfinite(t).all())


def _outermost_self(code: Any) -> Any:
    """The module whose ``code`` (``Module.train`` / ``Module._apply``) started the traversal that is
    now running: the ``self`` of the outermost frame running that code on this thread, or None."""
    root = None
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is code:
            root = f.f_locals.get("self", root)
        f = f.f_back
    return root


def _refuse_train(mode: bool, what: str) -> None:
    """Refuse ``train(True)``. ``Module.train`` sets flags top-down, so the model's root and the modules
    visited before this one are already in training mode (dropout on): the whole model is put back in
    eval mode first, so that a refused call leaves no half-trained model behind."""
    if not isinstance(mode, bool):
        raise errors.ValueError(f"training mode is expected to be boolean, got {type(mode).__name__}")
    if mode:
        root = _outermost_self(torch.nn.Module.train.__code__)
        if isinstance(root, torch.nn.Module):
            root.train(False)
        raise AutogradError(inference_only_message(what) + " The model was put back in eval mode (model.eval()).")


def _refuse_device(fn: Any, what: str) -> None:
    """Refuse an ``_apply`` (``.to()`` / ``.cuda()``) that moves tensors off the CPU. ``Module._apply``
    converts children in order, so the modules converted before this one were already moved: they
    are moved back to the CPU first (tensors moved to the meta device have no data to bring back:
    then the error says the model must be rebuilt or reloaded)."""
    probe = fn(torch.empty(0))
    if probe.device.type == "cpu":
        return
    msg = f"cquant quantized layers run on the CPU; cannot move {what} to {probe.device}"
    root = _outermost_self(torch.nn.Module._apply.__code__)
    if isinstance(root, torch.nn.Module):
        if probe.device.type == "meta":
            if any(t.device.type == "meta" for t in list(root.parameters()) + list(root.buffers())):
                msg += ("; the tensors moved before this layer are on the meta device now, without data: "
                        "rebuild or reload the model")
        else:
            root._apply(lambda t: t.to("cpu") if t.device.type != "cpu" else t)
            msg += " (the model stays on the CPU)"
    raise errors.ValueError(msg)


def _state_shapes_ok(want: Iterable[Tuple[str, Any, Tuple[int, ...]]], error_msgs: List[str]) -> bool:
    """``_load_from_state_dict`` check of the quantized modules: each (key, value, shape) must be a
    tensor of that shape; torch's own messages appended to ``error_msgs`` otherwise. True if all are."""
    ok = True
    for key, t, shape in want:
        if not isinstance(t, torch.Tensor):
            error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor, '
                              f"got {type(t).__name__}.")
            ok = False
        elif tuple(t.shape) != shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(t.shape)} "
                              f"from checkpoint, the shape in current model is {torch.Size(shape)}.")
            ok = False
    return ok


# ---- the per-class subclasses cquant.fuse makes (kept here: torch_fused and torch_smoothing both
# need them, and torch_fused imports torch_smoothing) -------------------------------------------
_FUSED_CLASSES: dict = {}


def fused_class(base: type, kind: type) -> type:
    """The fused subclass of ``base`` (a transformers block class) for fused ``kind`` (one per pair)."""
    key = (base, kind)
    cls = _FUSED_CLASSES.get(key)
    if cls is None:
        cls = type(f"Fused{base.__name__}", (kind, base), {"__module__": kind.__module__,
                                                          "__qualname__": f"Fused{base.__name__}"})
        _FUSED_CLASSES[key] = cls
    return cls


def fused_base(cls: type) -> type:
    """The original (transformers) class a fused class was made from (the fused kinds set
    ``_cquant_fused``)."""
    return next(c for c in cls.__mro__[1:] if not getattr(c, "_cquant_fused", False))
