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


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    raise _autograd_error("a cquant::linear layer")


linear.register_autograd(_backward, setup_context=_setup_context)
