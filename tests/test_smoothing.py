"""SmoothQuant (cquant.smoothing) on synthetic models with planted outlier channels: runs without any
optional package (the torch part is skipped without torch)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import cquant
from cquant import errors, nn
from cquant.bert import BertConfig, BertModel, smooth_activations
from cquant.quantization import QuantizedLinear, Quantizer
from cquant.smoothing import INPUT_SCALES_ATTR, Smoothed, smooth, smoothing_scales

OUTLIERS = [3, 17, 40]


class PreNorm(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))): the LayerNorm output feeds fc1 only (foldable); its gain has
    planted outlier channels, as trained transformers' do."""

    def __init__(self, d=64, h=128, seed=0):
        super().__init__()
        g = np.random.default_rng(seed)
        self.norm = nn.LayerNorm(d)
        self.norm.weight = np.ones(d, np.float32)
        self.norm.weight[OUTLIERS] = 200.0
        self.norm.bias = g.normal(0, 0.1, d).astype(np.float32)
        self.fc1 = nn.Linear(d, h, rng=g)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, d, rng=g)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class PostNorm(PreNorm):
    """norm(x) is also the residual: folding 1/s into the norm would change the model."""

    def forward(self, x):
        a = self.norm(x)
        return a + self.fc2(self.act(self.fc1(a)))


def _batches(n=4, d=64, seed=1):
    g = np.random.default_rng(seed)
    return [g.standard_normal((4, 8, d)).astype(np.float32) for _ in range(n)]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_scales_formula():
    s = smoothing_scales(np.array([4.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_scales(np.array([9.0]), np.array([4.0]), 1.0), [9.0])


def test_prenorm_folds_into_layernorm_exactly_and_cuts_int8_error():
    model = PreNorm()
    test = _batches(seed=7)
    ref = [model(x) for x in test]
    plain = Quantizer.quantize_dynamic(copy.deepcopy(model))
    err_plain = np.mean([_rel(plain(x), r) for x, r in zip(test, ref)])

    sm = copy.deepcopy(model)
    res = smooth(sm, _batches(), alpha=0.5)
    g = {tuple(x.layers): x for x in res.groups}
    assert g[("fc1",)].how == "layernorm" and g[("fc1",)].folded_into == "norm"
    assert g[("fc2",)].how == "prescale"                      # GELU in between: wrapper
    assert type(sm.fc1) is nn.Linear and isinstance(sm.fc2, Smoothed)
    assert sm.norm.weight[OUTLIERS].max() < 200.0             # 1/s went into the gain
    for x, r in zip(test, ref):                               # exact in float
        assert _rel(sm(x), r) < 1e-5
    np.testing.assert_array_equal(getattr(sm, INPUT_SCALES_ATTR)["fc1"], g[("fc1",)].scale)

    Quantizer.quantize_dynamic(sm)
    assert isinstance(sm.fc1, QuantizedLinear) and isinstance(sm.fc2.linear, QuantizedLinear)
    err_smooth = np.mean([_rel(sm(x), r) for x, r in zip(test, ref)])
    assert err_smooth < err_plain / 1.5, (err_smooth, err_plain)
    # the layer with the planted outliers, on the same inputs (cquant.compare undoes the fold)
    sq_plain = {r.name: r.sqnr_db for r in cquant.compare(model, plain, test[:2], sensitivity=False).layers}
    sq_smooth = {r.name: r.sqnr_db for r in cquant.compare(model, sm, test[:2], sensitivity=False).layers}
    assert sq_smooth["fc1"] > sq_plain["fc1"] + 10, (sq_smooth, sq_plain)


def test_postnorm_fold_is_rejected_and_prescale_used():
    model = PostNorm()
    test = _batches(seed=5)
    ref = [model(x) for x in test]
    sm = copy.deepcopy(model)
    res = smooth(sm, _batches(), alpha=0.5)
    g = {tuple(x.layers): x for x in res.groups}
    assert g[("fc1",)].how == "prescale" and "would change the model output" in g[("fc1",)].note
    np.testing.assert_array_equal(sm.norm.weight, model.norm.weight)   # the fold was undone
    for x, r in zip(test, ref):
        assert _rel(sm(x), r) < 1e-5
    no_pre = copy.deepcopy(model)
    res = smooth(no_pre, _batches(), alpha=0.5, prescale=False)
    assert {x.how for x in res.groups} == {"none"} and type(no_pre.fc1) is nn.Linear
    np.testing.assert_array_equal(no_pre.fc1.weight, model.fc1.weight)


def test_one_call_api():
    model = PreNorm()
    test = _batches(seed=3)
    ref = [model(x) for x in test]
    q = Quantizer()
    out = q.prepare_and_quantize(model, calibration=_batches(), smoothing=0.5, inplace=False)
    assert out is not model and type(model.fc1) is nn.Linear            # inplace=False: original kept
    assert q.smoothing is not None and q.calibration is q.smoothing.calibration
    assert set(q.smoothing.smoothed_layers) == {"fc1", "fc2"}
    one = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=_batches(), smoothing=0.5)
    for x in test:
        np.testing.assert_array_equal(one(x), out(x))
    plain = Quantizer.quantize_dynamic(copy.deepcopy(model))
    assert np.mean([_rel(one(x), r) for x, r in zip(test, ref)]) < \
        np.mean([_rel(plain(x), r) for x, r in zip(test, ref)]) / 1.5
    kept = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=_batches(), smoothing=0.5,
                                      scheme={"fc2": None})       # the rule names the wrapped layer
    assert isinstance(kept.fc2, Smoothed) and type(kept.fc2.linear) is nn.Linear
    with pytest.raises(errors.ValueError, match="calibration"):
        Quantizer.quantize_dynamic(PreNorm(), smoothing=0.5)
    with pytest.raises(errors.ValueError):
        Quantizer.quantize_dynamic(PreNorm(), calibration=_batches(), smoothing=1.5)


