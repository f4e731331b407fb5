"""A small numpy module framework, enough to write real inference models (e.g. a BERT encoder) in.

The names and behaviour follow ``torch.nn`` where that is cheap, so code reads familiarly:

- :class:`Module` tracks sub-modules and parameters assigned as attributes (``self.fc = Linear(...)``,
  ``self.weight = np.zeros(...)``). Every ``numpy.ndarray`` attribute is a parameter; every
  :class:`Module` attribute is a child. ``named_modules()``, ``named_children()``,
  ``named_parameters()``, ``state_dict()``, ``load_state_dict()``, ``apply()``, ``eval()``/``train()``
  work as in torch (``eval``/``train`` only flip ``training``: nothing here behaves differently).
- Layers: :class:`Linear`, :class:`Embedding`, :class:`LayerNorm`, :class:`GELU`, :class:`ReLU`,
  :class:`Tanh`, :class:`Softmax`, :class:`Dropout` (identity: this is an inference library),
  :class:`Identity`; containers :class:`Sequential`, :class:`ModuleList`, :class:`ModuleDict`.
- Functional helpers: :func:`linear`, :func:`erf`, :func:`gelu`, :func:`relu`, :func:`softmax`,
  :func:`layer_norm`.

Every forward computes in float32 and returns float32. Layers never call C; the quantized layer
(:class:`cquant.quantization.QuantizedLinear`) is the one that goes through :mod:`cquant.ops`.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import errors, ops

__all__ = [
    "Module", "Linear", "Embedding", "LayerNorm", "GELU", "ReLU", "Tanh", "Softmax", "Dropout",
    "Identity", "Sequential", "ModuleList", "ModuleDict", "StateDictError", "LoadResult",
    "linear", "erf", "gelu", "relu", "softmax", "layer_norm",
]

RngLike = Union[None, int, np.random.Generator]


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise errors.TypeError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def _as_float_input(x: Any, name: str = "x") -> np.ndarray:
    """Activations as a float32 array; integer/bool/complex input is refused (as ops.linear does)."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise errors.TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------
# Functional helpers
# --------------------------------------------------------------------------------------------------

# erf(x) ~= x * P(x^2) / Q(x^2) on [-4, 4] (clamped outside, where float32 erf is +-1): the rational
# approximation Eigen and XLA use for float32 (degree-13 odd numerator, degree-8 even denominator).
# Evaluated in float32 with Horner's rule: max absolute error ~4.5e-7 over the real line, relative
# error ~3e-7 near 0 (tests check < 1e-6 against math.erf on a dense grid). No exp, one division per
# element, fully vectorized; math.erf through np.vectorize/np.frompyfunc is ~100x slower.
_ERF_ALPHA = tuple(np.float32(a) for a in (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02))
_ERF_BETA = tuple(np.float32(b) for b in (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
    -1.42647390514189e-02))


def erf(x: Any) -> np.ndarray:
    """Vectorized error function in float32. ``x``: any shape, any real dtype -> float32, same shape.

    Max absolute error < 1e-6 (in practice ~4.5e-7). NaN propagates; +-Inf gives +-1.
    """
    x = np.clip(np.asarray(x, dtype=np.float32), np.float32(-4.0), np.float32(4.0))
    x2 = x * x
    p = np.full_like(x2, _ERF_ALPHA[0])
    for a in _ERF_ALPHA[1:]:
        p *= x2
        p += a
    q = np.full_like(x2, _ERF_BETA[0])
    for b in _ERF_BETA[1:]:
        q *= x2
        q += b
    p *= x
    p /= q
    return np.clip(p, np.float32(-1.0), np.float32(1.0), out=p)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: Any, approximate: str = "none") -> np.ndarray:
    """GELU. ``approximate="none"``: ``0.5 x (1 + erf(x / sqrt 2))`` (BERT's exact form);
    ``approximate="tanh"``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GPT-2's)."""
    x = _as_float_input(x)
    if approximate == "none":
        if x.ndim == 0:  # a scalar, as torch and the tanh form take it
            return ops.gelu(x.reshape(1)).reshape(())
        return ops.gelu(x)  # C kernel (SIMD, threaded): ~20x faster than the numpy erf formula
    if approximate == "tanh":
        inner = np.float32(_SQRT_2_OVER_PI) * (x + np.float32(0.044715) * x * x * x)
        return (0.5 * x * (1.0 + np.tanh(inner))).astype(np.float32, copy=False)
    raise errors.ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


