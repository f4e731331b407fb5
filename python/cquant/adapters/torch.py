"""PyTorch adapter: quantize the Linear layers of a ``torch.nn.Module`` onto cquant's int8 kernels.

Importing this module imports torch; :mod:`cquant` itself never does (see :mod:`cquant.adapters`).
Normally reached through ``cquant.Quantizer.quantize_dynamic(torch_model, ...)``; the function here,
:func:`quantize_module`, is the same thing with the arguments spelled out.

Which modules are quantized
---------------------------
- ``torch.nn.Linear`` and subclasses that keep ``Linear.forward`` (``y = x @ W.T + b``, W is (out, in));
- GPT-2 style ``Conv1D`` (transformers): a module named ``Conv1D`` with a 2-D ``weight`` of shape
  ``(in, out)`` and ``nf == out`` (``y = x @ W + b``); its weight is transposed once at quantization;
- ``torch.nn.MultiheadAttention``: replaced by a :class:`QuantizedMultiheadAttention` whose query, key,
  value and output projections are cquant linears (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)
  and which runs torch's attention math between them. Attentions with ``add_bias_kv`` or
  ``add_zero_attn`` are skipped with that reason.

Every other module holding a 2-D weight is *recorded as skipped with its reason* (embeddings, a Linear
subclass with its own ``forward``, a weight on the meta device, a weight tied to a module that is not
quantized, ...), and skipped layers that look like linear layers are logged at WARNING, so nothing a
user would expect quantized is skipped silently. ``include``/``exclude`` are module names or
:func:`fnmatch.fnmatchcase` globs on the dotted name (``"encoder.layer.*.attention.*"``); ``exclude``
wins. A ``MultiheadAttention`` is selected by its own name.

Tied weights: a weight shared by several quantized layers is quantized once and shared. A Linear
whose weight is tied to a module that stays float (GPT-2's ``lm_head`` and its ``wte`` embedding) is
skipped with that reason: quantizing it would store the weight twice and save nothing.

Embedding tables (opt-in, ``embeddings=True`` or table names / globs): a ``torch.nn.Embedding``
becomes a :class:`~cquant.adapters.torch_embedding.QuantizedTorchEmbedding` (int8 rows, one float32
scale each). A table tied to a Linear quantized per_channel int8 (``lm_head``/``wte``) reads that
Linear's codes: both are quantized once and stay tied. With any other scheme for the Linear (per_group,
per_tensor, int4), or a Linear kept float, the table is skipped with the reason (and so is the Linear,
by the rule above), never stored twice. Subclasses overriding ``Embedding.forward`` and tables with
``max_norm`` are skipped with the reason.

Memory: after the model is rewired, the float32 weights of quantized layers are no longer referenced
by it. When they live in a file mapping (``from_pretrained`` of a safetensors checkpoint maps the
file and every weight is a view of it, so dropping the tensors does not unmap anything), the pages
quantization read are handed back to the kernel (Linux): ``madvise(MADV_DONTNEED)`` when
``/proc/self/pagemap`` shows they are all the file's own pages (nothing is lost: a later read maps
them again from the file), else ``MADV_PAGEOUT``.

What the quantized module does
------------------------------
:class:`QuantizedTorchLinear` keeps the quantized weight as numpy arrays (int8 codes packed for the
kernels, float32 scales, float32 bias) and shows them to torch as buffers sharing that memory:
``packed`` (non-persistent: the packed format depends on the CPU), ``weight_scale``, ``bias`` and, for
a static layer (``mode="static"``), ``act_scale`` (float32, shape (1,)).
``state_dict()`` holds ``<name>.weight_q`` (the canonical ``(out, in)`` int8 codes, unpacked on
demand, so memory holds one copy), ``<name>.weight_scale``, ``<name>.bias`` (and
``<name>.act_scale``); ``load_state_dict``
into a model quantized with the same settings restores them bit-exactly (the codes are repacked).
Its forward:

- takes a CPU tensor of any shape ``(..., in_features)``; float32 C-contiguous input is read in place
  through a zero-copy numpy view; other float dtypes are converted to float32 (the output is converted
  back to the input dtype), non-contiguous input is made contiguous; integer input and non-CPU devices
  are refused with a clear error;
- returns ``torch.from_numpy`` of the kernel's output (zero-copy), ``(..., out_features)``;
- under ``torch.jit.trace``, ``torch.export``, ``torch.compile`` and ``torch.fx`` it calls the custom
  operator ``torch.ops.cquant.linear`` (:mod:`cquant.adapters.torch_ops`) instead, so the captured
  graph holds a real op; ``torch.jit.script`` is refused with a clear error;
- is inference only: ``.train()`` raises :class:`AutogradError`, and so does ``backward()`` through
  it (a forward in grad mode still works and returns a tensor whose backward raises).

Threads: importing this module hands torch's OpenMP runtime to cquant (:func:`share_torch_openmp`),
so the kernels' parallel loops run on torch's OpenMP threads instead of cquant's own pool. Between
the quantized layers a model runs torch ops whose OpenMP workers then spin-wait (libgomp's default)
on the cores cquant's workers would need; on torch's team the spinning worker takes cquant's next
job instead. ``CQUANT_OPENMP=0`` keeps the own pool.
"""
from __future__ import annotations

import copy
import ctypes
import fnmatch
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import errors, ops
from ..embedding import can_share, float_tie_reason, resolve_ties
from ..checkpoint_file import plain_tensor_problem
from ..frontends import match_layer, wrapper_tensors
from ..errors import CheckpointError
from ..quantization import LayerRecord, QuantizedLinearForward, ReportRow, _renamed
from . import torch_ops  # noqa: F401  (registers torch.ops.cquant.linear)
from .torch_base import (AutogradError, _finite_floats, _functorch_active, _functorch_wrapped, _graph_mode,  # noqa: F401
                         _NoBackward, _refuse_device, _refuse_train, _shared_tensor, _state_shapes_ok,
                         hadamard_torch, inference_only_message)
from .torch_embedding import QuantizedTorchEmbedding, embedding_problem
from .torch_smoothing import SmoothedTorchLinear, make_residual_scaled, residual_scales_in

__all__ = ["AutogradError", "QuantizedTorchLinear", "QuantizedMultiheadAttention", "QuantizedTorchEmbedding",
           "quantize_module",
           "report", "to_numpy", "is_conv1d", "quantized_layers", "install_checkpoint", "torch_openmp_runtime",
           "share_torch_openmp"]

logger = logging.getLogger("cquant")

#: shared-library names of the OpenMP runtimes torch builds use (GNU libgomp in the pip wheels,
#: Intel's libiomp5 in some conda builds, LLVM's libomp); each exports GOMP_parallel
_OMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def torch_openmp_runtime(maps: str = "/proc/self/maps") -> Optional[str]:
    """The path of the OpenMP runtime torch's ops run on, as this process has it mapped: the one
    inside torch's installation (the pip wheels bundle ``torch/lib/libgomp.so.1``), else the only
    one mapped; None when there is none or it cannot be told which (or no ``/proc``)."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:
        return None
    paths = {x[5].strip() for x in fields if len(x) == 6}  # address perms offset dev inode path
    found = sorted(p for p in paths if p.startswith("/") and os.path.basename(p).startswith(_OMP_RUNTIMES)
                   and ".so" in os.path.basename(p))
    root = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))  # site-packages
    mine = [p for p in found if p.startswith((os.path.join(root, "torch") + os.sep,
                                              os.path.join(root, "torch.libs") + os.sep))]
    if len(mine) == 1:
        return mine[0]
    return found[0] if len(found) == 1 and not mine else None


def share_torch_openmp(enable: bool = True) -> Optional[str]:
    """Run cquant's parallel loops on torch's OpenMP threads (``enable``; see the module
    docstring) or on cquant's own pool (``enable=False``). Returns the runtime's path when shared,
    else None (no runtime found: the pool stays). Done on import unless ``CQUANT_OPENMP=0``."""
    if not enable:
        ops.use_openmp(None)
        return None
    path = torch_openmp_runtime()
    if path is None:
        return None
    try:
        ops.use_openmp(path)
    except errors.ValueError:  # mapped but not a runtime cquant can drive (no GOMP_parallel)
        return None
    return path


def _share_on_import() -> None:
    env = os.environ.get("CQUANT_OPENMP", "").strip()
    if env not in ("", "0", "1"):
        warnings.warn(f"CQUANT_OPENMP={env!r} ignored (expected 0 or 1): cquant's kernels run on torch's "
                      "OpenMP threads", RuntimeWarning, stacklevel=3)
    if env != "0":
        share_torch_openmp()


_share_on_import()


def to_numpy(t: "torch.Tensor", name: str = "tensor") -> np.ndarray:
    """A float32 C-contiguous numpy array with the values of ``t``: a zero-copy view when ``t`` is
    already a contiguous float32 CPU tensor, a converted copy otherwise."""
    t = t.detach()
    if t.device.type == "meta":
        raise errors.ValueError(f"{name} is on the meta device (no data): materialize the model first")
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.dtype.is_floating_point:
        raise errors.TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.contiguous().numpy()


def is_conv1d(mod: "torch.nn.Module") -> bool:
    """GPT-2 style transposed linear: class ``Conv1D``, 2-D weight ``(in, out)``, ``nf == out``."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and int(getattr(mod, "nf", -1)) == int(w.shape[1]))


