"""cquant.compare: per-layer error of a quantized model against its float original, worst first."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import cquant
from cquant import errors, nn
from cquant.quantization import Quantizer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = np.random.default_rng(0)
        self.a = nn.Linear(32, 64, rng=g)
        self.b = nn.Linear(64, 64, rng=g)
        self.c = nn.Linear(64, 16, rng=g)
        self.b.weight[0, 0] = 40.0          # one huge weight: per_tensor on b is very coarse

    def forward(self, x):
        return self.c(nn.relu(self.b(nn.relu(self.a(x)))))


def _batches():
    g = np.random.default_rng(1)
    return [g.standard_normal((8, 32)).astype(np.float32) for _ in range(2)]


def test_worst_layer_first_and_shares_add_up():
    f = Net()
    q = Quantizer(scheme={"b": "per_tensor"}).quantize(copy.deepcopy(f))
    cmp = cquant.compare(f, q, _batches())
    names = [r.name for r in cmp.layers]
    assert names[0] == "b" and sorted(names) == ["a", "b", "c"]
    assert math.isclose(sum(r.output_share for r in cmp.layers), 1.0, rel_tol=1e-9)
    assert cmp.layers[0].output_share > 0.5
    assert cmp.layers[0].scheme == "int8 dynamic per_tensor"
    assert [r.output_share for r in cmp.layers] == sorted((r.output_share for r in cmp.layers), reverse=True)
    # per-layer figures are on the float model's input: check layer "a" by hand
    # (batch by batch as compare runs them: numpy's float32 matmul may round differently for other
    # M, e.g. OpenBLAS on Zen 3 for 16 rows against 8: max_abs_error off by 3e-6 relative)
    y = np.concatenate([f.a(b) for b in _batches()]).astype(np.float64)
    yq = np.concatenate([q.a(b) for b in _batches()]).astype(np.float64)
    ra = next(r for r in cmp.layers if r.name == "a")
    assert ra.sqnr_db == pytest.approx(10 * np.log10((y ** 2).sum() / ((yq - y) ** 2).sum()), rel=1e-6)
    assert ra.max_abs_error == pytest.approx(np.abs(yq - y).max(), rel=1e-6)
    assert 0.99 < ra.cosine <= 1.0
    # whole model
    yf = np.concatenate([f(b) for b in _batches()]).astype(np.float64)
    yqm = np.concatenate([q(b) for b in _batches()]).astype(np.float64)
    assert cmp.output_sqnr_db == pytest.approx(10 * np.log10((yf ** 2).sum() / ((yqm - yf) ** 2).sum()), rel=1e-6)
    text = cmp.format()
    assert text.splitlines()[2].startswith("b ") and "model output: SQNR" in text


def test_without_sensitivity_sorted_by_sqnr():
    f = Net()
    q = Quantizer(scheme={"b": "per_tensor"}).quantize(copy.deepcopy(f))
    cmp = cquant.compare(f, q, _batches(), sensitivity=False)
    assert [r.sqnr_db for r in cmp.layers] == sorted(r.sqnr_db for r in cmp.layers)
    assert all(math.isnan(r.output_share) for r in cmp.layers)


def test_float_model_left_untouched_and_errors():
    f = Net()
    q = Quantizer.quantize_dynamic(copy.deepcopy(f))
    y = f(_batches()[0])
    cquant.compare(f, q, _batches())
    np.testing.assert_array_equal(f(_batches()[0]), y)
    assert "forward" not in vars(f.a)
    with pytest.raises(errors.ValueError, match="no quantized layer"):
        cquant.compare(f, copy.deepcopy(f), _batches())


def test_torch_models():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    with torch.no_grad():
        f[2].weight[0, 0] = 30.0
    q = Quantizer(scheme={"2": "per_tensor"}).quantize(f, inplace=False)
    cmp = cquant.compare(f, q, _batches())
    assert [r.name for r in cmp.layers][0] == "2" and len(cmp.layers) == 2
    assert math.isclose(sum(r.output_share for r in cmp.layers), 1.0, rel_tol=1e-9)
    assert not f[0]._forward_hooks and cmp.output_cosine > 0.99
