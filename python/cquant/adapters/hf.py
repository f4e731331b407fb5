"""Save and rebuild torch / Hugging Face transformers models quantized by cquant.

    qmodel = cquant.Quantizer.quantize_dynamic(transformers.AutoModel.from_pretrained(src))
    cquant.save_pretrained(qmodel, "out/")                # config + quantized safetensors (+ shards)
    model = cquant.from_pretrained("out/")                # no float32 weights are ever built

Directory layout written by :func:`save_pretrained`:

- ``config.json`` (transformers models: the model's own config, plus a ``quantization_config``
  ``{"quant_method": "cquant", ...}`` entry so that the directory says what it is);
  ``generation_config.json`` when the model has one;
- ``cquant_config.json``: format version, the model class, every quantized layer (mode,
  granularity, group size, shape, bias, layout), the quantized attentions and the tied tensors;
- ``cquant-model.safetensors``, or past ``max_shard_size`` the shards
  ``cquant-model-00001-of-0000N.safetensors`` and ``cquant-model.safetensors.index.json`` (the
  usual ``{"metadata": {"total_size": ...}, "weight_map": {tensor: file}}``). Tensors are the
  model's ``state_dict``: ``L.weight_q`` (int8 (out, in) codes), ``L.weight_scale``, ``L.bias`` (and
  ``L.act_scale`` for a static layer) for each quantized layer ``L`` and every other tensor under its own name and dtype; each file is also a
  cquant checkpoint (``cquant.format_version`` and ``cquant.layers`` in its metadata), readable by
  ``cquant.load``. Tied tensors (``lm_head.weight`` = ``transformer.wte.weight``) are stored once.
  Int8 embedding tables (``Quantizer(..., embeddings=True)``) are listed under ``"embeddings"`` in
  ``cquant_config.json`` (``{name: {"shape", "padding_idx", "tied_to"}}``); a table tied to a
  quantized Linear (``"tied_to"``) has no tensors: it reads that layer's codes.

The weight files are deliberately not named ``model.safetensors``: transformers' own
``from_pretrained`` would otherwise load the float layers and silently leave the quantized ones at
random values; on this directory it stops with "no file named model.safetensors".

:func:`from_pretrained` builds the model class with its parameters on the meta device (buffers,
such as position ids, are computed as usual), installs the quantized layers from the codes, assigns
the other tensors and re-ties what was tied: memory holds the int8 model only.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .. import __version__, errors, ops
from ..checkpoint_file import (KEY_CQ_VERSION, KEY_FOLDS, KEY_LAYERS, KEY_VERSION, fold_key as _fold_key, fold_tensors,
                               _umask, pack_int4, read_folds, set_folds, unpack_int4)
from ..quantization import QuantizedLinearForward
from .torch_smoothing import SmoothedTorchLinear, make_residual_scaled, residual_scales_in
from .torch import (QuantizedMultiheadAttention, QuantizedTorchLinear, _disable_fast_paths, _module_sites,
                    _pfx)
from .torch_base import _finite_floats
from .torch_embedding import QuantizedTorchEmbedding

__all__ = ["save_pretrained", "from_pretrained", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "cquant-model.safetensors"
WEIGHTS_INDEX_NAME = "cquant-model.safetensors.index.json"
CONFIG_NAME = "cquant_config.json"
FORMAT_VERSION = "1"
_LAYER_KEYS = ("weight_q", "weight_scale", "bias", "act_scale")

PathLike = Union[str, "os.PathLike[str]"]


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, bool):
        raise errors.TypeError("max_shard_size must be an int or a string such as '2GB'")
    if isinstance(size, int):
        if size <= 0:
            raise errors.ValueError(f"max_shard_size must be positive, got {size}")
        return size
    if not isinstance(size, str):
        raise errors.TypeError("max_shard_size must be an int or a string such as '2GB'")
    s = size.strip().upper()
    units = [("KIB", 2**10), ("MIB", 2**20), ("GIB", 2**30), ("KB", 10**3), ("MB", 10**6), ("GB", 10**9),
             ("B", 1)]
    for u, f in units:
        if s.endswith(u):
            try:
                n = float(s[:-len(u)])
            except ValueError:
                break
            if n > 0:
                return int(n * f)
            break
    raise errors.ValueError(f"max_shard_size {size!r} is not a size such as 500MB, 2GB or 1GiB")


def _layer_meta(m: QuantizedTorchLinear) -> Dict[str, Any]:
    qw = m.qweight
    meta = {"mode": m.mode, "granularity": qw.granularity, "group_size": qw.group_size,
            "shape": [int(qw.shape[0]), int(qw.shape[1])], "bias": m.bias_array is not None,
            "layout": "in_out" if m.source == "Conv1D" else "out_in", "source": m.source}
    if qw.bits != 8:  # int4: weight_q stored two codes per byte (U8 (N, ceil(K/2)), as cquant.save)
        meta["bits"] = int(qw.bits)
    return meta


def _embedding_meta(model: "torch.nn.Module") -> Dict[str, Dict[str, Any]]:
    """``{name: {"shape", "padding_idx", "tied_to"}}`` of the int8 embedding tables of ``model``."""
    mods = list(model.named_modules())
    name_of = {id(m): n for n, m in mods}
    out: Dict[str, Dict[str, Any]] = {}
    first: Dict[int, str] = {}  # a table several modules share (T5's shared / embed_tokens): stored once
    for name, m in mods:
        if isinstance(m, QuantizedTorchEmbedding):
            tie = m.tied_to
            if tie is not None and id(tie) not in name_of:
                raise errors.ValueError(f"embedding {name!r} is tied to a quantized layer that is not in the model")
            out[name] = {"shape": [int(m.num_embeddings), int(m.embedding_dim)], "padding_idx": m.padding_idx,
                         "tied_to": None if tie is None else name_of[id(tie)]}
            if tie is None:
                same = first.setdefault(id(m.qweight), name)
                if same != name:
                    out[name]["same_as"] = same
    return out


def save_pretrained(model: "torch.nn.Module", save_directory: PathLike,
                    max_shard_size: Union[int, str] = "2GB", metadata: Optional[Dict[str, str]] = None) -> List[str]:
    """Write a cquant-quantized torch model to ``save_directory`` (see the module docstring for the
    layout); returns the paths of the weight files. Files of an earlier save there are replaced."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("cquant.save_pretrained needs the safetensors package: pip install safetensors") from None
    if not isinstance(model, torch.nn.Module):
        raise errors.TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layers = {name: _layer_meta(m) for name, m in model.named_modules() if isinstance(m, QuantizedTorchLinear)}
    embeddings = _embedding_meta(model)
    if not layers and not embeddings:
        raise errors.ValueError("the model has no cquant quantized layer: quantize it first "
                                "(cquant.Quantizer.quantize_dynamic(model))")
    attentions = [{"name": name, "embed_dim": m.embed_dim, "num_heads": m.num_heads, "batch_first": m.batch_first}
                  for name, m in model.named_modules() if isinstance(m, QuantizedMultiheadAttention)]
    limit = _parse_size(max_shard_size)
    directory = os.fspath(save_directory)
    os.makedirs(directory, exist_ok=True)

    # tensors, tied ones once
    sd = model.state_dict()
    tensors: Dict[str, "torch.Tensor"] = {}
    tied: Dict[str, str] = {}
    first_of: Dict[Tuple, str] = {}
    storages: set = set()
    for k, t in sd.items():
        t = t.detach()
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if ident is not None and ident in first_of:
            tied[k] = first_of[ident]
            continue
        if ident is not None:
            first_of[ident] = k
        sp = t.untyped_storage().data_ptr() if t.numel() else None
        if (sp is not None and sp in storages) or not t.is_contiguous() or \
                t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()  # safetensors refuses tensors that share memory
        if sp is not None:
            storages.add(sp)
        tensors[k] = t.cpu()
    # layers sharing one QuantizedWeight (a weight shared by two Linears, quantized once): the codes
    # once too (their scales already share memory, so the loop above tied them)
    first_qw: Dict[int, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedTorchLinear):
            key = _pfx(name) + "weight_q"
            src = first_qw.setdefault(id(m.qforward.qweight), key)
            if src != key and key in tensors and src in tensors:
                del tensors[key]
                tied[key] = src
    # the smoothing folds (for cquant.compare on the reloaded model), under names no state_dict key has
    folds, fold_listing = fold_tensors(model, set(tensors) | set(tied))
    fold_side = {}
    for side, names_ in fold_listing.items():
        for layer in names_:
            fold_side[_fold_key(side, layer)] = (side, layer)
    tensors.update({k: torch.from_numpy(v) for k, v in folds.items()})
    for name, lm in layers.items():  # int4 codes: two per byte in the file
        key = _pfx(name) + "weight_q"
        if lm.get("bits") == 4 and key in tensors:
            tensors[key] = torch.from_numpy(pack_int4(tensors[key].numpy()))

    # groups (a quantized layer's tensors stay in one file), then shards
    def owner(key: str) -> Optional[str]:
        base, _, leaf = key.rpartition(".")
        return base if leaf in _LAYER_KEYS and base in layers else None

    groups: List[Tuple[Optional[str], List[str], int]] = []
    index_of: Dict[str, int] = {}
    for k, t in tensors.items():
        o = owner(k)
        nb = t.numel() * t.element_size()
        if o is not None and o in index_of:
            g = groups[index_of[o]]
            g[1].append(k)
            groups[index_of[o]] = (g[0], g[1], g[2] + nb)
            continue
        if o is not None:
            index_of[o] = len(groups)
        groups.append((o, [k], nb))
    shards: List[List[Tuple[Optional[str], List[str], int]]] = [[]]
    size = 0
    for g in groups:
        if shards[-1] and size + g[2] > limit:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g[2]

    for old in glob.glob(os.path.join(glob.escape(directory), "cquant-model*.safetensors*")):
        os.remove(old)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"cquant-model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: Dict[str, str] = {}
    paths = []
    for fname, shard in zip(names, shards):
        keys = [k for g in shard for k in g[1]]
        shard_layers = {g[0]: layers[g[0]] for g in shard if g[0] is not None}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update({"format": "pt", KEY_VERSION: FORMAT_VERSION, KEY_CQ_VERSION: __version__,
                     KEY_LAYERS: json.dumps(shard_layers, separators=(",", ":"))})
        shard_folds: Dict[str, List[str]] = {}
        for k in keys:
            if k in fold_side:
                shard_folds.setdefault(fold_side[k][0], []).append(fold_side[k][1])
        if shard_folds:  # each file is a cquant checkpoint: it lists the folds it holds
            meta[KEY_FOLDS] = json.dumps(shard_folds, separators=(",", ":"))
        path = os.path.join(directory, fname)
        tmp = path + ".tmp"
        save_file({k: tensors[k] for k in keys}, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its file 0600; the others get the umask's
        os.replace(tmp, path)
        paths.append(path)
        weight_map.update({k: fname for k in keys})
    if n > 1:
        total = sum(g[2] for g in groups)
        with open(os.path.join(directory, WEIGHTS_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total, KEY_VERSION: FORMAT_VERSION}, "weight_map": weight_map},
                      f, indent=2)

    cls = type(model)
    cq = {"format_version": FORMAT_VERSION, "cquant_version": __version__, "model_class": cls.__name__,
          "model_module": cls.__module__, "layers": layers, "attentions": attentions, "tied": tied,
          **({"embeddings": embeddings} if embeddings else {}),
          **({"folds": fold_listing} if fold_listing else {}),
          "files": names}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cq, f, indent=2)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained") and hasattr(config, "to_dict"):
        import copy
        cfg = copy.deepcopy(config)
        cfg.quantization_config = {"quant_method": "cquant", "format_version": FORMAT_VERSION,
                                   "weights": names[0] if n == 1 else WEIGHTS_INDEX_NAME,
                                   "note": "load with cquant.from_pretrained(directory)"}
        cfg.save_pretrained(directory)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            try:
                gen.save_pretrained(directory)
            except Exception:  # noqa: BLE001 - optional file
                pass
    return paths


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside go to the meta device as soon as they are registered (no float32
    storage is filled or kept; initializers run on meta). Buffers are created as usual."""
    original = torch.nn.Module.register_parameter

    def register_parameter(self: "torch.nn.Module", name: str, param: Any) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _read_tensors(directory: str, cq: Dict[str, Any]) -> Dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file
    out: Dict[str, "torch.Tensor"] = {}
    files = cq.get("files") or [WEIGHTS_NAME]
    for fname in files:
        if os.path.basename(fname) != fname:
            raise errors.ValueError(f"{CONFIG_NAME}: bad weight file name {fname!r}")
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: weight file listed in {CONFIG_NAME} is missing")
        try:
            got = load_file(path)
        except Exception as e:  # safetensors' own errors (a truncated or corrupted file)
            raise errors.CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        # load_file's tensors live in a mapping of the whole file, which stays resident while any
        # of them does: the tensors the model keeps are copied out of it, and the int8 codes (packed
        # into buffers of their own, then dropped) are read from it in place. A loaded model held
        # its file's pages as well as its own (GPT-2 2 layers, 51 MiB: RSS +108-120 MiB)
        out.update({k: (t if k.endswith(".weight_q") or k == "weight_q" else t.clone()) for k, t in got.items()})
        del got
    return out


def _set_tensor(model: "torch.nn.Module", key: str, value: "torch.Tensor") -> None:
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise errors.ValueError(f"tied tensor {key!r} is not a parameter or buffer of the model")


def _embeddings_from(d: str, model: "torch.nn.Module", cq: Dict[str, Any], tensors: Dict[str, "torch.Tensor"],
                     new: Dict[str, "torch.nn.Module"]) -> None:
    """The int8 embedding tables of ``cquant_config.json`` into ``new`` (name -> module to install)."""
    tables = cq.get("embeddings", {})
    # the tables that read another table's codes ("same_as") after that one
    for name, em in sorted(tables.items(), key=lambda kv: isinstance(kv[1], dict) and kv[1].get("same_as") is not None):
        try:
            old = model.get_submodule(name) if name else model
        except AttributeError:
            raise errors.ValueError(f"{d}: the model built from the config has no sub-module {name!r}") from None
        w = getattr(old, "weight", None)
        dtype = w.dtype if isinstance(w, torch.Tensor) and w.dtype.is_floating_point else torch.float32
        same = em.get("same_as")
        if same is not None:
            src = new.get(same)
            if not isinstance(src, QuantizedTorchEmbedding):
                raise errors.ValueError(f"{d}: embedding {name!r} shares the table of {same!r}, which is not an "
                                        "int8 embedding table of this checkpoint")
            new[name] = QuantizedTorchEmbedding(src.qweight, em.get("padding_idx"), dtype=dtype)
            continue
        tie = em.get("tied_to")
        if tie is not None:
            target = new.get(tie)
            if not isinstance(target, QuantizedTorchLinear):
                raise errors.ValueError(f"{d}: embedding {name!r} is tied to {tie!r}, which is not a quantized layer")
            new[name] = QuantizedTorchEmbedding(None, em.get("padding_idx"), tie=target, dtype=dtype)
            continue
        p = _pfx(name)
        try:
            q, s = tensors.pop(p + "weight_q"), tensors.pop(p + "weight_scale")
        except KeyError as e:
            raise errors.ValueError(f"{d}: embedding {name!r}: tensor {e} is missing") from None
        qw = ops.QuantizedWeight.from_codes(q.numpy(), s.to(torch.float32).numpy(), "per_channel")
        new[name] = QuantizedTorchEmbedding(qw, em.get("padding_idx"), dtype=dtype)


def _smoothing_wrappers(model: "torch.nn.Module", tensors: Dict[str, "torch.Tensor"]) -> None:
    """Put a smoothing pre-scale wrapper (placeholder: its ``inv_scale`` and rotation come with the
    other tensors) around every module the checkpoint smoothed (a ``<name>.inv_scale`` tensor), so
    that ``<name>.linear`` (quantized or float) has a place to go."""
    subs = dict(model.named_modules())
    sites, _ = _module_sites(model)
    for key in [k for k in tensors if k.endswith(".inv_scale")]:
        name = key[: -len(".inv_scale")]
        old = subs.get(name)
        if old is None or getattr(type(old), "_cquant_smoothing_wrapper", False) or not sites.get(id(old)):
            raise errors.ValueError(f"checkpoint tensor {key!r}: the model built from the config has no "
                                    f"layer {name!r} to wrap")
        inv = tensors[key]
        if inv.dim() != 1 or inv.numel() != getattr(old, "in_features", inv.numel()):
            raise errors.ValueError(f"checkpoint tensor {key!r} has shape {tuple(inv.shape)}, expected "
                                    f"({getattr(old, 'in_features', '?')},)")
        w = SmoothedTorchLinear(old, np.ones(inv.numel(), np.float32))
        for parent, cname in sites[id(old)]:
            parent._modules[cname] = w


def _residual_scaled_blocks(model: "torch.nn.Module", tensors: Dict[str, "torch.Tensor"]) -> None:
    """Make every output block the checkpoint has a ``<name>.residual_scale`` for (smoothing folded
    into the LayerNorm that produced its residual) a residual-scaled one (placeholder values; the
    checkpoint fills them)."""
    found = residual_scales_in(model, tensors)
    for key in tensors:
        if key.endswith(".residual_scale") and key not in found:
            raise errors.ValueError(f"checkpoint tensor {key!r}: the model built from the config has no "
                                    f"output block {key[: -len('.residual_scale')]!r} that can scale its residual")
    for blk in found.values():
        make_residual_scaled(blk, np.ones(int(blk.LayerNorm.normalized_shape[-1]), np.float32))


def _static_scale_of(d: str, name: str, p: str, lm: Dict[str, Any], tensors: Dict[str, "torch.Tensor"]) -> Optional[float]:
    """A static layer's activation scale from its ``act_scale`` tensor (taken out of ``tensors``),
    or None for a dynamic / weight-only layer."""
    if lm.get("mode") != "static":
        return None
    act = tensors.pop(p + "act_scale", None)
    if act is None or act.dtype != torch.float32 or act.numel() != 1:
        raise errors.ValueError(f"{d}: static layer {name!r}: tensor {p + 'act_scale'!r} (one float32) "
                                "is missing or malformed")
    return float(act.reshape(()).item())


def _layer_weight(d: str, name: str, p: str, lm: Dict[str, Any], tensors: Dict[str, Any]) -> Any:
    """The QuantizedWeight of a checkpoint layer from its ``weight_q`` / ``weight_scale`` tensors (taken
    out of ``tensors``): int4 codes unpacked, the values cquant.load refuses refused."""
    try:
        q, s = tensors.pop(p + "weight_q"), tensors.pop(p + "weight_scale")
    except KeyError as e:
        raise errors.ValueError(f"{d}: layer {name!r}: tensor {e} is missing") from None
    bits = lm.get("bits", 8)
    if bits not in (4, 8):
        raise errors.ValueError(f"{d}: layer {name!r}: bits must be 4 or 8, got {bits!r}")
    codes = q.numpy()
    if bits == 4:  # two codes per byte, k = 2i in the low nibble of byte i
        k = int(lm["shape"][1])
        if q.dtype != torch.uint8 or tuple(q.shape) != (int(lm["shape"][0]), (k + 1) // 2):
            raise errors.ValueError(f"{d}: int4 layer {name!r}: {p + 'weight_q'!r} must be uint8 of shape "
                                    f"({lm['shape'][0]}, {(k + 1) // 2}), got {q.dtype} {tuple(q.shape)}")
        codes = unpack_int4(codes, k)
    try:  # codes in range, finite >= 0 float scales
        sa = s.to(torch.float32).numpy() if s.is_floating_point() else s.numpy()  # integer scales: refused
        return ops.QuantizedWeight.from_codes(codes, ops.check_scales(sa, p + "weight_scale"),
                                              lm["granularity"], lm.get("group_size"), bits=bits)
    except errors.QuantizationError as e:
        raise errors.CheckpointError(f"{d}: layer {name!r}: {e}") from None


def from_pretrained(directory: PathLike, model_class: Any = None, config: Any = None) -> "torch.nn.Module":
    """Rebuild a model written by :func:`save_pretrained`, in eval mode, without float32 weights.

    ``model_class``: the class to build (default: the transformers class named in
    ``cquant_config.json``; only classes of the ``transformers`` package are looked up by name).
    ``config``: the config to build it with (default: ``AutoConfig.from_pretrained(directory)``).
    The class is called as ``model_class(config)``.
    """
    d = os.fspath(directory)
    cpath = os.path.join(d, CONFIG_NAME)
    if not os.path.exists(cpath):
        raise errors.CheckpointError(f"{cpath} not found: {d} was not written by cquant.save_pretrained"
                                     + ("" if os.path.isdir(d) else f" ({d} is not a folder)"))
    try:
        with open(cpath, encoding="utf-8") as f:
            cq = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.CheckpointError(f"{cpath}: not valid JSON ({e})") from None
    for key, kind in (("", dict), ("layers", dict), ("tied", dict), ("embeddings", dict), ("attentions", list),
                      ("files", list), ("folds", dict)):
        v = cq if key == "" else (cq.get(key) if isinstance(cq, dict) else None)
        if (key == "" or v is not None) and not isinstance(v, kind):
            raise errors.CheckpointError(f"{cpath}: {key or 'the file'} must be a JSON "
                                         f"{'object' if kind is dict else 'array'}, got {type(v).__name__}")
    try:
        return _from_pretrained(d, cpath, cq, model_class, config)
    except errors.QuantizationError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        # a field of cquant_config.json missing or of the wrong type (our own errors pass as they are)
        raise errors.CheckpointError(f"{cpath}: malformed entry ({type(e).__name__}: {e})") from e


def _from_pretrained(d: str, cpath: str, cq: Dict[str, Any], model_class: Any, config: Any) -> "torch.nn.Module":
    if str(cq.get("format_version")) != FORMAT_VERSION:
        raise errors.ValueError(f"{cpath}: format version {cq.get('format_version')!r} is not supported "
                                f"(this cquant reads {FORMAT_VERSION})")
    if config is None or model_class is None:
        try:
            import transformers
        except ImportError:
            raise ImportError("cquant.from_pretrained needs transformers to rebuild the model; or pass "
                              "model_class and config") from None
        if config is None:
            config = transformers.AutoConfig.from_pretrained(d)
        if model_class is None:
            if not str(cq.get("model_module", "")).startswith("transformers"):
                raise errors.ValueError(f"{cpath}: the model class {cq.get('model_class')!r} is not from "
                                        "transformers: pass model_class=")
            model_class = getattr(transformers, str(cq.get("model_class")), None)
            if model_class is None:
                raise errors.ValueError(f"transformers has no class {cq.get('model_class')!r}: pass model_class=")
    if hasattr(config, "quantization_config"):
        import copy
        config = copy.deepcopy(config)
        delattr(config, "quantization_config")
    with _parameters_on_meta():
        model = model_class(config)
    tensors = _read_tensors(d, cq)
    # the smoothing folds: out of the tensors (they are no parameter), recorded on the model at the end
    fold_arrays = {k: tensors.pop(k).numpy() for k in [_fold_key(side, layer) for side, ls in cq.get("folds", {}).items()
                                                        if isinstance(ls, list) for layer in ls if isinstance(layer, str)]
                   if k in tensors}
    folds = read_folds(cpath, json.dumps(cq["folds"]) if "folds" in cq else None, fold_arrays,
                       {n: lm["shape"] for n, lm in cq.get("layers", {}).items()})
    tied_map = cq.get("tied", {})
    layer_keys = {_pfx(n) + t for n in cq.get("layers", {}) for t in ("weight_q", "weight_scale")}

    # quantized layers
    new: Dict[str, "torch.nn.Module"] = {}
    qw_of: Dict[str, Any] = {}  # a layer's weight_scale key -> its QuantizedWeight
    for name, lm in cq.get("layers", {}).items():
        p = _pfx(name)
        kq, ks = p + "weight_q", p + "weight_scale"
        # a layer that shares its weight with an earlier one (quantized once): the file ties its
        # scales (and, since 2026-11-30, its codes) to that layer's; it gets that QuantizedWeight back
        src_ks = tied_map.get(ks) if ks not in tensors else None
        if src_ks is not None and src_ks in qw_of and kq not in tensors \
                and tied_map.get(kq) == src_ks[: -len("weight_scale")] + "weight_q":
            qw = qw_of[src_ks]
            if [int(v) for v in lm["shape"]] != list(qw.shape) or lm["granularity"] != qw.granularity \
                    or lm.get("bits", 8) != qw.bits:
                raise errors.CheckpointError(f"{d}: layer {name!r} is tied to {src_ks!r}, whose weight has "
                                             "another shape or scheme")
        else:
            if src_ks is not None and src_ks in qw_of:  # codes written again (saves before 2026-11-30)
                tensors[ks] = torch.from_numpy(qw_of[src_ks].scale)
            qw = qw_of[ks] = _layer_weight(d, name, p, lm, tensors)
        b = tensors.pop(p + "bias", None) if lm.get("bias") else None
        if b is not None and not _finite_floats(b):  # as cquant.load refuses it
            raise errors.CheckpointError(f"{d}: layer {name!r}: {p + 'bias'!r} must hold finite floats")
        act = _static_scale_of(d, name, p, lm, tensors)
        bias = None if b is None else np.array(b.to(torch.float32).numpy(), dtype=np.float32, copy=True)
        new[name] = QuantizedTorchLinear(QuantizedLinearForward(qw, bias, lm["mode"], act),
                                         source=lm.get("source", "Conv1D" if lm.get("layout") == "in_out" else "Linear"))
    for a in cq.get("attentions", []):
        aname = a["name"]
        parts = [new.pop(_pfx(aname) + s) for s in ("q_proj", "k_proj", "v_proj", "out_proj")]
        new[aname] = QuantizedMultiheadAttention(a["embed_dim"], a["num_heads"], *parts,
                                                 batch_first=a.get("batch_first", False))
    _embeddings_from(d, model, cq, tensors, new)
    _smoothing_wrappers(model, tensors)
    _residual_scaled_blocks(model, tensors)
    subs = dict(model.named_modules())
    sites, _ = _module_sites(model)
    for name, mod in new.items():
        old = subs.get(name)
        if old is None:
            raise errors.ValueError(f"{d}: the model built from the config has no sub-module {name!r}")
        if name == "":
            model = mod
        for parent, cname in sites.get(id(old), []):
            parent._modules[cname] = mod

    # everything else, then the ties
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise errors.ValueError(f"{d}: tensors the model does not have: {', '.join(result.unexpected_keys[:10])}")
    live = model.state_dict(keep_vars=True)
    for alias, src in cq.get("tied", {}).items():
        if alias in layer_keys:  # resolved above: the layers share one QuantizedWeight
            continue
        if src not in live:
            raise errors.ValueError(f"{d}: tied tensor {alias!r} refers to {src!r}, which the model lacks")
        if alias in live and tuple(live[alias].shape) != tuple(live[src].shape):
            raise errors.CheckpointError(f"{d}: tied tensor {alias!r} has shape {tuple(live[alias].shape)}, "
                                         f"{src!r} {tuple(live[src].shape)}: they cannot be one tensor")
        _set_tensor(model, alias, live[src])
    left = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
            if t is not None and t.device.type == "meta"]
    if left:
        raise errors.ValueError(f"{d}: the checkpoint does not hold {', '.join(left[:10])}"
                                + (f" (+{len(left) - 10} more)" if len(left) > 10 else ""))
    model.eval()
    _disable_fast_paths(model)
    set_folds(model, folds)
    return model