class QuantizedTorchLinear(torch.nn.Module):
    """``torch.nn.Module`` stand-in for a Linear (or Conv1D) layer, running on cquant's int8 kernels.

    Holds a :class:`cquant.quantization.QuantizedLinearForward` (numpy arrays only: pickles and
    deep-copies) and buffers sharing its memory: ``packed`` (not persistent), ``weight_scale``,
    ``bias``. ``forward(x)``: ``x (..., in_features)`` CPU tensor -> ``(..., out_features)``.
    """

    _cquant_x_mul = True  # forward takes x_mul and x_hadamard (smoothing / rotation in the kernel)
    #: no float weight: code that reads ``layer.weight`` to pick a dtype (transformers' T5 FFN:
    #: ``isinstance(self.wo.weight, torch.Tensor) and ...``) sees None, as for a layer without one
    weight = None

    def __init__(self, qforward: QuantizedLinearForward, source: str = "Linear"):
        super().__init__()
        self.source = source
        self._install(qforward)
        self.training = False

    def _install(self, qf: QuantizedLinearForward) -> None:
        qw = qf.qweight
        self.qforward = qf
        self.in_features = qf.in_features
        self.out_features = qf.out_features
        self._packed_src = qw.packed
        self.register_buffer("packed", _shared_tensor(qw.packed), persistent=False)
        self.register_buffer("weight_scale", _shared_tensor(qw.scale))
        self.register_buffer("bias", None if qf.bias is None else _shared_tensor(qf.bias))
        self.register_buffer("act_scale", None if qf.act_scale is None else
                             torch.tensor([qf.act_scale], dtype=torch.float32))  # static mode only

    def _sync_packed(self) -> None:
        """The weight repacks itself for another path (``set_isa``): follow it."""
        p = self.qforward.qweight.packed
        if p is not self._packed_src:
            self._packed_src = p
            self._buffers["packed"] = _shared_tensor(p)

    @property
    def qweight(self) -> ops.QuantizedWeight:
        return self.qforward.qweight

    @property
    def mode(self) -> str:
        return self.qforward.mode

    @property
    def scheme(self) -> str:
        return self.qforward.scheme

    @property
    def act_scale_value(self) -> Optional[float]:
        """The static activation scale (``mode == "static"``), else None."""
        return self.qforward.act_scale

    @property
    def bias_array(self) -> Optional[np.ndarray]:
        return self.qforward.bias

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: "torch.Tensor", x_mul: "Optional[torch.Tensor]" = None,
                x_hadamard: int = 0) -> "torch.Tensor":
        """``x_mul`` (in_features,) float32 tensor: the input is ``x * x_mul`` (a smoothing
        pre-scale), applied inside the kernel's activation pass; ``x_hadamard``: then rotated in
        blocks of that size (:func:`cquant.ops.linear`), in the same pass."""
        if not isinstance(x, (torch.Tensor, torch.fx.Proxy)):
            raise errors.TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if isinstance(x, torch.Tensor) and not isinstance(x, torch.fx.Proxy) and (x.is_nested or x.layout != torch.strided):
            if x.is_nested:  # (either layout: strided nested tensors are what TransformerEncoder makes)
                raise errors.TypeError("nested tensors are not supported by cquant's layers: pad the batch "
                                       "(torch.nested.to_padded_tensor) first")
            x = x.to_dense()  # sparse COO / CSR: as nn.Linear multiplies them, densely
        if _graph_mode(x):
            if x_mul is not None:  # (an fx Proxy's dtype is a Proxy too: no branch on it)
                x = x * (x_mul if isinstance(x, torch.fx.Proxy) or x.dtype == torch.float32 else x_mul.to(x.dtype))
            if x_hadamard:
                x = hadamard_torch(x, x_hadamard)
            if torch.compiler.is_compiling() or not _functorch_wrapped(x):  # (dynamo cannot trace the test)
                return self._forward_op(x)
            try:  # torch.func: vmap runs the op's vmap rule; grad / jacrev cannot differentiate it
                return self._forward_op(x)
            except RuntimeError as e:
                if "functorch transforms" in str(e):
                    raise AutogradError(inference_only_message(f"this {type(self).__name__}")) from None
                raise
        if not isinstance(x, torch.Tensor):
            raise errors.TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise errors.ValueError(f"input is on {x.device}; cquant's kernels run on the CPU "
                                    "(move the input with .cpu())")
        dtype = x.dtype
        if not dtype.is_floating_point:
            raise errors.TypeError(f"input must be a floating-point tensor, got {dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise errors.ShapeError(f"input has shape {tuple(x.shape)}; its last dimension must be "
                                    f"in_features={self.in_features}")
        xf = x if dtype == torch.float32 else x.to(torch.float32)
        if not xf.is_contiguous():
            xf = xf.contiguous()
        if x_mul is None and not x_hadamard:
            y = torch.from_numpy(self.qforward(xf.detach().numpy()))
        else:
            y = torch.from_numpy(self.qforward(xf.detach().numpy(), x_mul=None if x_mul is None else
                                               x_mul.detach().numpy(), x_hadamard=x_hadamard))
        if self.qforward.qweight.packed is not self._packed_src:
            self._sync_packed()
        out = _autocast_dtype(dtype)
        if out != torch.float32:
            y = y.to(out)
        if torch.is_grad_enabled() and not _functorch_active():  # (torch.func: no autograd.Function here;
            y = _NoBackward.apply(x, y)                          # this input is not the transformed one)
        return y

    def _forward_op(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, torch.fx.Proxy):
            if x.device.type not in ("cpu", "meta"):
                raise errors.ValueError(f"input is on {x.device}; cquant's kernels run on the CPU")
            if not x.dtype.is_floating_point:
                raise errors.TypeError(f"input must be a floating-point tensor, got {x.dtype}")
            dtype = x.dtype
        else:
            dtype = torch.float32  # fx Proxy: no dtype known; the op takes float32
        self._sync_packed()
        qw = self.qforward.qweight
        xf = x if dtype == torch.float32 else x.to(torch.float32)
        y = torch.ops.cquant.linear(xf, self.packed, self.weight_scale, self.bias, int(qw.shape[0]),
                                    int(qw.shape[1]), qw.granularity, int(qw.group_size or 0), self.mode,
                                    float(self.qforward.act_scale or 0.0))
        out = dtype if isinstance(x, torch.fx.Proxy) else _autocast_dtype(dtype)  # as the eager path
        return y if out == torch.float32 else y.to(out)

    # ---- inference only ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "QuantizedTorchLinear":
        _refuse_train(mode, f"this {type(self).__name__}")
        return super().train(False)

    def _apply(self, fn, recurse=True):  # .to() / .float() / .half() / .cuda() ...
        _refuse_device(fn, "them")
        return self  # dtype casts do not apply: the kernels compute in float32 and forward keeps the input dtype

    def __prepare_scriptable__(self):
        raise errors.TypeError(
            "torch.jit.script cannot compile a cquant quantized layer (its kernels are called from "
            "Python); use torch.jit.trace, torch.export.export or torch.compile, which record the "
            "cquant::linear custom operator")

    # ---- state_dict ----------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight_q"] = torch.from_numpy(self.qforward.qweight.q)
        for name in ("weight_scale", "bias", "act_scale"):
            b = self._buffers.get(name)
            if b is not None:
                destination[prefix + name] = b if keep_vars else b.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        qw = self.qforward.qweight
        kq, ks, kb, ka = prefix + "weight_q", prefix + "weight_scale", prefix + "bias", prefix + "act_scale"
        has_bias = self.qforward.bias is not None
        static = self.qforward.act_scale is not None
        keys = (kq, ks) + ((kb,) if has_bias else ()) + ((ka,) if static else ())
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key not in keys:
                    if "." not in key[len(prefix):]:
                        unexpected_keys.append(key)
        absent = [k for k in keys if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        q, s = state_dict[kq], state_dict[ks]
        b = state_dict[kb] if has_bias else None
        a = state_dict[ka] if static else None
        n, k = qw.shape
        want = [(kq, q, (n, k)), (ks, s, tuple(qw.scale.shape))] + ([(kb, b, (n,))] if has_bias else []) \
            + ([(ka, a, (1,))] if static else [])
        if not _state_shapes_ok(want, error_msgs):
            return
        if q.dtype != torch.int8:
            error_msgs.append(f"{kq}: expected int8 codes, got {q.dtype}")
            return
        if a is not None and a.dtype != torch.float32:
            error_msgs.append(f"{ka}: expected a float32 activation scale, got {a.dtype}")
            return
        if b is not None and not _finite_floats(b):
            error_msgs.append(f"{kb}: the bias must hold finite floats, no NaN or Inf (got {b.dtype})")
            return
        try:  # the values a checkpoint load refuses (NaN / negative / integer scales) name their key
            scales = ops.check_scales(s.detach().cpu().numpy(), ks)
        except errors.QuantizationError as e:
            error_msgs.append(str(e))
            return
        try:
            new_qw = ops.QuantizedWeight.from_codes(q.detach().cpu().contiguous().numpy(), scales,
                                                    qw.granularity, qw.group_size, bits=qw.bits)
            bias = None if b is None else np.array(b.detach().cpu().to(torch.float32).numpy(),
                                                   dtype=np.float32, copy=True)
            qf = QuantizedLinearForward(new_qw, bias, self.mode,
                                        None if a is None else float(a.detach().cpu().reshape(()).item()))
        except errors.QuantizationError as e:
            error_msgs.append(f"{prefix or '<root>'}: {e}")
            return
        self._install(qf)

    # ---- pickling / deepcopy: the buffers share the numpy arrays' memory; rebuild them -------------
    def __getstate__(self):
        state = super().__getstate__()
        state["_buffers"] = {}
        state.pop("_packed_src", None)
        # the forward's arrays travel as torch tensors (sharing their memory): torch.save (pickle
        # protocol 2, where numpy arrays become latin-1 strings and every byte >= 0x80 takes two:
        # 1.5x the int8 weight) writes tensors as raw storages
        state["qforward"] = _TorchArrays(state["qforward"])
        return state

    def __setstate__(self, state):
        if isinstance(state.get("qforward"), _TorchArrays):  # copy.copy hands __getstate__'s dict over as is
            state = {**state, "qforward": state["qforward"].obj}
        super().__setstate__(state)
        self._install(self.qforward)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.qforward.bias is not None}, {self.scheme}, from={self.source}")


