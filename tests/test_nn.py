"""Tests of the numpy module framework cquant.nn (no quantization involved)."""
from __future__ import annotations

import copy
import math
import pickle
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cquant import errors, nn

EPS32 = float(np.finfo(np.float32).eps)


def _erf_ref(x: np.ndarray) -> np.ndarray:
    return np.array([math.erf(v) for v in np.asarray(x, np.float64).ravel()]).reshape(np.shape(x))


class Net(nn.Module):
    def __init__(self, rng=0):
        super().__init__()
        g = np.random.default_rng(rng)
        self.emb = nn.Embedding(10, 8, rng=g)
        self.body = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16, rng=g), nn.GELU(), nn.Dropout(0.1),
                                  nn.Linear(16, 8, rng=g))
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3, rng=g), "b": nn.Linear(8, 2, bias=False, rng=g)})
        self.extra = nn.ModuleList([nn.ReLU(), nn.Identity()])

    def forward(self, ids):
        h = self.body(self.emb(ids))
        for m in self.extra:
            h = m(h)
        return {k: m(h) for k, m in self.heads.items()}


# --------------------------------------------------------------------------------------------------
# functional
# --------------------------------------------------------------------------------------------------

def test_erf_accuracy_dense_grid():
    x = np.linspace(-9, 9, 400_001).astype(np.float32)
    err = np.abs(nn.erf(x).astype(np.float64) - _erf_ref(x))
    assert err.max() < 1e-6
    tiny = np.float32(10.0) ** np.linspace(-30, 0, 2001).astype(np.float32)  # relative accuracy near 0
    ref = _erf_ref(tiny)
    assert np.max(np.abs(nn.erf(tiny) - ref) / ref) < 1e-6
    assert nn.erf(x).dtype == np.float32


@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=6),
                  elements=st.floats(-50, 50, width=32)))
def test_erf_matches_math_erf(x):
    assert np.abs(nn.erf(x).astype(np.float64) - _erf_ref(x)).max(initial=0) < 1e-6
    assert nn.erf(x).shape == x.shape


def test_erf_special_values_and_odd():
    y = nn.erf(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32))
    assert np.isnan(y[0]) and y[1] == 1 and y[2] == -1 and y[3] == 0
    x = np.linspace(0, 5, 1001, dtype=np.float32)
    np.testing.assert_array_equal(nn.erf(-x), -nn.erf(x))


def test_gelu_exact_and_tanh():
    x = np.linspace(-8, 8, 10_001).astype(np.float32)
    ref = 0.5 * x.astype(np.float64) * (1 + _erf_ref(x / np.sqrt(2)))
    # erf error < 1e-6 times 0.5|x|, plus float32 rounding of the products
    budget = 0.5 * np.abs(x) * 1e-6 + 4 * EPS32 * np.abs(ref) + 1e-30
    assert np.all(np.abs(nn.gelu(x) - ref) <= budget)
    x64 = x.astype(np.float64)
    ref_t = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
    np.testing.assert_allclose(nn.GELU("tanh")(x), ref_t, rtol=1e-5, atol=1e-6)
    assert nn.GELU()(x).dtype == np.float32
    with pytest.raises(ValueError):
        nn.GELU("fast")


