"""Tests of cquant.quantization: Quantizer on cquant.nn models and duck-typed object trees."""
from __future__ import annotations

import copy
import gc
import logging
import pickle
import types
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cquant import errors, nn, ops
from cquant.quantization import (
    LayerRecord, QuantizedLinear, QuantizedLinearForward, Quantizer, format_report, model_nbytes, report,
)

EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------------------
# Error budgets, derived from the quantization step (no magic tolerances)
# --------------------------------------------------------------------------------------------------

def _full_scale(qw: ops.QuantizedWeight) -> np.ndarray:
    """The (N, K) scale that applies to each weight element."""
    n, k = qw.shape
    if qw.granularity == "per_tensor":
        return np.full((n, k), qw.scale[0], np.float64)
    if qw.granularity == "per_channel":
        return np.repeat(qw.scale.astype(np.float64)[:, None], k, axis=1)
    return np.repeat(qw.scale.astype(np.float64), qw.group_size, axis=1)


def _accumulation_slack(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float32 dot products over K terms (any summation order): |error| <= K * eps * sum_k |x_k w_k|."""
    k = x.shape[-1]
    return (k + 2) * EPS32 * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)


def weight_only_budget(x: np.ndarray, w: np.ndarray, qw: ops.QuantizedWeight) -> np.ndarray:
    """|y_q - y| <= sum_k |x_k| * scale(n, k) / 2  (rounding moves each weight by <= half a step)."""
    half_step = _full_scale(qw) / 2
    return np.abs(x.astype(np.float64)) @ half_step.T + _accumulation_slack(x, np.abs(w) + half_step)


def dynamic_budget(x: np.ndarray, w: np.ndarray, qw: ops.QuantizedWeight) -> np.ndarray:
    """x' w' - x w = (x' - x) w' + x (w' - w), with |x' - x| <= s_x / 2, s_x = max|x_row| / 127."""
    x64 = x.astype(np.float64)
    wq = ops.dequantize(qw).astype(np.float64)
    sx = np.abs(x64).max(axis=-1, keepdims=True) / 127.0
    return (sx / 2) * np.abs(wq).sum(axis=1) + weight_only_budget(x, w, qw) \
        + _accumulation_slack(np.abs(x) + sx, np.abs(wq))


def _ref_linear(x, w, b):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if b is None else y + b


# --------------------------------------------------------------------------------------------------
# Models used by the tests
# --------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d, h, g):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h, rng=g)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d, rng=g)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, seed=0, d=32, h=64, depth=2):
        super().__init__()
        g = np.random.default_rng(seed)
        self.emb = nn.Embedding(50, d, rng=g)
        self.emb.weight *= np.float32(0.1)
        self.blocks = nn.ModuleList(Block(d, h, g) for _ in range(depth))
        self.heads = nn.ModuleDict({"cls": nn.Linear(d, 5, rng=g), "reg": nn.Linear(d, 1, bias=False, rng=g)})

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return np.concatenate([self.heads["cls"](x), self.heads["reg"](x)], axis=-1)


IDS = np.array([[1, 2, 3, 4], [5, 6, 7, 49]])


# Duck-typed layers: plain classes, no cquant imports.
class MyLinear:
    def __init__(self, i, o, g, dtype=np.float32):
        self.weight = g.standard_normal((o, i)).astype(dtype) / np.sqrt(i)
        self.bias = g.standard_normal(o).astype(dtype)

    def forward(self, x):
        return x @ self.weight.T + self.bias

    def __call__(self, x):
        return self.forward(x)


class Dense:
    """Matched by in_features/out_features; its __call__ does the math itself (no forward)."""

    def __init__(self, i, o, g):
        self.in_features, self.out_features = i, o
        self.weight = g.standard_normal((o, i)).astype(np.float32) / np.sqrt(i)
        self.bias = None

    def __call__(self, x):
        return x @ self.weight.T


class Proj:
    """A linear map the rule does not recognise (no Linear name, no in/out features)."""

    def __init__(self, i, o, g):
        self.weight = g.standard_normal((o, i)).astype(np.float32) / np.sqrt(i)

    def forward(self, x):
        return x @ self.weight.T


class TokenEmbedding:
    def __init__(self, n, d, g):
        self.weight = g.standard_normal((n, d)).astype(np.float32)

    def forward(self, ids):
        return self.weight[ids]


class Conv1D:
    """GPT-2 style: weight is (in, out) and y = x @ W + b; must never be taken for a Linear."""

    def __init__(self, i, o, g):
        self.weight = g.standard_normal((i, o)).astype(np.float32)
        self.bias = np.zeros(o, np.float32)

    def forward(self, x):
        return x @ self.weight + self.bias


class RMSNorm:
    def __init__(self, d):
        self.weight = np.ones(d, np.float32)

    def forward(self, x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * self.weight


class DuckBlock:
    def __init__(self, d, g):
        self.attn = {"q": MyLinear(d, d, g), "k": MyLinear(d, d, g)}
        self.mlp = [Dense(d, 2 * d, g), Proj(2 * d, d, g)]
        self.extra = (MyLinear(d, d, g),)
        self.norm = RMSNorm(d)

    def __call__(self, x):
        h = self.norm.forward(x)
        h = self.attn["q"](h) + self.attn["k"](h) + self.extra[0](h)
        return x + self.mlp[1].forward(np.maximum(self.mlp[0](h), 0))


class DuckModel:
    def __init__(self, seed=0, d=16):
        g = np.random.default_rng(seed)
        self.embed = TokenEmbedding(30, d, g)
        self.layers = [DuckBlock(d, g), DuckBlock(d, g)]
        self.conv = Conv1D(d, d, g)
        self.out = MyLinear(d, 3, g)
        self.config = {"d": d, "names": ["a", "b"]}
        for layer in self.layers:
            layer.owner = self  # a reference cycle

    def __call__(self, ids):
        x = self.embed.forward(ids)
        for layer in self.layers:
            x = layer(x)
        return self.out(self.conv.forward(x))


def _snapshot_arrays(model):
    """(path, id, copy) for every array reachable, to prove a model was not touched."""
    out = []
    seen = set()

    def walk(o, path):
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            out.append((path, id(o), o.copy()))
        elif isinstance(o, nn.Module):
            for k, v in list(o._parameters.items()) + list(o._modules.items()) + list(vars(o).items()):
                walk(v, f"{path}.{k}")
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            out.append((path + ".__class__", id(type(o)), None))
            for k, v in vars(o).items():
                walk(v, f"{path}.{k}")
    walk(model, "model")
    return out


def _assert_same_snapshot(a, b):
    assert [(p, i) for p, i, _ in a] == [(p, i) for p, i, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b):
        if x is not None:
            np.testing.assert_array_equal(x, y)


def reachable_array_bytes(root) -> int:
    """Bytes of every ndarray reachable from root through gc referents (independent of cquant's
    own walker), each memory block once."""
    owners = {}
    seen = set()
    stack = [root]
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes, int, float)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            while isinstance(o.base, np.ndarray):
                o = o.base
            owners[id(o)] = o.nbytes
            continue
        stack.extend(gc.get_referents(o))
    return sum(owners.values())


# --------------------------------------------------------------------------------------------------
# cquant.nn models
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_nn_model_linears_replaced(mode):
    net = Net()
    float_out = net(IDS)
    q = Quantizer(mode=mode)
    out = q.quantize(net)
    assert out is net
    lin_names = ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "heads.cls", "heads.reg"]
    mods = dict(net.named_modules())
    for name in lin_names:
        m = mods[name]
        assert isinstance(m, QuantizedLinear) and m.mode == mode
        assert isinstance(m.qweight, ops.QuantizedWeight) and m.qweight.granularity == "per_channel"
        assert not any(isinstance(v, np.ndarray) and v.ndim == 2 for v in vars(m).values())
    assert mods["heads.reg"].bias is None and mods["heads.reg"].out_features == 1
    assert isinstance(mods["emb"], nn.Embedding) and isinstance(mods["blocks.0.norm"], nn.LayerNorm)
    status = {r.name: (r.status, r.reason) for r in q.summary}
    assert {n for n, (s, _) in status.items() if s == "quantized"} == set(lin_names)
    assert status["emb"] == ("skipped", "embedding (Embedding): never quantized")
    assert status["blocks.1.norm"] == ("skipped", "normalization layer (LayerNorm): never quantized")
    y = net(IDS)
    assert y.shape == float_out.shape and y.dtype == np.float32
    assert "QuantizedLinear(in_features=32, out_features=64" in repr(net)


@pytest.mark.parametrize("granularity,group_size", [("per_tensor", None), ("per_channel", None),
                                                    ("per_group", 16)])
@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_each_layer_within_quantization_budget(mode, granularity, group_size):
    """Every quantized layer, fed the activations it really sees in the model, stays within the error
    budget of its own quantization step; weight_only also matches the dequantized weight exactly
    up to float32 accumulation."""
    net = Net(seed=1)
    floats = {n: (m.weight.copy(), None if m.bias is None else m.bias.copy())
              for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    Quantizer(mode, granularity, group_size).quantize(net)
    seen = {}
    for name, m in net.named_modules():
        if isinstance(m, QuantizedLinear):
            def spy(x, m=m, name=name):
                seen[name] = np.array(x, np.float32)
                return QuantizedLinear.forward(m, x)
            m.forward = spy
    net(IDS)
    assert set(seen) == set(floats)
    for name, x in seen.items():
        m = dict(net.named_modules())[name]
        w, b = floats[name]
        x2 = x.reshape(-1, x.shape[-1])
        y = QuantizedLinear.forward(m, x2).astype(np.float64)
        budget = (weight_only_budget if mode == "weight_only" else dynamic_budget)(x2, w, m.qweight)
        budget = budget + 4 * EPS32 * (np.abs(_ref_linear(x2, w, b)) + (0 if b is None else np.abs(b)))
        err = np.abs(y - _ref_linear(x2, w, b))
        assert np.all(err <= budget), f"{name}: worst excess {np.max(err - budget)}"
        if mode == "weight_only":
            wq = m.dequantized_weight()
            exact = np.abs(y - _ref_linear(x2, wq, b))
            assert np.all(exact <= _accumulation_slack(x2, wq) + 2 * EPS32 * np.abs(_ref_linear(x2, wq, b)))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 70), m=st.integers(1, 6), seed=st.integers(0, 2**31),
       mode=st.sampled_from(["weight_only", "dynamic"]), wscale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_single_linear_budget_fuzzed(n, k, m, seed, mode, wscale):
    g = np.random.default_rng(seed)
    lin = nn.Linear(k, n, rng=g)
    lin.weight *= np.float32(wscale)
    w, b = lin.weight.copy(), lin.bias.copy()
    model = nn.Sequential(lin)
    Quantizer.quantize_dynamic(model, mode=mode)
    x = (g.standard_normal((m, k)) * g.uniform(0.1, 10)).astype(np.float32)
    y = model(x).astype(np.float64)
    budget = (weight_only_budget if mode == "weight_only" else dynamic_budget)(x, w, model[0].qweight)
    # plus the float32 roundings of the epilogue (scale, then + bias): a few ulps of |y| and |b|
    ref = _ref_linear(x, w, b)
    budget = budget + 4 * EPS32 * (np.abs(ref) + np.abs(b))
    assert np.all(np.abs(y - ref) <= budget)


def test_quantized_model_matches_float_model_with_dequantized_weights():
    """weight_only: the quantized model is the float model with w' = q * scale, up to accumulation."""
    net = Net(seed=2)
    qnet = Quantizer("weight_only").quantize(net, inplace=False)
    ref = copy.deepcopy(net)
    for (name, m), (_, qm) in zip(ref.named_modules(), qnet.named_modules()):
        if isinstance(m, nn.Linear):
            m.weight = qm.dequantized_weight()
    y, y_ref = qnet(IDS), ref(IDS)
    # Each layer differs from its reference by accumulation order only (<= K eps relative); the model
    # is 2 residual blocks deep with K <= 64: allow that per layer, on the output's magnitude.
    k_max = 64
    n_layers = 6
    assert np.max(np.abs(y - y_ref)) <= n_layers * (k_max + 2) * EPS32 * np.max(np.abs(y_ref))


def test_tied_weights_quantized_once():
    g = np.random.default_rng(0)
    a, b = nn.Linear(16, 16, rng=g), nn.Linear(16, 16, rng=g)
    b.weight = a.weight
    shared = nn.Linear(16, 8, rng=g)
    model = nn.Sequential(a, b, nn.ModuleList([shared, shared]))
    q = Quantizer("weight_only")
    q.quantize(model)
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[1], QuantizedLinear)
    assert model[0].qweight is model[1].qweight
    assert model[0].bias is not model[1].bias
    # the same Linear object held twice is replaced at both places by one QuantizedLinear
    assert model[2][0] is model[2][1] and isinstance(model[2][0], QuantizedLinear)
    recs = {r.name: r for r in q.summary}
    assert recs["1"].reason == "weight shared with '0' (quantized once)"
    assert recs["1"].bytes_after == 16 * 4
    assert [r.name for r in q.summary if r.status == "quantized"] == ["0", "1", "2.0"]
    rows = report(model)
    assert [(r.name, r.shared_with) for r in rows] == [("0", None), ("1", "0"), ("2.0", None)]
    # duck-typed tie
    g = np.random.default_rng(1)
    l1, l2 = MyLinear(8, 8, g), MyLinear(8, 8, g)
    l2.weight = l1.weight
    tree = {"a": l1, "b": [l2]}
    Quantizer().quantize(tree)
    assert l1.forward.qweight is l2.forward.qweight


def test_include_exclude_globs(caplog):
    net = Net()
    q = Quantizer(exclude=["*.fc2", "heads.reg"])
    q.quantize(net)
    mods = dict(net.named_modules())
    assert isinstance(mods["blocks.0.fc2"], nn.Linear) and isinstance(mods["heads.reg"], nn.Linear)
    assert isinstance(mods["blocks.0.fc1"], QuantizedLinear)
    recs = {r.name: r for r in q.summary}
    assert recs["blocks.1.fc2"].status == "skipped" and recs["blocks.1.fc2"].reason == "excluded by pattern '*.fc2'"
    assert recs["heads.reg"].reason == "excluded by pattern 'heads.reg'"

    net = Net()
    with caplog.at_level(logging.WARNING, logger="cquant"):
        q = Quantizer(include=["blocks.0.*", "nothing.matches"], exclude="blocks.0.fc2")
        q.quantize(net)
    mods = dict(net.named_modules())
    assert isinstance(mods["blocks.0.fc1"], QuantizedLinear)
    assert all(isinstance(mods[n], nn.Linear) for n in ("blocks.0.fc2", "blocks.1.fc1", "heads.cls"))
    recs = {r.name: r for r in q.summary}
    assert recs["blocks.1.fc1"].reason == "not matched by include"
    assert recs["blocks.0.fc2"].reason == "excluded by pattern 'blocks.0.fc2'"
    assert "include pattern 'nothing.matches' matched no layer" in caplog.text


def test_skip_report_and_logging(caplog):
    net = Net()
    with caplog.at_level(logging.INFO, logger="cquant"):
        q = Quantizer("dynamic")
        q.quantize(net)
    assert "quantized 6 Linear layer(s) to int8 dynamic per_channel" in caplog.text
    assert "skipped (embedding (Embedding): never quantized): emb" in caplog.text
    assert all(isinstance(r, LayerRecord) for r in q.summary)
    skipped = [r for r in q.summary if r.status == "skipped"]
    assert {r.name for r in skipped} == {"emb", "blocks.0.norm", "blocks.1.norm"}
    assert all(r.bytes_before == r.bytes_after for r in skipped)
    mods = dict(net.named_modules())
    for r in q.summary:
        if r.status == "quantized":
            m = mods[r.name]
            assert r.scheme == "int8 dynamic per_channel"
            assert r.bytes_after == m.qweight.nbytes + \
                (m.bias.nbytes if m.bias is not None else 0)
            # a 1-row layer can cost more than float32 once the kernel layout pads its rows
            assert r.bytes_after < r.bytes_before or r.shape[0] == 1


def test_quantize_twice_is_harmless():
    net = Net()
    Quantizer().quantize(net)
    y = net(IDS)
    q = Quantizer()
    q.quantize(net)
    assert {r.reason for r in q.summary if r.name.startswith("blocks.0.fc")} == {"already quantized"}
    assert not [r for r in q.summary if r.status == "quantized"]
    np.testing.assert_array_equal(net(IDS), y)


# --------------------------------------------------------------------------------------------------
# duck-typed trees
# --------------------------------------------------------------------------------------------------

def test_duck_tree_quantized():
    model = DuckModel()
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    y_float = model(ids)
    blk = model.layers[0]
    w_dense = blk.mlp[0].weight
    q = Quantizer("weight_only")
    assert q.quantize(model) is model
    recs = {r.name: r for r in q.summary}
    quantized = {n for n, r in recs.items() if r.status == "quantized"}
    assert quantized == {f"layers.{i}.{p}" for i in (0, 1)
                         for p in ("attn.q", "attn.k", "mlp.0", "extra.0")} | {"out"}
    assert recs["layers.0.mlp.1"].reason.startswith("not a Linear by the recognition rule")
    assert recs["embed"].reason == "embedding (TokenEmbedding): never quantized"
    assert recs["conv"].reason == "convolution (Conv1D): never quantized"
    assert recs["layers.1.norm"].reason == "normalization layer (RMSNorm): never quantized"
    # converted in place: float weight dropped, forward quantized
    assert blk.attn["q"].weight is None and isinstance(blk.attn["q"].forward, QuantizedLinearForward)
    assert blk.extra[0].weight is None  # inside a tuple: converted in place
    # Dense had no forward and did its math in __call__: calls now go to the quantized forward
    dense = blk.mlp[0]
    assert dense.weight is None and isinstance(dense, Dense) and type(dense).__name__ == "Dense"
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(dense(x), x @ ops.dequantize(dense.forward.qweight).T, rtol=1e-5, atol=1e-6)
    bound = weight_only_budget(x, w_dense, dense.forward.qweight)
    assert np.all(np.abs(dense(x) - x.astype(np.float64) @ w_dense.astype(np.float64).T) <= bound)
    y = model(ids)
    assert y.shape == y_float.shape
    cos = np.sum(y * y_float) / np.linalg.norm(y) / np.linalg.norm(y_float)
    assert cos > 1 - 1e-3  # a sanity check on top of the per-layer budgets above
    assert model.layers[0].owner is model


def test_include_forces_missed_layer_but_never_takes_embedding_conv_norm():
    model = DuckModel()
    q = Quantizer(include=["layers.*.mlp.1", "embed", "conv", "layers.0.norm", "out"])
    q.quantize(model)
    assert isinstance(model.layers[0].mlp[1].forward, QuantizedLinearForward)
    assert model.layers[1].mlp[1].weight is None
    assert isinstance(model.embed.weight, np.ndarray) and model.conv.weight.shape == (16, 16)
    recs = {r.name: r for r in q.summary}
    assert recs["embed"].status == "skipped" and recs["conv"].status == "skipped"
    assert recs["layers.0.norm"].status == "skipped"
    assert recs["layers.0.attn.q"].reason == "not matched by include"
    q = Quantizer(include="*")
    q.quantize(DuckModel())
    taken = {r.name for r in q.summary if r.status == "quantized"}
    assert not any(n.endswith(("embed", "conv", "norm")) for n in taken)


def test_duck_float64_weights_and_bias():
    g = np.random.default_rng(0)
    lin = MyLinear(8, 4, g, dtype=np.float64)
    w, b = lin.weight.copy(), lin.bias.copy()
    tree = [lin]
    Quantizer("weight_only").quantize(tree)
    assert lin.bias.dtype == np.float32 and lin.bias is lin.forward.bias
    x = g.standard_normal((2, 8)).astype(np.float32)
    assert np.all(np.abs(lin(x) - _ref_linear(x, w, b)) <= weight_only_budget(x, w, lin.forward.qweight))


def test_duck_rule_details():
    g = np.random.default_rng(0)

    class WrongShape:
        in_features, out_features = 5, 4

        def __init__(self):
            self.weight = np.ones((5, 4), np.float32)

        def forward(self, x):
            return x

    class IntLinear:
        def __init__(self):
            self.weight = np.ones((4, 5), np.int8)

        def forward(self, x):
            return x

    class NoForwardLinear:
        def __init__(self):
            self.weight = np.ones((4, 5), np.float32)

    class BadBiasLinear(MyLinear):
        pass

    bb = BadBiasLinear(5, 4, g)
    bb.bias = np.ones(3, np.float32)
    tree = {"shape": WrongShape(), "int": IntLinear(), "nofwd": NoForwardLinear(), "bias": bb}
    q = Quantizer()
    q.quantize(tree)
    reasons = {r.name: r.reason for r in q.summary}
    assert reasons["shape"] == "weight shape (5, 4) != (out_features, in_features) = (4, 5)"
    assert reasons["int"] == "weight dtype int8 is not floating-point"
    assert reasons["nofwd"] == "no forward() and not callable"
    assert reasons["bias"].startswith("bias (shape (3,) dtype float32) is not a float array")
    assert all(r.status == "skipped" for r in q.summary)


def test_root_linear_converted_in_place():
    lin = nn.Linear(8, 4, rng=0)
    w = lin.weight.copy()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    out = Quantizer("weight_only").quantize(lin)
    # the model itself: no site to put a new layer in, so the object becomes the QuantizedLinear
    # (its repr, state_dict and checkpoint say so; a quantized forward on a plain Linear saved only
    # the bias)
    assert out is lin and type(lin) is QuantizedLinear and "weight" not in lin.__dict__
    assert np.all(np.abs(lin(x) - _ref_linear(x, w, lin.bias)) <= weight_only_budget(x, w, lin.qweight))
    assert [r.name for r in report(lin)] == ["<root>"]


# --------------------------------------------------------------------------------------------------
# validation before modification
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_leaves_nn_model_untouched(bad):
    net = Net()
    net.heads["reg"].weight[0, 3] = bad  # the last layer in walk order: earlier ones were fine
    before = _snapshot_arrays(net)
    types_before = [(n, type(m)) for n, m in net.named_modules()]
    y_before = net(IDS)
    with pytest.raises(errors.NonFiniteError, match=r"heads\.reg\.weight"):
        Quantizer().quantize(net)
    assert [(n, type(m)) for n, m in net.named_modules()] == types_before
    _assert_same_snapshot(before, _snapshot_arrays(net))
    np.testing.assert_array_equal(net(IDS), y_before)


def test_nonfinite_bias_and_duck_weight_leave_model_untouched():
    net = Net()
    net.blocks[1].fc1.bias[2] = np.nan
    before = _snapshot_arrays(net)
    with pytest.raises(errors.NonFiniteError, match=r"blocks\.1\.fc1\.bias"):
        Quantizer().quantize(net)
    _assert_same_snapshot(before, _snapshot_arrays(net))

    model = DuckModel()
    model.out.weight[1, 1] = np.nan
    ids = np.array([[1, 2]])
    before = _snapshot_arrays(model)
    y_before = model(ids)
    with pytest.raises(ValueError, match=r"\bout\.weight"):
        Quantizer().quantize(model)
    _assert_same_snapshot(before, _snapshot_arrays(model))
    assert type(model.layers[0].mlp[0]) is Dense and "forward" not in vars(model.layers[0].attn["q"])
    np.testing.assert_array_equal(model(ids), y_before)


def test_failure_while_installing_is_rolled_back():
    class FrozenLinear(MyLinear):
        def __setattr__(self, k, v):
            if k == "forward":
                raise AttributeError("frozen layer")
            super().__setattr__(k, v)

    g = np.random.default_rng(0)
    net = Net()
    model = {"first": MyLinear(4, 4, g), "net": net, "last": FrozenLinear(4, 4, g)}
    before = _snapshot_arrays(model)
    types_before = [(n, type(m)) for n, m in net.named_modules()]
    with pytest.raises(AttributeError, match="frozen layer"):
        Quantizer().quantize(model)
    _assert_same_snapshot(before, _snapshot_arrays(model))
    assert [(n, type(m)) for n, m in net.named_modules()] == types_before
    assert type(model["first"]) is MyLinear and "forward" not in vars(model["first"])


@pytest.mark.parametrize("kwargs,exc", [
    (dict(mode="int4"), errors.ValueError),
    (dict(granularity="per_row"), errors.ValueError),
    (dict(granularity="per_group"), errors.ValueError),
    (dict(granularity="per_group", group_size=0), errors.ValueError),
    (dict(granularity="per_group", group_size=-8), errors.ValueError),
    (dict(granularity="per_group", group_size=8.0), errors.ValueError),
    (dict(granularity="per_group", group_size=True), errors.ValueError),
    (dict(granularity="per_channel", group_size=32), errors.ValueError),
    (dict(include=5), errors.TypeError),
    (dict(exclude=["ok", 3]), errors.TypeError),
])
def test_bad_arguments_raise_before_any_change(kwargs, exc):
    net = Net()
    before = _snapshot_arrays(net)
    with pytest.raises(exc):
        Quantizer.quantize_dynamic(net, **kwargs)
    _assert_same_snapshot(before, _snapshot_arrays(net))
    assert issubclass(exc, errors.QuantizationError)


def test_group_size_not_dividing_k_names_layer_and_changes_nothing():
    net = Net()  # K = 32 and 64
    before = _snapshot_arrays(net)
    with pytest.raises(errors.ValueError, match="layer 'blocks.0.fc1'"):
        Quantizer(granularity="per_group", group_size=24, strict=True).quantize(net)
    _assert_same_snapshot(before, _snapshot_arrays(net))
    q = Quantizer(granularity="per_group", group_size=24)           # not strict: per_channel instead
    q.quantize(Net())
    assert {r.scheme for r in q.summary if r.status == "quantized"} == {"int8 dynamic per_channel"}
    assert all("per_group(24) does not fit" in r.reason for r in q.summary if r.status == "quantized")
    q = Quantizer(granularity="per_group", group_size=32)
    q.quantize(net)
    assert {r.scheme for r in q.summary if r.status == "quantized"} == {"int8 dynamic per_group(32)"}


def test_inplace_false_leaves_original_intact():
    net = Net()
    before = _snapshot_arrays(net)
    y = net(IDS)
    qnet = Quantizer.quantize_dynamic(net, inplace=False)
    assert qnet is not net and isinstance(qnet.blocks[0].fc1, QuantizedLinear)
    assert isinstance(net.blocks[0].fc1, nn.Linear)
    _assert_same_snapshot(before, _snapshot_arrays(net))
    np.testing.assert_array_equal(net(IDS), y)
    duck = DuckModel()
    qduck = Quantizer().quantize(duck, inplace=False)
    assert duck.out.weight is not None and qduck.out.weight is None and type(duck.layers[0].mlp[0]) is Dense


def test_quantize_dynamic_equals_instance_quantize():
    a = Quantizer.quantize_dynamic(Net(), mode="weight_only", granularity="per_tensor")
    b = Quantizer("weight_only", "per_tensor").quantize(Net())
    np.testing.assert_array_equal(a(IDS), b(IDS))


# --------------------------------------------------------------------------------------------------
# memory, reports, serialisation
# --------------------------------------------------------------------------------------------------

def test_memory_measured_quarter_and_float_weights_freed():
    g = np.random.default_rng(0)
    dims = [(256, 128), (128, 256), (64, 128)]
    model = nn.Sequential(*[nn.Linear(k, n, rng=g) for n, k in dims])
    refs = [weakref.ref(m.weight) for m in model]
    before = reachable_array_bytes(model)
    assert before == model_nbytes(model) == sum(4 * n * k + 4 * n for n, k in dims)
    Quantizer("dynamic").quantize(model)
    gc.collect()
    assert all(r() is None for r in refs), "float32 weights still alive after quantization"
    after = reachable_array_bytes(model)
    assert after == model_nbytes(model)
    def block(a):  # the memory block an array lives in (a packed buffer may be an aligned view)
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a.nbytes
    held = sum(block(m.qweight.packed) + m.qweight.scale.nbytes + m.bias.nbytes for m in model)
    assert after == held
    # int8 codes are 1/4 of float32; per-channel scales, biases and the packed column sums (the u8
    # kernels' compensation, in the N64K4 format) are 4 bytes per output row each, plus a 64-byte header.
    # Dimensions are multiples of 64, so a packed layout has no reason to pad: allow 1% for it.
    ideal = sum(n * k + 4 * n + 4 * n + (4 * n if ops.best_format(n) == "n64k4" else 0) + 64 for n, k in dims)
    assert ideal <= after <= ideal * 1.01
    assert after / before < 0.25 + (12 * max(n for n, _ in dims) + 64) / min(4 * n * k for n, k in dims)
    rows = report(model)  # the arrays' own bytes (an aligned buffer's up to 63 bytes of slack not counted)
    assert sum(r.bytes_after for r in rows) == sum(m.qweight.nbytes + m.bias.nbytes for m in model)
    assert held - 64 * len(dims) <= sum(r.bytes_after for r in rows) <= held
    assert sum(r.bytes_before for r in rows) == before


def test_report_rows_and_format():
    net = Net()
    qnet = Quantizer("weight_only", "per_group", 16).quantize(net, inplace=False)
    rows = report(qnet)
    assert [r.name for r in rows] == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2",
                                      "heads.cls", "heads.reg"]
    r0 = rows[0]
    m = qnet.blocks[0].fc1
    assert r0.shape == (64, 32) and r0.scheme == "int8 weight_only per_group(16)"
    assert r0.bytes_before == 64 * 32 * 4 + 64 * 4
    assert r0.bytes_after == m.qweight.nbytes + m.bias.nbytes
    text = format_report(rows)
    assert "blocks.0.fc1" in text and "total (6 layers)" in text and "int8 weight_only per_group(16)" in text
    assert report(net) == []


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_quantized_models_pickle_and_deepcopy(clone):
    for mode in ("dynamic", "weight_only"):
        net = Quantizer(mode).quantize(Net())
        other = clone(net)
        np.testing.assert_array_equal(other(IDS), net(IDS))
        assert other.blocks[0].fc1.qweight is not net.blocks[0].fc1.qweight
    duck = Quantizer("dynamic").quantize(DuckModel())
    ids = np.array([[3, 4, 5]])
    other = clone(duck)
    np.testing.assert_array_equal(other(ids), duck(ids))
    assert type(other.layers[0].mlp[0]).__name__ == "Dense" and other.layers[0].owner is other
    x = np.ones((1, 16), np.float32)
    np.testing.assert_array_equal(other.layers[0].mlp[0](x), duck.layers[0].mlp[0](x))


def test_quantized_state_dict_roundtrip():
    a = Quantizer("dynamic").quantize(Net(seed=0))
    b = Quantizer("dynamic").quantize(Net(seed=1))
    assert not np.array_equal(a(IDS), b(IDS))
    sd = a.state_dict()
    assert sd["blocks.0.fc1.weight_q"].dtype == np.int8 and sd["blocks.0.fc1.weight_q"].shape == (64, 32)
    b.load_state_dict(sd)
    np.testing.assert_array_equal(a(IDS), b(IDS))
    with pytest.raises(nn.StateDictError, match="weight_scale"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "heads.cls.weight_scale"})
    bad = dict(sd)
    bad["heads.cls.weight_q"] = np.zeros((4, 32), np.int8)
    with pytest.raises(nn.StateDictError, match="heads.cls.weight_q"):
        b.load_state_dict(bad)
    np.testing.assert_array_equal(a(IDS), b(IDS))
    # a float model's state dict does not fit the quantized one
    with pytest.raises(nn.StateDictError, match="unexpected keys: .*blocks.0.fc1.weight"):
        b.load_state_dict(Net().state_dict())