def _autocast_dtype(dtype: "torch.dtype") -> "torch.dtype":
    """The output dtype: the input's, or under CPU autocast its dtype, as nn.Linear returns there."""
    try:
        if torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
    except (AttributeError, TypeError):  # pragma: no cover - older torch
        pass
    return dtype


class _TorchArrays:
    """Pickles an object whose state (``__getstate__``: a dict) holds numpy arrays and such objects,
    with each array as a torch tensor sharing its memory; unpickled through the object's own
    ``__setstate__`` (its checks) with the arrays back as numpy."""
    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __reduce_ex__(self, protocol: int):
        # protocol 2 (torch.save's default) is the one that wrote numpy's bytes as latin-1 strings;
        # from 3 on bytes are raw and the object pickles as itself. (Tensors made here for other
        # picklers would not do: torch.multiprocessing moves a pickled tensor's storage into shared
        # memory whose descriptor closes when this throwaway tensor is freed, before a spawned child
        # reads it: "bad value(s) in fds_to_keep".)
        if protocol >= 3:
            return _from_torch_arrays, (type(self.obj), self.obj.__getstate__())
        return _from_torch_arrays, (type(self.obj), _arrays_to_torch(self.obj.__getstate__()))


def _arrays_to_torch(v: Any) -> Any:
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf" and v.dtype.byteorder in "=|":
        a = np.ascontiguousarray(v)
        with warnings.catch_warnings():  # a read-only array: the tensor is only read, by pickling
            warnings.simplefilter("ignore")
            return ("ndarray", torch.from_numpy(a), a.shape)
    if isinstance(v, dict):
        return {k: _arrays_to_torch(x) for k, x in v.items()}
    if hasattr(type(v), "__setstate__") and type(v).__module__.startswith("cquant.") and hasattr(v, "__getstate__") \
            and isinstance(v.__getstate__(), dict):
        return _TorchArrays(v)
    return v


