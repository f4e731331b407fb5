"""Accuracy budget (``min_cosine=``, cquant.budget) on synthetic models with one planted sensitive layer.

Runs with nothing optional installed; the torch variant is skipped without torch.

The planted layer ``b``: its input channel 0 is always 0 (the row of ``a`` that feeds it is zero with
a negative bias, then ReLU), and its weight column 0 is huge. In float the column never contributes;
quantized per channel it sets every output row's scale, so the rest of ``b``'s weights round to a
few codes. Smoothing cannot help (the channel's activation absmax is 0, so its scale stays 1).
"""
from __future__ import annotations

import copy
import logging
import types
import warnings

import numpy as np
import pytest

import cquant
from cquant import errors, nn
from cquant.budget import BudgetWarning, cosine_rows
from cquant.quantization import QuantizedLinear, Quantizer
from cquant.smoothing import Smoothed

D = 128


def _weights(big=50.0, seed=0):
    g = np.random.default_rng(seed)
    w = {}
    for name, (i, o) in {"a": (D, D), "b": (D, D), "c": (D, D), "d": (D, 16)}.items():
        w[name] = (g.uniform(-1, 1, (o, i)).astype(np.float32) / np.sqrt(i),
                   g.uniform(-0.1, 0.1, o).astype(np.float32))
    w["a"][0][0] = 0.0
    w["a"][1][0] = -1.0
    w["b"][0][:, 0] = big
    return w


class Net(nn.Module):
    def __init__(self, big=50.0):
        super().__init__()
        for name, (wt, b) in _weights(big).items():
            lin = nn.Linear(wt.shape[1], wt.shape[0])
            lin.weight, lin.bias = wt.copy(), b.copy()
            setattr(self, name, lin)

    def forward(self, x):
        return self.d(nn.relu(self.c(nn.relu(self.b(nn.relu(self.a(x)))))))


class DuckLinear:
    def __init__(self, w, b):
        self.weight, self.bias = w.copy(), b.copy()
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x):
        return x @ self.weight.T + self.bias


class DuckNet:
    def __init__(self, big=50.0):
        self.layers = {k: DuckLinear(*v) for k, v in _weights(big).items()}

    def __call__(self, x):
        h = x
        for k in "abc":
            h = np.maximum(self.layers[k].forward(h), 0)
        return self.layers["d"].forward(h)


def _batches(n=2, seed=1):
    g = np.random.default_rng(seed)
    return [g.standard_normal((16, D)).astype(np.float32) for _ in range(n)]


def _cos(model, ref_model, batches):
    c = np.concatenate([cosine_rows(model(x), ref_model(x)) for x in batches])
    return float(c.mean()), float(c.min())


def test_planted_layer_is_the_only_one_kept_float():
    f = Net()
    assert _cos(Quantizer().quantize(copy.deepcopy(f)), f, _batches())[0] < 0.99   # the plant hurts
    q = Quantizer()
    m = q.quantize(copy.deepcopy(f), calibration=_batches(), min_cosine=0.999, refine=())
    assert type(m.b) is nn.Linear
    assert all(isinstance(getattr(m, k), QuantizedLinear) for k in "acd")
    res = q.budget
    assert res.met and res.kept_float == ["b"] and res.refined == {}
    assert res.mean >= 0.999 and res.min <= res.mean and res.base_mean < 0.99
    assert res.layers[0].name == "b" and res.layers[0].choice == "float" and res.layers[0].share > 0.9
    assert res.evaluations == 1 + 4 + 1                     # baseline, 4 layers alone, k=1
    # bytes: 3 of the 4 layers' weights int8
    wb = {k: getattr(f, k).weight.nbytes for k in "abcd"}
    assert res.int8_share == pytest.approx((wb["a"] + wb["c"] + wb["d"]) / sum(wb.values()))
    assert res.extra_bytes == res.bytes_chosen - res.bytes_all_quantized > 0
    rec = {r.name: r for r in q.summary}
    assert rec["b"].status == "skipped" and "kept in float by the accuracy budget (min_cosine=0.999)" in rec["b"].reason
    assert rec["a"].status == "quantized" and rec["a"].reason == ""
    text = res.format()
    assert "met with 1 layer(s) kept in float (b)" in text and "min" in text
    # held-out batches: the budget generalises on this model
    assert _cos(m, f, _batches(seed=9))[0] >= 0.999


def test_one_call_api_and_duck_typed_model(caplog):
    f = DuckNet()
    with caplog.at_level(logging.INFO, logger="cquant"):
        m = Quantizer.quantize_dynamic(f, calibration=_batches(), min_cosine=0.999, refine=(), inplace=False)
    assert "accuracy budget mean cosine >= 0.999: met with 1 layer(s) kept in float (layers.b)" in caplog.text
    assert isinstance(m.layers["b"].weight, np.ndarray)          # float
    assert all(m.layers[k].weight is None for k in "acd")          # quantized in place
    assert isinstance(f.layers["a"].weight, np.ndarray)            # inplace=False: original untouched
    assert _cos(m, f, _batches(seed=9))[0] >= 0.999