def test_relu_softmax_layernorm_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32) * 4 + 1
    np.testing.assert_array_equal(nn.ReLU()(x), np.where(x > 0, x, 0))
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(nn.Softmax(-1)(x), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(nn.softmax(np.array([1000.0, 1000.0], np.float32)), [0.5, 0.5])

    ln = nn.LayerNorm(7, eps=1e-5)
    ln.weight = rng.standard_normal(7).astype(np.float32)
    ln.bias = rng.standard_normal(7).astype(np.float32)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(var + 1e-5) * ln.weight + ln.bias
    y = ln(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(errors.ShapeError):
        ln(np.zeros((2, 6), np.float32))


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------

def test_linear_forward_matches_numpy_and_init_bounds():
    lin = nn.Linear(33, 17, rng=3)
    assert lin.weight.shape == (17, 33) and lin.weight.dtype == np.float32
    assert lin.bias.shape == (17,) and lin.bias.dtype == np.float32
    bound = 1 / math.sqrt(33)
    assert np.abs(lin.weight).max() <= bound and np.abs(lin.bias).max() <= bound
    x = np.random.default_rng(0).standard_normal((2, 4, 33))
    y = lin(x)
    assert y.shape == (2, 4, 17) and y.dtype == np.float32
    ref = x @ lin.weight.astype(np.float64).T + lin.bias
    # float32 accumulation over K terms: error <= K * eps * sum|x||w| (a loose, standard bound)
    budget = 33 * EPS32 * (np.abs(x) @ np.abs(lin.weight.astype(np.float64)).T + np.abs(lin.bias))
    assert np.all(np.abs(y - ref) <= budget)
    nb = nn.Linear(4, 2, bias=False, rng=0)
    assert nb.bias is None
    np.testing.assert_allclose(nb(np.ones((1, 4), np.float32)), nb.weight.sum(1)[None], rtol=1e-6)
    # same seed -> same weights
    np.testing.assert_array_equal(nn.Linear(33, 17, rng=3).weight, lin.weight)


def test_linear_errors():
    lin = nn.Linear(4, 3, rng=0)
    with pytest.raises(errors.ShapeError):
        lin(np.zeros((2, 5), np.float32))
    with pytest.raises(errors.TypeError):
        lin(np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError):
        nn.Linear(0, 3)
    with pytest.raises(TypeError):
        nn.Linear(2, 3, rng="seed")


def test_embedding():
    emb = nn.Embedding(10, 4, padding_idx=0, rng=0)
    ids = np.array([[0, 3], [9, 3]])
    y = emb(ids)
    assert y.shape == (2, 2, 4)
    np.testing.assert_array_equal(y[0, 1], emb.weight[3])
    assert not y[0, 0].any()
    with pytest.raises(errors.ValueError):
        emb(np.array([10]))
    with pytest.raises(errors.TypeError):
        emb(np.array([1.0]))


def test_dropout_identity_and_eval_train():
    net = Net()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert nn.Dropout(0.5)(x) is x
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    with pytest.raises(ValueError):
        nn.Dropout(1.5)


# --------------------------------------------------------------------------------------------------
# Module machinery
# --------------------------------------------------------------------------------------------------

def test_registration_and_names():
    net = Net()
    names = [n for n, _ in net.named_modules()]
    assert names == ["", "emb", "body", "body.0", "body.1", "body.2", "body.3", "body.4", "heads",
                     "heads.a", "heads.b", "extra", "extra.0", "extra.1"]
    assert [n for n, _ in net.named_children()] == ["emb", "body", "heads", "extra"]
    assert list(net.children())[0] is net.emb
    pnames = [n for n, _ in net.named_parameters()]
    assert pnames == ["emb.weight", "body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias",
                      "body.4.weight", "body.4.bias", "heads.a.weight", "heads.a.bias", "heads.b.weight"]
    assert net.num_parameters() == sum(p.size for p in net.parameters())
    # re-assigning a name moves it between registries
    net.body = np.zeros(3, np.float32)
    assert "body" not in dict(net.named_children()) and "body" in dict(net.named_parameters())
    with pytest.raises(errors.TypeError, match="parameter 'body'"):  # as torch: the slot keeps its kind
        net.body = "plain"
    assert "body" in dict(net.named_parameters())
    del net.body                                      # a plain attribute after deleting the parameter
    net.body = "plain"
    assert net.body == "plain" and "body" not in dict(net.named_parameters())
    del net.emb
    assert "emb" not in dict(net.named_children())
    with pytest.raises(AttributeError):
        net.nonexistent  # noqa: B018


def test_assign_before_init_is_clear():
    class Bad(nn.Module):
        def __init__(self):
            self.x = 1

    with pytest.raises(AttributeError, match="Module.__init__"):
        Bad()


def test_tied_parameters_dedup_and_state_dict_names():
    a, b = nn.Linear(4, 4, rng=0), nn.Linear(4, 4, rng=1)
    b.weight = a.weight
    seq = nn.Sequential(a, b)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    assert len(list(seq.named_parameters(remove_duplicate=False))) == 4
    sd = seq.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "1.weight", "1.bias"] and sd["0.weight"] is sd["1.weight"]
    # loading keeps the tie (values are copied into the existing arrays)
    new = {k: v + 1 for k, v in sd.items()}
    seq.load_state_dict(new)
    assert seq[0].weight is seq[1].weight
    np.testing.assert_array_equal(seq[1].weight, new["1.weight"])


def test_state_dict_roundtrip():
    src, dst = Net(rng=0), Net(rng=1)
    ids = np.array([[1, 2, 3], [4, 5, 9]])
    assert not np.array_equal(src(ids)["a"], dst(ids)["a"])
    res = dst.load_state_dict(src.state_dict())
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k in ("a", "b"):
        np.testing.assert_array_equal(src(ids)[k], dst(ids)[k])
    # copies, not aliases
    assert dst.body[1].weight is not src.body[1].weight


def test_load_state_dict_errors_change_nothing():
    net = Net(rng=0)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    good = {k: v + 1 for k, v in Net(rng=1).state_dict().items()}

    missing = dict(good)
    del missing["body.1.bias"]
    with pytest.raises(nn.StateDictError, match="missing keys: body.1.bias") as ei:
        net.load_state_dict(missing)
    assert ei.value.missing == ["body.1.bias"]

    unexpected = dict(good, **{"body.9.weight": np.zeros(2)})
    with pytest.raises(nn.StateDictError, match="unexpected keys: body.9.weight"):
        net.load_state_dict(unexpected)

    wrong = dict(good, **{"heads.a.weight": np.zeros((4, 8))})
    with pytest.raises(nn.StateDictError, match=r"heads.a.weight \(model \(3, 8\), state_dict \(4, 8\)\)"):
        net.load_state_dict(wrong, strict=False)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, errors.QuantizationError)

    for k, v in net.state_dict().items():  # nothing was loaded by any failed call
        np.testing.assert_array_equal(v, before[k])

    res = net.load_state_dict(dict(missing, extra=np.zeros(1)), strict=False)
    assert res.missing_keys == ["body.1.bias"] and res.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(net.body[1].weight, good["body.1.weight"])
    np.testing.assert_array_equal(net.body[1].bias, before["body.1.bias"])