def test_auto_alpha_not_worse_than_unsmoothed():
    model = PreNorm()
    test = _batches(seed=11)
    ref = [model(x) for x in test]
    auto = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=_batches(), smoothing="auto")
    plain = Quantizer.quantize_dynamic(copy.deepcopy(model))
    assert np.mean([_rel(auto(x), r) for x, r in zip(test, ref)]) < \
        np.mean([_rel(plain(x), r) for x, r in zip(test, ref)])


def _tiny_bert(seed=0):
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, add_pooling_layer=False)
    m = BertModel(cfg)
    g = np.random.default_rng(seed)
    state = {}
    for k, v in m.state_dict().items():
        if k.endswith("LayerNorm.weight"):
            w = np.ones(v.shape, np.float32)
            w[[1, 7]] = 30.0                               # planted outlier channels
            state[k] = w
        else:
            state[k] = g.normal(0, 0.2, v.shape).astype(np.float32)
    m.load_state_dict(state)
    return m


def test_bert_blocks_fold_value_into_output_and_stay_exact():
    model = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[0, 7:] = 0
    ref = model(ids, mask)
    sm = copy.deepcopy(model)
    res = smooth(sm, [(ids, mask)], alpha=0.5)
    how = {tuple(g.layers): (g.how, g.folded_into) for g in res.groups}
    assert how[("encoder.layer.0.attention.output.dense",)] == ("linear", "encoder.layer.0.attention.self.value")
    # post-norm: each LayerNorm output is also the residual of the next block; the fold goes into
    # the LayerNorm and that block multiplies the residual back by s in its add + LayerNorm pass
    qkv = tuple(f"encoder.layer.1.attention.self.{n}" for n in ("query", "key", "value"))
    assert how[qkv] == ("layernorm", "encoder.layer.0.output.LayerNorm")
    assert how[("encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                "encoder.layer.0.attention.self.value")] == ("layernorm", "embeddings.LayerNorm")
    assert how[("encoder.layer.1.intermediate.dense",)] == ("layernorm", "encoder.layer.1.attention.output.LayerNorm")
    groups = {tuple(g.layers): g for g in res.groups}
    assert groups[qkv].residual == ["encoder.layer.1.attention.output"]
    assert groups[("encoder.layer.1.intermediate.dense",)].residual == ["encoder.layer.1.output"]
    assert "residual scaled back in encoder.layer.1.output" in res.format()
    np.testing.assert_array_equal(sm.encoder.layer[1].output.residual_scale, groups[("encoder.layer.1.intermediate.dense",)].scale)
    # the FFN's second Linear reads GELU's output: no exact fold, a pre-scale wrapper
    assert how[("encoder.layer.1.output.dense",)][0] == "prescale"
    assert [n for n, m in sm.named_modules() if isinstance(m, Smoothed)] == [
        "encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert len(res.smoothed_layers) == 12
    valid = mask.astype(bool)
    assert _rel(sm(ids, mask)[valid], ref[valid]) < 1e-5
    # quantized, the fold matches the pre-scale wrappers it replaces (the same s; float32 rounding
    # of where 1/s is applied apart)
    import contextlib
    import cquant.smoothing as smoothing_mod
    real = smoothing_mod._watch_residuals
    try:
        smoothing_mod._watch_residuals = lambda *a: contextlib.nullcontext()
        wrapped = copy.deepcopy(model)
        res_w = smooth(wrapped, [(ids, mask)], alpha=0.5)
    finally:
        smoothing_mod._watch_residuals = real
    assert sum(isinstance(m, Smoothed) for _, m in wrapped.named_modules()) == 10
    for a, b in zip(res.groups, res_w.groups):
        np.testing.assert_array_equal(a.scale, b.scale)
    q = Quantizer.quantize_dynamic(copy.deepcopy(sm))(ids, mask)[valid]
    qw = Quantizer.quantize_dynamic(wrapped)(ids, mask)[valid]
    assert _rel(q, qw) < 0.1 * _rel(qw, ref[valid])
    names = smooth_activations(copy.deepcopy(model), lambda m: m(ids, mask))   # the bert.py front
    assert sorted(names) == sorted(res.smoothed_layers)


def test_duck_models_are_refused():
    class Duck:
        def __init__(self):
            self.fc = nn.Linear(4, 4, rng=0)
    with pytest.raises(errors.TypeError, match="cquant.nn or torch"):
        smooth(Duck(), [np.zeros((1, 4), np.float32)])


def test_torch_prenorm_and_postnorm():
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self, post):
            super().__init__()
            self.post = post
            self.norm = torch.nn.LayerNorm(64)
            self.fc1 = torch.nn.Linear(64, 128)
            self.fc2 = torch.nn.Linear(128, 64)
            with torch.no_grad():
                self.norm.weight[OUTLIERS] = 200.0

        def forward(self, x):
            a = self.norm(x)
            h = self.fc2(torch.nn.functional.gelu(self.fc1(a)))
            return (a if self.post else x) + h

    torch.manual_seed(0)
    for post in (False, True):
        m = Block(post).eval()
        test = _batches(seed=9)
        with torch.no_grad():
            ref = [m(torch.from_numpy(x)).numpy() for x in test]
        q = Quantizer()
        qm = q.prepare_and_quantize(m, calibration=_batches(), smoothing=0.5, inplace=False)
        g = {tuple(x.layers): x for x in q.smoothing.groups}
        assert g[("fc1",)].how == ("prescale" if post else "layernorm")
        assert type(qm.fc2).__name__ == "SmoothedTorchLinear"
        plain = Quantizer.quantize_dynamic(m, inplace=False)
        with torch.no_grad():
            e_s = np.mean([_rel(qm(torch.from_numpy(x)).numpy(), r) for x, r in zip(test, ref)])
            e_p = np.mean([_rel(plain(torch.from_numpy(x)).numpy(), r) for x, r in zip(test, ref)])
        assert e_s < e_p / 2, (post, e_s, e_p)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_prescale_runs_inside_the_kernel(monkeypatch, mode):
    """Once quantized, a pre-scale wrapper hands 1/s to the kernel (ops.linear's x_mul: the
    activation quantizer's pass) instead of multiplying x in numpy; same output bit for bit."""
    model = PostNorm()
    sm = copy.deepcopy(model)
    smooth(sm, _batches(), alpha=0.5)
    Quantizer.quantize_dynamic(sm, mode=mode)
    assert isinstance(sm.fc1, Smoothed) and isinstance(sm.fc1.linear, QuantizedLinear)
    x = _batches(n=1, seed=4)[0]
    a = sm.norm(x)
    want = cquant.ops.linear((a * sm.fc1.inv_scale).astype(np.float32), sm.fc1.linear.qweight,
                             sm.fc1.linear.bias, mode=mode)
    seen = []
    real = cquant.ops.linear

    def spy(x, qw, bias=None, mode="dynamic", **kw):
        seen.append(kw.get("x_mul") is not None)
        return real(x, qw, bias, mode, **kw)
    monkeypatch.setattr(cquant.ops, "linear", spy)
    got = sm.fc1(a)
    assert seen == [True]
    np.testing.assert_array_equal(got, want)


def test_torch_prescale_runs_inside_the_kernel(monkeypatch):
    torch = pytest.importorskip("torch")
    from cquant.adapters.torch_smoothing import SmoothedTorchLinear
    inv = np.linspace(0.5, 2.0, 64).astype(np.float32)
    wrapped = Quantizer.quantize_dynamic(torch.nn.Sequential(SmoothedTorchLinear(torch.nn.Linear(64, 32), inv)),
                                         inplace=False)
    assert type(wrapped[0].linear).__name__ == "QuantizedTorchLinear"
    x = torch.from_numpy(_batches(n=1, seed=2)[0])
    seen = []
    real = cquant.ops.linear

    def spy(x, qw, bias=None, mode="dynamic", **kw):
        seen.append(kw.get("x_mul") is not None)
        return real(x, qw, bias, mode, **kw)
    monkeypatch.setattr(cquant.ops, "linear", spy)
    with torch.no_grad():
        got = wrapped(x).numpy()
        want = wrapped[0].linear(x * torch.from_numpy(inv)).numpy()  # the multiply outside, as before
    assert seen == [True, False]
    np.testing.assert_array_equal(got, want)


def test_torch_prescale_stays_float32_when_cast_and_calibration_object_refused():
    torch = pytest.importorskip("torch")
    from cquant.adapters.torch_smoothing import SmoothedTorchLinear
    inv = np.array([1.0 + 2.0 ** -20, 3.0, 0.1], np.float32)   # not representable in float16
    w = SmoothedTorchLinear(torch.nn.Linear(3, 2), inv).half()
    assert w.inv_scale.dtype == torch.float32 and np.array_equal(w.inv_scale.numpy(), inv)
    assert w.linear.weight.dtype == torch.float16
    model = PreNorm()
    cal = cquant.calibrate(model, _batches())
    with pytest.raises(errors.TypeError, match="Calibration"):
        Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=cal, smoothing=0.5)


@pytest.mark.parametrize("kw", [{}, dict(mode="weight_only"), dict(smoothing=0.5), dict(smoothing=0.5, rotate="all")])
def test_bert_ffn_gelu_runs_in_the_kernel(monkeypatch, kw):
    """cquant.bert's FFN input layer, quantized (bare or in a smoothing wrapper), takes the GELU into
    its kernel (ops.linear(..., activation="gelu")): bit for bit the separate pass; a watched layer
    (calibration, compare) runs the plain forward so the watcher sees the layer's own output."""
    import cquant.bert as bert
    model = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[0, 6:] = 0
    q = Quantizer.quantize_dynamic(copy.deepcopy(model), calibration=[(ids, mask)] if kw.get("smoothing") else None, **kw)
    seen = []
    real = cquant.ops.linear
    monkeypatch.setattr(cquant.ops, "linear", lambda *a, **k: (seen.append(k.get("activation")), real(*a, **k))[1])
    fused = q(ids, mask)
    assert seen.count("gelu") == 2                       # one per layer
    monkeypatch.setattr(bert, "_fusable", lambda layer: False)
    np.testing.assert_array_equal(fused, q(ids, mask))   # the separate GELU pass: the same bits
    monkeypatch.undo()
    dense = q.encoder.layer[0].intermediate.dense
    assert bert._fusable(dense)
    object.__setattr__(dense, "forward", dense.forward)  # as an interceptor would
    assert not bert._fusable(dense)
    np.testing.assert_array_equal(fused, q(ids, mask))
    object.__delattr__(dense, "forward")
    cmp = cquant.compare(model, q, [(ids, mask)])        # watches every layer: still runs
    assert cmp.layers


def test_residual_scale_owns_its_array_and_refuses_nan():
    model = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    mask = np.ones((3, 10), np.int64)
    sm = copy.deepcopy(model)
    res = smooth(sm, [(ids, mask)], alpha=0.5)
    g = next(g for g in res.groups if g.residual)
    blk = sm.encoder.layer[1].attention.output
    assert blk.residual_scale is not g.scale and not np.shares_memory(blk.residual_scale, g.scale)
    keep = g.scale.copy()
    st = dict(sm.state_dict())
    st["encoder.layer.1.attention.output.residual_scale"] = np.ones_like(blk.residual_scale)
    sm.load_state_dict(st)                          # copies into the parameter in place
    np.testing.assert_array_equal(g.scale, keep)    # the smoothing result is not changed by it
    for bad in (np.full(32, np.nan, np.float32), np.zeros(32, np.float32), -np.ones(32, np.float32)):
        st["encoder.layer.1.attention.output.residual_scale"] = bad
        with pytest.raises(ValueError, match="residual_scale"):
            copy.deepcopy(sm).load_state_dict(st)


def _compare_rows(fm, qm, cal):
    return {r.name: (round(r.sqnr_db, 6), round(r.output_share, 6)) for r in cquant.compare(fm, qm, cal).layers}


def test_compare_of_a_smoothed_model_reloaded_from_a_checkpoint(tmp_path):
    """The folds of smoothing are saved: cquant.compare on the reloaded model gives the per-layer
    numbers of the model in memory (they were nonsense for the folded layers: the fold scales were
    lost, so the layers got the float model's input unscaled)."""
    fm = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    cal = [(ids, np.ones((3, 10), np.int64))]
    qm = Quantizer.quantize_dynamic(copy.deepcopy(fm), calibration=cal, smoothing=0.5)
    f = str(tmp_path / "q.safetensors")
    cquant.save(qm, f)
    back = cquant.load(f)
    np.testing.assert_array_equal(back(*cal[0]), qm(*cal[0]))
    assert _compare_rows(fm, back, cal) == _compare_rows(fm, qm, cal)
    for attr in ("_cquant_input_scales", "_cquant_output_scales"):
        mine, theirs = getattr(qm, attr), getattr(back, attr)
        assert sorted(mine) == sorted(theirs)
        for k in mine:
            np.testing.assert_array_equal(mine[k], theirs[k])
    # load_into a fresh model records them too; a checkpoint without folds clears a stale record
    fresh = _tiny_bert(5)
    cquant.load_into(fresh, f)
    assert _compare_rows(fm, fresh, cal) == _compare_rows(fm, qm, cal)
    plain = Quantizer.quantize_dynamic(copy.deepcopy(fm))
    g = str(tmp_path / "plain.safetensors")
    cquant.save(plain, g)
    other = _tiny_bert(6)
    object.__setattr__(other, INPUT_SCALES_ATTR, dict(getattr(qm, INPUT_SCALES_ATTR)))
    cquant.load_into(other, g)
    assert getattr(other, INPUT_SCALES_ATTR, None) is None
    assert _compare_rows(fm, other, cal) == _compare_rows(fm, plain, cal)
    # a smoothed file into a hand-built model: wrappers and residual factors in place, bit-exact
    np.testing.assert_array_equal(fresh(*cal[0]), qm(*cal[0]))
    with pytest.raises(errors.CheckpointError, match="is a Linear, the model has a Smoothed"):
        cquant.load_into(fresh, g)  # a plain file into the smoothed model: refused, model unchanged
    np.testing.assert_array_equal(fresh(*cal[0]), qm(*cal[0]))


def _rewrite(src, dst, meta_change=None, tensor_change=None):
    from safetensors.numpy import load_file, save_file
    from cquant.checkpoint_file import open_checkpoint
    with open_checkpoint(src) as r:
        meta = dict(r.metadata)
    tensors = load_file(src)
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, dst, metadata=meta)


