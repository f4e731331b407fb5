"""Static activation quantization (issue 9 item 5): ``mode="static"`` / ``activations="static"``.

Each layer stores one calibrated activation scale, ``max|x| / 127`` over the calibration batches
(measured after smoothing, on the smoothed input), and runs the dynamic kernel with it
(``ops.linear(..., x_scale=s)``). Checked: outputs bit-exact against the numpy oracle with that scale
on every ISA path, the scale against numpy, clamping, every front-end, smoothing, checkpoints /
state_dict / pickle round trips, the torch op under trace and export, errors, and accuracy against
dynamic on a synthetic model."""
from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest

import cquant
from cquant import errors, nn, ops
from cquant.io import KEY_LAYERS, CheckpointError, SafetensorsReader
from cquant.quantization import QuantizedLinear, QuantizedLinearForward, Quantizer
from cquant.scheme import QuantScheme
from cquant.smoothing import Smoothed, smooth

import oracle
from test_oracle import path  # noqa: F401  (the per-ISA fixture)
from test_smoothing import PreNorm

F32 = np.float32


class Two(nn.Module):
    """fc2(fc1(x)): no activation in between, so the expected output is two oracle calls."""

    def __init__(self, k=64, h=96, n=40, seed=0):
        super().__init__()
        g = np.random.default_rng(seed)
        self.fc1 = nn.Linear(k, h, rng=g)
        self.fc2 = nn.Linear(h, n, rng=g)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _batches(k=64, n=3, seed=1, shape=(4, 6)):
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = g.standard_normal(shape + (k,)).astype(F32)
        x[..., 5] *= 8.0  # an outlier channel
        out.append(x * F32(1 + i))
    return out


def _amax_scale(xs):
    """max|x| over all rows of all arrays / 127, in float32 (what a static layer stores)."""
    a = max(float(np.abs(np.asarray(x, F32)).max()) for x in xs)
    return float(F32(a) / F32(127))


def _oracle(x, layer, bias=None, x_scale=None, x_mul=None):
    qw = layer.qweight
    src = np.asarray(x, F32).reshape(-1, qw.shape[1])
    if x_mul is not None:
        src = (src * x_mul).astype(F32)
    y = oracle.linear_dynamic(src, qw.q, qw.scale, qw.granularity, qw.group_size,
                              layer.bias if bias is None else bias, fma_groups=True, x_scale=x_scale)
    return y.reshape(np.shape(x)[:-1] + (qw.shape[0],))


# ---- the scheme ------------------------------------------------------------------------------------

def test_scheme_names_static():
    s = QuantScheme(activations="static")
    assert s.mode == "static" and str(s) == "int8 static per_channel"
    assert QuantScheme.parse("static per_channel") == s
    assert QuantScheme.parse("int8 static per_group(32)") == QuantScheme(granularity="per_group", group_size=32,
                                                                          activations="static")
    assert QuantScheme.from_dict(s.to_dict()) == s and s.to_dict()["mode"] == "static"
    assert QuantScheme.from_args(mode="static") == s
    q = Quantizer(mode="static")
    assert q.scheme == s and q.mode == "static"


# ---- outputs bit-exact vs the oracle, on every ISA path ------------------------------------------

SCHEMES = [("per_channel", None, 8), ("per_group", 32, 8), ("per_tensor", None, 8), ("per_group", 32, 4)]