def _arrays_from_torch(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 3 and v[0] == "ndarray" and isinstance(v[1], torch.Tensor):
        return v[1].numpy().reshape(v[2])
    if isinstance(v, dict):
        return {k: _arrays_from_torch(x) for k, x in v.items()}
    return v


def _from_torch_arrays(cls: type, state: Any) -> Any:
    if not (isinstance(cls, type) and cls.__module__.startswith("cquant.")):
        raise errors.ValueError(f"not a pickled cquant object: {cls!r}")
    obj = cls.__new__(cls)
    obj.__setstate__(_arrays_from_torch(state))
    return obj


# --------------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# --------------------------------------------------------------------------------------------------

def _float_mask(mask: Optional["torch.Tensor"], dtype: "torch.dtype") -> Optional["torch.Tensor"]:
    """Boolean masks (True = may not attend) -> additive float masks; float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not mask.dtype.is_floating_point:
        raise errors.TypeError(f"attention masks must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


class QuantizedMultiheadAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` with cquant's int8 linears for its projections.

    Same call as ``nn.MultiheadAttention.forward`` (``query, key, value, key_padding_mask,
    need_weights, attn_mask, average_attn_weights, is_causal``; batched or not, ``batch_first`` or
    not) and the same math: per-head scaled dot-product attention (``F.scaled_dot_product_attention``,
    or an explicit softmax when the weights are asked for) between ``q_proj``/``k_proj``/``v_proj``
    and ``out_proj``, all :class:`QuantizedTorchLinear`. Inference only (no dropout).

    ``in_proj_weight`` and ``in_proj_bias`` are None: the float projections no longer exist (which is
    also what keeps ``nn.TransformerEncoderLayer`` off its fused fast path).
    """

    def __init__(self, embed_dim: int, num_heads: int, q_proj: QuantizedTorchLinear,
                 k_proj: QuantizedTorchLinear, v_proj: QuantizedTorchLinear, out_proj: QuantizedTorchLinear,
                 batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.kdim = k_proj.in_features
        self.vdim = v_proj.in_features
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.in_proj_weight = None
        self.in_proj_bias = None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.training = False

    @staticmethod
    def parts(mha: "torch.nn.MultiheadAttention") -> List[Tuple[str, "torch.Tensor", Optional["torch.Tensor"]]]:
        """``[(suffix, weight (out, in), bias)]`` for q_proj, k_proj, v_proj, out_proj of a float MHA."""
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            ws = [w[:e], w[e:2 * e], w[2 * e:]]
        else:
            ws = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        b = mha.in_proj_bias
        bs = [None] * 3 if b is None else [b[:e], b[e:2 * e], b[2 * e:]]
        out = [(s, w_, b_) for s, w_, b_ in zip(("q_proj", "k_proj", "v_proj"), ws, bs)]
        out.append(("out_proj", mha.out_proj.weight, mha.out_proj.bias))
        return out

    @staticmethod
    def unsupported(mha: "torch.nn.MultiheadAttention") -> str:
        """Why a float MHA cannot be converted ("" when it can)."""
        if mha.bias_k is not None or mha.bias_v is not None:
            return "nn.MultiheadAttention with add_bias_kv=True is not supported: kept in float32"
        if mha.add_zero_attn:
            return "nn.MultiheadAttention with add_zero_attn=True is not supported: kept in float32"
        return ""

    def train(self, mode: bool = True) -> "QuantizedMultiheadAttention":
        _refuse_train(mode, f"this {type(self).__name__}")
        return super().train(False)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if isinstance(query, torch.fx.Proxy):  # (torch's own MHA is an fx leaf; this module is traced through)
            raise errors.TypeError(
                "torch.fx.symbolic_trace cannot trace a quantized nn.MultiheadAttention (its forward depends "
                "on the input's rank and masks); torch.export.export, torch.jit.trace and torch.compile "
                "capture it, or give fx a Tracer whose is_leaf_module keeps this module a leaf")
        batched = query.dim() == 3
        if batched:
            if not self.batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        else:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        bsz, tgt, _ = query.shape
        src = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(bsz, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(bsz, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(bsz, src, h, d).transpose(1, 2)
        dtype = q.dtype
        mask = _float_mask(attn_mask, dtype)
        if mask is None and is_causal:
            mask = torch.full((tgt, src), float("-inf"), dtype=dtype, device=q.device).triu(1)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.view(1, 1, tgt, src)
            elif mask.dim() == 3:
                mask = mask.view(bsz if batched else 1, h, tgt, src)
            else:
                raise errors.ShapeError(f"attn_mask must be 2-D or 3-D, got {mask.dim()}-D")
        kpm = _float_mask(key_padding_mask, dtype)
        if kpm is not None:
            kpm = kpm.view(bsz, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        if need_weights:
            scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(weights, v)
        else:
            weights = None
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(ctx.transpose(1, 2).reshape(bsz, tgt, self.embed_dim))
        if batched and not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------

@dataclass
class _Part:
    suffix: str                     # "" for a Linear/Conv1D; "q_proj", ... for an attention
    weight: "torch.Tensor"          # as stored (a slice of in_proj_weight for an attention)
    bias: Optional["torch.Tensor"]
    layout: str                     # "out_in" (Linear) or "in_out" (Conv1D)
    share_key: Optional[int]        # id of the Parameter (tied weights are quantized once)
    qweight: Optional[ops.QuantizedWeight] = None
    bias_np: Optional[np.ndarray] = None
    shared_with: Optional[str] = None


@dataclass
class _Plan:
    name: str
    mod: "torch.nn.Module"
    kind: str                       # "linear" or "mha"
    parts: List[_Part]
    sites: List[Tuple["torch.nn.Module", str]] = field(default_factory=list)


@dataclass
class _EmbPlan:
    """An ``nn.Embedding`` to store as int8 rows (``tie``: the Linear plan whose codes it reads)."""
    name: str
    mod: "torch.nn.Module"
    sites: List[Tuple["torch.nn.Module", str]]
    tie: Optional[_Plan] = None
    qweight: Optional[ops.QuantizedWeight] = None
    shared_with: Optional[str] = None


@dataclass
class _EmbSelection:
    """``embeddings=`` for one :func:`_select` call: the table patterns, whether the Linears' scheme
    gives per-row int8 codes a tied table can share, and (out) the tables selected."""
    patterns: Tuple[str, ...]
    tie_ok: bool
    plans: List[_EmbPlan] = field(default_factory=list)


def _match(name: str, patterns: Sequence[str]) -> Optional[str]:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def _patterns(p: Any) -> Tuple[str, ...]:
    if p is None:
        return ()
    if isinstance(p, str):
        return (p,)
    return tuple(p)


def _weight_problem(w: Any, b: Any, out: int) -> str:
    if isinstance(w, torch.nn.parameter.UninitializedParameter):
        return "weight not initialized yet (lazy module): run one forward first"
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        return "weight is not a non-empty 2-D tensor"
    if w.device.type == "meta":
        return "weight is on the meta device (no data)"
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not floating-point"
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (out,)):
        return f"bias is not a tensor of out_features={out} values"
    return ""


def _classify(mod: "torch.nn.Module", parent: Optional["torch.nn.Module"]) -> Tuple[Optional[str], str]:
    """(kind, "") if ``mod`` is quantizable ("linear_out_in", "linear_in_out", "mha"), else (None,
    reason); reason "" means: not a layer."""
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.nn.parameter.UninitializedParameter):  # LazyLinear before its first call
        return None, f"{type(mod).__name__}: weight is not initialized yet (run the model once first)"
    if isinstance(mod, torch.nn.MultiheadAttention):
        why = QuantizedMultiheadAttention.unsupported(mod)
        if why:
            return None, why
        for suffix, pw, pb in QuantizedMultiheadAttention.parts(mod):
            why = _weight_problem(pw, pb, int(pw.shape[0]) if isinstance(pw, torch.Tensor) and pw.dim() else 0)
            if why:
                return None, f"{suffix}: {why}"
        return "mha", ""
    if isinstance(mod, torch.nn.Linear):
        if isinstance(parent, torch.nn.MultiheadAttention):
            return None, ""  # handled with its attention
        if type(mod).forward is not torch.nn.Linear.forward:
            return None, f"{type(mod).__name__} overrides Linear.forward: replacing it would change what it computes"
        layout = "out_in"
    elif is_conv1d(mod):
        layout = "in_out"
    else:
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            kind = type(mod).__name__
            if "Embedding" in kind:
                return None, f"embedding ({kind}): never quantized"
            return None, f"{kind} is not nn.Linear or a GPT-2 style Conv1D"
        return None, ""
    b = getattr(mod, "bias", None)
    out = (w.shape[0] if layout == "out_in" else w.shape[1]) if isinstance(w, torch.Tensor) and w.dim() == 2 else 0
    why = _weight_problem(w, b, out)
    return (None, why) if why else ("linear_" + layout, "")


def _module_names(model: "torch.nn.Module") -> Dict[int, List[str]]:
    """id(module) -> every name it is registered under (a shared module has several)."""
    names: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def _module_sites(model: "torch.nn.Module") -> Tuple[Dict[int, List[Tuple["torch.nn.Module", str]]],
                                                     Dict[int, "torch.nn.Module"]]:
    """Every (parent, child name) where each module is registered, and a parent of each."""
    parents: Dict[int, "torch.nn.Module"] = {}
    sites: Dict[int, List[Tuple["torch.nn.Module", str]]] = {}
    seen: set = set()
    for _, m in model.named_modules(remove_duplicate=False):
        for cname, child in m._modules.items():
            if child is None or (id(m), cname) in seen:
                continue
            seen.add((id(m), cname))
            parents.setdefault(id(child), m)
            sites.setdefault(id(child), []).append((m, cname))
    return sites, parents


def _param_owners(model: "torch.nn.Module") -> Dict[int, List[Tuple[str, "torch.nn.Module"]]]:
    """id(parameter) -> every (module name, module) that registers it (ties show up as several)."""
    owners: Dict[int, List[Tuple[str, "torch.nn.Module"]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None and all(o is not m for _, o in owners.get(id(p), [])):
                owners.setdefault(id(p), []).append((name, m))
    return owners


def _select(model: "torch.nn.Module", include: Sequence[str], exclude: Sequence[str],
            emb: Optional[_EmbSelection] = None) -> Tuple[List[_Plan], List[LayerRecord]]:
    sites, parents = _module_sites(model)
    plans: List[_Plan] = []
    skipped: List[LayerRecord] = []
    for name, mod in model.named_modules():
        disp = name or "<root>"
        if isinstance(mod, (QuantizedTorchLinear, QuantizedTorchEmbedding)):
            skipped.append(LayerRecord(disp, tuple(mod.qweight.shape), "skipped", "already quantized", 0, 0,
                                       mod.scheme))
            continue
        kind, why = _classify(mod, parents.get(id(mod)))
        if kind is None and emb is not None and isinstance(mod, torch.nn.Embedding):
            why = embedding_problem(mod)
            if not why and _match(name, exclude) is not None:
                why = f"excluded by pattern {_match(name, exclude)!r}"
            elif not why and _match(name, emb.patterns) is None:
                why = f"not matched by embeddings={list(emb.patterns)!r}"
            if not why:
                emb.plans.append(_EmbPlan(name, mod, sites.get(id(mod), [])))
                continue
        w = getattr(mod, "weight", None)
        if kind == "mha":
            w = mod.in_proj_weight if mod._qkv_same_embed_dim else None
        if isinstance(w, torch.nn.parameter.UninitializedParameter):  # no shape or size yet
            shape, wb = None, 0
        else:
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) and w.device.type != "meta" else None
            wb = int(w.numel() * w.element_size()) if isinstance(w, torch.Tensor) else 0
        if kind is not None:
            # the layer inside a smoothing pre-scale wrapper is named by the wrapper's name too
            wrapped = name.endswith(".linear") and \
                getattr(type(parents.get(id(mod))), "_cquant_smoothing_wrapper", False) is True
            exc = match_layer(name, exclude, wrapped)
            if exc is not None:
                kind, why = None, f"excluded by pattern {exc!r}"
            elif include and match_layer(name, include, wrapped) is None:
                kind, why = None, "not matched by include"
        if kind is None:
            if why:
                skipped.append(LayerRecord(disp, shape, "skipped", why, wb, wb, ""))
            continue
        if kind == "mha":
            parts = [_Part(s, pw, pb, "out_in", id(pw) if s == "out_proj" else None)
                     for s, pw, pb in QuantizedMultiheadAttention.parts(mod)]
            plans.append(_Plan(name, mod, "mha", parts, sites.get(id(mod), [])))
        else:
            layout = kind[len("linear_"):]
            plans.append(_Plan(name, mod, "linear", [_Part("", w, getattr(mod, "bias", None), layout, id(w))],
                               sites.get(id(mod), [])))
    # ties: a weight also registered by a module that stays float would be stored twice; an embedding
    # table tied to a Linear quantized per_channel int8 shares its codes (to a fixed point: a module
    # left float can make another one tied to it stay float)
    owners = _param_owners(model)
    planned = {id(p.mod) for p in plans}
    for sub in {id(m): m for p in plans if p.kind == "mha" for m in p.mod.modules()}.values():
        planned.add(id(sub))
    tables = {id(e.mod): e for e in (emb.plans if emb is not None else [])}
    plan_of = {id(p.mod): p for p in plans if p.kind == "linear"}
    tie_ok = emb is not None and emb.tie_ok
    changed = True
    while changed:  # the tables, then the Linears tied to a module left float (which may leave a table float)
        chosen, dropped = resolve_ties(
            tables, lambda e: owners.get(id(e.mod.weight), []), lambda m: plan_of.get(id(m)),
            lambda p: tie_ok and p.parts[0].layout == "out_in", quantized=lambda m: id(m) in planned)
        for e, why in dropped:
            w = e.mod.weight
            wb = int(w.numel() * w.element_size())
            skipped.append(LayerRecord(e.name or "<root>", tuple(w.shape), "skipped", why, wb, wb, ""))
        tables = {id(e.mod): e for e, _tie in chosen}
        changed = False
        for p in plans:
            if p.kind == "linear" and id(p.mod) in planned:
                others = [(n, m) for n, m in owners.get(id(p.mod.weight), []) if id(m) not in planned
                          and id(m) not in tables]
                if others:
                    w = p.mod.weight
                    wb = int(w.numel() * w.element_size())
                    skipped.append(LayerRecord(p.name or "<root>", tuple(w.shape), "skipped",
                                               float_tie_reason(*others[0]), wb, wb, ""))
                    planned.discard(id(p.mod))
                    changed = True
    for e, tie in chosen:
        e.tie = tie
    if emb is not None:
        emb.plans[:] = [e for e, _tie in chosen]
    kept = [p for p in plans if p.kind != "linear" or id(p.mod) in planned]
    return kept, skipped


def _prepare(plans: List[_Plan], granularity: str, group_size: Optional[int], bits: int = 8) -> None:
    """Quantize every selected weight (nothing in the model changes; raises naming the layer)."""
    done: Dict[int, Tuple[str, _Part]] = {}
    for p in plans:
        for part in p.parts:
            disp = ".".join(s for s in (p.name, part.suffix) if s) or "<root>"
            b = part.bias
            part.bias_np = None if b is None else np.array(to_numpy(b, f"{disp}.bias"), dtype=np.float32, copy=True)
            if part.bias_np is not None:
                ops.check_finite(part.bias_np, f"{disp}.bias")
            first = done.get(part.share_key) if part.share_key is not None else None
            if first is not None and first[1].layout == part.layout:
                part.qweight, part.shared_with = first[1].qweight, first[0]
                continue
            arr = to_numpy(part.weight, f"{disp}.weight")
            if part.layout == "in_out":
                arr = np.ascontiguousarray(arr.T)
            try:
                ops.check_finite(arr, f"{disp}.weight")
                part.qweight = ops.quantize_weight(arr, granularity=granularity, group_size=group_size,
                                                   name=f"{disp}.weight", bits=bits)
            except errors.QuantizationError as e:
                raise _renamed(e, f"layer {disp!r}: {e}") from e
            del arr
            if part.share_key is not None:
                done[part.share_key] = (disp, part)


def _prepare_embeddings(embs: List[_EmbPlan]) -> None:
    """Quantize every selected table, per row (after :func:`_prepare`: a tied table takes its Linear's
    codes); raises naming the table, nothing in the model changes."""
    done: Dict[int, _EmbPlan] = {}
    for e in embs:
        if e.tie is not None:
            e.qweight = e.tie.parts[0].qweight
            continue
        w = e.mod.weight
        first = done.get(id(w))
        if first is not None:
            e.qweight, e.shared_with = first.qweight, first.name or "<root>"
            continue
        disp = e.name or "<root>"
        arr = to_numpy(w, f"{disp}.weight")
        try:
            ops.check_finite(arr, f"{disp}.weight")
            e.qweight = ops.quantize_weight(arr, granularity="per_channel", name=f"{disp}.weight")
        except errors.QuantizationError as exc:
            raise _renamed(exc, f"embedding {disp!r}: {exc}") from exc
        del arr
        done[id(w)] = e


# --------------------------------------------------------------------------------------------------
# Releasing the float32 pages of a memory-mapped checkpoint
# --------------------------------------------------------------------------------------------------

_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21
_PAGE = 4096
_PM_PRESENT = 1 << 63
_PM_FILE = 1 << 61


def _file_mappings() -> List[Tuple[int, int]]:
    """(start, end) of this process' file-backed mappings (Linux), [] elsewhere."""
    if not sys.platform.startswith("linux"):
        return []
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].strip().startswith("/") and fields[4] != "0":
                    a, b = fields[0].split("-")
                    out.append((int(a, 16), int(b, 16)))
    except OSError:
        return []
    return out


def _only_file_pages(pagemap: Any, a: int, b: int) -> bool:
    """True if every resident page in [a, b) is a page of the file itself (not a private copy made by
    a write): those can be dropped from this process and read again, identical, from the file."""
    n = (b - a) // _PAGE
    try:
        pagemap.seek(a // _PAGE * 8)
        raw = pagemap.read(8 * n)
    except OSError:
        return False
    if len(raw) != 8 * n:
        return False
    e = np.frombuffer(raw, dtype=np.uint64)
    present = (e & np.uint64(_PM_PRESENT)) != 0
    return bool(np.all((e[present] & np.uint64(_PM_FILE)) != 0))


def _release_file_pages(tensors: Iterable["torch.Tensor"]) -> int:
    """Hand back the whole pages of each tensor that lies in a file mapping (a memory-mapped
    checkpoint): ``madvise(MADV_DONTNEED)`` when ``/proc/self/pagemap`` shows that every resident page
    is the file's own page (dropping it loses nothing, a later read maps it again), else
    ``MADV_PAGEOUT`` (always safe; it skips pages other processes map too). Returns the bytes advised."""
    maps = _file_mappings()
    if not maps:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover
        return 0
    try:
        pagemap: Any = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:  # pragma: no cover
        pagemap = None
    done = 0
    seen: set = set()
    try:
        for t in tensors:
            if t is None or t.device.type != "cpu" or t.numel() == 0:
                continue
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            if (start, end) in seen or not any(lo <= start and end <= hi for lo, hi in maps):
                continue
            seen.add((start, end))
            a = (start + _PAGE - 1) // _PAGE * _PAGE
            b = end // _PAGE * _PAGE
            if b <= a:
                continue
            advice = _MADV_DONTNEED if pagemap is not None and _only_file_pages(pagemap, a, b) else _MADV_PAGEOUT
            if madvise(a, b - a, advice) == 0:
                done += b - a
    finally:
        if pagemap is not None:
            pagemap.close()
    return done


# --------------------------------------------------------------------------------------------------
# Transformer layers whose fused fast path reads float weights
# --------------------------------------------------------------------------------------------------

def _disable_fast_paths(model: "torch.nn.Module", undo: Optional[List[Any]] = None) -> List[str]:
    """``nn.TransformerEncoderLayer``'s fused fast path (and ``nn.TransformerEncoder``'s nested
    tensor path) read ``linear1.weight``, ``linear1.bias``, ``self_attn.in_proj_weight``, ... directly.
    For each one holding quantized modules or smoothing pre-scale wrappers (whose inner weight is
    scaled, and which have no ``weight`` / ``bias`` of their own), switch it to its regular path: the
    encoder's ``use_nested_tensor`` and the layer's ``activation_relu_or_gelu`` (read by torch only to
    choose and configure the fast path) are cleared. Returns the names of the modules changed;
    ``undo``: gets a callable per change that restores it."""
    changed = []

    def quantized_inside(m: "torch.nn.Module") -> bool:
        return any(isinstance(s, (QuantizedTorchLinear, QuantizedMultiheadAttention))
                   or getattr(type(s), "_cquant_smoothing_wrapper", False) is True for s in m.modules())

    for name, m in model.named_modules():
        attr = ("activation_relu_or_gelu" if isinstance(m, torch.nn.TransformerEncoderLayer) else
                "use_nested_tensor" if isinstance(m, torch.nn.TransformerEncoder) else None)
        if attr is not None and getattr(m, attr, False) and quantized_inside(m):
            old = getattr(m, attr)
            setattr(m, attr, 0 if attr == "activation_relu_or_gelu" else False)
            changed.append(name or "<root>")
            if undo is not None:
                undo.append(lambda _m=m, _a=attr, _o=old: setattr(_m, _a, _o))
    return changed


def quantize_module(model: "torch.nn.Module", mode: str = "dynamic", granularity: str = "per_channel",
                    group_size: Optional[int] = None, include: Any = None, exclude: Any = None,
                    inplace: bool = True, quantizer: Any = None, bits: int = 8,
                    act_scales: Optional[Dict[str, float]] = None, embeddings: Any = ()) -> "torch.nn.Module":
    """Replace the Linear / Conv1D / MultiheadAttention layers of ``model`` by quantized modules.

    Returns the model (a deep copy when ``inplace=False``; a new module when ``model`` itself is a
    Linear), in eval mode. Every weight is checked and quantized before the model is touched: a
    NaN/Inf weight or a bad ``group_size`` raises naming the layer and leaves the model as it was.
    ``quantizer`` (a :class:`cquant.Quantizer`) receives the per-layer ``summary``. ``bits``: 8,
    or 4 (int4 codes, two per byte). ``mode="static"`` needs ``act_scales`` (module name -> calibrated
    activation scale, e.g. ``Quantizer.act_scales``; ``q_proj``... of an attention are named
    ``<attn>.q_proj``); a layer missing from it gets dynamic activations, the reason recorded.
    ``embeddings``: ``True`` or names / globs of ``nn.Embedding`` tables to store as int8 rows too
    (default: none; see the module docstring for tied tables).
    """
    if not isinstance(model, torch.nn.Module):
        raise errors.TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if mode not in ops.MODES and mode != "static":
        raise errors.ValueError(f"mode must be one of {sorted(ops.MODES) + ['static']}, got {mode!r}")
    if mode == "static" and act_scales is None:
        raise errors.ValueError("mode='static' needs act_scales (calibrated per layer): use "
                                "cquant.Quantizer.quantize_dynamic(model, mode='static', calibration=batches)")
    include, exclude = _patterns(include), _patterns(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    emb_pats = ("*",) if embeddings is True else () if embeddings in (None, False) else _patterns(embeddings)
    emb = _EmbSelection(emb_pats, granularity == "per_channel" and bits == 8) if emb_pats else None
    plans, skipped = _select(model, include, exclude, emb)
    embs = emb.plans if emb is not None else []
    quiet = bool(getattr(quantizer, "quiet", False))  # a Quantizer's per-scheme call: it reports the whole
    for pat in include:
        if not quiet and not any(fnmatch.fnmatchcase(p.name, pat) for p in plans):
            logger.warning("include pattern %r matched no quantizable layer", pat)
    _prepare(plans, granularity, group_size, bits)
    _prepare_embeddings(embs)
    if model.training and (plans or embs):
        logger.info("quantize: the model was in training mode; quantized models are for inference, "
                    "it is switched to eval mode")
    records: List[LayerRecord] = []
    released: List["torch.Tensor"] = []
    installed: Dict[int, "torch.nn.Module"] = {}
    for p in plans:
        news = {}
        for part in p.parts:
            assert part.qweight is not None
            source = ("Conv1D" if part.layout == "in_out" else
                      type(p.mod).__name__ if p.kind == "linear" else "MultiheadAttention")
            lmode, act, static_note = mode, None, ""
            if mode == "static":
                assert act_scales is not None
                act = act_scales.get(".".join(s for s in (p.name, part.suffix) if s))
                if act is None:
                    lmode, static_note = "dynamic", ("static: the calibration batches never reached this layer "
                                                     "(no activation statistics): dynamic activations instead")
            news[part.suffix] = QuantizedTorchLinear(QuantizedLinearForward(part.qweight, part.bias_np, lmode, act),
                                                     source=source)
            w = part.weight
            wb = int(w.numel() * w.element_size())
            bb = 0 if part.bias_np is None else int(part.bias_np.nbytes)
            if part.shared_with is None:
                before, after, note = wb + bb, part.qweight.nbytes + bb, ""
            else:
                before, after, note = bb, bb, f"weight shared with {part.shared_with!r} (quantized once)"
            note = "; ".join(filter(None, [static_note, note]))
            full = ".".join(s for s in (p.name, part.suffix) if s) or "<root>"
            records.append(LayerRecord(full, tuple(part.qweight.shape), "quantized", note, before, after,
                                       news[part.suffix].scheme))
            released += [w] + ([part.bias] if part.bias is not None else [])
        if p.kind == "mha":
            m = p.mod
            new = QuantizedMultiheadAttention(m.embed_dim, m.num_heads, news["q_proj"], news["k_proj"],
                                              news["v_proj"], news["out_proj"], batch_first=m.batch_first,
                                              dropout=m.dropout)
        else:
            new = news[""]
        installed[id(p)] = new
        for parent, cname in p.sites:
            parent._modules[cname] = new
        if p.name == "":
            model = new
        for part in p.parts:
            part.weight = part.bias = None  # type: ignore[assignment]
        p.mod = None  # type: ignore[assignment]  # drop our reference to the float layer
    for e in embs:
        assert e.qweight is not None
        w = e.mod.weight
        tie = installed[id(e.tie)] if e.tie is not None else None
        new_e = QuantizedTorchEmbedding(None if tie is not None else e.qweight, e.mod.padding_idx, tie=tie,
                                        dtype=w.dtype)
        wb = int(w.numel() * w.element_size())
        if e.tie is not None:
            before, after, note = 0, 0, (f"weight tied to {e.tie.name or '<root>'!r}: quantized once, the table "
                                         "reads its per_channel int8 codes")
        elif e.shared_with is not None:
            before, after, note = 0, 0, f"weight shared with {e.shared_with!r} (quantized once)"
        else:
            before, after, note = wb, e.qweight.nbytes, ""
        records.append(LayerRecord(e.name or "<root>", tuple(e.qweight.shape), "quantized", note, before, after,
                                   new_e.scheme))
        released.append(w)
        for parent, cname in e.sites:
            parent._modules[cname] = new_e
        if e.name == "":
            model = new_e
        e.mod = None  # type: ignore[assignment]
    embs.clear()
    plans.clear()
    model.eval()
    fast = _disable_fast_paths(model)
    if fast:
        logger.info("fused fast path switched off (it reads float weights) in: %s", ", ".join(fast))
    if released:
        freed = _release_file_pages(released)
        if freed:
            logger.info("released %.2f MiB of memory-mapped float32 weight pages", freed / 2**20)
    del released
    if quantizer is not None:
        quantizer.summary = records + skipped
    before = sum(r.bytes_before for r in records)
    after = sum(r.bytes_after for r in records)
    logger.info("quantized %d torch layer(s) (%s %s): %.2f MiB -> %.2f MiB; %d skipped", len(records),
                mode, granularity, before / 2**20, after / 2**20, len(skipped))
    if not records and not quiet:
        logger.warning("no Linear layer was quantized")
    for r in skipped:
        level = logging.WARNING if ("Linear" in r.reason or "Conv1D" in r.reason or "Attention" in r.reason
                                    or "tied" in r.reason) and \
            not r.reason.startswith(("excluded", "not matched", "already")) else logging.INFO
        logger.log(level, "  skipped %s: %s", r.name, r.reason)
    return model


def report(model: "torch.nn.Module") -> List[ReportRow]:
    """One :class:`cquant.quantization.ReportRow` per quantized layer of a torch model."""
    rows: List[ReportRow] = []
    owner: Dict[int, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedTorchEmbedding):  # int8 table (a tied one shares its Linear's codes)
            qw = m.qweight
            n, k = qw.shape
            first = owner.setdefault(id(qw), name)
            own = first == name
            rows.append(ReportRow(name, (n, k), m.scheme, n * k * 4 if own else 0, qw.nbytes if own else 0,
                                  None if own else first))
            continue
        if not isinstance(m, QuantizedTorchLinear):
            continue
        qw = m.qweight
        n, k = qw.shape
        bb = 0 if m.bias_array is None else int(m.bias_array.nbytes)
        first = owner.get(id(qw))
        if first is None:
            owner[id(qw)] = name
            rows.append(ReportRow(name, (n, k), m.scheme, n * k * 4 + bb, qw.nbytes + bb))
        else:
            rows.append(ReportRow(name, (n, k), m.scheme, bb, bb, first))
    return rows


def quantized_layers(model: "torch.nn.Module") -> Iterable[Tuple[str, QuantizedTorchLinear]]:
    """(name, module) for every quantized layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QuantizedTorchLinear):
            yield name, m


# --------------------------------------------------------------------------------------------------
# Installing a cquant checkpoint (cquant.load_into)
# --------------------------------------------------------------------------------------------------

def _pfx(name: str) -> str:
    return f"{name}." if name else ""


def _non_persistent(model: "torch.nn.Module") -> set:
    out = set()
    for name, m in model.named_modules():
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            out.add(_pfx(name) + b)
    return out


def _aliases(model: "torch.nn.Module") -> Dict[str, List[str]]:
    """state_dict key -> the other keys naming the same tensor (tied weights)."""
    by_id: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for pname, p in list(m._parameters.items()) + list(m._buffers.items()):
            if p is not None:
                key = _pfx(name) + pname
                if key not in by_id.setdefault(id(p), []):
                    by_id[id(p)].append(key)
    out: Dict[str, List[str]] = {}
    for keys in by_id.values():
        for k in keys:
            out[k] = [o for o in keys if o != k]
    return out


def _numpy_dtype(dt: "torch.dtype") -> Optional[np.dtype]:
    """The numpy dtype a torch tensor's values are checked against (bfloat16: float32's range)."""
    if dt == torch.bfloat16:
        return np.dtype(np.float32)
    try:
        return torch.empty((), dtype=dt).numpy().dtype
    except TypeError:  # a dtype numpy lacks (float8 ...): the copy itself decides, as before
        return None


def install_checkpoint(model: "torch.nn.Module", ck: Any, strict: bool = True) -> "torch.nn.Module":
    """Install a :class:`cquant.io.Checkpoint` into a torch model (``cquant.load_into``); see
    :func:`_install_checkpoint`. A smoothed layer that stayed float (``<name>.inv_scale`` with
    ``<name>.linear.weight``: a ``scheme`` rule or the accuracy budget kept it float inside its
    pre-scale wrapper) gets the wrapper around the model's float layer first, as ``from_pretrained``
    does, so that its tensors have a place to go; undone if the install fails."""
    wrapped: List[Tuple["torch.nn.Module", str, "torch.nn.Module"]] = []
    try:
        if isinstance(model, torch.nn.Module):
            _wrap_float_smoothed(model, ck, wrapped)
        return _install_checkpoint(model, ck, strict)
    except BaseException:
        for parent, cname, mod in reversed(wrapped):
            parent._modules[cname] = mod
        raise


def _wrap_float_smoothed(model: "torch.nn.Module", ck: Any, wrapped: List[Tuple[Any, str, Any]]) -> None:
    """The pre-scale wrappers of :func:`install_checkpoint`, each journalled in ``wrapped``."""
    subs = dict(model.named_modules())
    sites, _ = _module_sites(model)
    for key in [k for k in ck.tensors if k.endswith(".inv_scale")]:
        base = key[: -len(".inv_scale")]
        mod = subs.get(base)
        if not base or _pfx(base) + "linear.weight" not in ck.tensors or mod is None \
                or not (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)):
            continue  # a quantized inner layer (handled with the layers), or nothing to wrap
        k_in = int(mod.weight.shape[1] if isinstance(mod, torch.nn.Linear) else mod.weight.shape[0])
        new = SmoothedTorchLinear(mod, *wrapper_tensors(ck.tensors, base, k_in))
        for parent, cname in sites.get(id(mod), []):
            parent._modules[cname] = new
            wrapped.append((parent, cname, mod))


def _install_checkpoint(model: "torch.nn.Module", ck: Any, strict: bool = True) -> "torch.nn.Module":
    """Install a :class:`cquant.io.Checkpoint` into a torch model (``cquant.load_into``).

    Each checkpoint layer replaces the ``nn.Linear`` / ``Conv1D`` (or an earlier quantized layer) of
    the same name; ``<attn>.q_proj``/``k_proj``/``v_proj``/``out_proj`` layers replace the
    ``nn.MultiheadAttention`` ``<attn>`` by a :class:`QuantizedMultiheadAttention`. The other tensors
    are copied into the model's parameters and buffers. Everything is checked before anything is
    changed. ``strict``: the keys must match, except that checkpoint tensors naming a non-persistent
    buffer of the model (e.g. transformers' ``embeddings.position_ids``) are ignored and a tied
    weight (e.g. ``lm_head.weight`` tied to ``wte.weight``) is satisfied by any of its names.
    A layer of kind ``"embedding"`` replaces an ``nn.Embedding`` by a ``QuantizedTorchEmbedding``
    (``cquant.load_into`` leaves here only the tables it can install quantized); one listed in
    ``ck.tied`` reads the codes of the Linear layer it is tied to.
    """
    subs = dict(model.named_modules())
    plans: List[Tuple[str, "torch.nn.Module", QuantizedLinearForward, str]] = []
    mha_plans: Dict[str, "torch.nn.MultiheadAttention"] = {}
    emb_plans: List[Tuple[str, "torch.nn.Module", QuantizedLinearForward]] = []
    kinds, tied = getattr(ck, "kinds", {}), getattr(ck, "tied", {})
    wrap_plans: Dict[str, Tuple[str, np.ndarray, int]] = {}  # base -> (layer name, inv_scale, hadamard)
    for name, qf in ck.layers.items():
        mod = subs.get(name)
        parent_name, _, last = name.rpartition(".")
        parent = subs.get(parent_name)
        if isinstance(parent, torch.nn.MultiheadAttention) and last in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mha_plans[parent_name] = parent
            continue
        if mod is None and name.endswith(".linear") and (_pfx(name[: -len(".linear")]) + "inv_scale") in ck.tensors:
            # a layer smoothing wrapped (``<base>.linear`` with ``<base>.inv_scale``): the model's
            # ``<base>`` gets the pre-scale wrapper around the quantized layer, as from_pretrained does
            base = name[: -len(".linear")]
            bmod = subs.get(base)
            if bmod is not None and (isinstance(bmod, (torch.nn.Linear, QuantizedTorchLinear)) or is_conv1d(bmod)):
                wrap_plans[base] = (name,) + wrapper_tensors(ck.tensors, base, int(qf.qweight.shape[1]))
                mod = bmod
        if mod is None:
            raise CheckpointError(f"the model has no sub-module {name!r} (checkpoint layer)")
        if kinds.get(name) == "embedding" and isinstance(mod, (torch.nn.Embedding, QuantizedTorchEmbedding)):
            rows = (int(mod.num_embeddings), int(mod.embedding_dim))
            if tuple(qf.qweight.shape) != rows:
                raise CheckpointError(f"layer {name!r}: checkpoint shape {tuple(qf.qweight.shape)}, the model's "
                                      f"embedding (num_embeddings, embedding_dim) = {rows}")
            why = "" if isinstance(mod, QuantizedTorchEmbedding) else embedding_problem(mod)
            if why or not can_share(qf.qweight) or qf.bias is not None:
                raise CheckpointError(f"embedding {name!r}: cannot install an int8 table there"
                                      + (f" ({why})" if why else " (not per-row int8 codes without a bias)"))
            emb_plans.append((name, mod, qf))
            continue
        if isinstance(mod, QuantizedTorchLinear):
            shape, source = (mod.out_features, mod.in_features), mod.source
        elif isinstance(mod, torch.nn.Linear):
            shape, source = tuple(mod.weight.shape), type(mod).__name__
        elif is_conv1d(mod):
            shape, source = (int(mod.weight.shape[1]), int(mod.weight.shape[0])), "Conv1D"
        else:
            raise CheckpointError(f"checkpoint layer {name!r} is a Linear, the model has a {type(mod).__name__}")
        if tuple(shape) != tuple(qf.qweight.shape):
            raise CheckpointError(f"layer {name!r}: checkpoint (out, in) = {tuple(qf.qweight.shape)}, "
                                  f"model {tuple(shape)}")
        plans.append((name, mod, qf, source))
    mha_new: List[Tuple[str, "torch.nn.Module", "torch.nn.Module"]] = []
    for aname, mha in mha_plans.items():
        layers = {}
        for suffix, w, _b in QuantizedMultiheadAttention.parts(mha):
            qf = ck.layers.get(_pfx(aname) + suffix)
            if qf is None:
                raise CheckpointError(f"attention {aname!r}: checkpoint layer {_pfx(aname) + suffix!r} is missing")
            if tuple(qf.qweight.shape) != tuple(w.shape):
                raise CheckpointError(f"layer {_pfx(aname) + suffix!r}: checkpoint (out, in) = "
                                      f"{tuple(qf.qweight.shape)}, model {tuple(w.shape)}")
            layers[suffix] = QuantizedTorchLinear(qf, source="MultiheadAttention")
        mha_new.append((aname, mha, QuantizedMultiheadAttention(
            mha.embed_dim, mha.num_heads, layers["q_proj"], layers["k_proj"], layers["v_proj"],
            layers["out_proj"], batch_first=mha.batch_first, dropout=mha.dropout)))
    linear_names = {p[0] for p in plans}
    for name, _mod, _qf in emb_plans:
        if name in tied and tied[name] not in linear_names:
            raise CheckpointError(f"embedding {name!r} is tied to {tied[name]!r}, which is not a Linear layer "
                                  "of the checkpoint installed in this model")
    qnames = linear_names | set(mha_plans) | {e[0] for e in emb_plans} | set(wrap_plans)
    # a replaced module registered under several names (a shared module): its keys under every name
    names_of = _module_names(model)
    consumed = {_pfx(n) + t for b in wrap_plans for n in names_of.get(id(subs[b]), [b]) + [b]
                for t in ("inv_scale", "hadamard")}
    for b in wrap_plans:  # the other names' copies must be the same tensors
        for n in names_of.get(id(subs[b]), []):
            for t in ("inv_scale", "hadamard"):
                k, k0 = _pfx(n) + t, _pfx(b) + t
                if k != k0 and k in ck.tensors and not np.array_equal(np.asarray(ck.tensors[k]),
                                                                      np.asarray(ck.tensors.get(k0, np.zeros(1, np.int64)))):
                    raise CheckpointError(f"tensor {k!r} differs from {k0!r}, but the model registers one module "
                                          f"under both names")
    planned = {id(p[1]) for p in plans} | {id(m) for m in mha_plans.values()} | {id(e[1]) for e in emb_plans}
    qnames = qnames | {n for i in planned for n in names_of.get(i, [])}

    def in_layer(key: str) -> bool:
        return any(key.startswith(_pfx(n)) and ("." not in key[len(_pfx(n)):] or n in mha_plans)
                   for n in qnames)

    own = {k: v for k, v in model.state_dict().items() if not in_layer(k)}
    # output blocks the checkpoint scaled the residual of (smoothing folded into a post-norm
    # LayerNorm): made residual-scaled below, once every check has passed
    rs_new = {k: blk for k, blk in residual_scales_in(model, ck.tensors).items() if k not in own}
    for k, blk in rs_new.items():
        own[k] = torch.empty(int(blk.LayerNorm.normalized_shape[-1]))
    aliases = _aliases(model)
    ignored = sorted(k for k in ck.tensors if k not in own and k in _non_persistent(model))
    missing = sorted(k for k in own if k not in ck.tensors
                     and not any(a in ck.tensors for a in aliases.get(k, ())))
    unexpected = sorted(k for k in ck.tensors if k not in own and k not in ignored and k not in consumed)
    if strict and (missing or unexpected):
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(
            s for s in (f"missing: {', '.join(missing[:10])}" + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
                        if missing else "",
                        f"unexpected: {', '.join(unexpected[:10])}" + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
                        if unexpected else "") if s)
            + ". If the model is right and only these keys differ, pass strict=False to install what "
              "fits (missing tensors keep the model's values, unexpected ones are ignored).")
    for k, v in ck.tensors.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"tensor {k!r}: checkpoint shape {tuple(v.shape)}, model {tuple(own[k].shape)}")
        nd = _numpy_dtype(own[k].dtype) if k in own else None
        why = plain_tensor_problem(v, nd) if nd is not None else None
        if why:
            raise CheckpointError(f"tensor {k!r} {why}")
    if ignored:
        logger.info("load_into: ignored %d checkpoint tensor(s) that are non-persistent buffers of the "
                    "model: %s", len(ignored), ", ".join(ignored[:5]))
    sites, _ = _module_sites(model)
    new_of: Dict[str, "torch.nn.Module"] = {}
    wrapped = {v[0]: (b, v[1], v[2]) for b, v in wrap_plans.items()}
    for name, mod, qf, source in plans:
        new = QuantizedTorchLinear(qf, source=source)
        new_of[name] = new
        if name in wrapped:  # smoothed in the checkpoint: the pre-scale wrapper goes where the layer was
            _b, inv, had = wrapped[name]
            new = SmoothedTorchLinear(new, inv, had)
        if name == "":
            model = new
        for parent, cname in sites.get(id(mod), []):
            parent._modules[cname] = new
    for _aname, mha, new in mha_new:
        for parent, cname in sites.get(id(mha), []):
            parent._modules[cname] = new
    for name, mod, qf in emb_plans:
        dtype = mod.out_dtype if isinstance(mod, QuantizedTorchEmbedding) else mod.weight.dtype
        t = tied.get(name)
        new = QuantizedTorchEmbedding(None if t is not None else qf.qweight, mod.padding_idx,
                                      tie=new_of[t] if t is not None else None, dtype=dtype)
        if name == "":
            model = new
        for parent, cname in sites.get(id(mod), []):
            parent._modules[cname] = new
    for k, blk in rs_new.items():
        make_residual_scaled(blk, np.ones(int(blk.LayerNorm.normalized_shape[-1]), np.float32))
    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        for k, v in ck.tensors.items():
            if k in live and k in own:
                live[k].copy_(torch.from_numpy(np.array(v, order="C")))  # (ascontiguousarray makes 0-d 1-d)
    for m in model.modules():  # a copied rotation block: the wrapper's cached value follows it
        if isinstance(m, SmoothedTorchLinear):
            m.block = m._check(int(m.hadamard[0]))
    if plans or mha_new or emb_plans:
        model.eval()
        _disable_fast_paths(model)
    return model