def test_load_state_dict_casts_to_param_dtype():
    lin = nn.Linear(3, 2, rng=0)
    lin.load_state_dict({"weight": np.ones((2, 3), np.float64), "bias": np.zeros(2, np.float64)})
    assert lin.weight.dtype == np.float32 and lin.weight.sum() == 6


def test_apply_and_repr():
    net = Net()
    seen = []
    net.apply(lambda m: seen.append(type(m).__name__))
    assert seen[-1] == "Net" and seen.count("Linear") == 4
    r = repr(net)
    assert "(body): Sequential(" in r and "Linear(in_features=8, out_features=16, bias=True)" in r


def test_containers():
    ml = nn.ModuleList([nn.ReLU()])
    ml.append(nn.Identity())
    ml.insert(0, nn.Tanh())
    assert [type(m).__name__ for m in ml] == ["Tanh", "ReLU", "Identity"]
    assert [n for n, _ in ml.named_children()] == ["0", "1", "2"]
    del ml[0]
    assert [n for n, _ in ml.named_children()] == ["0", "1"] and isinstance(ml[0], nn.ReLU)
    assert isinstance(ml[-1], nn.Identity) and len(ml[0:1]) == 1
    with pytest.raises(IndexError):
        ml[5]
    seq = nn.Sequential(OrderedDict(first=nn.Linear(2, 3, rng=0), act=nn.ReLU()))
    assert [n for n, _ in seq.named_children()] == ["first", "act"] and isinstance(seq[0], nn.Linear)
    md = nn.ModuleDict({"x": nn.ReLU()})
    assert "x" in md and list(md) == ["x"] and len(md) == 1
    with pytest.raises(TypeError):
        ml.append("not a module")


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_pickle_and_deepcopy(clone):
    net = Net()
    ids = np.array([[1, 2], [3, 4]])
    other = clone(net)
    for k in ("a", "b"):
        np.testing.assert_array_equal(other(ids)[k], net(ids)[k])
    assert other.body[1].weight is not net.body[1].weight


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 5), st.integers(0, 2**31))
def test_linear_matches_numpy_any_shape(k, n, m, seed):
    lin = nn.Linear(k, n, rng=seed)
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    w64 = lin.weight.astype(np.float64)
    ref = x.astype(np.float64) @ w64.T + lin.bias
    budget = (k + 1) * EPS32 * (np.abs(x) @ np.abs(w64).T + np.abs(lin.bias))
    assert np.all(np.abs(lin(x) - ref) <= budget)


# ---- found by a new-user review (2026-11-30) ------------------------------------------------------

def test_load_state_dict_refuses_values_it_cannot_cast_before_loading_anything():
    m = nn.Sequential(nn.Linear(3, 2, rng=0), nn.Linear(2, 2, rng=1))
    before = {k: v.copy() for k, v in m.state_dict().items()}
    sd = {k: v + 1 for k, v in before.items()}
    sd["1.bias"] = np.array(["a", "b"])
    with pytest.raises(nn.StateDictError, match=r"1\.bias.*nothing loaded"):
        m.load_state_dict(sd)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    sd["1.bias"] = np.ones(2, np.complex64)
    with pytest.raises(nn.StateDictError, match="complex"):
        m.load_state_dict(sd)
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v).to(torch.bfloat16).requires_grad_(True) for k, v in before.items()}
    m.load_state_dict(sd)                                             # bf16 / grad tensors: read, widened
    np.testing.assert_allclose(m.state_dict()["0.weight"], before["0.weight"], rtol=1e-2)