#: load_state_dict in progress on this thread: read-only parameters replaced (id -> (old, new))
_LOADING = threading.local()


def _state_value(v: Any, key: str, dtype: np.dtype) -> np.ndarray:
    """A state_dict value as a numpy array, refused (StateDictError naming the key) unless it can be
    cast into a parameter of ``dtype``: numbers only (bool / int / float; complex only into complex),
    checked while planning, so that a bad entry is found before anything is loaded. torch tensors are
    read detached (bfloat16 widened to float32)."""
    if hasattr(v, "detach") and hasattr(v, "numpy") and not isinstance(v, np.ndarray):
        t = v.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        v = t.numpy()
    try:
        a = np.asarray(v)
    except (TypeError, ValueError) as e:
        raise StateDictError(f"{key}: not an array ({e})", [], [], []) from None
    ok = a.dtype.kind in "biuf" or (a.dtype.kind == "c" and np.dtype(dtype).kind == "c")
    if not ok:
        raise StateDictError(f"load_state_dict: {key} has dtype {a.dtype}, which cannot be loaded into a "
                             f"{np.dtype(dtype)} parameter; nothing loaded", [], [], [])
    return a


def relu(x: Any) -> np.ndarray:
    """max(x, 0) in float32."""
    return np.maximum(_as_float_input(x), np.float32(0))


