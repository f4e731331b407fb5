"""Rotation (``smooth(..., rotate=True)``, ``Quantizer.quantize_dynamic(..., smoothing=0.5, rotate=True)``):
a Walsh-Hadamard transform of the smoothed input in blocks, inside the kernel's activation pass
(``ops.linear``'s ``x_hadamard``), with the weights rotated to match. On synthetic models with planted
outlier channels: the float model is unchanged, the int8 error falls below smoothing alone, the
kernel gets the rotation (no numpy pass), and the block size travels in state_dict and checkpoints.
The torch part is skipped without torch."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import cquant
from cquant import errors, nn, ops
from cquant.quantization import QuantizedLinear, Quantizer
from cquant.smoothing import Smoothed, rotation_block, smooth

from test_smoothing import PostNorm, _batches, _rel, _tiny_bert


def _err(model, test, ref):
    return float(np.mean([_rel(model(x), r) for x, r in zip(test, ref)]))


def _spiky(n=4, d=64, seed=1):
    """Rows with one large value each, in a channel that changes from row to row (as a transformer's
    massive activations on a few tokens): every channel's max is large, so per-channel smoothing
    cannot even them out, while a rotation spreads each spike over its block."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = g.standard_normal((32, d)).astype(np.float32)
        x[np.arange(32), g.integers(0, d, 32)] += g.choice([-1, 1], 32) * 50.0
        out.append(x)
    return out