@pytest.mark.parametrize("case", ["missing", "negative", "length", "twice", "dtype", "not_json", "bad_side"])
def test_lying_fold_records_are_refused(tmp_path, case):
    pytest.importorskip("safetensors")
    import json
    fm = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    qm = Quantizer.quantize_dynamic(copy.deepcopy(fm), calibration=[(ids, np.ones((3, 10), np.int64))], smoothing=0.5)
    f, g = str(tmp_path / "q.safetensors"), str(tmp_path / "bad.safetensors")
    cquant.save(qm, f)
    layer = "encoder.layer.1.intermediate.dense"
    key = f"cquant_fold_input.{layer}"

    def meta(m):
        lst = json.loads(m["cquant.folds"])
        if case == "twice":
            lst["input"].append(layer)
        if case == "bad_side":
            lst["sideways"] = []
        m["cquant.folds"] = "{" if case == "not_json" else json.dumps(lst)

    def tensors(t):
        if case == "missing":
            del t[key]
        elif case == "negative":
            t[key] = -t[key]
        elif case == "length":
            t[key] = t[key][:-1].copy()
        elif case == "dtype":
            t[key] = t[key].astype(np.float64)

    _rewrite(f, g, meta, tensors)
    with pytest.raises(errors.CheckpointError, match="cquant.folds"):
        cquant.load(g)