def softmax(x: Any, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis`` (max subtracted first), float32. The last axis
    runs in C (:func:`cquant.ops.softmax_rows` on a copy); a row with a NaN, or all -Inf, is NaN."""
    x = _as_float_input(x)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -max(x.ndim, 1) <= axis < max(x.ndim, 1):
        raise errors.ValueError(f"softmax: axis {axis!r} is not an axis of an array of {x.ndim} dimension(s)")
    if x.size == 0:  # nothing to normalize (torch gives the empty array too)
        return np.array(x, dtype=np.float32)
    if x.ndim and axis in (-1, x.ndim - 1):
        return ops.softmax_rows(np.array(x, dtype=np.float32, order="C"))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(np.float32, copy=False)


def layer_norm(x: Any, normalized_shape: Tuple[int, ...], weight: Optional[np.ndarray] = None,
               bias: Optional[np.ndarray] = None, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the trailing ``len(normalized_shape)`` axes (biased variance, as torch)."""
    x = _as_float_input(x)
    nd = len(normalized_shape)
    if tuple(x.shape[x.ndim - nd:]) != tuple(normalized_shape):
        raise errors.ShapeError(f"layer_norm: trailing shape of x {x.shape} is not {tuple(normalized_shape)}")
    if nd == 1 and x.size:  # the common case: one C pass per row instead of five numpy passes
        return ops.layer_norm(x, weight, bias, eps)
    if nd > 1 and x.size:  # several trailing axes: the same C pass over them flattened (same checks, numerics)
        flat = int(np.prod(normalized_shape))
        y = ops.layer_norm(x.reshape(-1, flat), None if weight is None else np.asarray(weight).reshape(flat),
                           None if bias is None else np.asarray(bias).reshape(flat), eps)
        return y.reshape(x.shape)
    axes = tuple(range(x.ndim - nd, x.ndim))
    mu = x.mean(axis=axes, keepdims=True, dtype=np.float32)
    xc = x - mu
    var = np.mean(xc * xc, axis=axes, keepdims=True, dtype=np.float32)
    y = xc / np.sqrt(var + np.float32(eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(np.float32, copy=False)


def linear(x: Any, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """``x @ weight.T + bias``. ``x``: (..., K) float; ``weight``: (N, K); ``bias``: (N,) -> (..., N) float32."""
    x = _as_float_input(x)
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise errors.ShapeError(f"linear: last dim of x {x.shape} must be in_features={weight.shape[1]}")
    y = np.matmul(x, weight.T.astype(np.float32, copy=False))
    if bias is not None:
        y += bias.astype(np.float32, copy=False)
    return y.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------

class StateDictError(errors.ValueError):
    """``load_state_dict`` found missing or unexpected keys (strict mode) or mismatched shapes.

    The lists are kept as attributes: ``missing``, ``unexpected``, ``mismatched`` (``(key, expected
    shape, given shape)`` triples). Nothing is loaded when this is raised.
    """

    def __init__(self, message: str, missing: List[str], unexpected: List[str],
                 mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` could not match."""
    missing_keys: List[str]
    unexpected_keys: List[str]


class Module:
    """Base class of every layer. Subclasses set attributes in ``__init__`` and define ``forward``.

    ``numpy.ndarray`` attributes are parameters, :class:`Module` attributes are children; both are kept
    (in assignment order) in ``_parameters`` / ``_modules`` and read back through ``__getattr__``.
    Assigning ``None`` to a registered name keeps the slot (a layer without bias has ``bias = None``).
    """

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        # False, where torch starts in training mode: this is an inference library (no layer behaves
        # differently; a model starts as a loaded one would be used), and `train()` flips it
        object.__setattr__(self, "training", False)

    # -- attribute registration ------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() has run")
        params, mods = d["_parameters"], d["_modules"]
        if isinstance(value, (Module, np.ndarray)) and name not in params and name not in mods:
            self._check_name(name, "module" if isinstance(value, Module) else "parameter")
        if isinstance(value, Module):
            if name in params:
                raise errors.TypeError(f"cannot assign {type(value).__name__} as parameter {name!r} of "
                                       f"{type(self).__name__} (a numpy array or None); delattr it first")
            self._check_no_cycle(name, value)
            d.pop(name, None)
            mods[name] = value
        elif isinstance(value, np.ndarray):
            mods.pop(name, None)
            d.pop(name, None)
            params[name] = value
        elif value is None and (name in params or name in mods):
            (params if name in params else mods)[name] = None
        elif name in params or name in mods:
            # as torch: a registered slot keeps its kind (silently dropping a parameter from
            # state_dict because 0.5 was assigned to it lost it on save and load)
            what = "parameter" if name in params else "child module"
            raise errors.TypeError(f"cannot assign {type(value).__name__} as {what} {name!r} of "
                                   f"{type(self).__name__} (a {'numpy array' if name in params else 'cquant.nn.Module'} "
                                   "or None); delattr it first to make it a plain attribute")
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails. Guard the registries themselves so that unpickling /
        # copying (which probe attributes before __dict__ is filled) cannot recurse.
        if name in ("_parameters", "_modules"):
            raise AttributeError(name)
        d = self.__dict__
        if "_parameters" in d and name in d["_parameters"]:
            return d["_parameters"][name]
        if "_modules" in d and name in d["_modules"]:
            return d["_modules"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    def __dir__(self) -> List[str]:
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._modules))

    def _check_name(self, name: Any, what: str) -> None:
        """A parameter or child name: a non-empty str without '.', not one of the class's own
        attributes (a method, ``training``) nor the registries (state_dict keys must reach it)."""
        if not isinstance(name, str):
            raise errors.TypeError(f"{what} name must be a str, got {type(name).__name__} {name!r}")
        if "." in name or name == "":
            raise errors.ValueError(f"{what} name must be non-empty and contain no '.', got {name!r}")
        if name in ("_parameters", "_modules", "training") or hasattr(type(self), name):
            raise errors.ValueError(f"{what} name {name!r} is already an attribute of {type(self).__name__}")

    def register_parameter(self, name: str, value: Optional[np.ndarray]) -> None:
        """Register ``value`` (an ndarray or None) as parameter ``name``."""
        if value is not None and not isinstance(value, np.ndarray):
            raise errors.TypeError(f"parameter {name!r} must be a numpy array or None")
        self._check_name(name, "parameter")
        self._modules.pop(name, None)
        self.__dict__.pop(name, None)
        self._parameters[name] = value

    def add_module(self, name: str, module: Optional["Module"]) -> None:
        """Register ``module`` as child ``name`` (names need not be identifiers, e.g. ``"0"``)."""
        if module is not None and not isinstance(module, Module):
            raise errors.TypeError(f"{name!r}: {type(module).__name__} is not a cquant.nn.Module")
        self._check_name(name, "module")
        if module is not None:
            self._check_no_cycle(name, module)
        self._parameters.pop(name, None)
        self.__dict__.pop(name, None)
        self._modules[name] = module

    def _check_no_cycle(self, name: str, module: "Module") -> None:
        """A module cannot become its own descendant: state_dict, repr and the Quantizer's walk would
        recurse without end (torch lets it happen and fails later with RecursionError)."""
        if module is self or any(m is self for m in module.modules()):
            raise errors.ValueError(f"cannot register {type(module).__name__} as {name!r} of {type(self).__name__}: "
                                    "it is that module or contains it (a module cannot contain itself)")

    # -- traversal --------------------------------------------------------------------------------
    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        """Direct sub-modules, in registration order (each module once)."""
        seen = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self) -> Iterator["Module"]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "", remove_duplicate: bool = True,
                      _memo: Optional[set] = None) -> Iterator[Tuple[str, "Module"]]:
        """This module and all descendants with dotted names (``""`` for self), pre-order.

        A module reachable by two paths is yielded once (first path) unless ``remove_duplicate=False``.
        """
        memo = set() if _memo is None else _memo
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is None:
                continue
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name, remove_duplicate, memo)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, np.ndarray]]:
        """Parameters with dotted names. A shared (tied) array is yielded once unless
        ``remove_duplicate=False``."""
        seen = set()
        mods = self.named_modules(prefix, remove_duplicate=remove_duplicate) if recurse else [(prefix, self)]
        for mname, m in mods:
            for pname, p in m._parameters.items():
                if p is None:
                    continue
                if remove_duplicate:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self, recurse: bool = True) -> Iterator[np.ndarray]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def num_parameters(self) -> int:
        """Number of scalar parameters (tied arrays counted once)."""
        return int(sum(p.size for p in self.parameters()))

    # -- state dict -------------------------------------------------------------------------------
    def _save_to_state_dict(self, dest: Dict[str, np.ndarray], prefix: str, specs: bool = False) -> None:
        """This module's own entries of :meth:`state_dict`; ``specs``: arrays derived on the fly (a
        quantized layer's canonical codes) may be empty arrays of their dtype (see _state_dtypes)."""
        for name, p in self._parameters.items():
            if p is not None:
                dest[prefix + name] = p

    def _state_items(self, specs: bool = False) -> "OrderedDict[str, Any]":
        """Every module's :meth:`_save_to_state_dict` entries, in model order (``specs``: derived
        arrays as empty placeholders of their dtype)."""
        out: "OrderedDict[str, Any]" = OrderedDict()
        for mname, m in self.named_modules(remove_duplicate=False):
            prefix = f"{mname}." if mname else ""
            if not specs:
                m._save_to_state_dict(out, prefix)
                continue
            try:
                m._save_to_state_dict(out, prefix, specs=True)
            except TypeError:  # a subclass's own override without ``specs``
                m._save_to_state_dict(out, prefix)
        return out

    def _state_dtypes(self) -> "OrderedDict[str, np.dtype]":
        """The keys of :meth:`state_dict` with their dtypes, without materializing what it derives
        (cquant.load_into's checks: state_dict() unpacked every int8 weight to (N, K) codes twice)."""
        return OrderedDict((k, np.asarray(v).dtype) for k, v in self._state_items(specs=True).items())

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Dotted name -> array, for every parameter of every module (references, not copies).

        Tied arrays appear under each name that uses them (as in torch), so a state dict can be loaded
        into an untied copy of the architecture.
        """
        return self._state_items()

    def _load_plan(self, state: Mapping[str, Any], prefix: str, plan: List[Callable[[], None]],
                   used: set, missing: List[str], mismatched: list) -> None:
        """Check this module's own entries of ``state`` and append the assignments to ``plan``.

        Nothing is modified here; subclasses with non-array state (e.g. quantized weights) override it.
        """
        for name, p in self._parameters.items():
            if p is None:
                continue
            key = prefix + name
            if key not in state:
                missing.append(key)
                continue
            used.add(key)
            v = _state_value(state[key], key, p.dtype)
            if v.shape != p.shape:
                mismatched.append((key, p.shape, v.shape))
                continue
            plan.append(lambda p=p, v=v, m=self, n=name: m._assign_param(n, p, v))

    def _assign_param(self, name: str, old: np.ndarray, value: np.ndarray) -> None:
        # Copy into the existing array when possible, so parameters tied between layers stay tied.
        if old.flags.writeable:
            np.copyto(old, value, casting="unsafe")
            return
        # a read-only array (np.frombuffer, a memory map): one new array per old one, shared by every
        # parameter that held it (load_state_dict re-points the ones the state_dict did not name)
        swaps = getattr(_LOADING, "swaps", None)
        hit = swaps.get(id(old)) if swaps is not None else None
        if hit is not None and hit[0] is old:
            np.copyto(hit[1], value, casting="unsafe")
            self._parameters[name] = hit[1]
            return
        new = np.array(value, dtype=old.dtype)
        if swaps is not None:
            swaps[id(old)] = (old, new)
        self._parameters[name] = new

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Copy arrays from ``state_dict`` into this model's parameters (dtype kept, values cast).

        Raises :class:`StateDictError` (a ``ValueError``) listing every problem — missing and
        unexpected keys when ``strict`` and shape mismatches always — before anything is changed.
        Returns the missing/unexpected keys (both empty in strict mode).
        """
        plan: List[Callable[[], None]] = []
        used: set = set()
        missing: List[str] = []
        mismatched: list = []
        for mname, m in self.named_modules(remove_duplicate=False):
            m._load_plan(state_dict, f"{mname}." if mname else "", plan, used, missing, mismatched)
        missing = list(dict.fromkeys(missing))
        unexpected = [k for k in state_dict if k not in used]
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("shape mismatch: " + ", ".join(
                f"{k} (model {tuple(a)}, state_dict {tuple(b)})" for k, a, b in mismatched))
        if problems:
            raise StateDictError(f"load_state_dict into {type(self).__name__} failed; nothing loaded. "
                                 + "; ".join(problems), missing, unexpected, mismatched)
        _LOADING.swaps = {}
        try:
            for step in plan:
                step()
            swaps = _LOADING.swaps
        finally:
            _LOADING.swaps = None
        if swaps:  # a read-only array replaced: every other parameter that held it follows (ties)
            for m in self.modules():
                for n, p in list(m._parameters.items()):
                    hit = swaps.get(id(p)) if p is not None else None
                    if hit is not None and hit[0] is p:
                        m._parameters[n] = hit[1]
        return LoadResult(missing, unexpected)

    # -- misc -------------------------------------------------------------------------------------
    def apply(self, fn: Callable[["Module"], None]) -> "Module":
        """Call ``fn`` on every sub-module (children first) and then on self; returns self."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def train(self, mode: bool = True) -> "Module":
        """Set ``training`` recursively. Kept for familiarity: no layer here changes behaviour."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = []
        for name, m in self._modules.items():
            child = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n" + "\n".join(lines) + "\n)"


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------

def _integer(v: Any, what: str) -> int:
    """An integer argument (a Python or numpy int; not a bool, a float or a string)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise errors.TypeError(f"{what} must be an integer, got {type(v).__name__} {v!r}")
    return int(v)


def _size(v: Any, what: str) -> int:
    n = _integer(v, what)
    if n < 1:
        raise errors.ValueError(f"{what} must be >= 1, got {n}")
    return n


class Linear(Module):
    """``y = x @ weight.T + bias``. ``weight``: (out_features, in_features) float32; ``bias``: (out,).

    Initialised as torch does: weight and bias uniform in ``[-1/sqrt(in), 1/sqrt(in)]``, from ``rng``
    (a seed, a ``numpy.random.Generator`` or None for fresh entropy).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng: RngLike = None):
        super().__init__()
        self.in_features = _size(in_features, "Linear in_features")
        self.out_features = _size(out_features, "Linear out_features")
        g = _rng(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = g.uniform(-bound, bound, (self.out_features, self.in_features)).astype(np.float32)
        self.bias = g.uniform(-bound, bound, (self.out_features,)).astype(np.float32) if bias else None

    def forward(self, x: Any) -> np.ndarray:
        """x: (..., in_features) float -> (..., out_features) float32."""
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Lookup table ``weight[ids]``; ``weight``: (num_embeddings, embedding_dim) float32, N(0, 1) init."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 rng: RngLike = None):
        super().__init__()
        self.num_embeddings = _size(num_embeddings, "Embedding num_embeddings")
        self.embedding_dim = _size(embedding_dim, "Embedding embedding_dim")
        if padding_idx is not None:  # as torch: an int in [-num_embeddings, num_embeddings), negatives from the end
            p = _integer(padding_idx, "Embedding padding_idx")
            if not -self.num_embeddings <= p < self.num_embeddings:
                raise errors.ValueError(f"Embedding padding_idx must be in [-{self.num_embeddings}, "
                                        f"{self.num_embeddings}), got {p}")
            padding_idx = p % self.num_embeddings
        self.padding_idx = padding_idx
        w = _rng(rng).standard_normal((self.num_embeddings, self.embedding_dim)).astype(np.float32)
        if padding_idx is not None:
            w[padding_idx] = 0.0
        self.weight = w

    def forward(self, ids: Any) -> np.ndarray:
        """ids: integer array, any shape -> (*ids.shape, embedding_dim) float32."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise errors.TypeError(f"Embedding ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise errors.ValueError(f"Embedding ids must be in [0, {self.num_embeddings}), "
                                    f"got range [{ids.min()}, {ids.max()}]")
        return self.weight[ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """LayerNorm over the trailing ``normalized_shape`` axes, with float32 ``weight`` (ones) and
    ``bias`` (zeros) when ``elementwise_affine``."""

    def __init__(self, normalized_shape: Union[int, Tuple[int, ...]], eps: float = 1e-5,
                 elementwise_affine: bool = True):
        super().__init__()
        shape = (int(normalized_shape),) if isinstance(normalized_shape, (int, np.integer)) else tuple(
            int(s) for s in normalized_shape)
        if not shape or any(d < 1 for d in shape):
            raise errors.ValueError(f"LayerNorm: normalized_shape must be one or more sizes >= 1, got {normalized_shape!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or not 0 <= eps < np.inf:
            raise errors.ValueError(f"LayerNorm: eps must be a finite number >= 0, got {eps!r}")
        self.normalized_shape = shape
        self.eps = float(eps)
        self.weight = np.ones(shape, np.float32) if elementwise_affine else None
        self.bias = np.zeros(shape, np.float32) if elementwise_affine else None

    def forward(self, x: Any) -> np.ndarray:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class GELU(Module):
    """GELU; ``approximate="none"`` (exact, erf) or ``"tanh"``."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise errors.ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Any) -> np.ndarray:
        return gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class ReLU(Module):
    def forward(self, x: Any) -> np.ndarray:
        return relu(x)


class Tanh(Module):
    def forward(self, x: Any) -> np.ndarray:
        return np.tanh(_as_float_input(x))


class Softmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = int(dim)

    def forward(self, x: Any) -> np.ndarray:
        return softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Dropout(Module):
    """Identity (inference only); ``p`` is kept so converted models keep their description."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise errors.ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: Any) -> Any:
        return x

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Identity(Module):
    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------

class Sequential(Module):
    """Calls its children in order. ``Sequential(a, b, c)`` (named "0", "1", ...) or
    ``Sequential(OrderedDict(name=module, ...))``."""

    def __init__(self, *modules: Any):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Mapping):
            for name, m in modules[0].items():
                self.add_module(str(name), m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def __getitem__(self, idx: Union[int, slice]) -> Any:
        items = list(self._modules.items())
        if isinstance(idx, slice):
            return Sequential(OrderedDict(items[idx]))
        return items[_index(idx, len(items))][1]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def append(self, module: Module) -> "Sequential":
        self.add_module(str(len(self._modules)), module)
        return self

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x


def _index(idx: int, n: int) -> int:
    idx = int(idx)
    if not -n <= idx < n:
        raise IndexError(f"index {idx} out of range for length {n}")
    return idx % n


class ModuleList(Module):
    """A list of modules, registered as children "0", "1", ... (no forward of its own)."""

    def __init__(self, modules: Optional[Iterable[Module]] = None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _renumber(self, mods: List[Module]) -> None:
        for i, m in enumerate(mods):  # every check first: a refused module leaves the list as it was
            if not isinstance(m, Module):
                raise errors.TypeError(f"{i!r}: {type(m).__name__} is not a cquant.nn.Module")
            self._check_no_cycle(str(i), m)
        self._modules.clear()
        for i, m in enumerate(mods):
            self.add_module(str(i), m)

    def __getitem__(self, idx: Union[int, slice]) -> Any:
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            return ModuleList(mods[idx])
        return mods[_index(idx, len(mods))]

    def __setitem__(self, idx: int, module: Module) -> None:
        self.add_module(str(_index(idx, len(self))), module)

    def __delitem__(self, idx: Union[int, slice]) -> None:
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            del mods[idx]
        else:
            del mods[_index(idx, len(mods))]
        self._renumber(mods)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def append(self, module: Module) -> "ModuleList":
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> "ModuleList":
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, module: Module) -> None:
        mods = list(self._modules.values())
        mods.insert(index, module)
        self._renumber(mods)


class ModuleDict(Module):
    """A dict of modules, registered as children under their keys (no forward of its own)."""

    def __init__(self, modules: Optional[Mapping[str, Module]] = None):
        super().__init__()
        if modules is not None:
            for k, m in modules.items():
                self[k] = m

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        self.add_module(key, module)  # a str key (as torch): md[1] stored "1", then md[1] missed it

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._modules))

    def keys(self) -> Iterable[str]:
        return self._modules.keys()

    def values(self) -> Iterable[Module]:
        return self._modules.values()

    def items(self) -> Iterable[Tuple[str, Module]]:
        return self._modules.items()