@pytest.mark.parametrize("gran,group,bits", SCHEMES, ids=[f"{g}{s or ''}-int{b}" for g, s, b in SCHEMES])
def test_static_model_matches_oracle_every_path(path, gran, group, bits):
    model = Two()
    cal = _batches()
    scheme = QuantScheme(bits=bits, granularity=gran, group_size=group, activations="static")
    q = Quantizer(scheme=scheme)
    qm = q.quantize(model, inplace=False, calibration=cal)
    assert isinstance(qm.fc1, QuantizedLinear) and qm.fc1.mode == "static"
    assert [r.scheme for r in q.summary] == [str(scheme)] * 2
    # the scales: max|x| over every calibration row, of the float model's inputs
    s1 = _amax_scale(cal)
    s2 = _amax_scale([model.fc1(x) for x in cal])
    assert q.act_scales == {"fc1": s1, "fc2": s2}
    assert (qm.fc1.act_scale, qm.fc2.act_scale) == (s1, s2)
    if bits == 8:  # the codes are the oracle's
        qo, so = oracle.quantize(model.fc1.weight, gran, group)
        np.testing.assert_array_equal(qm.fc1.qweight.q, qo)
        np.testing.assert_array_equal(qm.fc1.qweight.scale, so)
    rng = np.random.default_rng(9)
    for m in (1, 3, 17, 64):
        x = (rng.standard_normal((m, 64)) * 2.5).astype(F32)  # partly beyond the calibrated range: clamps
        x[0, 5] = 500.0
        h = _oracle(x, qm.fc1, x_scale=s1)
        want = _oracle(h, qm.fc2, x_scale=s2)
        np.testing.assert_array_equal(qm(x), want, err_msg=f"M={m}")
        # and it is not the dynamic result
        assert not np.array_equal(h, _oracle(x, qm.fc1))


def test_clamping_and_nonfinite_rows():
    ident = ops.QuantizedWeight.from_codes(np.eye(8, dtype=np.int8), np.ones(8, F32))
    s = 1 / 127
    layer = QuantizedLinear(ident, None, "static", s)
    x = np.array([[0.5, -0.25, 1.0, -1.0, 3.0, -7.0, 1e30, 0.0]], F32)
    codes = np.clip(np.round(x / F32(s)), -127, 127)
    np.testing.assert_array_equal(layer(x), (codes * F32(s)).astype(F32))
    assert layer(x)[0, 4] == layer(x)[0, 2]   # 3.0 clamps to the code of 1.0
    bad = np.vstack([x, x])
    bad[1, 3] = np.nan
    y = layer(bad)
    assert np.isnan(y[1]).all() and np.isfinite(y[0]).all()


def test_calibrated_scale_is_absmax_over_batches_against_numpy():
    model = Two()
    cal = _batches(n=4, shape=(2, 3, 5))   # 3-D batches: every leading dimension is rows
    cal[2][1, 1, 0, 7] = np.nan            # non-finite values are left out of the statistics
    cal[3][0, 0, 0, 9] = -1234.5           # the maximum, negative
    q = Quantizer(mode="static")
    q.quantize(model, inplace=False, calibration=cal)
    finite = [np.where(np.isfinite(x), x, 0) for x in cal]
    assert q.act_scales["fc1"] == float(F32(1234.5) / F32(127))
    assert q.act_scales["fc1"] == _amax_scale(finite)
    hs = [model.fc1(x) for x in cal]           # the NaN row gives a NaN row: left out too
    assert not np.isfinite(hs[2]).all()
    assert q.act_scales["fc2"] == _amax_scale([np.where(np.isfinite(h), h, 0) for h in hs])
    assert q.act_scales["fc1"] == float(cquant.calibrate(model, cal).static_scale("fc1")[0])


def test_dict_and_tuple_batches_and_budget():
    model = Two()
    cal = _batches()
    qm = Quantizer.quantize_dynamic(copy.deepcopy(model), mode="static", calibration=[(x,) for x in cal])
    assert qm.fc1.act_scale == _amax_scale(cal)
    q = Quantizer(mode="static")
    qb = q.quantize(copy.deepcopy(model), calibration=cal, min_cosine=0.9)
    assert q.budget is not None and qb.fc1.act_scale == _amax_scale(cal)


# ---- every front-end ---------------------------------------------------------------------------------

class DuckLinear:
    def __init__(self, w, b):
        self.weight, self.bias = w, b
        self.out_features, self.in_features = w.shape

    def forward(self, x):
        return (np.asarray(x, F32) @ self.weight.T + self.bias).astype(F32)

    def __call__(self, x):
        return self.forward(x)