class Spiky(nn.Module):
    """x + fc(x): the model input feeds fc and the residual, so there is no fold (a wrapper)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64, rng=np.random.default_rng(0))

    def forward(self, x):
        return x + self.fc(x)


def test_block_choice():
    assert rotation_block(384, True) == 64 and rotation_block(1536, True) == 64
    assert rotation_block(96, True) == 32 and rotation_block(100, True) == 4 and rotation_block(7, True) == 0
    assert rotation_block(384, 128) == 128 and rotation_block(96, 64) == 0


def test_rotation_keeps_the_float_model_and_beats_smoothing_alone():
    model = Spiky()
    test = _spiky(seed=5)
    ref = [model.fc(x) for x in test]
    rot = copy.deepcopy(model)
    res = smooth(rot, _spiky(), alpha=0.5, rotate=True)
    g = {tuple(x.layers): x for x in res.groups}
    assert g[("fc",)].how == "prescale" and g[("fc",)].hadamard == 64 and "rotated in blocks of 64" in res.format()
    assert int(rot.fc.hadamard[0]) == 64
    for x, r in zip(test, ref):                       # the same function in float
        assert _rel(rot(x) - x, r) < 1e-5

    def err(q):
        return float(np.mean([_rel(q(x) - x, r) for x, r in zip(test, ref)]))
    Quantizer.quantize_dynamic(rot)
    smo = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=_spiky(), smoothing=0.5)
    plain = Quantizer.quantize_dynamic(copy.deepcopy(model))
    e_rot, e_smo, e_plain = err(rot), err(smo), err(plain)   # 0.0115, 0.033, 0.0185 (bit-exact everywhere)
    assert e_rot < e_plain / 1.4 and e_rot < e_smo / 2, (e_rot, e_smo, e_plain)
    one = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=_spiky(), smoothing=0.5, rotate=True)
    for x in test:                                     # the one-call form does the same
        np.testing.assert_array_equal(one(x), rot(x))
    # in the post-norm model (LayerNorm output also the residual) the wrappers rotate both layers
    pm = copy.deepcopy(PostNorm())
    res = smooth(pm, _batches(), alpha=0.5, rotate=True)
    assert {tuple(x.layers): x.hadamard for x in res.groups} == {("fc1",): 64, ("fc2",): 64}


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_rotation_runs_inside_the_kernel(monkeypatch, mode):
    model = PostNorm()
    sm = Quantizer.quantize_dynamic(copy.deepcopy(model), mode=mode, calibration=_batches(), smoothing=0.5,
                                    rotate=True)
    assert isinstance(sm.fc1, Smoothed) and isinstance(sm.fc1.linear, QuantizedLinear)
    a = sm.norm(_batches(n=1, seed=4)[0])
    want = ops.linear(ops.hadamard(a, 64, sm.fc1.inv_scale), sm.fc1.linear.qweight, sm.fc1.linear.bias, mode=mode)
    seen = []
    real = ops.linear

    def spy(x, qw, bias=None, mode="dynamic", **kw):
        seen.append((kw.get("x_mul") is not None, kw.get("x_hadamard")))
        return real(x, qw, bias, mode, **kw)
    monkeypatch.setattr(cquant.ops, "linear", spy)
    got = sm.fc1(a)
    assert seen == [(True, 64)]
    np.testing.assert_array_equal(got, want)


def test_rotate_all_wraps_and_rotates_the_post_norm_groups_too():
    """rotate=True rotates the GELU-fed FFN output only (the LayerNorm-fed groups fold, with the
    residual scaled back); rotate="all" gives those groups rotated wrappers instead."""
    model = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    mask = np.ones((3, 10), np.int64)
    ref = model(ids, mask)
    rotated = {}
    for rot in (True, "all"):
        m = copy.deepcopy(model)
        res = smooth(m, [(ids, mask)], alpha=0.5, rotate=rot)
        assert _rel(m(ids, mask), ref) < 1e-5
        rotated[rot] = sorted(n for n, w in m.named_modules() if isinstance(w, Smoothed) and int(w.hadamard[0]))
        if rot == "all":
            assert all(b._parameters.get("residual_scale") is None
                       for n, b in m.named_modules() if n.endswith("output") and hasattr(b, "LayerNorm"))
            assert "rotate='all'" in res.format()
    assert rotated[True] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert len(rotated["all"]) == 10 and set(rotated[True]) < set(rotated["all"])
    one = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=[(ids, mask)], smoothing=0.5, rotate="all")
    assert sum(isinstance(w, Smoothed) for _, w in one.named_modules()) == 10


def test_rotation_is_refused_where_it_cannot_run():
    with pytest.raises(errors.ValueError, match="smoothing"):
        Quantizer.quantize_dynamic(PostNorm(), calibration=_batches(), rotate=True)
    with pytest.raises(errors.ValueError, match="prescale"):
        smooth(PostNorm(), _batches(), rotate=True, prescale=False)
    for bad in (3, 1, 0.5, "yes", "ALL", -4):
        with pytest.raises(errors.ValueError, match="rotate"):
            smooth(PostNorm(), _batches(), rotate=bad)
    with pytest.raises(errors.ValueError, match="hadamard"):
        Smoothed(nn.Linear(12, 4), np.ones(12, np.float32), 8)   # 8 does not divide 12


def test_rotation_travels_in_state_dict_and_checkpoints(tmp_path):
    model = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    mask = np.ones((3, 10), np.int64)
    q = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=[(ids, mask)], smoothing=0.5, rotate=True)
    sd = q.state_dict()
    # the FFN's second Linear (after GELU) has the only wrappers; the LayerNorm-fed groups are folded,
    # with the residual multiplied back in the next block (its residual_scale travels too)
    assert int(sd["encoder.layer.0.output.dense.hadamard"][0]) == 64         # K = 64 (intermediate)
    assert "encoder.layer.0.intermediate.dense.hadamard" not in sd
    assert sd["encoder.layer.0.output.residual_scale"].shape == (32,)
    assert sd["encoder.layer.1.attention.output.residual_scale"].shape == (32,)
    path = str(tmp_path / "rot.safetensors")
    cquant.save(q, path)
    back = cquant.load(path)
    np.testing.assert_array_equal(back(ids, mask), q(ids, mask))
    assert int(back.encoder.layer[0].output.dense.hadamard[0]) == 64
    np.testing.assert_array_equal(back.encoder.layer[0].output.residual_scale, sd["encoder.layer.0.output.residual_scale"])
    # a residual_scale of the wrong shape, or one the model has no place for, is refused
    st = dict(sd)
    st["encoder.layer.0.output.residual_scale"] = np.ones(31, np.float32)
    with pytest.raises(ValueError, match="residual_scale"):
        copy.deepcopy(q).load_state_dict(st)
    with pytest.raises(ValueError, match="residual_scale"):
        copy.deepcopy(model).load_state_dict(dict(copy.deepcopy(model).state_dict(),
                                                  **{"encoder.layer.0.output.residual_scale": np.ones(32, np.float32)}))
    from cquant.bert import BertModel
    cfg = q.cquant_config()
    assert cfg["residual_scaled"] == ["encoder.layer.0.attention.output", "encoder.layer.0.output",
                                      "encoder.layer.1.attention.output", "encoder.layer.1.output"]
    for bad in (["encoder.layer.0.intermediate"], ["encoder.layer.9.output"], ["nope"]):
        with pytest.raises(errors.ValueError):
            BertModel.from_cquant_config(dict(cfg, residual_scaled=bad))
    # a state_dict from before rotation (no .hadamard keys) loads as "no rotation"
    plain = copy.deepcopy(model)
    smooth(plain, [(ids, mask)], alpha=0.5)
    old = {k: v for k, v in plain.state_dict().items() if not k.endswith(".hadamard")}
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(old)
    np.testing.assert_array_equal(fresh(ids, mask), plain(ids, mask))
    # lying metadata: a block that is not a power of two dividing K, or not an integer
    for badv in (np.array([3]), np.array([64.0]), np.array([2, 2])):
        st = dict(q.state_dict())
        st["encoder.layer.0.intermediate.dense.hadamard"] = badv
        with pytest.raises(ValueError):
            copy.deepcopy(q).load_state_dict(st)


def _torch_spiky():
    torch = pytest.importorskip("torch")

    class TorchSpiky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return x + self.fc(x)
    torch.manual_seed(0)
    return TorchSpiky().eval()


def test_torch_rotation():
    torch = pytest.importorskip("torch")
    from cquant.adapters.torch_smoothing import SmoothedTorchLinear
    m = _torch_spiky()
    test = _spiky(seed=9)
    with torch.no_grad():
        ref = [m.fc(torch.from_numpy(x)).numpy() for x in test]
    fl = copy.deepcopy(m)
    smooth(fl, _spiky(), alpha=0.5, rotate=True)
    assert type(fl.fc).__name__ == "SmoothedTorchLinear" and fl.fc.block == 64

    def err(q):
        return float(np.mean([_rel(q(torch.from_numpy(x)).numpy() - x, r) for x, r in zip(test, ref)]))
    with torch.no_grad():
        assert err(fl) < 1e-5
    rot = Quantizer.quantize_dynamic(copy.deepcopy(m), calibration=_spiky(), smoothing=0.5, rotate=True)
    smo = Quantizer.quantize_dynamic(copy.deepcopy(m), calibration=_spiky(), smoothing=0.5)
    plain = Quantizer.quantize_dynamic(copy.deepcopy(m), inplace=False)
    with torch.no_grad():
        e_rot, e_smo, e_plain = err(rot), err(smo), err(plain)
        assert e_rot < e_plain / 1.4 and e_rot < e_smo / 2, (e_rot, e_smo, e_plain)
        # the quantized torch layer runs what the cquant kernel runs on the rotated input
        a = torch.from_numpy(test[0])
        want = ops.linear(ops.hadamard(a.numpy(), 64, rot.fc.inv_scale.numpy()), rot.fc.linear.qweight,
                          rot.fc.linear.bias_array)
        np.testing.assert_array_equal(rot.fc(a).numpy(), want)
    # state_dict: the block size is a buffer; a wrapper built without it takes it on load
    w = SmoothedTorchLinear(torch.nn.Linear(64, 64), np.ones(64, np.float32))
    w.load_state_dict(fl.fc.state_dict())
    assert w.block == 64 and int(w.hadamard[0]) == 64
    old = {k: v for k, v in fl.fc.state_dict().items() if k != "hadamard"}
    w.load_state_dict(old)                               # from before rotation: none
    assert w.block == 0
    bad = dict(fl.fc.state_dict(), hadamard=torch.tensor([3]))
    with pytest.raises(errors.ValueError, match="hadamard"):
        w.load_state_dict(bad)
    with torch.no_grad():                               # the float wrapper's torch rotation is the kernel's
        x = torch.from_numpy(test[1][0])
        from cquant.adapters.torch_base import hadamard_torch
        np.testing.assert_array_equal(hadamard_torch(x * fl.fc.inv_scale, 64).numpy(),
                                      ops.hadamard(x.numpy(), 64, fl.fc.inv_scale.numpy()))


def test_torch_trace_uses_the_rotation():
    torch = pytest.importorskip("torch")
    m = _torch_spiky()
    rot = Quantizer.quantize_dynamic(copy.deepcopy(m), calibration=_spiky(), smoothing=0.5, rotate=True)
    x = torch.from_numpy(_spiky(n=1, seed=3)[0])
    with torch.no_grad():
        eager = rot(x)
        traced = torch.jit.trace(rot, (x,), check_trace=False)
        np.testing.assert_array_equal(traced(x).numpy(), eager.numpy())


@pytest.mark.parametrize("kw", [{}, dict(smoothing=0.5), dict(smoothing=0.5, rotate=True), dict(mode="static")])
def test_bert_attention_shares_one_activation_pass(monkeypatch, kw):
    """cquant.bert's query/key/value (bare or in one smoothing group) run through one
    ops.linear_multi call, bit-identical to three calls; not while calibration watches the layers."""
    import cquant.bert as bert
    model = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[0, 6:] = 0
    q = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=[(ids, mask)] if kw else None, **kw)
    calls = []
    real = ops.linear_multi

    def spy(*a, **k):
        calls.append(len(a[1]))
        return real(*a, **k)
    monkeypatch.setattr(ops, "linear_multi", spy)
    shared = q(ids, mask)
    assert calls == [3, 3]                                  # one call per layer, three weights each
    monkeypatch.setattr(bert, "forward_shared", lambda layers, x: None)
    np.testing.assert_array_equal(shared, q(ids, mask))     # the same as one by one
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(ops, "linear_multi", spy)
    cquant.calibrate(q, [(ids, mask)])                      # watched layers: one by one
    assert calls == []
