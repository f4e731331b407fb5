"""PyTorch adapter: quantize the Linear layers of a ``torch.nn.Module`` onto cquant's int8 kernels.

Importing this module imports torch; :mod:`cquant` itself never does (see :mod:`cquant.adapters`).
Normally reached through ``cquant.Quantizer.quantize_dynamic(torch_model, ...)``; the function here,
:func:`quantize_module`, is the same thing with the arguments spelled out.

Which modules are quantized
---------------------------
- ``torch.nn.Linear`` and subclasses that keep ``Linear.forward`` (``y = x @ W.T + b``, W is (out, in));
- GPT-2 style ``Conv1D`` (transformers): a module named ``Conv1D`` with a 2-D ``weight`` of shape
  ``(in, out)`` and ``nf == out`` (``y = x @ W + b``); its weight is transposed once at quantization.

Every other module holding a 2-D weight is *recorded as skipped with its reason* (embeddings, a Linear
subclass with its own ``forward``, the ``out_proj`` of ``nn.MultiheadAttention`` whose weight the
attention reads directly, a weight on the meta device, ...), and skipped layers that look like
linear layers are logged at WARNING, so nothing a user would expect quantized is skipped silently.
``include``/``exclude`` are module names or :func:`fnmatch.fnmatchcase` globs on the dotted name
(``"encoder.layer.*.attention.*"``); ``exclude`` wins.

What the quantized module does
------------------------------
Each selected module is replaced, at every place it is registered, by a :class:`QuantizedTorchLinear`
holding only numpy arrays (int8 codes packed for the kernels, float32 scales, float32 bias): the
float32 ``Parameter`` is no longer referenced by the model and is freed once the caller drops its own
references. Its forward:

- takes a CPU tensor of any shape ``(..., in_features)``; float32 C-contiguous input is read in place
  through a zero-copy numpy view; other float dtypes are converted to float32 (the output is converted
  back to the input dtype), non-contiguous input is made contiguous; integer input and non-CPU devices
  are refused with a clear error;
- returns ``torch.from_numpy`` of the kernel's output (zero-copy), ``(..., out_features)``;
- works under ``torch.no_grad()`` and ``torch.inference_mode()``; an input that requires grad while
  grad mode is on raises :class:`AutogradError` (the int8 kernels have no backward).
"""
from __future__ import annotations

import builtins
import copy
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import errors, ops
from ..quantization import LayerRecord, QuantizedLinearForward, ReportRow

__all__ = ["AutogradError", "QuantizedTorchLinear", "quantize_module", "report", "to_numpy",
           "is_conv1d"]

logger = logging.getLogger("cquant")


