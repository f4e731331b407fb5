"""A bundled demo model written in :mod:`cquant.nn`, with deterministic weights.

:class:`MLPStackModel` is a transformer-style MLP stack over token ids::

    tokens (B, T) int -> token embedding + position embedding            (B, T, dim)
      -> depth x [ x + Linear(hidden->dim)(GELU(Linear(dim->hidden)(LayerNorm(x)))) ]
      -> LayerNorm -> head Linear(dim -> num_classes)                     (B, T, num_classes)

The default configuration (dim 512, hidden 2048, 4 blocks, vocab 8192, 1000 classes) has ~13.2M
parameters, 9 Linear layers and ~9 GFLOP per 512 tokens — big enough for latency and memory to mean
something, small enough for ``make demo`` to take seconds. Weights come from a seeded numpy Generator,
so ``build_default_model(seed)`` gives the same model on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from . import errors, nn

__all__ = ["ModelConfig", "MLPBlock", "MLPStackModel", "build_default_model", "sample_inputs"]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of :class:`MLPStackModel`."""
    vocab_size: int = 8192
    max_seq: int = 128
    dim: int = 512
    hidden: int = 2048
    depth: int = 4
    num_classes: int = 1000
    eps: float = 1e-5

    @classmethod
    def small(cls) -> "ModelConfig":
        """A tiny configuration for tests (~0.1M parameters)."""
        return cls(vocab_size=256, max_seq=32, dim=64, hidden=128, depth=2, num_classes=16)


class MLPBlock(nn.Module):
    """Pre-norm residual MLP: ``x + fc2(gelu(fc1(norm(x))))``."""

    def __init__(self, dim: int, hidden: int, eps: float, rng: np.random.Generator):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden, rng=rng)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, rng=rng)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class MLPStackModel(nn.Module):
    """Token ids (B, T) -> per-token logits (B, T, num_classes), float32."""

    def __init__(self, config: ModelConfig, rng: np.random.Generator):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim, rng=rng)
        self.pos_emb = nn.Embedding(config.max_seq, config.dim, rng=rng)
        # Embeddings are N(0, 1); scale them down like a trained model's so the residual stream and
        # the LayerNorm inputs have realistic magnitudes.
        self.tok_emb.weight *= np.float32(0.02)
        self.pos_emb.weight *= np.float32(0.02)
        self.blocks = nn.ModuleList(MLPBlock(config.dim, config.hidden, config.eps, rng)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.eps)
        self.head = nn.Linear(config.dim, config.num_classes, rng=rng)

    def forward(self, tokens: Any) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise errors.ShapeError(f"tokens must be (batch, seq), got shape {tokens.shape}")
        if tokens.shape[1] > self.config.max_seq:
            raise errors.ShapeError(f"sequence length {tokens.shape[1]} > max_seq {self.config.max_seq}")
        x = self.tok_emb(tokens) + self.pos_emb(np.arange(tokens.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_default_model(seed: int = 0, config: Optional[ModelConfig] = None, **overrides: Any) -> MLPStackModel:
    """The demo model with weights drawn from ``numpy.random.default_rng(seed)``.

    ``config`` (default :class:`ModelConfig()`) and keyword ``overrides`` (e.g. ``depth=2``) set sizes.
    """
    cfg = replace(config or ModelConfig(), **overrides)
    return MLPStackModel(cfg, np.random.default_rng(seed))


def sample_inputs(batch: int = 8, seq: int = 64, seed: int = 0, vocab_size: Optional[int] = None,
                  config: Optional[ModelConfig] = None) -> np.ndarray:
    """Deterministic token ids, int64 of shape (batch, seq), uniform in ``[0, vocab_size)``."""
    vocab = vocab_size if vocab_size is not None else (config or ModelConfig()).vocab_size
    if batch < 1 or seq < 1:
        raise errors.ValueError(f"batch and seq must be >= 1, got {batch}, {seq}")
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)