def test_torch_smoothed_round_trips_keep_the_folds(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")

    def model(seed):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64)
        return transformers.BertModel(cfg).eval()

    torch.manual_seed(1)
    cal = [{"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}]
    fm = model(0)
    qm = Quantizer.quantize_dynamic(copy.deepcopy(fm), calibration=cal, smoothing=0.5)
    want = _compare_rows(fm, qm, cal)
    d = tmp_path / "hf"
    cquant.save_pretrained(qm, d, max_shard_size=300)  # a shard per layer: each lists its own folds
    assert len(list(d.glob("cquant-model-*.safetensors"))) > 1
    assert _compare_rows(fm, cquant.from_pretrained(d), cal) == want
    # the folder read as one sharded cquant checkpoint: every shard's folds (the metadata merge kept
    # the first shard's list only, and a strict load_into refused the rest as unexpected tensors)
    from cquant.io import read_checkpoint
    assert read_checkpoint(d).folds["output"].keys() == qm._cquant_output_scales.keys()
    assert _compare_rows(fm, cquant.load_into(model(7), d), cal) == want
    f = str(tmp_path / "q.safetensors")
    cquant.save(qm, f)
    li = model(5)
    cquant.load_into(li, f)
    assert _compare_rows(fm, li, cal) == want


def test_load_into_hand_built_nn_model_with_a_float_smoothed_layer(tmp_path):
    """A smoothed layer that stayed float (scheme None) is wrapped in the hand-built model too; a zero
    inv_scale in the file is refused and the model is left as it was."""
    pytest.importorskip("safetensors")
    fm = _tiny_bert()
    ids = np.random.default_rng(1).integers(0, 50, (3, 10))
    cal = [(ids, np.ones((3, 10), np.int64))]
    keep = "encoder.layer.1.output.dense"  # a pre-scale wrapper (the FFN output has no fold)
    qm = Quantizer(scheme={"*": "per_channel", keep: None}).quantize(copy.deepcopy(fm), calibration=cal,
                                                                      smoothing=0.5, rotate="all")
    assert isinstance(qm.encoder.layer[1].output.dense, Smoothed)
    assert type(qm.encoder.layer[1].output.dense.linear) is nn.Linear
    f = str(tmp_path / "q.safetensors")
    cquant.save(qm, f)
    fresh = _tiny_bert(5)
    cquant.load_into(fresh, f)
    np.testing.assert_array_equal(fresh(*cal[0]), qm(*cal[0]))

    g = str(tmp_path / "bad.safetensors")

    def zero(t):
        t[keep + ".inv_scale"] = np.zeros_like(t[keep + ".inv_scale"])
    _rewrite(f, g, tensor_change=zero)
    other = _tiny_bert(6)
    before = other(*cal[0])
    with pytest.raises(errors.CheckpointError, match="finite non-zero"):
        cquant.load_into(other, g)
    assert not [n for n, m in other.named_modules() if isinstance(m, Smoothed)]
    assert all(m._parameters.get("residual_scale", None) is None for _, m in other.named_modules())
    np.testing.assert_array_equal(other(*cal[0]), before)


def test_from_pretrained_checks_fold_lengths(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    m = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=64)).eval()
    cal = [{"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}]
    qm = Quantizer.quantize_dynamic(m, calibration=cal, smoothing=0.5)
    d = tmp_path / "hf"
    cquant.save_pretrained(qm, d)
    f = d / "cquant-model.safetensors"
    t = st.load_file(str(f))
    key = next(k for k in t if k.startswith("cquant_fold_input."))
    t[key] = t[key][:-3].clone()
    from cquant.checkpoint_file import open_checkpoint
    with open_checkpoint(str(f)) as r:
        meta = dict(r.metadata)
    st.save_file(t, str(f), metadata=meta)
    with pytest.raises(errors.CheckpointError, match="fold of layer"):
        cquant.from_pretrained(d)
