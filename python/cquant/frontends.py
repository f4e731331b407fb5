"""Front-ends: the model kinds cquant works on, and what the transforms need from each of them.

Three front-ends: ``"nn"`` (a :mod:`cquant.nn` module tree), ``"objects"`` (a duck-typed tree of plain
Python objects, lists, dicts) and ``"torch"`` (a ``torch.nn.Module``; torch is never imported here: a
torch model can only exist if the caller imported it, so ``sys.modules["torch"]`` is used).

What this module gives the Quantizer, calibration, smoothing and compare:

- :func:`linear_layers`: the Linear layers (float or quantized) with dotted names, in model order;
- :func:`norm_layers`: LayerNorm / RMSNorm layers (``nn`` and ``torch``), candidates for folding;
- :func:`run` / :func:`batch_list`: run a model on user batches (an array, a tuple of positional
  arguments, or a dict of keyword arguments, e.g. a tokenizer's output) and get its output as numpy;
- :func:`intercept`: while active, every call of the given layers goes through ``fn(ref, x, forward)``
  (``forward(x)`` runs the layer as it is). On ``nn``/``objects`` layers the instance's ``forward``
  is wrapped (and, for an object whose class defines ``__call__``, its class is swapped for a subclass
  that calls the wrapper); on ``torch`` layers a forward hook is registered. Everything is undone on exit.
- :func:`replace_module` / :func:`find_module`: replace a sub-module at every place it is registered.

The model walk and the Linear recognition rule used by :class:`cquant.Quantizer` live here too (see
:mod:`cquant.quantization` for the rule).
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import errors, nn, ops
from .adapters import is_torch_module, is_torch_tensor

__all__ = ["LayerRef", "frontend", "linear_layers", "norm_layers", "batch_list", "run", "call",
           "output_array", "as_numpy", "intercept", "find_module", "replace_module",
           "quantized_forward_of"]

Patterns = Union[None, str, Iterable[str]]

# --------------------------------------------------------------------------------------------------
# Walking models
# --------------------------------------------------------------------------------------------------

_LEAF_TYPES = (np.ndarray, np.generic, str, bytes, bytearray, int, float, complex, bool, type(None),
               type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
               property, staticmethod, classmethod, range, slice, memoryview, set, frozenset)
# Objects from these modules are never layers and can be large or cyclic (loggers, locks, ...).
_SKIP_MODULES = ("builtins", "logging", "threading", "_thread", "numpy", "io", "_io", "re", "random",
                 "functools", "collections", "typing", "types", "abc", "weakref", "enum", "pathlib")


def _descendable(obj: Any) -> bool:
    if isinstance(obj, (list, tuple, dict, nn.Module)):
        return True
    if isinstance(obj, _LEAF_TYPES) or isinstance(obj, ops.QuantizedWeight) or _is_qforward(obj):
        return False
    mod = (type(obj).__module__ or "").split(".")[0]
    if mod in _SKIP_MODULES:
        return False
    return hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__")


def _slot_names(cls: type) -> Iterator[str]:
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        for s in slots:
            if s not in ("__dict__", "__weakref__"):
                yield s


@dataclass
class _Site:
    """Where an object is held: ``kind`` is "module" (Module child), "attr", "item" or "tuple"."""
    container: Any
    key: Any
    kind: str


def _children(obj: Any) -> List[Tuple[str, Any, _Site]]:
    out: List[Tuple[str, Any, _Site]] = []
    if isinstance(obj, nn.Module):
        for name, m in obj._modules.items():
            if m is not None:
                out.append((name, m, _Site(obj, name, "module")))
        hidden = getattr(type(obj), "_cquant_unwalked", ())  # e.g. the Linear a tied QuantizedEmbedding reads
        for name, v in vars(obj).items():
            if name not in ("_parameters", "_modules", "training") and name not in hidden:
                out.append((name, v, _Site(obj, name, "attr")))
    elif isinstance(obj, list):
        out = [(str(i), v, _Site(obj, i, "item")) for i, v in enumerate(obj)]
    elif isinstance(obj, tuple):
        out = [(str(i), v, _Site(obj, i, "tuple")) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        out = [(str(k), v, _Site(obj, k, "item")) for k, v in list(obj.items())]
    else:
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            out = [(k, v, _Site(obj, k, "attr")) for k, v in list(d.items())]
        for s in _slot_names(type(obj)):
            if hasattr(obj, s):
                out.append((s, getattr(obj, s), _Site(obj, s, "attr")))
    return out


def _walk(root: Any, stop: Callable[[Any], bool], descend: Callable[[Any], bool] = _descendable
          ) -> Iterator[Tuple[str, Any, Optional[_Site], bool]]:
    """Pre-order walk: yields ``(path, obj, site, revisit)`` for every descendable object.

    An object met again (same id) is yielded with ``revisit=True`` and not descended into; objects for
    which ``stop(obj)`` is true are yielded but not descended into either.
    """
    seen: set = set()
    stack: List[Tuple[str, Any, Optional[_Site]]] = [("", root, None)]
    while stack:
        path, obj, site = stack.pop()
        if not descend(obj):
            continue
        revisit = id(obj) in seen
        yield path, obj, site, revisit
        if revisit:
            continue
        seen.add(id(obj))
        if stop(obj):
            continue
        kids = _children(obj)
        for name, child, csite in reversed(kids):
            stack.append((f"{path}.{name}" if path else name, child, csite))



# --------------------------------------------------------------------------------------------------
# The Linear recognition rule (see cquant.quantization)
# --------------------------------------------------------------------------------------------------

_NEVER_RE = re.compile(r"(Embedding|Convolution|Conv|Norm)(?![a-z])")


def _never_reason(obj: Any) -> Optional[str]:
    m = _NEVER_RE.search(type(obj).__name__)
    if not m:
        return None
    kind = {"Embedding": "embedding", "Norm": "normalization layer"}.get(m.group(1), "convolution")
    return f"{kind} ({type(obj).__name__}): never quantized"


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except Exception:  # noqa: BLE001 - a broken property is just "absent" for recognition
        return None


def _has_forward(obj: Any) -> bool:
    return callable(_get(obj, "forward")) or callable(obj)


def _looks_like_layer(obj: Any) -> bool:
    """Worth a line in the summary: named like a Linear, sized like one, or holding a weight array."""
    return (isinstance(obj, nn.Linear) or type(obj).__name__.endswith("Linear")
            or (hasattr(obj, "in_features") and hasattr(obj, "out_features"))
            or isinstance(_get(obj, "weight"), np.ndarray))


def _check_layer(obj: Any, relaxed: bool) -> Tuple[bool, str]:
    """Apply the recognition rule (``relaxed``: named in include). Returns (ok, reason if not ok)."""
    never = _never_reason(obj)
    if never:
        return False, never
    w = _get(obj, "weight")
    if not relaxed:
        by_rule = (isinstance(obj, nn.Linear) or type(obj).__name__.endswith("Linear")
                   or (hasattr(obj, "in_features") and hasattr(obj, "out_features")))
        if not by_rule:
            return False, "not a Linear by the recognition rule (name it in include= to force)"
    if not isinstance(w, np.ndarray):
        return False, f"weight is {type(w).__name__}, not a numpy array"
    if w.ndim != 2:
        return False, f"weight is {w.ndim}-D, not 2-D"
    if w.dtype.kind != "f":
        return False, f"weight dtype {w.dtype} is not floating-point"
    if w.size == 0:
        return False, "weight is empty"
    if not relaxed and hasattr(obj, "in_features") and hasattr(obj, "out_features"):
        expect = (_get(obj, "out_features"), _get(obj, "in_features"))
        if tuple(w.shape) != expect:
            return False, f"weight shape {tuple(w.shape)} != (out_features, in_features) = {expect}"
    if not _has_forward(obj):
        return False, "no forward() and not callable"
    b = _get(obj, "bias")
    if b is not None and not (isinstance(b, np.ndarray) and b.dtype.kind == "f" and b.shape == (w.shape[0],)):
        desc = f"shape {b.shape} dtype {b.dtype}" if isinstance(b, np.ndarray) else type(b).__name__
        return False, f"bias ({desc}) is not a float array of out_features={w.shape[0]} values"
    if not isinstance(obj, nn.Module) and not isinstance(getattr(obj, "__dict__", None), dict):
        return False, "object has no __dict__: cannot install a quantized forward on it"
    return True, ""


def _as_patterns(p: Patterns, what: str) -> Tuple[str, ...]:
    if p is None:
        return ()
    if isinstance(p, str):
        return (p,)
    try:
        pats = tuple(p)
    except TypeError:
        raise errors.TypeError(f"{what} must be a string or a list of strings, got {type(p).__name__}") from None
    for s in pats:
        if not isinstance(s, str):
            raise errors.TypeError(f"{what} patterns must be strings, got {type(s).__name__}: {s!r}")
    return pats


def _match(path: str, patterns: Sequence[str]) -> Optional[str]:
    for pat in patterns:
        if fnmatch.fnmatchcase(path, pat):
            return pat
    return None



def _display(name: str) -> str:
    return name or "<root>"


# --------------------------------------------------------------------------------------------------
# Layers of every front-end
# --------------------------------------------------------------------------------------------------

def _is_qforward(obj: Any) -> bool:
    return getattr(type(obj), "_cquant_qforward", False) is True


def quantized_forward_of(obj: Any) -> Any:
    """The quantized forward a layer carries (a QuantizedLinear module itself, the
    QuantizedLinearForward of a converted duck layer or of a torch QuantizedTorchLinear), or None."""
    if isinstance(obj, nn.Module) and _is_qforward(obj):
        return obj
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        for key in ("forward", "qforward"):
            if _is_qforward(d.get(key)):
                return d[key]
    return None


def frontend(model: Any) -> str:
    """``"torch"``, ``"nn"`` or ``"objects"``."""
    if is_torch_module(model):
        return "torch"
    return "nn" if isinstance(model, nn.Module) else "objects"


@dataclass
class LayerRef:
    """One Linear layer: its dotted ``name``, the object, its sizes, and whether it is quantized."""
    name: str
    obj: Any
    in_features: int
    out_features: int
    quantized: bool


def _torch() -> Any:
    return sys.modules["torch"]


def _torch_linear_sizes(mod: Any) -> Optional[Tuple[int, int]]:
    """(in, out) of a float torch Linear (keeping Linear.forward) or GPT-2 Conv1D, else None."""
    torch = _torch()
    w = getattr(mod, "weight", None)
    if isinstance(mod, torch.nn.Linear):
        if type(mod).forward is not torch.nn.Linear.forward or type(mod).__name__.startswith("NonDynamically"):
            return None
        return int(mod.in_features), int(mod.out_features)
    if type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(mod, "nf"):
        return int(w.shape[0]), int(w.shape[1])
    return None


def linear_layers(model: Any, include: Patterns = None, exclude: Patterns = None,
                  quantized: Optional[bool] = None) -> List[LayerRef]:
    """The Linear layers of ``model`` in model order (each object once). ``quantized``: None for
    both kinds, True / False for only quantized / only float ones. ``include``/``exclude``: names or
    fnmatch globs on the dotted name (``exclude`` wins)."""
    inc, exc = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    refs: List[LayerRef] = []
    if is_torch_module(model):
        for name, mod in model.named_modules():
            qf = quantized_forward_of(mod)
            if qf is not None:
                refs.append(LayerRef(name, mod, int(qf.in_features), int(qf.out_features), True))
                continue
            sizes = _torch_linear_sizes(mod)
            if sizes is not None:
                refs.append(LayerRef(name, mod, sizes[0], sizes[1], False))
    else:
        for path, obj, _site, revisit in _walk(model, stop=lambda o: quantized_forward_of(o) is not None):
            if revisit:
                continue
            qf = quantized_forward_of(obj)
            if qf is not None:
                refs.append(LayerRef(path, obj, int(qf.in_features), int(qf.out_features), True))
            elif _looks_like_layer(obj) and _check_layer(obj, relaxed=False)[0]:
                w = _get(obj, "weight")
                refs.append(LayerRef(path, obj, int(w.shape[1]), int(w.shape[0]), False))
    return [r for r in refs
            if (quantized is None or r.quantized == quantized)
            and (not inc or _match(r.name, inc) is not None) and _match(r.name, exc) is None]


def norm_layers(model: Any) -> List[Tuple[str, Any]]:
    """LayerNorm / RMSNorm layers with a 1-D affine ``weight`` (``nn`` and ``torch`` models)."""
    out = []
    if is_torch_module(model):
        torch = _torch()
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if re.search(r"(Layer|RMS)Norm", type(mod).__name__) and isinstance(w, torch.Tensor) and w.dim() == 1:
                out.append((name, mod))
    elif isinstance(model, nn.Module):
        for name, mod in model.named_modules():
            w = mod._parameters.get("weight")
            if re.search(r"(Layer|RMS)Norm", type(mod).__name__) and isinstance(w, np.ndarray) and w.ndim == 1:
                out.append((name, mod))
    return out


def find_module(model: Any, name: str) -> Any:
    """The sub-module at dotted ``name`` of an ``nn`` or ``torch`` model."""
    mod = model
    for part in name.split(".") if name else []:
        mod = mod._modules[part]
    return mod


def replace_module(model: Any, old: Any, new: Any) -> int:
    """Replace ``old`` by ``new`` at every place it is registered in an ``nn`` or ``torch`` model;
    returns how many places."""
    n = 0
    for _name, parent in list(model.named_modules(remove_duplicate=False)):
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new
                n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Running a model on user batches
# --------------------------------------------------------------------------------------------------

def batch_list(batches: Any) -> List[Any]:
    """``batches`` as a list: an iterable of batches, or one bare array / tensor / dict."""
    if isinstance(batches, (np.ndarray, Mapping)) or is_torch_tensor(batches):
        return [batches]
    if isinstance(batches, (str, bytes)) or batches is None:
        raise errors.TypeError(f"batches must be an iterable of model inputs, got {type(batches).__name__}")
    try:
        out = list(batches)
    except TypeError:
        raise errors.TypeError(f"batches must be an iterable of model inputs (arrays, tuples of "
                               f"positional arguments or dicts of keyword arguments), got "
                               f"{type(batches).__name__}") from None
    if not out:
        raise errors.ValueError("batches is empty: give at least one batch")
    return out


def _to_torch(v: Any) -> Any:
    return _torch().from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v


def call(model: Any, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``
    (numpy arrays become tensors for a torch model, run under ``torch.inference_mode()``). A
    callable batch is called with the model (``lambda m: encoder.encode(sentences)``)."""
    if callable(batch) and not isinstance(batch, (np.ndarray, Mapping, tuple, list)) and not is_torch_tensor(batch):
        if is_torch_module(model):
            with _torch().inference_mode():
                return batch(model)
        return batch(model)
    if is_torch_module(model):
        if isinstance(batch, Mapping):
            batch = {k: _to_torch(v) for k, v in batch.items()}
        elif isinstance(batch, (tuple, list)):
            batch = type(batch)(_to_torch(v) for v in batch)
        else:
            batch = _to_torch(batch)
        with _torch().inference_mode():
            return _call(model, batch)
    return _call(model, batch)


