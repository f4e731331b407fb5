"""cquant's int8 linear as a PyTorch custom operator: ``torch.ops.cquant.linear``.

Registered with :mod:`torch.library` (on import of :mod:`cquant.adapters.torch`) so that graph
capture sees one real operator instead of tracing through numpy:

- ``torch.jit.trace`` records ``cquant::linear`` (a traced module computes, it does not replay a
  constant);
- ``torch.export.export`` and ``torch.compile`` get a fake (meta) implementation that gives the output
  shape and dtype without running the kernels;
- autograd: the backward raises :class:`cquant.adapters.torch.AutogradError` (the int8 kernels are
  inference only).

Schema::

    cquant::linear(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int n, int k,
                   str granularity, int group_size, str mode, float x_scale=0.0) -> Tensor

``x`` float32 ``(..., k)`` on the CPU; ``packed`` the packed int8 codes of an ``(n, k)`` weight (a
self-describing buffer, see ``cquant.h``; a buffer packed for another CPU is repacked on use);
``scale`` float32 scales; ``bias`` float32 ``(n,)`` or None; ``group_size`` 0 unless per_group;
``mode`` "dynamic", "static" or "weight_only"; ``x_scale`` the static activation scale (> 0, float32
value) with mode "static", else 0 (a "dynamic" call with ``x_scale`` > 0 is static too, as in
``cq_linear_ex``). Returns float32 ``(..., n)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import errors, ops
from .torch_base import AutogradError, inference_only_message

__all__ = ["linear", "OP_NAME", "inference_only_message"]

OP_NAME = "cquant::linear"


def _autograd_error(what: str) -> Exception:
    return AutogradError(inference_only_message(what))


@torch.library.custom_op(OP_NAME, mutates_args=())
def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
           n: int, k: int, granularity: str, group_size: int, mode: str, x_scale: float = 0.0) -> torch.Tensor:
    if x.device.type != "cpu":
        raise errors.ValueError(f"cquant::linear: input is on {x.device}; cquant's kernels run on the CPU")
    if x.dtype != torch.float32:
        raise errors.TypeError(f"cquant::linear: x must be float32, got {x.dtype}")
    qw = ops.QuantizedWeight(packed.detach().contiguous().numpy(), scale.detach().contiguous().numpy(),
                             (n, k), granularity, group_size if granularity == "per_group" else None)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous().numpy()
    if mode == "static":
        if not x_scale > 0:
            raise errors.ValueError(f"cquant::linear: mode 'static' needs x_scale > 0, got {x_scale!r}")
        mode = "dynamic"
    y = ops.linear(x.detach().contiguous().numpy(), qw, b, mode=mode, x_scale=x_scale if x_scale != 0 else None)
    return torch.from_numpy(y)


@linear.register_fake
def _linear_fake(x, packed, scale, bias, n, k, granularity, group_size, mode, x_scale=0.0):
    torch._check(x.shape[-1] == k, lambda: f"cquant::linear: last dimension of x must be {k}")
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.custom_op("cquant::no_backward", mutates_args=())
def no_backward(grad: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The gradient of cquant::linear's input: raises AutogradError when it runs. An op rather than
    a raise in the backward formula, so that torch.compile (AOTAutograd traces the backward while
    compiling a forward whose input requires grad) compiles, and backward() is what raises."""
    raise _autograd_error("a cquant::linear layer")


@no_backward.register_fake
def _no_backward_fake(grad, shape):
    return grad.new_empty(shape)


def _setup_context(ctx, inputs, output):
    ctx.x_shape = list(inputs[0].shape)


def _backward(ctx, grad):
    return (torch.ops.cquant.no_backward(grad, ctx.x_shape),) + (None,) * 9


linear.register_autograd(_backward, setup_context=_setup_context)


def _linear_vmap(info, in_dims, x, packed, scale, bias, n, k, granularity, group_size, mode, x_scale=0.0):
    """torch.func.vmap: rows are independent, so the batch dimension of x goes first and stays there
    (a batched weight, scale or bias is refused)."""
    if any(d is not None for d in in_dims[1:4]):
        raise errors.ValueError("cquant::linear under vmap: only the input may be batched, not the weight")
    xb = x if in_dims[0] is None else x.movedim(in_dims[0], 0)
    return linear(xb, packed, scale, bias, n, k, granularity, group_size, mode, x_scale), \
        (None if in_dims[0] is None else 0)


linear.register_vmap(_linear_vmap)
