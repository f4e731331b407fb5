"""The torch front-end: a ``torch.nn.Module`` seen through the :class:`cquant.frontends.FrontEnd`
protocol (:data:`TORCH`). Importing this module imports torch; :func:`cquant.frontends.for_model`
reaches it only for a torch model (the caller imported torch already)."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import ops
from ..checkpoint_file import BF16Bits, _prefix
from ..embedding import can_share
from ..frontends import (CheckpointState, FrontEnd, LayerRef, Patterns, ReportRow, _add_layer, _as_patterns,
                         _embedding_table, _filter_refs, embedding_entries, quantized_forward_of, replace_module)
from .torch import QuantizedTorchLinear, _disable_fast_paths, _module_names, _param_owners, install_checkpoint
from .torch import report as _torch_report
from .torch_embedding import QuantizedTorchEmbedding, embedding_problem
from .torch_smoothing import SmoothedTorchLinear, residual_block, scale_residual

__all__ = ["TorchFrontEnd", "TORCH"]


def _torch_linear_sizes(mod: Any) -> Optional[Tuple[int, int]]:
    """(in, out) of a float torch Linear (keeping Linear.forward) or GPT-2 Conv1D, else None."""
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.nn.parameter.UninitializedParameter):  # a lazy module not run yet: no sizes
        return None
    if isinstance(mod, torch.nn.Linear):
        if type(mod).forward is not torch.nn.Linear.forward or type(mod).__name__.startswith("NonDynamically"):
            return None
        return int(mod.in_features), int(mod.out_features)
    if type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(mod, "nf"):
        return int(w.shape[0]), int(w.shape[1])
    return None


def _embeddings_as_tensors(model: Any, ck: Any) -> Any:
    """For a torch model: checkpoint layers that are embedding tables in the model stay layers (the
    adapter installs a ``QuantizedTorchEmbedding``) when they are int8 tables (kind ``"embedding"``,
    per-row int8 codes) and the ``nn.Embedding`` can take one (torch's forward, no ``max_norm``, a
    weight not tied to a module that stays float); the others become float tensors ``L.weight``
    (dequantized rows) copied into the table (a tie to a float module is kept)."""
    subs = dict(model.named_modules())
    emb = {n: m for n, m in subs.items() if n in ck.layers
           and isinstance(m, (torch.nn.Embedding, QuantizedTorchEmbedding))}
    if not emb:
        return ck
    owners = _param_owners(model)
    out = type(ck)(layers=dict(ck.layers), layouts=dict(ck.layouts), kinds=dict(ck.kinds),
                   tensors=dict(ck.tensors), metadata=ck.metadata, tied=dict(getattr(ck, "tied", {})))
    for name, m in emb.items():
        qf = out.layers[name]
        _embedding_table(name, qf, (m.num_embeddings, m.embedding_dim))
        if isinstance(m, QuantizedTorchEmbedding):  # already int8: the codes are installed as they are
            out.kinds[name] = "embedding"
            continue
        floats = [n for n, o in owners.get(id(m.weight), []) if o is not m and n not in ck.layers]
        if (ck.kinds.get(name) == "embedding" and can_share(qf.qweight) and qf.bias is None
                and not embedding_problem(m) and not floats):
            continue
        out.layers.pop(name)
        out.layouts.pop(name, None)
        out.kinds.pop(name, None)
        out.tied.pop(name, None)
        out.tensors[_prefix(name) + "weight"] = ops.dequantize(qf.qweight).astype(np.float32)
    return out


class TorchFrontEnd(FrontEnd):
    """``torch.nn.Module`` models (layers: ``nn.Linear`` keeping torch's forward, GPT-2 ``Conv1D``)."""
    name = "torch"
    embeddings = True
    smoothable = True

    def layers(self, model: Any, include: Patterns = None, exclude: Patterns = None,
               quantized: Optional[bool] = None) -> List[LayerRef]:
        inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
        refs: List[LayerRef] = []
        for name, mod in model.named_modules():
            qf = quantized_forward_of(mod)
            if qf is not None:
                refs.append(LayerRef(name, mod, int(qf.in_features), int(qf.out_features), True))
                continue
            sizes = _torch_linear_sizes(mod)
            if sizes is not None:
                refs.append(LayerRef(name, mod, sizes[0], sizes[1], False))
        return _filter_refs(refs, inc, exc, quantized, model)

    def norm_layers(self, model: Any) -> List[Tuple[str, Any]]:
        out = []
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if re.search(r"(Layer|RMS)Norm", type(mod).__name__) and isinstance(w, torch.Tensor) and w.dim() == 1:
                out.append((name, mod))
        return out

    def replace(self, model: Any, old: Any, new: Any) -> int:
        return replace_module(model, old, new)

    def quantize(self, quantizer: Any, model: Any, inplace: bool) -> Any:
        return quantizer._quantize_torch(model, inplace)

    def report(self, model: Any) -> List[ReportRow]:
        return _torch_report(model)

    def state_tensors(self, model: Any) -> CheckpointState:
        obj = model
        tensors: Dict[str, np.ndarray] = {}
        layers: Dict[str, Dict[str, Any]] = {}
        for k, v in obj.state_dict().items():  # bfloat16 (no numpy dtype) is stored as BF16 bits
            v = v.detach().cpu().contiguous()
            tensors[k] = (BF16Bits.wrap(v.view(torch.int16).numpy().view(np.uint16))
                          if v.dtype == torch.bfloat16 else v.numpy())
        names_of = _module_names(obj)
        for name, m in obj.named_modules():  # after the state_dict: codes, f32 scales and an f32 bias
            if isinstance(m, QuantizedTorchLinear):
                _add_layer(tensors, layers, name, m.qforward, "in_out" if m.source == "Conv1D" else "out_in")
                for alias in names_of.get(id(m), []):  # the same module under another name: stored once
                    if alias != name:
                        for k in [k for k in tensors if k.startswith(alias + ".") and "." not in k[len(alias) + 1:]]:
                            del tensors[k]
        ties = embedding_entries(obj, QuantizedTorchEmbedding, tensors, layers)
        return CheckpointState(tensors, layers, None, ties)

    def install(self, model: Any, checkpoint: Any, strict: bool = True) -> Any:
        return install_checkpoint(model, _embeddings_as_tensors(model, checkpoint), strict)

    def set_param(self, mod: Any, name: str, value: np.ndarray) -> None:
        old = getattr(mod, name)
        new = torch.from_numpy(np.ascontiguousarray(value)).to(dtype=old.dtype)
        setattr(mod, name, torch.nn.Parameter(new, requires_grad=old.requires_grad))

    def weight_in_out(self, mod: Any) -> bool:
        return type(mod).__name__ == "Conv1D"

    def smoothed(self, mod: Any, inv_scale: np.ndarray, hadamard: int = 0) -> Any:
        return SmoothedTorchLinear(mod, inv_scale, hadamard)

    def wrappers_placed(self, model: Any) -> Any:
        undo: List[Any] = []
        _disable_fast_paths(model, undo)
        return lambda: [step() for step in reversed(undo)]

    def residual_blocks(self, model: Any) -> List[Tuple[str, Any, int]]:
        # transformers' *Output blocks (LayerNorm(dropout(dense(h)) + input_tensor)); smoothing
        # verifies the fold on the model output, so a block that computes something else is undone
        return [(name, mod, 1) for name, mod in model.named_modules() if residual_block(mod)]

    def scale_residual(self, block: Any, s: np.ndarray) -> Any:
        return scale_residual(block, s)

    def watch_calls(self, obj: Any, fn: Any) -> Any:
        return obj.register_forward_hook(lambda m, args, out: fn(args, out)).remove


TORCH = TorchFrontEnd()