class AutogradError(builtins.RuntimeError, errors.QuantizationError):
    """A quantized layer was asked to take part in autograd (it is inference only)."""


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
    deep-copies). ``forward(x)``: ``x (..., in_features)`` CPU tensor -> ``(..., out_features)``.
    """

    def __init__(self, qforward: QuantizedLinearForward, source: str = "Linear"):
        super().__init__()
        self.qforward = qforward
        self.in_features = qforward.in_features
        self.out_features = qforward.out_features
        self.source = source

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
    def bias_array(self) -> Optional[np.ndarray]:
        return self.qforward.bias

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        if not isinstance(x, torch.Tensor):
            raise errors.TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.requires_grad and torch.is_grad_enabled():
            raise AutogradError(
                "cquant quantized layers are inference only and have no backward: the input requires "
                "grad while grad mode is on. Run the model under torch.inference_mode() or "
                "torch.no_grad(), or pass x.detach().")
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
        y = torch.from_numpy(self.qforward(xf.detach().numpy()))
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.qforward.bias is not None}, {self.scheme}, from={self.source}")


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    name: str
    mod: "torch.nn.Module"
    layout: str                     # "out_in" (Linear) or "in_out" (Conv1D)
    sites: List[Tuple["torch.nn.Module", str]] = field(default_factory=list)
    qweight: Optional[ops.QuantizedWeight] = None
    bias: Optional[np.ndarray] = None
    shared_with: Optional[str] = None


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


def _classify(mod: "torch.nn.Module", parent: Optional["torch.nn.Module"]) -> Tuple[Optional[str], str]:
    """(layout, "") if ``mod`` is quantizable, else (None, reason); reason "" means: not a layer."""
    w = getattr(mod, "weight", None)
    if isinstance(mod, torch.nn.Linear):
        if isinstance(parent, torch.nn.MultiheadAttention):
            return None, ("Linear inside nn.MultiheadAttention: the attention reads its weight directly, "
                          "so it cannot be replaced")
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
    if isinstance(w, torch.nn.parameter.UninitializedParameter):
        return None, "weight not initialized yet (lazy module): run one forward first"
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0:
        return None, "weight is not a non-empty 2-D tensor"
    if w.device.type == "meta":
        return None, "weight is on the meta device (no data)"
    if not w.dtype.is_floating_point:
        return None, f"weight dtype {w.dtype} is not floating-point"
    b = getattr(mod, "bias", None)
    out = w.shape[0] if layout == "out_in" else w.shape[1]
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (out,)):
        return None, f"bias is not a tensor of out_features={out} values"
    return layout, ""


def _select(model: "torch.nn.Module", include: Sequence[str], exclude: Sequence[str]
            ) -> Tuple[List[_Plan], List[LayerRecord]]:
    parents: Dict[int, "torch.nn.Module"] = {}
    sites: Dict[int, List[Tuple["torch.nn.Module", str]]] = {}
    seen: set = set()
    for _, m in model.named_modules(remove_duplicate=False):  # every place a module is registered
        for cname, child in m._modules.items():
            if child is None or (id(m), cname) in seen:
                continue
            seen.add((id(m), cname))
            parents.setdefault(id(child), m)
            sites.setdefault(id(child), []).append((m, cname))
    plans: List[_Plan] = []
    skipped: List[LayerRecord] = []
    for name, mod in model.named_modules():
        disp = name or "<root>"
        if isinstance(mod, QuantizedTorchLinear):
            skipped.append(LayerRecord(disp, tuple(mod.qweight.shape), "skipped", "already quantized", 0, 0,
                                       mod.scheme))
            continue
        layout, why = _classify(mod, parents.get(id(mod)))
        w = getattr(mod, "weight", None)
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) and w.device.type != "meta" else None
        wb = int(w.numel() * w.element_size()) if isinstance(w, torch.Tensor) else 0
        if layout is not None:
            exc = _match(name, exclude)
            if exc is not None:
                layout, why = None, f"excluded by pattern {exc!r}"
            elif include and _match(name, include) is None:
                layout, why = None, "not matched by include"
        if layout is None:
            if why:
                skipped.append(LayerRecord(disp, shape, "skipped", why, wb, wb, ""))
            continue
        plans.append(_Plan(name, mod, layout, sites.get(id(mod), [])))
    return plans, skipped


def _prepare(plans: List[_Plan], granularity: str, group_size: Optional[int]) -> None:
    """Quantize every selected weight (nothing in the model changes; raises naming the layer)."""
    done: Dict[int, _Plan] = {}
    for p in plans:
        disp = p.name or "<root>"
        w = p.mod.weight
        b = getattr(p.mod, "bias", None)
        p.bias = None if b is None else np.array(to_numpy(b, f"{disp}.bias"), dtype=np.float32, copy=True)
        if p.bias is not None:
            ops.check_finite(p.bias, f"{disp}.bias")
        first = done.get(id(w))
        if first is not None and first.layout == p.layout:
            p.qweight, p.shared_with = first.qweight, first.name
            continue
        arr = to_numpy(w, f"{disp}.weight")
        if p.layout == "in_out":
            arr = np.ascontiguousarray(arr.T)
        try:
            ops.check_finite(arr, f"{disp}.weight")
            p.qweight = ops.quantize_weight(arr, granularity=granularity, group_size=group_size,
                                            name=f"{disp}.weight")
        except errors.QuantizationError as e:
            try:
                raise type(e)(f"layer {disp!r}: {e}") from e
            except builtins.TypeError:  # pragma: no cover - unusual constructor
                raise e
        del arr
        done[id(w)] = p


def quantize_module(model: "torch.nn.Module", mode: str = "dynamic", granularity: str = "per_channel",
                    group_size: Optional[int] = None, include: Any = None, exclude: Any = None,
                    inplace: bool = True, quantizer: Any = None) -> "torch.nn.Module":
    """Replace the Linear / Conv1D layers of ``model`` by :class:`QuantizedTorchLinear` modules.

    Returns the model (a deep copy when ``inplace=False``; a new module when ``model`` itself is a
    Linear). Every weight is checked and quantized before the model is touched: a NaN/Inf weight or a
    bad ``group_size`` raises naming the layer and leaves the model as it was. ``quantizer`` (a
    :class:`cquant.Quantizer`) receives the per-layer ``summary``.
    """
    if not isinstance(model, torch.nn.Module):
        raise errors.TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if mode not in ops.MODES:
        raise errors.ValueError(f"mode must be one of {sorted(ops.MODES)}, got {mode!r}")
    include, exclude = _patterns(include), _patterns(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    plans, skipped = _select(model, include, exclude)
    for pat in include:
        if not any(fnmatch.fnmatchcase(p.name, pat) for p in plans):
            logger.warning("include pattern %r matched no quantizable layer", pat)
    _prepare(plans, granularity, group_size)
    records: List[LayerRecord] = []
    for p in plans:
        assert p.qweight is not None
        source = "Conv1D" if p.layout == "in_out" else type(p.mod).__name__
        new = QuantizedTorchLinear(QuantizedLinearForward(p.qweight, p.bias, mode), source=source)
        new.train(p.mod.training)
        for parent, cname in p.sites:
            parent._modules[cname] = new
        if p.name == "":
            model = new
        w = p.mod.weight
        wb = int(w.numel() * w.element_size())
        bb = 0 if p.bias is None else int(p.bias.nbytes)
        if p.shared_with is None:
            before, after, note = wb + bb, p.qweight.nbytes + bb, ""
        else:
            before, after, note = bb, bb, f"weight shared with {p.shared_with!r} (quantized once)"
        records.append(LayerRecord(p.name or "<root>", tuple(p.qweight.shape), "quantized", note,
                                   before, after, new.scheme))
        p.mod = None  # type: ignore[assignment]  # drop our reference to the float layer
    if quantizer is not None:
        quantizer.summary = records + skipped
    before = sum(r.bytes_before for r in records)
    after = sum(r.bytes_after for r in records)
    logger.info("quantized %d torch layer(s) (%s %s): %.2f MiB -> %.2f MiB; %d skipped", len(records),
                mode, granularity, before / 2**20, after / 2**20, len(skipped))
    if not records:
        logger.warning("no Linear layer was quantized")
    for r in skipped:
        level = logging.WARNING if ("Linear" in r.reason or "Conv1D" in r.reason) and \
            not r.reason.startswith(("excluded", "not matched", "already")) else logging.INFO
        logger.log(level, "  skipped %s: %s", r.name, r.reason)
    return model


def report(model: "torch.nn.Module") -> List[ReportRow]:
    """One :class:`cquant.quantization.ReportRow` per quantized layer of a torch model."""
    rows: List[ReportRow] = []
    owner: Dict[int, str] = {}
    for name, m in model.named_modules():
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


def install_checkpoint(model: "torch.nn.Module", ck: Any, strict: bool = True) -> "torch.nn.Module":
    """Install a :class:`cquant.io.Checkpoint` into a torch model (``cquant.load_into``).

    Each checkpoint layer replaces the ``nn.Linear`` / ``Conv1D`` (or an earlier quantized layer) of
    the same name; the other tensors are copied into the model's parameters and buffers. Everything
    is checked before anything is changed; ``strict``: the keys must match exactly.
    """
    from ..io import CheckpointError
    subs = dict(model.named_modules())
    plans: List[Tuple[str, "torch.nn.Module", QuantizedLinearForward, str]] = []
    for name, qf in ck.layers.items():
        mod = subs.get(name)
        if mod is None:
            raise CheckpointError(f"the model has no sub-module {name!r} (checkpoint layer)")
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
    qnames = {p[0] for p in plans}

    def in_layer(key: str) -> bool:
        return any(key.startswith(_pfx(n)) and "." not in key[len(_pfx(n)):] for n in qnames)

    own = {k: v for k, v in model.state_dict().items() if not in_layer(k)}
    missing = sorted(k for k in own if k not in ck.tensors)
    unexpected = sorted(k for k in ck.tensors if k not in own)
    if strict and (missing or unexpected):
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(
            s for s in (f"missing: {', '.join(missing[:10])}" if missing else "",
                        f"unexpected: {', '.join(unexpected[:10])}" if unexpected else "") if s))
    for k, v in ck.tensors.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"tensor {k!r}: checkpoint shape {tuple(v.shape)}, model {tuple(own[k].shape)}")
    sites: Dict[int, List[Tuple["torch.nn.Module", str]]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for cname, child in m._modules.items():
            if child is not None and (m, cname) not in sites.setdefault(id(child), []):
                sites[id(child)].append((m, cname))
    for name, mod, qf, source in plans:
        new = QuantizedTorchLinear(qf, source=source)
        if name == "":
            model = new
        for parent, cname in sites.get(id(mod), []):
            parent._modules[cname] = new
    with torch.no_grad():
        live = model.state_dict(keep_vars=True)
        for k, v in ck.tensors.items():
            if k in live:
                live[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))
    return model


def _pfx(name: str) -> str:
    return f"{name}." if name else ""
