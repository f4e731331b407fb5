"""``QuantizedTorchEmbedding``: a ``torch.nn.Embedding`` stand-in holding an int8 table (one float32
scale per row), made by ``cquant.Quantizer(..., embeddings=True)`` on a torch model.

Importing this module imports torch (it is part of :mod:`cquant.adapters.torch`).

- Storage: a per_channel int8 :class:`cquant.ops.QuantizedWeight` (the codes the linear kernels
  read); buffers ``packed`` (not persistent) and ``weight_scale`` share its memory. ``state_dict()``
  holds ``<name>.weight_q`` (int8 ``(num_embeddings, embedding_dim)``, unpacked on demand) and
  ``<name>.weight_scale``; ``load_state_dict`` restores them bit-exactly.
- Tied tables: a table whose weight was the weight of a quantized output Linear (GPT-2's ``wte`` and
  ``lm_head``) reads that :class:`QuantizedTorchLinear`'s codes (``tied_to``; the codes are the same:
  per-row int8 of the table is per_channel int8 of the Linear). It holds no buffer and its
  ``state_dict`` is empty: the pair is stored once, and reloading the Linear reloads the table.
- ``forward(ids)``: an integer CPU tensor (int64 / int32 / ...), any shape -> ``(*ids.shape,
  embedding_dim)`` in ``out_dtype`` (the float table's dtype; ``.half()`` / ``.to(dtype)`` change it). Only the
  looked-up rows are dequantized (``float32(q) * scale``); ``padding_idx`` behaves as in torch's forward
  (the row is returned as stored: a zero row stays exactly zero). Float / bool ids, ids out of
  ``[0, num_embeddings)`` and non-CPU tensors raise a clear cquant error. Under ``torch.jit.trace``,
  ``torch.export`` and ``torch.compile`` the lookup is written in torch ops on the packed codes (ids
  are not range-checked there).
- Inference only, as :class:`QuantizedTorchLinear`: ``.train()`` raises :class:`AutogradError`.
  ``max_norm`` is None (tables with ``max_norm`` are not quantized: torch renormalizes them in place).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np
import torch

from .. import errors, ops
from ..embedding import EMBEDDING_SCHEME, TiedCodes, can_share, check_ids, lookup, padded_rows_view
from .torch_base import _graph_mode, _refuse_device, _refuse_train, _shared_tensor, _state_shapes_ok

__all__ = ["QuantizedTorchEmbedding", "embedding_problem"]


def embedding_problem(mod: "torch.nn.Module") -> str:
    """Why a ``torch.nn.Embedding`` cannot become a :class:`QuantizedTorchEmbedding` ("" when it can)."""
    if type(mod).forward is not torch.nn.Embedding.forward:
        return f"{type(mod).__name__} overrides Embedding.forward: replacing it would change what it computes"
    if mod.max_norm is not None:
        return "max_norm renormalizes the looked-up rows of the table in place: kept float"
    w = mod.weight
    if isinstance(w, torch.nn.parameter.UninitializedParameter) or not isinstance(w, torch.Tensor) \
            or w.dim() != 2 or w.numel() == 0:
        return "weight is not a non-empty 2-D tensor"
    if w.device.type == "meta":
        return "weight is on the meta device (no data)"
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not floating-point"
    return ""


class QuantizedTorchEmbedding(TiedCodes, torch.nn.Module):
    """``torch.nn.Embedding`` with an int8 table (see the module docstring).

    ``QuantizedTorchEmbedding(qweight, padding_idx=None, dtype=torch.float32)`` (``dtype``: the dtype
    of the outputs, ``out_dtype``; the float table's dtype), or
    ``QuantizedTorchEmbedding(tie=quantized_linear, ...)`` for a table that reads the codes of a
    :class:`QuantizedTorchLinear` quantized per_channel int8.
    """

    def __init__(self, qweight: Optional[ops.QuantizedWeight] = None, padding_idx: Optional[int] = None, *,
                 tie: Optional["torch.nn.Module"] = None, dtype: "torch.dtype" = torch.float32):
        super().__init__()
        if (qweight is None) == (tie is None):
            raise errors.TypeError("QuantizedTorchEmbedding needs exactly one of qweight or tie=")
        if tie is not None and not can_share(getattr(tie, "qweight", None)):
            raise errors.ValueError("a tied QuantizedTorchEmbedding reads the codes of a quantized layer with "
                                    f"per_channel int8 codes; got {type(tie).__name__}")
        if tie is None and not can_share(qweight):
            raise errors.ValueError(f"an embedding table needs per_channel int8 codes, got {qweight!r}")
        # a plain attribute, not a registered child: the Linear is registered where it lives
        object.__setattr__(self, "_cquant_tie", tie)
        self._install(qweight)
        n, d = (int(s) for s in self.qweight.shape)
        self.num_embeddings, self.embedding_dim = n, d
        if padding_idx is not None:
            p = int(padding_idx)
            if not -n <= p < n:
                raise errors.ValueError(f"padding_idx {padding_idx} is not in [-{n}, {n})")
            padding_idx = p + n if p < 0 else p
        self.padding_idx = padding_idx
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = False
        if not dtype.is_floating_point:
            raise errors.TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.out_dtype = dtype
        self.training = False

    def _install(self, qw: Optional[ops.QuantizedWeight]) -> None:
        self._qweight = qw
        if qw is not None:
            self.register_buffer("packed", _shared_tensor(qw.packed), persistent=False)
            self.register_buffer("weight_scale", _shared_tensor(qw.scale))

    @property
    def scheme(self) -> str:
        return EMBEDDING_SCHEME

    def dequantized_weight(self) -> "torch.Tensor":
        """The (rows, dim) float32 table the layer effectively uses (a new tensor)."""
        return torch.from_numpy(ops.dequantize(self.qweight))

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, ids: "torch.Tensor") -> "torch.Tensor":
        if _graph_mode(ids):
            return self._forward_graph(ids)
        if not isinstance(ids, torch.Tensor):
            raise errors.TypeError(f"expected a torch.Tensor of ids, got {type(ids).__name__}")
        if ids.device.type != "cpu":
            raise errors.ValueError(f"ids are on {ids.device}; cquant's embedding tables live on the CPU "
                                    "(move them with .cpu())")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise errors.TypeError(f"embedding ids must be an integer tensor (torch.long / torch.int), got {ids.dtype}")
        qw = self.qweight
        y = torch.from_numpy(lookup(qw, check_ids(ids.detach().numpy(), int(qw.shape[0]))))
        return y if self.out_dtype == torch.float32 else y.to(self.out_dtype)

    def _forward_graph(self, ids: Any) -> Any:
        """The lookup in torch ops on the packed codes (trace / export / compile)."""
        if isinstance(ids, torch.Tensor) and not isinstance(ids, torch.fx.Proxy) and \
                (ids.dtype.is_floating_point or ids.dtype == torch.bool):
            raise errors.TypeError(f"embedding ids must be an integer tensor, got {ids.dtype}")
        qw = self.qweight
        k = int(qw.shape[1])
        idx = ids.long()
        v = padded_rows_view(qw)
        with warnings.catch_warnings():  # the codes and scales are constants of the graph, as they should be
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            scale = _shared_tensor(qw.scale)
            table = _shared_tensor(qw.q if v is None else v[0])
        if v is None:
            codes = table[idx]
        else:
            nr = v[1]
            rows = table[torch.div(idx, nr, rounding_mode="floor"), :, torch.remainder(idx, nr), :]
            codes = rows.flatten(-2)[..., :k]
        y = codes.to(torch.float32) * scale[idx].unsqueeze(-1)
        return y if self.out_dtype == torch.float32 else y.to(self.out_dtype)

    # ---- inference only ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "QuantizedTorchEmbedding":
        _refuse_train(mode, f"this {type(self).__name__}")
        return super().train(False)

    def _apply(self, fn, recurse=True):  # .to() / .float() / .half() / .cuda() ...
        _refuse_device(fn, "them")
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        if probe.dtype.is_floating_point:
            self.out_dtype = probe.dtype  # the codes stay int8; the output follows the model's float dtype
        return self

    def __prepare_scriptable__(self):
        raise errors.TypeError("torch.jit.script cannot compile a cquant quantized layer; use torch.jit.trace, "
                               "torch.export.export or torch.compile")

    # ---- state_dict ----------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.tied_to is not None:
            return  # stored once, by the Linear it is tied to
        destination[prefix + "weight_q"] = torch.from_numpy(self.qweight.q)
        b = self._buffers["weight_scale"]
        destination[prefix + "weight_scale"] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = () if self.tied_to is not None else (prefix + "weight_q", prefix + "weight_scale")
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key not in keys and "." not in key[len(prefix):]:
                    unexpected_keys.append(key)
        if not keys:
            return
        kq, ks = keys
        absent = [k for k in keys if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        q, s = state_dict[kq], state_dict[ks]
        n, d = self.num_embeddings, self.embedding_dim
        if not _state_shapes_ok(((kq, q, (n, d)), (ks, s, (n,))), error_msgs):
            return
        if q.dtype != torch.int8:
            error_msgs.append(f"{kq}: expected int8 codes, got {q.dtype}")
            return
        try:
            qw = ops.QuantizedWeight.from_codes(q.detach().cpu().contiguous().numpy(),
                                                np.array(s.detach().cpu().to(torch.float32).numpy(),
                                                         dtype=np.float32, copy=True), "per_channel")
        except errors.QuantizationError as e:
            error_msgs.append(f"{prefix or '<root>'}: {e}")
            return
        self._install(qw)

    # ---- pickling / deepcopy: the buffers share the numpy arrays' memory; rebuild them -------------
    def __getstate__(self):
        state = super().__getstate__()
        state["_buffers"] = {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._install(self.__dict__.get("_qweight"))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + (", tied" if self.tied_to is not None else ""))
