"""QuantScheme: validation, names, metadata; per-layer schemes and the per_channel fallback in the Quantizer."""
from __future__ import annotations

import numpy as np
import pytest

from cquant import errors, nn, ops
from cquant.quantization import QuantizedLinear, Quantizer
from cquant.scheme import QuantScheme, normalize, resolve


def test_defaults_names_and_text():
    s = QuantScheme()
    assert (s.bits, s.granularity, s.group_size, s.activations) == (8, "per_channel", None, "dynamic")
    assert s.mode == "dynamic" and s.name == "per_channel" and str(s) == "int8 dynamic per_channel"
    g = QuantScheme(granularity="per_group", group_size=np.int64(64), activations="none")
    assert g.group_size == 64 and type(g.group_size) is int
    assert g.name == "per_group(64)" and str(g) == "int8 weight_only per_group(64)"
    assert hash(g) == hash(QuantScheme(granularity="per_group", group_size=64, activations="none"))


@pytest.mark.parametrize("kwargs", [
    dict(bits=3), dict(bits=True), dict(granularity="per_row"), dict(granularity="per_group"),
    dict(granularity="per_group", group_size=0), dict(granularity="per_group", group_size=6),
    dict(granularity="per_group", group_size=8.0), dict(granularity="per_group", group_size=True),
    dict(granularity="per_channel", group_size=32), dict(activations="Static"), dict(activations="int8"),
])
def test_invalid_schemes_raise(kwargs):
    with pytest.raises(errors.ValueError):
        QuantScheme(**kwargs)


def test_frozen():
    with pytest.raises(Exception):
        QuantScheme().bits = 4  # type: ignore[misc]


@pytest.mark.parametrize("text, expect", [
    ("per_channel", QuantScheme()),
    ("per_group(32)", QuantScheme(granularity="per_group", group_size=32)),
    ("weight_only per_tensor", QuantScheme(granularity="per_tensor", activations="none")),
    ("int8 dynamic per_group(g=16)", QuantScheme(granularity="per_group", group_size=16)),
])
def test_parse_and_roundtrips(text, expect):
    s = QuantScheme.parse(text)
    assert s == expect
    assert QuantScheme.parse(str(s)) == s
    assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(errors.ValueError):
        QuantScheme.parse("per_channel(32)")
    with pytest.raises(errors.ValueError):
        QuantScheme.parse("int3 per_channel")


def test_scale_shapes_match_ops():
    w = np.random.default_rng(0).standard_normal((12, 64)).astype(np.float32)
    for s in (QuantScheme(granularity="per_tensor"), QuantScheme(),
              QuantScheme(granularity="per_group", group_size=16)):
        qw = ops.quantize_weight(w, granularity=s.granularity, group_size=s.group_size)
        assert qw.scale.shape == s.scale_shape(12, 64)
        assert qw.scheme == s.name


def test_fit_and_fallback():
    s = QuantScheme(granularity="per_group", group_size=32)
    assert s.fit(64) is None and "not a multiple of group_size 32" in s.fit(100)
    assert s.for_k(64) == (s, "")
    fb, note = s.for_k(100)
    assert fb == QuantScheme() and "per_channel instead" in note
    with pytest.raises(errors.ValueError, match="layer 'head'.*strict"):
        s.for_k(100, strict=True, layer="head")


def test_resolve_order():
    default, rules = normalize({"*": "weight_only per_channel", "head": None, "blocks.*": "per_group(16)",
                                nn.Linear: "per_tensor"})
    assert default == QuantScheme(activations="none")
    lin = nn.Linear(4, 4, rng=0)
    assert resolve("head", lin, default, rules) == (None, "head")
    assert resolve("blocks.0.fc", lin, default, rules)[0] == QuantScheme.parse("per_group(16)")
    assert resolve("other", lin, default, rules) == (QuantScheme(granularity="per_tensor"), "Linear")
    assert resolve("other", object(), default, rules) == (default, "")
    with pytest.raises(errors.TypeError):
        normalize({3: "per_channel"})
    with pytest.raises(errors.TypeError):
        normalize(42)
    with pytest.raises(errors.ValueError):
        normalize({"*": None})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 32, rng=1)
        self.b = nn.Linear(32, 100, rng=2)
        self.head = nn.Linear(100, 10, rng=3)   # K = 100: no group size of 32 fits

    def forward(self, x):
        return self.head(self.b(self.a(x)))


X = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)


def test_group_size_fallback_records_reason():
    net = Net()
    q = Quantizer(granularity="per_group", group_size=32)
    q.quantize(net)
    rec = {r.name: r for r in q.summary}
    assert rec["a"].scheme == rec["b"].scheme == "int8 dynamic per_group(32)"
    assert rec["head"].status == "quantized" and rec["head"].scheme == "int8 dynamic per_channel"
    assert "per_group(32) does not fit" in rec["head"].reason and "K=100" in rec["head"].reason
    assert net.head.qweight.granularity == "per_channel" and net.a.qweight.group_size == 32


