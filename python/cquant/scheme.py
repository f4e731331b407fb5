"""Quantization schemes: what a quantized Linear stores and how it treats its activations.

    from cquant.scheme import QuantScheme
    s = QuantScheme(granularity="per_group", group_size=64)     # int8 weights, dynamic activations
    s.name                 # 'per_group(64)'
    str(s)                 # 'int8 dynamic per_group(64)'
    s.scale_shape(n, k)    # (n, k // 64)
    s.to_dict()            # checkpoint metadata; QuantScheme.from_dict(d) reads it back
    QuantScheme.parse("weight_only per_group(32)")

A :class:`QuantScheme` is frozen (hashable, usable as a dict key) and validates itself on
construction, so a scheme that exists is a valid one; whether it *fits* a given layer (its K) is a
separate question, answered by :meth:`QuantScheme.fit`.

Per-layer schemes
-----------------
``Quantizer(scheme=...)`` takes one scheme, or a mapping from keys to schemes (see
:func:`resolve`): an exact layer name, an :func:`fnmatch.fnmatchcase` glob on the dotted name
(``"encoder.layer.*.output.dense"``), or a class (every layer that is an instance of it, e.g.
``cquant.nn.Linear`` or ``torch.nn.Linear``). The value ``None`` keeps the layer in float. Keys are
tried in this order: exact names, then globs and classes in the mapping's order; a layer that no key
matches gets the default scheme (the Quantizer's ``mode``/``granularity``/``group_size``, or the
mapping's ``"*"`` entry).

Fallback
--------
``per_group`` needs K to be a multiple of ``group_size`` (and ``group_size`` a multiple of 4, a
kernel constraint). A layer whose K does not fit gets the same scheme with ``per_channel`` weights
instead, and the reason is recorded (``LayerRecord.reason``, the log); ``strict=True`` makes that an
error naming the layer.

``activations="static"`` needs each layer's activation scale, calibrated by the Quantizer on its
``calibration=`` batches (after smoothing, on the smoothed inputs). A layer the batches never reached
(no statistics) gets the same scheme with dynamic activations instead, the reason recorded the same
way; with ``strict=True`` it is an error listing every such layer.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from . import errors

__all__ = ["QuantScheme", "ACTIVATIONS", "GRANULARITIES", "MODES", "BITS", "resolve", "SchemeSpec"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
#: activation handling: "dynamic" (per-row int8 at run time), "static" (int8 with one scale per
#: layer, calibrated ahead of time: ``max|x| / 127`` over the calibration batches, see
#: :mod:`cquant.calibration`) or "none" (weight-only: float32 activations, weights dequantized inside
#: the kernel).
ACTIVATIONS = ("dynamic", "static", "none")
#: the Quantizer's ``mode`` names for each activation handling
MODES = {"dynamic": "dynamic", "static": "static", "weight_only": "none"}
BITS = (8, 4)

_NAME_RE = re.compile(r"^\s*(?:int(?P<bits>\d+)\s+)?(?:(?P<mode>dynamic|static|weight_only)\s+)?"
                      r"(?P<gran>per_tensor|per_channel|per_group)(?:\((?:g=)?(?P<g>\d+)\))?\s*$")


@dataclass(frozen=True)
class QuantScheme:
    """How one Linear layer is quantized.

    ``bits``: weight bits (8, or 4: codes in [-7, 7], two per byte). ``granularity``: ``"per_tensor"``, ``"per_channel"`` (one scale per
    output row) or ``"per_group"`` (one scale per ``group_size`` consecutive input columns of a row).
    ``activations``: ``"dynamic"`` (per-row int8 at run time), ``"static"`` (int8 with a calibrated
    per-layer scale: the Quantizer needs calibration batches) or ``"none"`` (weight-only).
    """
    bits: int = 8
    granularity: str = "per_channel"
    group_size: Optional[int] = None
    activations: str = "dynamic"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise errors.ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise errors.ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        g = self.group_size
        if self.granularity == "per_group":
            if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
                raise errors.ValueError(f"per_group needs a positive integer group_size, got {g!r}")
            if int(g) % 4:
                raise errors.ValueError(f"group_size must be a multiple of 4 (the kernels read groups of "
                                        f"4 codes), got {g}")
            object.__setattr__(self, "group_size", int(g))
        elif g is not None:
            raise errors.ValueError(f"group_size is only used with granularity='per_group' "
                                    f"(got group_size={g!r} with {self.granularity!r})")
        if self.activations not in ACTIVATIONS:
            raise errors.ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")

    # -- constructors ---------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, mode: str = "dynamic", granularity: str = "per_channel",
                  group_size: Optional[int] = None, bits: int = 8) -> "QuantScheme":
        """From the Quantizer's arguments (``mode`` is ``"dynamic"``, ``"static"`` or ``"weight_only"``)."""
        if not isinstance(mode, str) or mode not in MODES:
            raise errors.ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        return cls(bits=bits, granularity=granularity, group_size=group_size, activations=MODES[mode])

    @classmethod
    def parse(cls, text: str) -> "QuantScheme":
        """``"per_channel"``, ``"per_group(64)"``, ``"weight_only per_tensor"``, ``"static per_channel"``,
        ``"int8 dynamic per_group(32)"`` (what ``str(scheme)`` gives) -> QuantScheme."""
        m = _NAME_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise errors.ValueError(f"cannot parse a quantization scheme from {text!r} (e.g. "
                                    f"'per_channel', 'per_group(64)', 'weight_only per_tensor')")
        g = m.group("g")
        if g is not None and m.group("gran") != "per_group":
            raise errors.ValueError(f"{text!r}: only per_group takes a group size")
        return cls.from_args(m.group("mode") or "dynamic", m.group("gran"), None if g is None else int(g),
                             int(m.group("bits") or 8))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantScheme":
        """Inverse of :meth:`to_dict` (also accepts the checkpoint's ``mode`` key)."""
        if "activations" in d:
            act = d["activations"]
        else:
            mode = d.get("mode", "dynamic")
            if mode not in MODES:
                raise errors.ValueError(f"unknown mode {mode!r} in scheme metadata")
            act = MODES[mode]
        return cls(bits=int(d.get("bits", 8)), granularity=d.get("granularity", "per_channel"),
                   group_size=d.get("group_size"), activations=act)

    # -- views ----------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The layer mode: ``"dynamic"``, ``"static"`` (the dynamic kernel with a fixed activation
        scale) or ``"weight_only"``."""
        return "weight_only" if self.activations == "none" else self.activations

    @property
    def name(self) -> str:
        """The weight layout: ``per_tensor``, ``per_channel``, ``per_group(64)``."""
        return f"per_group({self.group_size})" if self.granularity == "per_group" else self.granularity

    def __str__(self) -> str:
        return f"int{self.bits} {self.mode} {self.name}"

    def to_dict(self) -> Dict[str, Any]:
        """Checkpoint metadata: ``{"bits", "mode", "granularity", "group_size"}`` (JSON-able)."""
        return {"bits": self.bits, "mode": self.mode, "granularity": self.granularity,
                "group_size": self.group_size}

    def scale_shape(self, n: int, k: int) -> Tuple[int, ...]:
        """Shape of the float32 scales of an (n, k) weight (k must fit, see :meth:`fit`)."""
        if self.granularity == "per_tensor":
            return (1,)
        if self.granularity == "per_channel":
            return (int(n),)
        why = self.fit(k)
        if why:
            raise errors.ValueError(why)
        return (int(n), int(k) // int(self.group_size))  # type: ignore[arg-type]

    def fit(self, k: int) -> Optional[str]:
        """None if a weight with ``k`` input columns can use this scheme, else the reason it cannot."""
        if self.granularity == "per_group" and int(k) % int(self.group_size):  # type: ignore[arg-type]
            return f"K={k} is not a multiple of group_size {self.group_size}"
        if self.bits == 4 and self.granularity == "per_group" and (
                int(self.group_size) % 8 or int(self.group_size) > 256):  # type: ignore[arg-type]
            return f"int4 groups are multiples of 8 up to 256, not {self.group_size}"
        return None

    def for_k(self, k: int, strict: bool = False, layer: str = "") -> Tuple["QuantScheme", str]:
        """``(scheme to use, note)`` for a layer with ``k`` input columns: this scheme if it fits,
        else per_channel with the reason in ``note`` (``strict``: raise ``ValueError`` instead)."""
        why = self.fit(k)
        if why is None:
            return self, ""
        where = f"layer {layer!r}: " if layer else ""
        if strict:
            raise errors.ValueError(f"{where}{self.name} does not fit: {why} (strict=True)")
        return replace(self, granularity="per_channel", group_size=None), \
            f"{self.name} does not fit ({why}): per_channel instead"


SchemeSpec = Union[QuantScheme, str, Mapping[Any, Optional[Union[QuantScheme, str]]]]
_DEFAULT_KEY = "*"


def _as_scheme(v: Any, what: str) -> Optional[QuantScheme]:
    if v is None or isinstance(v, QuantScheme):
        return v
    if isinstance(v, str):
        return QuantScheme.parse(v)
    raise errors.TypeError(f"{what}: expected a QuantScheme, a scheme name or None, got {type(v).__name__}")


def normalize(spec: Any) -> Tuple[Optional[QuantScheme], Tuple[Tuple[Any, Optional[QuantScheme]], ...]]:
    """``scheme=`` argument -> ``(default or None, ((key, scheme or None), ...))``; validates keys."""
    if spec is None:
        return None, ()
    if isinstance(spec, (QuantScheme, str)):
        return _as_scheme(spec, "scheme"), ()
    if not isinstance(spec, Mapping):
        raise errors.TypeError(f"scheme must be a QuantScheme, a name, or a mapping of layer name/glob/"
                               f"class -> scheme, got {type(spec).__name__}")
    default = None
    rules = []
    for key, v in spec.items():
        if not isinstance(key, (str, type)):
            raise errors.TypeError(f"scheme mapping keys must be layer names, globs or classes, got {key!r}")
        s = _as_scheme(v, f"scheme[{key!r}]")
        if key == _DEFAULT_KEY:
            if s is None:
                raise errors.ValueError("scheme['*'] (the default) cannot be None")
            default = s
        else:
            rules.append((key, s))
    return default, tuple(rules)


_UNMATCHED = object()


def resolve(name: str, layer: Any, default: QuantScheme,
            rules: Tuple[Tuple[Any, Optional[QuantScheme]], ...]) -> Tuple[Optional[QuantScheme], str]:
    """The scheme for layer ``name`` (None: keep it float) and the key that chose it ("" = default).

    Exact names first, then globs and classes in the mapping's order."""
    for key, s in rules:
        if isinstance(key, str) and key == name:
            return s, key
    for key, s in rules:
        if isinstance(key, type):
            if isinstance(layer, key):
                return s, key.__name__
        elif fnmatch.fnmatchcase(name, key):
            return s, key
    return default, ""