def _call(model: Any, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def as_numpy(x: Any) -> np.ndarray:
    """An activation as a float numpy array (torch tensors: detached, float32, CPU)."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch_tensor(x):
        x = x.detach()
        if x.dtype != _torch().float32:
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def output_array(out: Any) -> np.ndarray:
    """A model's output as one float32 array: the array itself, a tensor, the first entry of a
    dict-like output (``last_hidden_state`` / ``logits`` first), or the first item of a tuple."""
    if isinstance(out, Mapping):
        for key in ("last_hidden_state", "logits"):
            if key in out:
                return output_array(out[key])
        for v in out.values():
            if v is not None:
                return output_array(v)
    if isinstance(out, (tuple, list)) and out:
        return output_array(out[0])
    a = as_numpy(out)
    if a.dtype.kind not in "fiu":
        raise errors.TypeError(f"cannot read an array from a model output of type {type(out).__name__}")
    return np.asarray(a, dtype=np.float32)


def run(model: Any, batch: Any) -> np.ndarray:
    """:func:`call`, then :func:`output_array` (a copy: later runs cannot overwrite it)."""
    return np.array(output_array(call(model, batch)), dtype=np.float32, copy=True)


# --------------------------------------------------------------------------------------------------
# Watching / replacing what layers compute
# --------------------------------------------------------------------------------------------------

Interceptor = Callable[[Any, Any, Callable[[Any], Any]], Any]

_CALL_HOOKS: Dict[int, Callable[..., Any]] = {}
_ICALL_CLASSES: Dict[type, type] = {}


def _intercepted_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    hook = _CALL_HOOKS.get(id(self))
    if hook is None:  # not intercepted any more: behave as the original class
        return type(self)._cquant_icall_base.__call__(self, *args, **kwargs)
    return hook(*args, **kwargs)


def _icall_class(base: type) -> type:
    sub = _ICALL_CLASSES.get(base)
    if sub is None:
        sub = type(base.__name__, (base,), {"__slots__": (), "__call__": _intercepted_call,
                                            "_cquant_icall_base": base, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__})
        _ICALL_CLASSES[base] = sub
    return sub


@contextlib.contextmanager
def intercept(refs: Sequence[Any], fn: Interceptor) -> Iterator[None]:
    """While active, a call of layer ``ref.obj`` (for each ``ref`` in ``refs``: a :class:`LayerRef`,
    or any object with ``.obj``) returns ``fn(ref, x, forward)``: ``x`` is the layer's first argument
    and ``forward(x2)`` runs the layer as it was on ``x2`` (other arguments unchanged). Nested calls
    of the same layer (``__call__`` -> ``forward``) are seen once."""
    undo: List[Callable[[], None]] = []
    try:
        for ref in refs:
            _install(ref, fn, undo)
        yield
    finally:
        for step in reversed(undo):
            step()


def _install(ref: Any, fn: Interceptor, undo: List[Callable[[], None]]) -> None:
    obj = ref.obj
    if is_torch_module(obj):
        def hook(mod: Any, args: Tuple[Any, ...], output: Any) -> Any:
            if not args:
                return None
            x = args[0]

            def forward(x2: Any) -> Any:
                return output if x2 is x else mod.forward(x2, *args[1:])
            return fn(ref, x, forward)
        handle = obj.register_forward_hook(hook)
        undo.append(handle.remove)
        return
    d = getattr(obj, "__dict__", None)
    if not isinstance(d, dict):
        raise errors.TypeError(f"layer {_display(ref.name)!r} ({type(obj).__name__}) has no __dict__: "
                               f"its calls cannot be watched")
    depth = [0]

    def wrap(inner: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if depth[0] or not args:
                return inner(*args, **kwargs)
            depth[0] += 1
            try:
                return fn(ref, args[0], lambda x2: inner(x2, *args[1:], **kwargs))
            finally:
                depth[0] -= 1
        return wrapper

    fwd = getattr(obj, "forward", None)
    if callable(fwd):
        had = "forward" in d
        old = d.get("forward")
        object.__setattr__(obj, "forward", wrap(fwd))

        def restore_forward() -> None:
            if had:
                object.__setattr__(obj, "forward", old)
            else:
                object.__delattr__(obj, "forward")
        undo.append(restore_forward)
    cls = type(obj)
    if not isinstance(obj, nn.Module) and callable(obj) and not hasattr(cls, "_cquant_base") \
            and not hasattr(cls, "_cquant_icall_base"):
        base_call = cls.__call__
        _CALL_HOOKS[id(obj)] = wrap(lambda *a, **k: base_call(obj, *a, **k))
        try:
            obj.__class__ = _icall_class(cls)
        except TypeError:
            del _CALL_HOOKS[id(obj)]
            if not callable(fwd):
                raise errors.TypeError(f"layer {_display(ref.name)!r}: cannot watch its calls") from None
            return

        def restore_class() -> None:
            obj.__class__ = cls
            _CALL_HOOKS.pop(id(obj), None)
        undo.append(restore_class)