class DuckModel:
    def __init__(self, seed=0):
        g = np.random.default_rng(seed)
        self.layers = [DuckLinear((g.standard_normal((48, 64)) * 0.1).astype(F32), g.standard_normal(48).astype(F32)),
                       DuckLinear((g.standard_normal((16, 48)) * 0.1).astype(F32), g.standard_normal(16).astype(F32))]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_duck_typed_front_end():
    model = DuckModel()
    cal = _batches()
    ref = copy.deepcopy(model)
    q = Quantizer(mode="static")
    qm = q.quantize(model, inplace=False, calibration=cal)
    s0, s1 = _amax_scale(cal), _amax_scale([ref.layers[0](x) for x in cal])
    assert q.act_scales == {"layers.0": s0, "layers.1": s1}
    f0, f1 = qm.layers[0].forward, qm.layers[1].forward
    assert isinstance(f0, QuantizedLinearForward) and (f0.act_scale, f1.act_scale) == (s0, s1)
    assert f0.scheme == "int8 static per_channel"
    x = np.random.default_rng(4).standard_normal((7, 64)).astype(F32) * F32(3)
    np.testing.assert_array_equal(qm(x), _oracle(_oracle(x, f0, x_scale=s0), f1, x_scale=s1))
    for clone in (copy.deepcopy(qm), pickle.loads(pickle.dumps(qm))):
        assert clone.layers[0].forward.act_scale == s0
        np.testing.assert_array_equal(clone(x), qm(x))


def test_nn_state_dict_pickle_and_deepcopy():
    model = Two()
    qm = Quantizer.quantize_dynamic(copy.deepcopy(model), mode="static", calibration=_batches())
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(F32)
    y = qm(x)
    sd = qm.state_dict()
    assert sd["fc1.act_scale"].dtype == F32 and sd["fc1.act_scale"].shape == (1,)
    assert float(sd["fc1.act_scale"][0]) == qm.fc1.act_scale
    for clone in (copy.deepcopy(qm), pickle.loads(pickle.dumps(qm))):
        np.testing.assert_array_equal(clone(x), y)
    # load_state_dict into a model quantized with other scales: the stored ones win
    other = Quantizer.quantize_dynamic(copy.deepcopy(model), mode="static", calibration=[x * 3 for x in _batches()])
    assert other.fc1.act_scale != qm.fc1.act_scale
    other.load_state_dict(sd)
    assert other.fc1.act_scale == qm.fc1.act_scale
    np.testing.assert_array_equal(other(x), y)
    bad = dict(sd)
    bad["fc2.act_scale"] = np.array([np.nan], F32)
    with pytest.raises(errors.ValueError, match="act_scale"):
        other.load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "fc2.act_scale"}
    with pytest.raises(errors.ValueError, match="fc2.act_scale"):
        other.load_state_dict(missing)
    np.testing.assert_array_equal(other(x), y)   # nothing was loaded


# ---- smoothing: scales of the smoothed inputs ------------------------------------------------------

def test_smoothing_scales_are_measured_on_smoothed_inputs():
    model = PreNorm()
    cal = [np.random.default_rng(s).standard_normal((4, 8, 64)).astype(F32) for s in range(3)]
    q = Quantizer(mode="static")
    qm = q.quantize(copy.deepcopy(model), calibration=cal, smoothing=0.5)
    assert isinstance(qm.fc2, Smoothed) and isinstance(qm.fc2.linear, QuantizedLinear)
    assert isinstance(qm.fc1, QuantizedLinear)           # its 1/s went into the LayerNorm
    # the same smoothing, deterministic, on a float copy: the inputs the layers see after it
    sm = copy.deepcopy(model)
    smooth(sm, cal, alpha=0.5)
    np.testing.assert_array_equal(sm.fc2.inv_scale, qm.fc2.inv_scale)
    ln = [sm.norm(x) for x in cal]
    wrapped_in = [sm.act(sm.fc1(a)) for a in ln]        # what the wrapper receives
    smoothed_in = [(h * sm.fc2.inv_scale).astype(F32) for h in wrapped_in]
    assert q.act_scales["fc1"] == _amax_scale(ln)
    assert q.act_scales["fc2.linear"] == _amax_scale(smoothed_in)
    assert q.act_scales["fc2.linear"] != _amax_scale(wrapped_in)   # not the unsmoothed input's
    assert qm.fc2.linear.act_scale == q.act_scales["fc2.linear"]
    # the wrapper hands 1/s to the kernel; the codes are those of x * (1/s) with the stored scale
    h = wrapped_in[0] * F32(2)
    np.testing.assert_array_equal(qm.fc2(h), _oracle(h, qm.fc2.linear, x_mul=sm.fc2.inv_scale,
                                                     x_scale=q.act_scales["fc2.linear"]))
    # and the whole model stays close to float
    x = np.random.default_rng(11).standard_normal((4, 8, 64)).astype(F32)
    ref = model(x)
    assert np.linalg.norm(qm(x) - ref) / np.linalg.norm(ref) < 0.05