def test_strict_refuses_and_changes_nothing():
    net = Net()
    w = net.head.weight.copy()
    with pytest.raises(errors.ValueError, match="layer 'head'"):
        Quantizer(granularity="per_group", group_size=32, strict=True).quantize(net)
    assert type(net.head) is nn.Linear and type(net.a) is nn.Linear
    np.testing.assert_array_equal(net.head.weight, w)


def test_per_layer_mapping_by_name_glob_type_and_float():
    net = Net()
    y = net(X)
    q = Quantizer(scheme={"a": QuantScheme(activations="none"), "h*": None,
                          nn.Linear: "per_tensor"})
    q.quantize(net)
    assert isinstance(net.a, QuantizedLinear) and net.a.mode == "weight_only"
    assert net.a.qweight.granularity == "per_channel"
    assert net.b.qweight.granularity == "per_tensor" and net.b.mode == "dynamic"
    assert type(net.head) is nn.Linear                       # kept in float
    rec = {r.name: r for r in q.summary}
    assert rec["head"].status == "skipped" and "kept in float" in rec["head"].reason
    np.testing.assert_allclose(net(X), y, rtol=0.1, atol=0.05)


def test_single_scheme_argument_and_legacy_arguments_agree():
    a, b = Net(), Net()
    Quantizer(scheme=QuantScheme(granularity="per_group", group_size=16)).quantize(a)
    Quantizer(granularity="per_group", group_size=16).quantize(b)
    np.testing.assert_array_equal(a(X), b(X))
    assert Quantizer(scheme="weight_only per_tensor").scheme == QuantScheme(granularity="per_tensor",
                                                                            activations="none")


def test_torch_per_layer_schemes_and_fallback_in_place():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10),
                            torch.nn.Linear(10, 4)).eval()
    q = Quantizer(granularity="per_group", group_size=32, scheme=None)
    out = q.quantize(m)                                     # in place, like the nn path
    assert out is m and type(m[0]).__name__ == "QuantizedTorchLinear"
    rec = {r.name: r for r in q.summary}
    assert rec["0"].scheme == "int8 dynamic per_group(32)"
    assert rec["2"].scheme == "int8 dynamic per_channel" and "does not fit" in rec["2"].reason
    m2 = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).eval()
    q2 = Quantizer(scheme={"1": None})
    q2.quantize(m2)
    assert type(m2[0]).__name__ == "QuantizedTorchLinear" and type(m2[1]) is torch.nn.Linear
    assert {r.name: r.status for r in q2.summary}["1"] == "skipped"


def test_int4_scheme_through_quantizer_checkpoint_and_torch(tmp_path):
    """bits=4 runs through the Quantizer (cquant.nn and torch), is named int4, falls back to
    per-channel where an int4 group does not fit, and a checkpoint stores the codes two per byte and
    loads back bit-exactly."""
    import cquant
    from cquant import io, nn
    s = QuantScheme(bits=4, granularity="per_group", group_size=32)
    assert str(s) == "int4 dynamic per_group(32)" and QuantScheme.parse(str(s)) == s
    assert QuantScheme(bits=4, granularity="per_group", group_size=12).fit(48) is not None  # not a multiple of 8
    g = np.random.default_rng(0)
    m = nn.Sequential(nn.Linear(64, 32, rng=g), nn.Linear(32, 16, rng=g), nn.Linear(20, 8, rng=g))
    m.layers = None
    x = g.standard_normal((3, 64)).astype(np.float32)
    q = cquant.Quantizer(scheme={"0": s, "1": "int4 weight_only per_channel"})
    m = q.quantize(nn.Sequential(m[0], m[1]))
    assert [r.scheme for r in q.summary] == ["int4 dynamic per_group(32)", "int4 weight_only per_channel"]
    assert m[0].qweight.bits == 4 and m[1].qweight.bits == 4
    y = m(x)
    p = tmp_path / "m.safetensors"
    cquant.save(m, p)
    with io.open_checkpoint(str(p)) as r:
        assert r.infos["0.weight_q"].dtype == "U8" and tuple(r.infos["0.weight_q"].shape) == (32, 32)
    m2 = nn.Sequential(nn.Linear(64, 32, rng=g), nn.Linear(32, 16, rng=g))
    cquant.load_into(m2, p)
    assert m2[0].qweight.bits == 4
    np.testing.assert_array_equal(m2(x), y)
    # the file layout, independently: low nibble k = 2i, high nibble k = 2i + 1
    codes = np.array([[-7, 7, 0, -1, 3]], np.int8)
    packed = io.pack_int4(codes)
    assert packed.tolist() == [[(9 | 7 << 4), (0 | 15 << 4), 3]]
    np.testing.assert_array_equal(io.unpack_int4(packed, 5), codes)
    torch = pytest.importorskip("torch")
    tm = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    qt = cquant.Quantizer(scheme="int4 dynamic per_group(32)")
    tq = qt.quantize(tm, inplace=False)
    assert all(r.scheme == "int4 dynamic per_group(32)" for r in qt.summary if r.status == "quantized")
    xt = torch.from_numpy(x)
    with torch.no_grad():
        yt = tq(xt)
    pt = tmp_path / "t.safetensors"
    cquant.save(tq, pt)
    tm2 = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    cquant.load_into(tm2, pt)
    with torch.no_grad():
        assert torch.equal(tm2(xt), yt)
