"""Quantization-aware training (PyTorch) whose eval forward is the deployed kernel, bit for bit.

    import cquant.qat as qat
    model = qat.prepare(model, scheme="per_channel")     # nn.Linear -> QATLinear (same parameters)
    ... train model as usual (plain loss, or distillation from the float model) ...
    model.eval(); y = model(x)                           # == qat.convert(model)(x), every bit
    qmodel = qat.convert(model)                          # the cquant-quantized model (int8 kernels)

Importing this module imports torch (an optional dependency of cquant; ``import cquant`` never does).

Which layers
------------
:func:`prepare` swaps the layers the PyTorch adapter would quantize (``nn.Linear`` and subclasses
that keep ``Linear.forward``, GPT-2 style ``Conv1D``; the same selection code, so tied weights,
``include``/``exclude`` and the rest behave the same) for :class:`QATLinear` modules that hold the
*same* ``weight``/``bias`` Parameters (an optimizer built before ``prepare`` keeps working; the
``state_dict`` keys do not change). ``nn.MultiheadAttention`` is left in float32 (no QAT module for
it yet) and so is every layer a scheme rule maps to ``None``; :func:`convert` leaves those float too.

What a QATLinear computes
-------------------------
The scheme (:class:`cquant.scheme.QuantScheme`: ``bits``, ``granularity``, ``group_size``,
``activations``) says how. With ``qmax = 2**(bits - 1) - 1`` (127 for int8, 7 for int4):

- weights, per slice (the whole tensor, a row, or ``group_size`` consecutive input columns of a row):
  ``scale = max|w| / qmax`` in float32 (1 for an all-zero slice, or one whose scale underflows),
  ``q = clamp(round_half_even(w / scale), -qmax, qmax)`` with a float32 division: exactly cquant's
  rule (the codes are the ones ``cquant.ops.quantize`` gives, a test checks it);
- activations (``activations="dynamic"``): each row of x (last axis) by the same rule with 127;
  ``activations="none"`` (weight-only): float32 activations.

*Eval mode* (``model.eval()``): the layer quantizes its current weight with
:func:`cquant.ops.quantize_weight` (cached until the weight changes in place) and runs
:func:`cquant.ops.linear`, the deployed kernel: the output is bit-identical to the converted
model's on every ISA path (integer sums exact, the contract's epilogue ``acc * (sx * sw) + b``).

*Training mode*: a fast float32 path, ``F.linear(fq(x), fq(w), b)`` with the fake-quantized values
above (the same codes and scales; only the float32 summation order differs from the kernel's).
``prepare(..., train_forward="kernel")`` uses the deployed kernel in training too.

Gradients are straight-through (STE): ``d fq(w) / dw = 1`` (and likewise for x); the scale is
treated as a constant. When a gradient is needed in eval mode (or with ``train_forward="kernel"``)
the value is the kernel's and the gradient that of the fast path.

:func:`convert` puts the original float modules (with the trained Parameters) back and quantizes
them with :meth:`cquant.Quantizer.quantize_dynamic` and the per-layer schemes of ``prepare``: the
same result as quantizing the trained float weights with the PyTorch adapter.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import errors, ops
from .adapters import torch as _tad
from .frontends import _match
from .quantization import Quantizer
from .scheme import QuantScheme, normalize as _normalize_scheme, resolve as _resolve_scheme

__all__ = ["prepare", "convert", "to_float", "QATLinear", "qat_layers", "fake_quantize_weight",
           "fake_quantize_rows", "TRAIN_FORWARDS"]

logger = logging.getLogger("cquant")

#: ``train_forward`` values: ``"fast"`` (float32 fake quantization) or ``"kernel"`` (the deployed kernel)
TRAIN_FORWARDS = ("fast", "kernel")
_ACT_QMAX = 127  # activations are int8 whatever the weight bits


def _qmax(bits: int) -> int:
    return (1 << (int(bits) - 1)) - 1


# --------------------------------------------------------------------------------------------------
# Fake quantization (float32, cquant's rule)
# --------------------------------------------------------------------------------------------------

def _scale_of(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    s = amax / torch.tensor(float(qmax), dtype=torch.float32)  # float32 true division
    return torch.where(s > 0, s, torch.ones_like(s))


def _fq(w: torch.Tensor, s: torch.Tensor, qmax: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / s), -qmax, qmax)  # torch.round: half to even
    return q * s


def fake_quantize_weight(w: torch.Tensor, granularity: str = "per_channel",
                         group_size: Optional[int] = None, bits: int = 8,
                         return_codes: bool = False) -> Any:
    """float32 (N, K) ``q * scale`` with cquant's codes and scales for ``w`` (no gradient logic).

    ``return_codes``: ``(fake, codes (N, K) float32 integers, scale)`` (scale shaped as cquant's)."""
    w = w.detach().to(torch.float32)
    if w.dim() != 2:
        raise errors.ShapeError(f"weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    qmax = _qmax(bits)
    n, k = w.shape
    a = w.abs()
    if granularity == "per_tensor":
        s = _scale_of(a.max().reshape(1), qmax)
        full = s.reshape(1, 1).expand(n, k)
    elif granularity == "per_channel":
        s = _scale_of(a.amax(dim=1), qmax)
        full = s[:, None].expand(n, k)
    elif granularity == "per_group":
        g = int(group_size)  # type: ignore[arg-type]
        if g <= 0 or k % g:
            raise errors.ValueError(f"group_size {group_size} does not divide K={k}")
        s = _scale_of(a.reshape(n, k // g, g).amax(dim=2), qmax)
        full = s[:, :, None].expand(n, k // g, g).reshape(n, k)
    else:
        raise errors.ValueError(f"unknown granularity {granularity!r}")
    q = torch.clamp(torch.round(w / full), -qmax, qmax)
    fake = q * full
    return (fake, q, s) if return_codes else fake


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` of each row of x (last axis) by cquant's dynamic activation rule."""
    x = x.detach().to(torch.float32)
    s = _scale_of(x.abs().amax(dim=-1, keepdim=True), _ACT_QMAX)
    return _fq(x, s, _ACT_QMAX)


class _FakeQuantWeightSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, granularity, group_size, bits):  # type: ignore[override]
        return fake_quantize_weight(w, granularity, group_size, bits).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None, None, None


class _FakeQuantRowsSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return fake_quantize_rows(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


class _KernelValue(torch.autograd.Function):
    """Forward: the value ``compute()`` gives (the deployed kernel); backward: the gradient of
    ``y_fast`` (the fake-quantized float32 path), i.e. straight-through."""

    @staticmethod
    def forward(ctx, y_fast, compute):  # type: ignore[override]
        return compute()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


# --------------------------------------------------------------------------------------------------
# The QAT module
# --------------------------------------------------------------------------------------------------

def _quantize_weight(arr: np.ndarray, scheme: QuantScheme, name: str) -> ops.QuantizedWeight:
    return ops.quantize_weight(arr, granularity=scheme.granularity, group_size=scheme.group_size,
                               name=name, bits=scheme.bits)


class QATLinear(torch.nn.Module):
    """A Linear (or GPT-2 Conv1D) under quantization-aware training; see the module docstring.

    ``weight`` and ``bias`` are the Parameters of the layer it replaced (same objects, same layout:
    ``(out, in)`` for a Linear, ``(in, out)`` for a Conv1D). ``scheme`` is a :class:`QuantScheme`;
    ``train_forward`` ``"fast"`` or ``"kernel"``.
    """

    def __init__(self, source: torch.nn.Module, scheme: QuantScheme, layout: str = "out_in",
                 name: str = "", train_forward: str = "fast"):
        super().__init__()
        if layout not in ("out_in", "in_out"):
            raise errors.ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
        if train_forward not in TRAIN_FORWARDS:
            raise errors.ValueError(f"train_forward must be one of {TRAIN_FORWARDS}, got {train_forward!r}")
        w = source.weight
        self.weight = w
        b = getattr(source, "bias", None)
        if b is None:
            self.register_parameter("bias", None)
        elif isinstance(b, torch.nn.Parameter):
            self.bias = b
        else:
            self.register_buffer("bias", b)
        self.layout = layout
        self.out_features, self.in_features = (int(w.shape[0]), int(w.shape[1])) if layout == "out_in" \
            else (int(w.shape[1]), int(w.shape[0]))
        self.scheme = scheme
        self.name = name
        self.train_forward = train_forward
        self._source = (source,)  # the float module, put back by convert (a tuple: not a sub-module)
        self._cache: Optional[tuple] = None
        self.training = source.training

    @property
    def source(self) -> torch.nn.Module:
        """The float module this layer replaced (holding the same Parameters)."""
        return self._source[0]

    # ---- the weight as the kernels see it ----------------------------------------------------------
    def _float_weight(self) -> torch.Tensor:
        """(out, in) view of the weight."""
        return self.weight if self.layout == "out_in" else self.weight.t()

    def quantized_weight(self) -> Tuple[ops.QuantizedWeight, Optional[np.ndarray]]:
        """``(QuantizedWeight, float32 bias or None)`` of the current parameters (what
        :func:`convert` installs), cached until a parameter changes."""
        w, b = self.weight, self.bias
        key = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape), self.scheme, self.layout,
               None if b is None else (b._version, b.data_ptr(), b.dtype))
        c = self._cache
        if c is None or c[0] != key:
            disp = self.name or "<root>"
            arr = _tad.to_numpy(w, f"{disp}.weight")
            if self.layout == "in_out":
                arr = np.ascontiguousarray(arr.T)
            ops.check_finite(arr, f"{disp}.weight")
            qw = _quantize_weight(arr, self.scheme, f"{disp}.weight")
            bias = None if b is None else np.array(_tad.to_numpy(b, f"{disp}.bias"), dtype=np.float32, copy=True)
            c = self._cache = (key, qw, bias)
        return c[1], c[2]

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise errors.TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise errors.TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise errors.ShapeError(f"input has shape {tuple(x.shape)}; its last dimension must be "
                                    f"in_features={self.in_features}")
        if self.training and self.train_forward == "fast":
            return self._fast_forward(x)
        need_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in (self.weight, self.bias)))
        if not need_grad:
            return self._kernel_forward(x)
        return _KernelValue.apply(self._fast_forward(x), lambda: self._kernel_forward(x))

    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scheme
        w = self._float_weight().to(torch.float32)
        wq = _FakeQuantWeightSTE.apply(w, s.granularity, s.group_size, s.bits)
        xf = x.to(torch.float32)
        if s.activations == "dynamic":
            xf = _FakeQuantRowsSTE.apply(xf)
        b = None if self.bias is None else self.bias.to(torch.float32)
        y = torch.nn.functional.linear(xf, wq, b)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the converted layer (QuantizedTorchLinear) computes, on the same kernels."""
        qw, bias = self.quantized_weight()
        xf = x.detach()
        if xf.device.type != "cpu":
            xf = xf.cpu()
        if xf.dtype != torch.float32:
            xf = xf.to(torch.float32)
        if not xf.is_contiguous():
            xf = xf.contiguous()
        y = torch.from_numpy(ops.linear(xf.numpy(), qw, bias, mode=self.scheme.mode))
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y if x.device.type == "cpu" else y.to(x.device)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.scheme}, train_forward={self.train_forward}"
                + (", layout=in_out" if self.layout == "in_out" else ""))


def qat_layers(model: torch.nn.Module) -> List[Tuple[str, QATLinear]]:
    """``(name, module)`` of every :class:`QATLinear` of ``model`` (each once)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]


# --------------------------------------------------------------------------------------------------
# prepare / convert
# --------------------------------------------------------------------------------------------------

def _replace(model: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


def _disable_fast_paths(model: torch.nn.Module) -> List[str]:
    """``nn.TransformerEncoderLayer``'s fused eval fast path reads ``linear1.weight`` directly (it
    would bypass the QAT forward): switch it off where a QATLinear is inside (as the adapter does
    for quantized layers)."""
    changed = []
    for name, m in model.named_modules():
        inside = any(isinstance(s, QATLinear) for s in m.modules())
        if isinstance(m, torch.nn.TransformerEncoderLayer) and inside and m.activation_relu_or_gelu:
            m.activation_relu_or_gelu = 0
            changed.append(name or "<root>")
        elif isinstance(m, torch.nn.TransformerEncoder) and inside and getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False
            changed.append(name or "<root>")
    return changed


def prepare(model: torch.nn.Module, scheme: Any = None, *, include: Any = None, exclude: Any = None,
            inplace: bool = True, strict: bool = False, train_forward: str = "fast") -> torch.nn.Module:
    """Swap the Linear / Conv1D layers of ``model`` for :class:`QATLinear` modules.

    ``scheme``: a :class:`QuantScheme`, a scheme name (``"per_group(32)"``, ``"weight_only
    per_channel"``), or a mapping of layer names / globs / classes to schemes (``None`` keeps a
    layer float; ``"*"`` is the default), as for :class:`cquant.Quantizer`. Default: int8 dynamic
    per-channel. A per-group scheme whose group does not divide a layer's K falls back to
    per-channel for that layer (logged; ``strict=True`` raises), as the Quantizer does.
    ``include``/``exclude``: names or globs, as for the Quantizer. Returns the model (a deep copy
    when ``inplace=False``; a new module when ``model`` itself is a Linear); its train/eval mode is
    kept."""
    if not isinstance(model, torch.nn.Module):
        raise errors.TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if train_forward not in TRAIN_FORWARDS:
        raise errors.ValueError(f"train_forward must be one of {TRAIN_FORWARDS}, got {train_forward!r}")
    default, rules = _normalize_scheme(scheme)
    default = default or QuantScheme()
    if any(sc is not None and sc.activations == "static" for sc in [default] + [v for _k, v in rules]):
        raise errors.ValueError("qat.prepare: static activations (calibrated scales) are not available in QAT, "
                                "which fake-quantizes activations per row as dynamic mode does: use a dynamic or "
                                "weight_only scheme")
    _check_reprepare(model, default, rules, _tad._patterns(include), _tad._patterns(exclude))
    if not inplace:
        model = copy.deepcopy(model)
    already = {id(m) for _, m in qat_layers(model)}
    plans, skipped = _tad._select(model, _tad._patterns(include), _tad._patterns(exclude))
    kept_float: List[Tuple[str, str]] = [(r.name, r.reason) for r in skipped
                                         if id(_find(model, r.name)) not in already]
    done = 0
    # every layer's scheme first (strict=True raises here, before any layer is swapped)
    chosen: List[Tuple[Any, Optional[QuantScheme], str]] = []
    for p in plans:
        disp = p.name or "<root>"
        if p.kind != "linear":
            kept_float.append((disp, "nn.MultiheadAttention: no QAT module for it yet, kept float32"))
            continue
        part = p.parts[0]
        s, key = _resolve_scheme(p.name, p.mod, default, rules)
        if s is None:
            chosen.append((p, None, f"kept in float by scheme rule {key!r}"))
            continue
        k = int(part.weight.shape[1] if part.layout == "out_in" else part.weight.shape[0])
        s, note = s.for_k(k, strict, disp)
        chosen.append((p, s, note))
    # layers that share one weight with different schemes (or float for some): convert keeps them
    # all float (one weight is quantized once), so training must see them float too
    by_weight: Dict[Any, List[int]] = {}
    for i, (p, _s, _n) in enumerate(chosen):
        sk = p.parts[0].share_key
        if sk is not None:
            by_weight.setdefault(sk, []).append(i)
    for idx in by_weight.values():
        if len({chosen[i][1] for i in idx}) > 1:
            names = ", ".join(chosen[i][0].name or "<root>" for i in idx)
            for i in idx:
                chosen[i] = (chosen[i][0], None, f"its weight is shared by {names} with different schemes: kept "
                                                 "float32 (convert stores a shared weight once, with one scheme)")
    for p, s, note in chosen:
        disp = p.name or "<root>"
        if s is None:
            kept_float.append((disp, note))
            continue
        if note:
            logger.info("qat.prepare: %s: %s", disp, note)
        part = p.parts[0]
        new = QATLinear(p.mod, s, part.layout, p.name, train_forward)
        for parent, cname in p.sites:
            parent._modules[cname] = new
        if p.name == "":
            model = new
        done += 1
    fast = _disable_fast_paths(model)
    if fast:
        logger.info("qat.prepare: fused fast path switched off (it reads float weights) in: %s", ", ".join(fast))
    logger.info("qat.prepare: %d layer(s) prepared for quantization-aware training, %d kept float32",
                done, len(kept_float))
    for name, why in kept_float:
        if why:
            logger.info("  kept float %s: %s", name, why)
    if done == 0 and not already:
        logger.warning("qat.prepare: no Linear layer was prepared")
    return model


def _check_reprepare(model: torch.nn.Module, default: QuantScheme, rules: Any, inc: Tuple[str, ...],
                     exc: Tuple[str, ...]) -> None:
    """``prepare`` on a model that has QAT layers already: a layer this call selects must be asked
    for the scheme it has (it used to keep its old scheme silently); another scheme is refused."""
    clash = []
    for name, layer in qat_layers(model):
        if (inc and _match(name, inc) is None) or _match(name, exc) is not None:
            continue
        s, _key = _resolve_scheme(name, layer.source, default, rules)  # (class rules name the float class)
        if s is not None:
            s = s.for_k(layer.in_features)[0]
        if s != layer.scheme:
            clash.append(f"{name or '<root>'} ({layer.scheme} -> {'float' if s is None else s})")
    if clash:
        raise errors.ValueError(
            f"qat.prepare: the model is prepared already and this call asks another scheme for "
            f"{', '.join(clash[:5])}{', ...' if len(clash) > 5 else ''}: call cquant.qat.to_float(model, inplace=True) "
            "first (it keeps the trained weights), then prepare with the new scheme")


def _find(model: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    if name in ("", "<root>"):
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def to_float(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The model with every :class:`QATLinear` replaced by its float module, holding the trained
    Parameters (a deep copy unless ``inplace``)."""
    if not isinstance(model, torch.nn.Module):
        raise errors.TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for _name, m in qat_layers(model):
        src = m.source
        src.weight = m.weight
        if m.bias is None or isinstance(m.bias, torch.nn.Parameter):
            src.bias = m.bias
        src.train(m.training)
        if m is model:
            model = src
        else:
            _replace(model, m, src)
    return model


def convert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The cquant-quantized model of a prepared one: every :class:`QATLinear` becomes the
    :class:`cquant.adapters.torch.QuantizedTorchLinear` that quantizing its trained float weights
    with the PyTorch adapter gives (:meth:`cquant.Quantizer.quantize_dynamic`, the layer's scheme),
    in eval mode. Layers that ``prepare`` kept float stay float.

    ``inplace=False`` (default) leaves the prepared model as it is (training can go on); with
    ``inplace=True`` the given model is consumed (use the returned one)."""
    if not isinstance(model, torch.nn.Module):
        raise errors.TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layers = qat_layers(model)
    if not layers:
        raise errors.ValueError("the model has no QAT layers: call cquant.qat.prepare(model, scheme) first")
    schemes: Dict[str, QuantScheme] = {n: m.scheme for n, m in layers}
    work = to_float(model, inplace=inplace)
    return Quantizer.quantize_dynamic(work, scheme=dict(schemes),
                                      include=[_glob_escape(n) for n in schemes], inplace=True)