# ---- fallbacks and errors ------------------------------------------------------------------------------

class Branchy(nn.Module):
    """``side`` is a Linear the forward never calls: no calibration statistics."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32, rng=0)
        self.side = nn.Linear(64, 8, rng=1)

    def forward(self, x):
        return self.fc1(x)


def test_layers_calibration_never_reached_fall_back_or_raise_with_strict():
    q = Quantizer(mode="static")
    qm = q.quantize(Branchy(), calibration=_batches())
    rec = {r.name: r for r in q.summary}
    assert rec["fc1"].scheme == "int8 static per_channel" and rec["fc1"].reason == ""
    assert rec["side"].scheme == "int8 dynamic per_channel"
    assert "never reached" in rec["side"].reason and "dynamic activations instead" in rec["side"].reason
    assert qm.side.mode == "dynamic" and qm.side.act_scale is None
    with pytest.raises(errors.ValueError, match=r"1 selected layer\(s\): side"):
        Quantizer(mode="static", strict=True).quantize(Branchy(), calibration=_batches())
    m = Branchy()
    with pytest.raises(errors.ValueError):
        Quantizer(mode="static", strict=True).quantize(m, calibration=_batches())
    assert type(m.fc1) is nn.Linear   # untouched


def test_static_without_calibration_names_the_argument():
    for call in (lambda: Quantizer(mode="static").quantize(Two()),
                 lambda: Quantizer.quantize_dynamic(Two(), mode="static"),
                 lambda: Quantizer(scheme={"fc2": "static per_channel"}).quantize(Two())):
        with pytest.raises(errors.ValueError, match="calibration"):
            call()
    # a per-layer static rule with calibration: only that layer is static
    q = Quantizer(scheme={"fc2": "static per_channel"})
    qm = q.quantize(Two(), calibration=_batches())
    assert (qm.fc1.mode, qm.fc2.mode) == ("dynamic", "static") and set(q.act_scales) >= {"fc2"}
    # a Quantizer reused without calibration forgets the scales of the last model
    q2 = Quantizer(mode="static")
    q2.quantize(Two(), calibration=_batches())
    with pytest.raises(errors.ValueError, match="calibration"):
        q2.quantize(Two())


@pytest.mark.parametrize("bad", [None, 0.0, -1.0, float("nan"), float("inf"), 1e39, [1.0, 2.0], "0.1"])
def test_layer_refuses_bad_scales(bad):
    qw = ops.quantize_weight(np.ones((4, 8), F32))
    with pytest.raises((errors.ValueError, errors.TypeError)):
        QuantizedLinear(qw, None, "static", bad)
    with pytest.raises((errors.ValueError, errors.TypeError)):
        QuantizedLinearForward(qw, None, "static", bad)


def test_act_scale_only_with_static_and_qat_refuses_static():
    qw = ops.quantize_weight(np.ones((4, 8), F32))
    with pytest.raises(errors.ValueError, match="only used with mode='static'"):
        QuantizedLinear(qw, None, "dynamic", 0.5)
    assert QuantizedLinearForward(qw, None, "static", np.float64(0.1)).act_scale == float(F32(0.1))


# ---- checkpoints -------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_nn_duck_and_bert(tmp_path):
    from cquant.bert import BertConfig, BertModel
    model = Two()
    qm = Quantizer.quantize_dynamic(copy.deepcopy(model), mode="static", calibration=_batches())
    x = np.random.default_rng(3).standard_normal((6, 64)).astype(F32) * F32(2)
    p = tmp_path / "two.safetensors"
    cquant.save(qm, p)
    with SafetensorsReader(p) as r:
        layers = json.loads(r.metadata[KEY_LAYERS])
        assert layers["fc1"]["mode"] == "static"
        assert r.infos["fc1.act_scale"].dtype == "F32" and tuple(r.infos["fc1.act_scale"].shape) == (1,)
        assert float(r.tensor("fc1.act_scale")[0]) == qm.fc1.act_scale
    ck = cquant.load(p)
    assert ck.layers["fc2"].act_scale == qm.fc2.act_scale
    fresh = cquant.load_into(Two(seed=5), p)
    assert isinstance(fresh.fc1, QuantizedLinear) and fresh.fc1.act_scale == qm.fc1.act_scale
    np.testing.assert_array_equal(fresh(x), qm(x))

    duck = Quantizer.quantize_dynamic(DuckModel(), mode="static", calibration=_batches())
    cquant.save(duck, tmp_path / "duck.safetensors")
    d2 = cquant.load_into(DuckModel(seed=3), tmp_path / "duck.safetensors")
    np.testing.assert_array_equal(d2(x), duck(x))

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    bert = BertModel(cfg)
    rng = np.random.default_rng(0)
    ids = [(rng.integers(0, 50, (2, 9)), np.ones((2, 9), np.int64)) for _ in range(2)]
    Quantizer.quantize_dynamic(bert, mode="static", calibration=ids)
    cquant.save(bert, tmp_path / "bert.safetensors")
    b2 = cquant.load(tmp_path / "bert.safetensors")
    assert isinstance(b2, BertModel)
    np.testing.assert_array_equal(b2(*ids[0]), bert(*ids[0]))


@pytest.mark.parametrize("case", ["nan", "zero", "negative", "inf", "f64", "shape", "missing", "not_static"])
def test_checkpoint_with_lying_act_scale_is_refused(tmp_path, case):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")
    qm = Quantizer.quantize_dynamic(Two(), mode="static", calibration=_batches())
    p = tmp_path / "ok.safetensors"
    cquant.save(qm, p)
    with SafetensorsReader(p) as r:
        meta = dict(r.metadata)
    tensors = st.load_file(str(p))
    layers = json.loads(meta[KEY_LAYERS])
    if case in ("nan", "zero", "negative", "inf"):
        tensors["fc2.act_scale"] = np.array([{"nan": np.nan, "zero": 0.0, "negative": -0.5, "inf": np.inf}[case]], F32)
    elif case == "f64":
        tensors["fc2.act_scale"] = np.array([0.1], np.float64)
    elif case == "shape":
        tensors["fc2.act_scale"] = np.array([0.1, 0.2], F32)
    elif case == "missing":
        del tensors["fc2.act_scale"]
    else:  # a dynamic layer with a scale: the file contradicts itself
        layers["fc2"]["mode"] = "dynamic"
    meta[KEY_LAYERS] = json.dumps(layers)
    bad = tmp_path / "bad.safetensors"
    st.save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="act_scale"):
        cquant.load(bad)
    m = Two()
    with pytest.raises(CheckpointError):
        cquant.load_into(m, bad)
    assert type(m.fc2) is nn.Linear


def test_cli_refuses_static(tmp_path, capsys):
    from cquant import cli
    rc = cli.main(["quantize", str(tmp_path / "in.safetensors"), "-o", str(tmp_path / "o.safetensors"),
                   "--mode", "static"])
    err = capsys.readouterr().err
    assert rc == 2 and "calibration" in err and "Traceback" not in err


# ---- accuracy against dynamic ------------------------------------------------------------------------

def test_static_accuracy_against_dynamic_on_a_synthetic_model():
    """Rows of very different sizes (as activations have): one scale for all of them costs accuracy
    against per-row scales, but stays usable."""
    model = Two(k=128, h=128, n=64, seed=3)
    rng = np.random.default_rng(7)

    def data(n):
        x = rng.standard_normal((n, 128)).astype(F32)
        return x * (10.0 ** rng.uniform(-0.5, 0.5, (n, 1))).astype(F32)

    cal = [data(64) for _ in range(4)]
    test = data(256)
    ref = model(test).astype(np.float64)
    errs = {}
    for mode in ("dynamic", "static"):
        kw = dict(calibration=cal) if mode == "static" else {}
        qm = Quantizer.quantize_dynamic(copy.deepcopy(model), mode=mode, **kw)
        y = qm(test)
        assert np.isfinite(y).all()
        errs[mode] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    assert errs["dynamic"] < errs["static"] < 0.05, errs


# ---- torch -------------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch", reason="torch is not installed (optional)")


def _torch_model(torch, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 40)).eval()


def test_torch_front_end_state_dict_pickle_and_load_into(tmp_path):
    torch = _torch()
    from cquant.adapters.torch import QuantizedTorchLinear, quantize_module
    model = _torch_model(torch)
    cal = _batches()
    q = Quantizer(mode="static")
    qm = q.quantize(copy.deepcopy(model), calibration=cal)
    with torch.no_grad():
        h_float = [model[0](torch.from_numpy(x)).numpy() for x in cal]
    s0, s1 = _amax_scale(cal), _amax_scale(h_float)
    assert q.act_scales == {"0": s0, "1": s1}
    assert isinstance(qm[0], QuantizedTorchLinear) and qm[0].mode == "static"
    assert [r.scheme for r in q.summary] == ["int8 static per_channel"] * 2
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 7, 64)).astype(F32) * F32(2))
    with torch.no_grad():
        y = qm(x)
    want = _oracle(_oracle(x.numpy(), qm[0].qforward, x_scale=s0), qm[1].qforward, x_scale=s1)
    np.testing.assert_array_equal(y.numpy(), want)
    # state_dict: a float32 buffer, restored bit-exactly into a model quantized with other scales
    sd = qm.state_dict()
    assert sd["0.act_scale"].dtype == torch.float32 and tuple(sd["0.act_scale"].shape) == (1,)
    other = Quantizer.quantize_dynamic(copy.deepcopy(model), mode="static", calibration=[c * 4 for c in cal])
    assert other[0].qforward.act_scale != s0
    other.load_state_dict(sd)
    assert other[0].qforward.act_scale == s0
    with torch.no_grad():
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    bad = dict(sd)
    bad["1.act_scale"] = torch.tensor([-1.0])
    with pytest.raises(RuntimeError, match="act_scale"):
        other.load_state_dict(bad)
    bad["1.act_scale"] = torch.tensor([0.1], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="act_scale"):
        other.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="act_scale"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "1.act_scale"})
    # pickle / deepcopy
    for clone in (copy.deepcopy(qm), pickle.loads(pickle.dumps(qm))):
        with torch.no_grad():
            torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    # cquant.save -> load_into a float torch model, and into a cquant.nn-free checkpoint view
    cquant.save(qm, tmp_path / "t.safetensors")
    m2 = cquant.load_into(_torch_model(torch, seed=1), tmp_path / "t.safetensors")
    assert m2[1].qforward.act_scale == s1
    with torch.no_grad():
        torch.testing.assert_close(m2(x), y, rtol=0, atol=0)
    with pytest.raises(errors.ValueError, match="act_scales"):
        quantize_module(copy.deepcopy(model), mode="static")
    lone = quantize_module(copy.deepcopy(model), mode="static", act_scales={"0": 0.05})
    assert lone[0].mode == "static" and lone[1].mode == "dynamic"


def test_torch_smoothing_wrapper_scale_and_mha_fallback():
    torch = _torch()
    from cquant.adapters.torch_smoothing import SmoothedTorchLinear
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 40)).eval()
    cal = _batches()
    q = Quantizer(mode="static")
    qm = q.quantize(copy.deepcopy(model), calibration=cal, smoothing=0.5)
    assert isinstance(qm[0], SmoothedTorchLinear)
    inv = qm[0].inv_scale.numpy()
    assert q.act_scales["0.linear"] == _amax_scale([(x * inv).astype(F32) for x in cal])
    x = torch.from_numpy(cal[0][:2])
    with torch.no_grad():
        got = qm[0](x).numpy()
    np.testing.assert_array_equal(got, _oracle(x.numpy(), qm[0].linear.qforward, x_mul=inv,
                                               x_scale=q.act_scales["0.linear"]))
    # nn.MultiheadAttention: its projections are not modules the calibration can watch: dynamic, said so
    enc = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    q2 = Quantizer(mode="static")
    q2.quantize(enc, calibration=[np.random.default_rng(1).standard_normal((2, 5, 32)).astype(F32)])
    rec = {r.name: r for r in q2.summary}
    assert rec["linear1"].scheme == "int8 static per_channel"
    qp = rec["self_attn.q_proj"]
    assert qp.scheme == "int8 dynamic per_channel" and "never reached" in qp.reason
    enc2 = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    with pytest.raises(errors.ValueError, match=r"self_attn\.q_proj, self_attn\.k_proj"):
        Quantizer(mode="static", strict=True).quantize(
            enc2, calibration=[np.random.default_rng(1).standard_normal((2, 5, 32)).astype(F32)])
    assert isinstance(enc2.linear1, torch.nn.Linear)   # untouched


def test_torch_trace_and_export_use_the_scale():
    torch = _torch()
    qm = Quantizer.quantize_dynamic(_torch_model(torch), mode="static", calibration=_batches())
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((4, 64)).astype(F32))
    with torch.no_grad():
        tr = torch.jit.trace(qm, x)
        assert "cquant::linear" in str(tr.inlined_graph)
        for t in (x, 3 * x, x[:1]):
            torch.testing.assert_close(tr(t), qm(t), rtol=0, atol=0)
    ep = torch.export.export(qm, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(5 * x), qm(5 * x), rtol=0, atol=0)
    # the op itself: "static" needs a scale
    lay = qm[0]
    qw = lay.qweight
    with pytest.raises(errors.ValueError, match="x_scale"):
        torch.ops.cquant.linear(x, lay.packed, lay.weight_scale, lay.bias, int(qw.shape[0]), int(qw.shape[1]),
                                qw.granularity, 0, "static")


def test_torch_save_pretrained_from_pretrained_gpt2(tmp_path):
    torch = _torch()
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=120, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    cal = [{"input_ids": torch.randint(0, 120, (2, 7), generator=gen)} for _ in range(2)]
    q = Quantizer(mode="static")
    q.quantize(g, calibration=cal)
    assert g.transformer.h[0].attn.c_attn.mode == "static"   # Conv1D layers are calibrated too
    ids = torch.randint(0, 120, (2, 9), generator=gen)
    with torch.no_grad():
        ref = g(ids).logits
    cquant.save_pretrained(g, tmp_path, max_shard_size="40KB")
    with open(tmp_path / "cquant_config.json") as f:
        assert json.load(f)["layers"]["transformer.h.0.attn.c_attn"]["mode"] == "static"
    m = cquant.from_pretrained(tmp_path)
    assert m.transformer.h[1].mlp.c_fc.qforward.act_scale == g.transformer.h[1].mlp.c_fc.qforward.act_scale
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=0)


def test_static_layer_without_finite_calibration_input_falls_back_to_dynamic():
    """A layer reached only by NaN rows (or by batches of zero rows) has no statistics: dynamic
    activations with the reason recorded, and strict=True refuses, as for a layer never reached
    (it took the scale 1.0 silently: review 2026-11-30)."""
    from cquant import nn
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 16)) * 0.05).astype(np.float32)
    nan_rows = np.where(np.eye(8, 16, dtype=bool), np.nan, x).astype(np.float32)  # layer 2 sees NaN only

    def fresh():
        return nn.Sequential(nn.Linear(16, 32, rng=1), nn.GELU(), nn.Linear(32, 8, rng=2))
    zeros = np.zeros((8, 16), np.float32)  # all-zero inputs: the scale was an arbitrary 1.0
    for batches, blind in (([nan_rows], ["2"]), ([x[:0]], ["0", "2"]), ([zeros], ["0"])):
        with pytest.raises(cquant.errors.ValueError, match="no finite non-zero input"):
            cquant.Quantizer(mode="static", strict=True).quantize(fresh(), calibration=batches)
        q = cquant.Quantizer(mode="static")
        m = q.quantize(fresh(), calibration=batches)
        why = {r.name: r.reason for r in q.summary}
        for name in blind:
            assert "held no finite non-zero value" in why[name] and "dynamic activations instead" in why[name]
        ref = fresh()(x)
        assert np.linalg.norm(m(x) - ref) / np.linalg.norm(ref) < 0.05