def test_budget_already_met_changes_nothing():
    f = Net(big=0.0)
    plain = Quantizer.quantize_dynamic(copy.deepcopy(f))
    q = Quantizer()
    m = q.quantize(copy.deepcopy(f), calibration=_batches(), min_cosine=0.999)
    assert q.budget.met and q.budget.kept_float == [] and q.budget.refined == {} and q.budget.layers == []
    assert q.budget.evaluations == 1 and q.budget.int8_share == 1.0 and q.budget.extra_bytes == 0
    assert all(r.status == "quantized" and r.reason == "" for r in q.summary)
    for x in _batches(seed=4):
        np.testing.assert_array_equal(m(x), plain(x))


def test_impossible_budget_keeps_everything_float_with_a_warning():
    f = Net()
    q = Quantizer()
    with pytest.warns(BudgetWarning, match="cannot be met with any Linear layer quantized"):
        m = q.quantize(copy.deepcopy(f), calibration=_batches(), min_cosine=1.0)
    assert not q.budget.met and sorted(q.budget.kept_float) == list("abcd") and q.budget.int8_share == 0.0
    assert all(type(getattr(m, k)) is nn.Linear for k in "abcd")
    assert all(r.status == "skipped" and "cannot be met" in r.reason for r in q.summary)
    for x in _batches():
        np.testing.assert_array_equal(m(x), f(x))


def test_finer_scheme_before_float():
    # a milder plant: per_group(32) confines the coarse scale to the group holding column 0
    f = Net(big=2.5)
    base = Quantizer().quantize(copy.deepcopy(f))
    assert _cos(base, f, _batches())[0] < 0.999
    q = Quantizer()
    m = q.quantize(copy.deepcopy(f), calibration=_batches(), min_cosine=0.999)   # refine: per_group(32)
    assert q.budget.met and q.budget.kept_float == [] and q.budget.refined == {"b": "int8 dynamic per_group(32)"}
    assert m.b.qweight.granularity == "per_group" and m.b.qweight.group_size == 32
    assert m.a.qweight.granularity == "per_channel"
    assert q.budget.int8_share == 1.0 and 0 < q.budget.extra_bytes < 0.2 * q.budget.bytes_all_quantized
    rec = {r.name: r for r in q.summary}
    assert rec["b"].scheme == "int8 dynamic per_group(32)" and "by the accuracy budget" in rec["b"].reason
    assert _cos(m, f, _batches())[0] >= 0.999
    # refine=(): float instead
    q2 = Quantizer()
    q2.quantize(copy.deepcopy(f), calibration=_batches(), min_cosine=0.999, refine=())
    assert q2.budget.kept_float == ["b"]


def test_with_smoothing_and_min_row_cosine():
    f = Net()
    q = Quantizer()
    m = q.quantize(copy.deepcopy(f), calibration=_batches(), smoothing=0.5, min_cosine=0.999,
                   min_row_cosine=0.998, refine=())
    assert q.smoothing is not None and q.budget.met and q.budget.kept_float == ["b"]
    assert q.budget.min >= 0.998
    inner = m.b.linear if isinstance(m.b, Smoothed) else m.b
    assert type(inner) is nn.Linear
    rec = {r.name: r for r in q.summary}
    bname = "b.linear" if isinstance(m.b, Smoothed) else "b"
    assert rec[bname].status == "skipped" and "accuracy budget" in rec[bname].reason
    assert _cos(m, f, _batches(seed=9))[0] >= 0.999


def test_argument_errors():
    f = Net()
    with pytest.raises(errors.ValueError, match="calibration"):
        Quantizer.quantize_dynamic(f, min_cosine=0.999)
    for bad in (1.5, 0, -0.2, float("nan"), True, "0.99"):
        with pytest.raises(errors.ValueError, match="min_cosine"):
            Quantizer.quantize_dynamic(f, calibration=_batches(), min_cosine=bad)
    with pytest.raises(errors.ValueError, match="min_row_cosine needs min_cosine"):
        Quantizer.quantize_dynamic(f, calibration=_batches(), min_row_cosine=0.99)
    with pytest.raises(errors.ValueError):
        Quantizer.quantize_dynamic(f, calibration=_batches(), min_cosine=0.999, refine=("per_bogus",))
    assert type(f.a) is nn.Linear and type(f.b) is nn.Linear      # nothing touched


def test_torch_model():
    torch = pytest.importorskip("torch")
    w = _weights()

    class TNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, (wt, b) in w.items():
                lin = torch.nn.Linear(wt.shape[1], wt.shape[0])
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(wt))
                    lin.bias.copy_(torch.from_numpy(b))
                setattr(self, k, lin)

        def forward(self, x):
            return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))

    f = TNet().eval()
    q = Quantizer()
    m = q.quantize(copy.deepcopy(f), calibration=_batches(), min_cosine=0.999, refine=())
    assert q.budget.met and q.budget.kept_float == ["b"]
    assert type(m.b) is torch.nn.Linear and type(m.a) is not torch.nn.Linear
    rec = {r.name: r for r in q.summary}
    assert rec["b"].status == "skipped" and "accuracy budget" in rec["b"].reason
    with torch.inference_mode():
        c = np.concatenate([cosine_rows(m(torch.from_numpy(x)).numpy(), f(torch.from_numpy(x)).numpy())
                            for x in _batches(seed=9)])
    assert c.mean() >= 0.999
    # with smoothing (wrappers around the torch Linears)
    q2 = Quantizer()
    q2.quantize(copy.deepcopy(f), calibration=_batches(), smoothing=0.5, min_cosine=0.999, refine=())
    assert q2.budget.met and q2.budget.kept_float == ["b"]
