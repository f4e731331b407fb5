"""cquant.calibrate: per-layer input statistics on cquant.nn, duck-typed and torch models."""
from __future__ import annotations

import numpy as np
import pytest

import cquant
from cquant import errors, nn
from cquant.calibration import Calibration, LayerStats


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32, rng=1)
        self.fc2 = nn.Linear(32, 8, rng=2)

    def forward(self, x, scale=1.0):
        return self.fc2(nn.relu(self.fc1(self.norm(x)))) * scale


def _batches(n=3, seed=0):
    g = np.random.default_rng(seed)
    return [g.standard_normal((2, 5, 16)).astype(np.float32) * (i + 1) for i in range(n)]


def test_nn_absmax_min_max_match_manual_and_model_untouched():
    net = Net()
    bs = _batches()
    cal = cquant.calibrate(net, bs)
    assert isinstance(cal, Calibration) and list(cal) == ["fc1", "fc2"] and cal.batches == 3
    x1 = np.concatenate([net.norm(b).reshape(-1, 16) for b in bs])
    x2 = np.concatenate([nn.relu(net.fc1(net.norm(b))).reshape(-1, 32) for b in bs])
    np.testing.assert_array_equal(cal["fc1"].absmax, np.abs(x1).max(0))
    np.testing.assert_array_equal(cal["fc1"].min, x1.min(0))
    np.testing.assert_array_equal(cal["fc2"].max, x2.max(0))
    assert cal["fc1"].rows == 30 and cal["fc1"].calls == 3
    assert cal.static_scale("fc2")[0] == pytest.approx(np.abs(x2).max() / 127)
    assert cal["fc2"].static_scale(per_channel=True).shape == (32,)
    assert "forward" not in vars(net.fc1) and "forward" not in vars(net.fc2)


def test_batch_forms_tuple_dict_and_errors():
    net = Net()
    b = _batches(1)[0]
    a = cquant.calibrate(net, [(b, 2.0)])
    c = cquant.calibrate(net, {"x": b, "scale": 2.0})          # one dict = one batch, as kwargs
    d = cquant.calibrate(net, b)                                # one bare array = one batch
    np.testing.assert_array_equal(a["fc2"].absmax, c["fc2"].absmax)
    np.testing.assert_array_equal(a["fc2"].absmax, d["fc2"].absmax)
    with pytest.raises(errors.ValueError):
        cquant.calibrate(net, [])
    with pytest.raises(errors.TypeError):
        cquant.calibrate(net, 3)
    # a bare tuple of integer arrays: one batch of two arguments, or two batches? (ids, mask) ran the
    # mask as a second batch of ids; refused, a list says which
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(errors.TypeError, match="ambiguous"):
        cquant.calibrate(net, (ids, ids))
    two = cquant.calibrate(net, (b, b))                        # floats (torch.split's chunks): batches
    assert two.batches == 2 and cquant.calibrate(net, (b,)).batches == 1
    e = cquant.calibrate(net, ((b, 2.0),))                     # a tuple of tuples is not ambiguous
    np.testing.assert_array_equal(a["fc2"].absmax, e["fc2"].absmax)
    with pytest.raises(errors.ValueError, match="no Linear"):
        cquant.calibrate(nn.Sequential(nn.ReLU()), [b])


def test_exception_in_batch_restores_model():
    net = Net()
    with pytest.raises(errors.ShapeError):
        cquant.calibrate(net, [np.zeros((2, 7), np.float32)])
    assert "forward" not in vars(net.fc1)
    np.testing.assert_array_equal(net(_batches(1)[0]), Net()(_batches(1)[0]))


def test_nonfinite_values_are_counted_and_left_out():
    s = LayerStats.empty("l", 3)
    s.update(np.array([[1.0, np.nan, -2.0], [np.inf, 0.5, 1.0]], np.float32))
    assert s.nonfinite == 2
    np.testing.assert_array_equal(s.absmax, [1.0, 0.5, 2.0])


def test_reservoir_keeps_real_rows():
    s = LayerStats.empty("l", 4, keep_rows=10)
    data = np.arange(400, dtype=np.float32).reshape(100, 4)
    for i in range(0, 100, 7):
        s.update(data[i:i + 7])
    assert s.samples.shape == (10, 4)
    assert all(any((r == d).all() for d in data) for r in s.samples)
    assert s.samples[:, 0].max() > 40      # later rows get in too


class Dense:
    """Duck-typed layer: __call__ does the work, no forward."""
    def __init__(self, w):
        self.weight = w
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def __call__(self, x):
        return x @ self.weight.T


class DuckNet:
    def __init__(self):
        g = np.random.default_rng(3)
        self.layers = [Dense(g.standard_normal((8, 6)).astype(np.float32)),
                       Dense(g.standard_normal((4, 8)).astype(np.float32))]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_duck_typed_model_via_call():
    m = DuckNet()
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    cal = cquant.calibrate(m, [x])
    assert list(cal) == ["layers.0", "layers.1"]
    np.testing.assert_array_equal(cal["layers.0"].absmax, np.abs(x).max(0))
    np.testing.assert_allclose(cal["layers.1"].absmax, np.abs(x @ m.layers[0].weight.T).max(0), rtol=1e-6)
    assert type(m.layers[0]) is Dense and "forward" not in vars(m.layers[0])


def test_torch_model_via_hooks():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    cal = cquant.calibrate(tm, [x, {"input": x * 2}])
    assert list(cal) == ["0", "2"] and cal.frontend == "torch"
    np.testing.assert_allclose(cal["0"].absmax, np.abs(2 * x).max(0), rtol=1e-6)
    with torch.no_grad():  # both batches (with a bias, relu(W x + b) can exceed relu(2 W x + b))
        h = torch.cat([torch.relu(tm[0](torch.from_numpy(v))) for v in (x, 2 * x)]).numpy()
    np.testing.assert_allclose(cal["2"].absmax, np.abs(h).max(0), rtol=1e-6)
    assert not tm[0]._forward_hooks