def test_read_only_tied_parameters_stay_tied_through_load_state_dict():
    w = np.frombuffer(np.arange(12, dtype=np.float32).tobytes(), np.float32).reshape(4, 3)  # read-only

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 3, rng=0)
            self.head = nn.Linear(3, 4, bias=False, rng=0)
            self.emb.weight = w
            self.head.weight = w
    m = Tied()
    m.load_state_dict({"emb.weight": np.full((4, 3), 7, np.float32)}, strict=False)   # stored once
    assert m.emb.weight is m.head.weight and (m.head.weight == 7).all()


def test_registration_names_and_kinds_as_torch():
    lin = nn.Linear(3, 2, rng=0)
    with pytest.raises(errors.TypeError, match="parameter 'bias'"):
        lin.bias = 0.5
    with pytest.raises(errors.TypeError, match="parameter 'weight'"):
        lin.weight = nn.ReLU()
    assert set(lin.state_dict()) == {"weight", "bias"}
    m = nn.Module()
    for bad in ("a.b", "", "forward", "training", "_parameters"):
        with pytest.raises(errors.ValueError):
            m.register_parameter(bad, np.zeros(1, np.float32))
    with pytest.raises(errors.TypeError, match="str"):
        m.register_parameter(3, np.zeros(1, np.float32))
    with pytest.raises(errors.ValueError):
        m.add_module("training", nn.ReLU())
    md = nn.ModuleDict()
    with pytest.raises(errors.TypeError, match="str"):
        md[1] = nn.ReLU()


def test_softmax_gelu_layernorm_edge_inputs():
    assert nn.Softmax(-1)(np.zeros((3, 0), np.float32)).shape == (3, 0)
    with pytest.raises(errors.ValueError, match="axis"):
        nn.softmax(np.zeros((2, 2), np.float32), axis=5)
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(nn.GELU()(np.float32(1.5)), torch.nn.functional.gelu(torch.tensor(1.5)).item(),
                               rtol=1e-6)
    with pytest.raises(errors.ValueError, match="eps"):
        nn.LayerNorm((1, 3), eps=-1)
    with pytest.raises(errors.ValueError, match="normalized_shape"):
        nn.LayerNorm(())
    ln = nn.LayerNorm((2, 3))
    x = np.array([[[1e20, -1e20, 1e20], [-1e20, 1e20, -1e20]]], np.float32)
    want = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (2, 3)).numpy()
    np.testing.assert_allclose(ln(x), want, atol=1e-5)               # the C pass, not float32 numpy sums


def test_constructor_arguments_are_checked_as_torch_does():
    with pytest.raises(errors.TypeError, match="in_features must be an integer"):
        nn.Linear(2.7, 3)
    with pytest.raises(errors.TypeError, match="out_features"):
        nn.Linear(2, "3")
    with pytest.raises(errors.ValueError, match=">= 1"):
        nn.Linear(0, 3)
    assert nn.Linear(np.int64(4), 3, rng=0).weight.shape == (3, 4)
    with pytest.raises(errors.TypeError, match="padding_idx must be an integer"):
        nn.Embedding(5, 2, padding_idx=1.5)
    with pytest.raises(errors.ValueError, match="padding_idx must be in"):
        nn.Embedding(5, 2, padding_idx=5)
    e = nn.Embedding(5, 2, padding_idx=-1, rng=0)  # torch: counts from the end
    assert e.padding_idx == 4 and not e.weight[4].any() and e.weight[0].any()
    assert nn.Linear(2, 3).training is False  # an inference library: modules start in eval mode


def test_a_module_cannot_contain_itself():
    a, b = nn.Sequential(nn.ReLU()), nn.Sequential(nn.ReLU())
    a.add_module("child", b)
    with pytest.raises(errors.ValueError, match="cannot contain itself"):
        b.loop = a
    with pytest.raises(errors.ValueError, match="cannot contain itself"):
        a.add_module("me", a)
    assert "loop" not in b._modules and "me" not in a._modules
    assert list(a.state_dict()) == []


def test_refused_insert_leaves_the_list_as_it_was():
    ml = nn.ModuleList([nn.ReLU(), nn.ReLU()])
    with pytest.raises(errors.ValueError, match="cannot contain itself"):
        ml.insert(0, ml)
    assert len(ml) == 2 and all(isinstance(m, nn.ReLU) for m in ml)