def test_quantized_linear_errors():
    qnet = Quantizer().quantize(Net())
    with pytest.raises(errors.ShapeError):
        qnet.blocks[0].fc1(np.zeros((2, 31), np.float32))
    with pytest.raises(errors.TypeError):
        qnet.blocks[0].fc1(np.zeros((2, 32), np.int32))
    with pytest.raises(errors.ValueError):
        QuantizedLinear(qnet.blocks[0].fc1.qweight, None, mode="fast")


def test_duck_layer_with_transposed_weight_is_probed_and_skipped():
    """A duck-typed 'Linear' whose forward is x @ W (weight stored (in, out)) must not be replaced
    by x @ W.T, even when W is square (shape checks cannot tell)."""
    class TLinear:
        def __init__(self, w):
            self.weight = w
            self.bias = None
            self.in_features = self.out_features = w.shape[0]

        def forward(self, x):
            return x @ self.weight

    rng = np.random.default_rng(0)
    layer = TLinear(rng.standard_normal((16, 16)).astype(np.float32))
    x = rng.standard_normal((3, 16)).astype(np.float32)
    y = layer.forward(x)
    q = Quantizer()
    q.quantize([layer])
    assert "forward" not in vars(layer) and layer.weight is not None
    np.testing.assert_array_equal(layer.forward(x), y)
    rec = [r for r in q.summary if r.status == "skipped"]
    assert rec and "weight.T" in rec[0].reason


@pytest.mark.parametrize("bad", [None, np.ones((3, 3), np.float32), 3.0, "model"])
def test_not_a_model_is_a_type_error(bad):
    with pytest.raises(TypeError):
        Quantizer.quantize_dynamic(bad)
