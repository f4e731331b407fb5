"""Int8 embedding tables for every front-end (issue 9 item 8): opt-in, exact lookups, tie-aware,
round trips through state_dict / pickle / cquant.save / load / load_into."""
import copy
import json
import os
import pickle

import numpy as np
import pytest

import cquant
from cquant import errors, nn, ops
from cquant.embedding import QuantizedEmbedding, gather_codes, lookup, resolve_ties
from cquant.io import KEY_LAYERS, KEY_TIED, CheckpointError, SafetensorsReader, StreamWriter
from cquant.quantization import model_nbytes, report

V, D = 300, 48


class TinyLM(nn.Module):
    """cquant.nn: token + position tables, a Linear, an output head (tied to the token table)."""

    def __init__(self, tie: bool = True, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.wte = nn.Embedding(V, D, padding_idx=0, rng=rng)
        self.wpe = nn.Embedding(16, D, rng=rng)
        self.fc = nn.Linear(D, D, rng=rng)
        self.lm_head = nn.Linear(D, V, bias=False, rng=rng)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(np.arange(np.shape(ids)[-1]))
        return self.lm_head(self.fc(x))


def _ids(shape=(2, 7), seed=1, high=V):
    return np.random.default_rng(seed).integers(0, high, shape)


def _oracle(qw, ids):
    return ops.dequantize(qw)[np.asarray(ids)]


# ---- the lookup itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["n16k4", "n64k4"])
@pytest.mark.parametrize("n,k", [(1, 1), (17, 7), (70, 33), (130, 64)])
def test_lookup_reads_rows_from_the_packed_codes(fmt, n, k):
    rng = np.random.default_rng(n * 100 + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s = ops.quantize(w, granularity="per_channel")
    qw = ops.QuantizedWeight.from_codes(q, s, "per_channel", format=fmt)
    for shape in [(), (5,), (2, 3), (2, 0), (1, 2, 3)]:
        ids = rng.integers(0, n, shape)
        assert np.array_equal(gather_codes(qw, ids), q[ids])
        out = lookup(qw, ids)
        assert out.dtype == np.float32 and out.shape == tuple(shape) + (k,)
        assert np.array_equal(out, _oracle(qw, ids))               # bit for bit


def test_quantized_embedding_never_builds_the_float_table(monkeypatch):
    emb = nn.Embedding(V, D, rng=0)
    qe = QuantizedEmbedding.from_embedding(emb)

    def boom(*a, **k):
        raise AssertionError("the whole table was dequantized / unpacked")
    monkeypatch.setattr(ops, "dequantize", boom)
    monkeypatch.setattr(ops.QuantizedWeight, "q", property(boom))
    qe(_ids())


# ---- cquant.nn models -----------------------------------------------------------------------------------

def test_default_keeps_tables_float():
    m = TinyLM(tie=False)
    q = cquant.Quantizer()
    q.quantize(m)
    assert type(m.wte) is nn.Embedding and type(m.wpe) is nn.Embedding
    status = {r.name: (r.status, r.reason) for r in q.summary}
    assert status["wte"] == ("skipped", "embedding (Embedding): never quantized")


def test_nn_tables_quantized_and_exact_against_the_oracle():
    m = TinyLM(tie=False)
    ref = m(_ids())
    q = cquant.Quantizer(embeddings=True)
    qm = q.quantize(m, inplace=False)
    assert type(m.wte) is nn.Embedding                               # inplace=False: original untouched
    assert isinstance(qm.wte, QuantizedEmbedding) and isinstance(qm.wpe, QuantizedEmbedding)
    assert qm.wte.padding_idx == 0 and qm.wte.tied_to is None
    for ids in (_ids(), _ids((3,)), np.int64(5), _ids((2, 2, 2)).astype(np.int32), _ids((4,)).astype(np.uint8)):
        assert np.array_equal(qm.wte(ids), _oracle(qm.wte.qweight, ids))
    assert not qm.wte(np.array([0])).any()                           # the padding row stays exactly zero
    rec = {r.name: r for r in q.summary}
    assert rec["wte"].status == "quantized" and rec["wte"].scheme == "int8 embedding per_channel"
    assert rec["wte"].bytes_before == V * D * 4 and rec["wte"].bytes_after == qm.wte.qweight.nbytes
    y = qm(_ids())
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
    assert {r.name for r in report(qm)} == {"wte", "wpe", "fc", "lm_head"}


def test_bad_ids_give_clear_errors():
    qe = cquant.Quantizer.quantize_dynamic(TinyLM(tie=False), embeddings=True).wte
    with pytest.raises(errors.ValueError, match=r"\[0, 300\).*\[-1, 3\]"):
        qe(np.array([3, -1]))
    with pytest.raises(ValueError, match=r"in \[0, 300\)"):
        qe(np.array([[300]]))
    with pytest.raises(errors.TypeError, match="integers.*float"):
        qe(np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="integers.*bool"):
        qe(np.array([True]))


def test_patterns_and_exclude_select_tables():
    q = cquant.Quantizer(embeddings="wpe")
    m = q.quantize(TinyLM(tie=False))
    assert isinstance(m.wpe, QuantizedEmbedding) and type(m.wte) is nn.Embedding
    assert {r.name: r.reason for r in q.summary}["wte"] == "not matched by embeddings=['wpe']"
    q = cquant.Quantizer(embeddings=True, exclude=["wte"])
    m = q.quantize(TinyLM(tie=False))
    assert type(m.wte) is nn.Embedding and "excluded by pattern 'wte'" in {r.name: r.reason for r in q.summary}["wte"]
    with pytest.raises(TypeError):
        cquant.Quantizer(embeddings=3)


def test_nn_tie_is_quantized_once_and_counted_once():
    m = TinyLM()
    ids = _ids()
    q = cquant.Quantizer(embeddings=True)
    qm = q.quantize(m, inplace=False)
    assert qm.wte.tied_to is qm.lm_head and qm.wte.qweight is qm.lm_head.qweight
    rec = {r.name: r for r in q.summary}
    assert "tied to 'lm_head'" in rec["wte"].reason and rec["wte"].bytes_after == 0
    # per-row int8 of the table == per_channel int8 of the head: the table reads exactly its own codes
    alone = QuantizedEmbedding.from_embedding(m.wte)
    assert np.array_equal(alone.weight_q, qm.wte.weight_q) and np.array_equal(alone.weight_scale, qm.wte.weight_scale)
    assert np.array_equal(qm.wte(ids), alone(ids))
    # bytes: the shared codes once
    untied = cquant.Quantizer(embeddings=["wpe"]).quantize(TinyLM(), inplace=False)
    assert model_nbytes(qm) < model_nbytes(untied)
    assert model_nbytes(qm) == sum(r.bytes_after for r in report(qm))
    rows = {r.name: r for r in report(qm)}
    assert rows["wte"].bytes_after == qm.lm_head.qweight.nbytes and rows["lm_head"].shared_with == "wte"
    assert rows["lm_head"].bytes_after == 0
    # the state_dict holds the pair once; loading it keeps the tie
    sd = qm.state_dict()
    assert "wte.weight_q" not in sd and "lm_head.weight_q" in sd
    other = cquant.Quantizer(embeddings=True).quantize(TinyLM(seed=5))
    other.load_state_dict(sd)
    assert other.wte.tied_to is other.lm_head and np.array_equal(other(ids), qm(ids))
    # deep copies and pickles keep it too
    for c in (copy.deepcopy(qm), pickle.loads(pickle.dumps(qm))):
        assert c.wte.tied_to is c.lm_head and np.array_equal(c(ids), qm(ids))


@pytest.mark.parametrize("kw", [dict(granularity="per_group", group_size=16), dict(granularity="per_tensor"),
                                dict(scheme="int4 weight_only per_group(16)")])
def test_nn_tie_with_other_codes_skips_the_table(kw):
    q = cquant.Quantizer(embeddings=True, **kw)
    qm = q.quantize(TinyLM(), inplace=False)
    assert type(qm.wte) is nn.Embedding and isinstance(qm.wpe, QuantizedEmbedding)
    reason = {r.name: r.reason for r in q.summary}["wte"]
    assert "tied to 'lm_head'" in reason and "stored twice" in reason


def test_nn_tie_to_a_float_head_skips_the_table():
    q = cquant.Quantizer(embeddings=True, exclude=["lm_head"])
    qm = q.quantize(TinyLM(), inplace=False)
    assert type(qm.wte) is nn.Embedding and type(qm.lm_head) is nn.Linear
    assert "not quantized" in {r.name: r.reason for r in q.summary}["wte"]


def test_resolve_ties_to_a_fixed_point():
    """cquant.embedding.resolve_ties, the tie rule of both front-ends, on plain objects."""
    class Mod:
        def __init__(self, name):
            self.name = name

    class Plan:
        def __init__(self, name, per_channel_int8):
            self.name, self.per_channel_int8 = name, per_channel_int8

    mods = {n: Mod(n) for n in ("a", "b", "f", "c", "head", "d", "head2", "e1", "e2", "g", "sub")}
    plans = {id(mods["head"]): Plan("head", True), id(mods["head2"]): Plan("head2", False)}
    arrays = [("a", "f", "b"), ("c", "head"), ("d", "head2"), ("e1", "e2"), ("g", "sub")]  # the holders of each
    held = {n: [(h, mods[h]) for h in arr] for arr in arrays for n in arr}
    tables = {id(mods[n]): mods[n] for n in ("a", "b", "c", "d", "e1", "e2", "g")}

    def resolve(tables, holders=lambda t: held[t.name]):
        return resolve_ties(tables, holders, lambda o: plans.get(id(o)), lambda p: p.per_channel_int8,
                            quantized=lambda o: id(o) in plans or o is mods["sub"])

    kept, dropped = resolve(tables)
    assert len(tables) == 7                                                         # nothing is modified
    # per_channel int8 codes: shared; another table only, or a quantized holder without a plan: own codes
    assert [(t.name, p and p.name) for t, p in kept] == [("c", "head"), ("e1", None), ("e2", None), ("g", None)]
    why = dict((t.name, r) for t, r in dropped)
    assert list(why) == ["a", "b", "d"]
    assert why["a"] == "weight tied to f.weight (Mod, not quantized): kept float32 so that it is stored once"
    assert why["b"].startswith("weight tied to a.weight (Mod, not quantized)")     # a table left float
    assert why["d"].startswith("weight tied to 'head2', which is not quantized per_channel int8") and \
        "stored twice" in why["d"]
    # a table that sees another one left float only in a later pass: still float (a fixed point)
    one_way = {"b": [("b", mods["b"]), ("a", mods["a"])], "a": [("a", mods["a"]), ("f", mods["f"])]}
    kept, dropped = resolve({id(mods[n]): mods[n] for n in ("b", "a")}, lambda t: one_way[t.name])
    assert kept == [] and [(t.name, r.split(" (")[0]) for t, r in dropped] == [
        ("a", "weight tied to f.weight"), ("b", "weight tied to a.weight")]


def test_duck_typed_trees_have_no_embedding_protocol():
    class TokenEmbedding:
        def __init__(self):
            self.weight = np.ones((10, 4), np.float32)

        def __call__(self, ids):
            return self.weight[ids]

    class Lin:
        def __init__(self):
            self.in_features, self.out_features = 4, 4
            self.weight = np.eye(4, dtype=np.float32)
            self.bias = None

        def forward(self, x):
            return x @ self.weight.T

    tree = {"embed": TokenEmbedding(), "nnemb": nn.Embedding(10, 4, rng=0), "proj": Lin()}
    q = cquant.Quantizer(embeddings=True)
    q.quantize(tree)
    rec = {r.name: r for r in q.summary}
    assert rec["proj"].status == "quantized"
    for name in ("embed", "nnemb"):
        assert rec[name].status == "skipped" and "no embedding protocol" in rec[name].reason
    assert type(tree["nnemb"]) is nn.Embedding


def test_nn_save_load_round_trips_bit_exactly(tmp_path):
    ids = _ids()
    for tie in (True, False):
        qm = cquant.Quantizer.quantize_dynamic(TinyLM(tie=tie), embeddings=True)
        y = qm(ids)
        path = tmp_path / f"m{tie}.safetensors"
        cquant.save(qm, path)
        with SafetensorsReader(path) as r:
            layers = json.loads(r.metadata[KEY_LAYERS])
            assert layers["wpe"]["kind"] == "embedding" and layers["wpe"]["granularity"] == "per_channel"
            if tie:
                assert json.loads(r.metadata[KEY_TIED]) == {"wte": "lm_head"}
                assert "wte" not in layers and not any(k.startswith("wte.") for k in r.infos)
            else:
                assert KEY_TIED not in r.metadata and layers["wte"]["kind"] == "embedding"
        ck = cquant.load(path)
        assert ck.kinds["wte"] == "embedding" and (ck.tied == ({"wte": "lm_head"} if tie else {}))
        fresh = cquant.load_into(TinyLM(tie=tie, seed=7), path)
        assert isinstance(fresh.wte, QuantizedEmbedding) and fresh.wte.padding_idx == 0
        assert (fresh.wte.tied_to is fresh.lm_head) == tie
        assert np.array_equal(fresh(ids), y)
        if tie:
            assert model_nbytes(fresh) == model_nbytes(qm)


def test_tied_metadata_is_validated(tmp_path):
    qm = cquant.Quantizer.quantize_dynamic(TinyLM(), embeddings=True)
    good = tmp_path / "good.safetensors"
    cquant.save(qm, good)
    with SafetensorsReader(good) as r:
        meta = dict(r.metadata)
        tensors = {k: np.array(r.tensor(k)) for k in r.infos}

    def write(name, **changes):
        p = tmp_path / name
        m = {**meta, **changes}
        with open(p, "wb") as f:
            w = StreamWriter(f, [(k, "I8" if v.dtype == np.int8 else "F32", v.shape) for k, v in tensors.items()], m)
            for k, v in tensors.items():
                w.write(k, v)
            w.close()
        return p

    assert cquant.load(write("ok.safetensors")).tied == {"wte": "lm_head"}
    with pytest.raises(CheckpointError, match="not a layer of the file"):
        cquant.load(write("a.safetensors", **{KEY_TIED: json.dumps({"wte": "nothing"})}))
    with pytest.raises(CheckpointError, match="also has a layer"):
        cquant.load(write("b.safetensors", **{KEY_TIED: json.dumps({"wpe": "lm_head"})}))
    layers = json.loads(meta[KEY_LAYERS])
    layers["lm_head"]["granularity"] = "per_tensor"
    tensors["lm_head.weight_scale"] = tensors["lm_head.weight_scale"][:1].copy()
    with pytest.raises(CheckpointError, match="not a per_channel int8"):
        cquant.load(write("c.safetensors", **{KEY_LAYERS: json.dumps(layers)}))


def test_legacy_spellings_and_pickles_keep_working():
    import cquant.bert as bert
    assert bert.QuantizedEmbedding is QuantizedEmbedding
    w = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    q, s = ops.quantize(w, granularity="per_channel")
    qe = bert.QuantizedEmbedding(q, s)                             # the old constructor
    assert np.array_equal(qe.weight_q, q) and np.array_equal(qe.weight_scale, s)
    assert set(qe.state_dict()) == {"weight_q", "weight_scale"}
    # a pickle written by the earlier class (codes as parameters weight_q / weight_scale)
    old = QuantizedEmbedding.__new__(QuantizedEmbedding)
    nn.Module.__init__(old)
    old._parameters.update(weight_q=q, weight_scale=s)
    object.__setattr__(old, "num_embeddings", 20)
    object.__setattr__(old, "embedding_dim", 8)
    for k in ("_qweight", "_cquant_tie", "padding_idx"):
        old.__dict__.pop(k, None)
    raw = pickle.dumps(old, protocol=0).replace(b"cquant.embedding", b"cquant.bert")
    assert b"cquant.bert" in raw
    back = pickle.loads(raw)
    assert isinstance(back, QuantizedEmbedding) and np.array_equal(back(np.arange(20)), qe(np.arange(20)))
    # the BERT helper
    m = nn.Sequential(nn.Embedding(20, 8, rng=0))
    m.add_module("word_embeddings", nn.Embedding(20, 8, rng=1))
    assert bert.quantize_embeddings(m) == ["word_embeddings"]
    assert isinstance(m.word_embeddings, QuantizedEmbedding)


# ---- torch ----------------------------------------------------------------------------------------------

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


if torch is not None:
    class Toy(torch.nn.Module):
        """torch: token + position tables, a Linear, an output head (tied to the token table)."""

        def __init__(self, tie=True):
            super().__init__()
            self.wte = torch.nn.Embedding(V, D, padding_idx=0)
            self.wpe = torch.nn.Embedding(16, D)
            self.fc = torch.nn.Linear(D, D)
            self.lm_head = torch.nn.Linear(D, V, bias=False)
            if tie:
                self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            return self.lm_head(self.fc(self.wte(ids) + self.wpe(torch.arange(ids.shape[-1]))))


def _toy(tie=True, seed=0):
    torch.manual_seed(seed)
    return Toy(tie).eval()


@needs_torch
def test_torch_default_off_and_untied_tables():
    from cquant.adapters.torch import AutogradError, QuantizedTorchEmbedding
    m = cquant.Quantizer().quantize(_toy(tie=False))
    assert type(m.wte) is torch.nn.Embedding
    m = _toy(tie=False)
    ids = torch.from_numpy(_ids())
    with torch.no_grad():
        ref = m(ids)
    q = cquant.Quantizer(embeddings=True)
    q.quantize(m)
    assert isinstance(m.wte, QuantizedTorchEmbedding) and isinstance(m.wpe, QuantizedTorchEmbedding)
    assert m.wte.padding_idx == 0 and m.wte.tied_to is None
    for t in (ids, ids.to(torch.int32), ids[0], torch.tensor(3)):
        y = m.wte(t)
        assert y.dtype == torch.float32
        assert np.array_equal(y.numpy(), _oracle(m.wte.qweight, t.numpy()))
    assert not m.wte(torch.tensor([0])).any()
    with torch.no_grad():
        assert float((m(ids) - ref).abs().max()) < 0.05 * float(ref.abs().max())
    with pytest.raises(errors.ValueError, match=r"\[0, 300\)"):
        m.wte(torch.tensor([-1]))
    with pytest.raises(errors.ValueError, match=r"\[0, 300\)"):
        m.wte(torch.tensor([V]))
    with pytest.raises(errors.TypeError, match="integer"):
        m.wte(torch.tensor([1.0]))
    with pytest.raises(AutogradError):
        m.train()
    assert {r.name: r.scheme for r in q.summary}["wte"] == "int8 embedding per_channel"
    # .half(): codes stay int8, outputs follow the model's dtype
    m.wpe.half()
    assert m.wpe(torch.tensor([1])).dtype == torch.float16


@needs_torch
def test_torch_state_dict_pickle_and_trace_round_trip():
    import io as _io
    m = cquant.Quantizer.quantize_dynamic(_toy(tie=False), embeddings=True)
    ids = torch.from_numpy(_ids())
    y = m(ids)
    sd = m.state_dict()
    assert sd["wte.weight_q"].dtype == torch.int8 and tuple(sd["wte.weight_q"].shape) == (V, D)
    assert sd["wte.weight_scale"].dtype == torch.float32 and tuple(sd["wte.weight_scale"].shape) == (V,)
    other = cquant.Quantizer.quantize_dynamic(_toy(tie=False, seed=3), embeddings=True)
    other.load_state_dict(sd)
    assert torch.equal(other(ids), y)
    assert torch.equal(other.wte.state_dict()["weight_q"], sd["wte.weight_q"])
    buf = _io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(ids), y)
    if not os.environ.get("CQUANT_SANITIZER"):  # torch.jit.trace aborts under ASan (Makefile: ASAN_DESELECT)
        traced = torch.jit.trace(m.wte, (ids,))
        assert torch.equal(traced(ids), m.wte(ids))


@needs_torch
def test_torch_unsupported_tables_are_skipped_with_a_reason():
    class Scaled(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    m = torch.nn.Sequential(Scaled(10, 4), torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.Linear(4, 4))
    q = cquant.Quantizer(embeddings=True)
    q.quantize(m)
    rec = {r.name: r.reason for r in q.summary}
    assert "overrides Embedding.forward" in rec["0"] and "max_norm" in rec["1"]
    assert type(m[0]) is Scaled and type(m[1]) is torch.nn.Embedding


@needs_torch
def test_torch_tie_quantized_once_stored_once(tmp_path):
    from cquant.adapters.torch import QuantizedTorchEmbedding, QuantizedTorchLinear
    m = _toy()
    ids = torch.from_numpy(_ids())
    q = cquant.Quantizer(embeddings=True)
    qm = q.quantize(m, inplace=False)
    assert isinstance(qm.lm_head, QuantizedTorchLinear) and isinstance(qm.wte, QuantizedTorchEmbedding)
    assert qm.wte.tied_to is qm.lm_head and qm.wte.qweight is qm.lm_head.qweight
    rec = {r.name: r for r in q.summary}
    assert rec["lm_head"].status == "quantized" and "tied to 'lm_head'" in rec["wte"].reason
    rows = {r.name: r for r in report(qm)}
    assert rows["lm_head"].shared_with == "wte" and rows["lm_head"].bytes_after == 0
    assert sum(r.bytes_after for r in report(qm)) == sum(
        mm.qweight.nbytes for mm in (qm.wpe, qm.fc, qm.lm_head)) + qm.fc.bias_array.nbytes
    with torch.no_grad():
        y = qm(ids)
        assert np.array_equal(qm.wte(ids).numpy(), _oracle(qm.lm_head.qweight, ids.numpy()))
    sd = qm.state_dict()
    assert not any(k.startswith("wte.") for k in sd) and "lm_head.weight_q" in sd
    other = cquant.Quantizer(embeddings=True).quantize(_toy(seed=4))
    other.load_state_dict(sd)
    assert other.wte.tied_to is other.lm_head and torch.equal(other(ids), y)
    c = copy.deepcopy(qm)
    assert c.wte.tied_to is c.lm_head and torch.equal(c(ids), y)
    # cquant.save stores the pair once; load_into a fresh float model restores both, tied, bit-exactly
    path = tmp_path / "toy.safetensors"
    cquant.save(qm, path)
    with SafetensorsReader(path) as r:
        assert json.loads(r.metadata[KEY_TIED]) == {"wte": "lm_head"}
        assert not any(k.startswith("wte.") for k in r.infos)
    fresh = cquant.load_into(_toy(seed=9), path)
    assert isinstance(fresh.wte, QuantizedTorchEmbedding) and fresh.wte.tied_to is fresh.lm_head
    assert fresh.wte.padding_idx == 0
    with torch.no_grad():
        assert torch.equal(fresh(ids), y)


@needs_torch
def test_torch_tie_with_other_codes_or_float_head_skips_both():
    for kw in (dict(granularity="per_group", group_size=16), dict(exclude=["lm_head"])):
        q = cquant.Quantizer(embeddings=True, **kw)
        qm = q.quantize(_toy(), inplace=False)
        assert type(qm.wte) is torch.nn.Embedding and type(qm.lm_head) is torch.nn.Linear
        assert qm.lm_head.weight is qm.wte.weight                      # still tied, stored once
        rec = {r.name: r.reason for r in q.summary}
        assert "tied to" in rec["wte"] and "kept float32" in rec["wte"]
    # per-layer schemes: the tie is resolved in the call that quantizes lm_head
    q = cquant.Quantizer(embeddings=True, scheme={"fc": "int8 dynamic per_group(16)"})
    qm = q.quantize(_toy(), inplace=False)
    assert qm.wte.tied_to is qm.lm_head and qm.fc.qweight.granularity == "per_group"


@needs_torch
def test_torch_load_into_keeps_a_tie_to_a_float_head_as_a_float_table(tmp_path):
    """A file whose table is an int8 layer but whose model ties it to a Linear that stays float (the
    CLI on a GPT-2 checkpoint: no lm_head in the file): the table is dequantized into the shared
    Parameter, so the head follows."""
    qm = cquant.Quantizer.quantize_dynamic(_toy(tie=False), embeddings=True, exclude=["lm_head"])
    path = tmp_path / "t.safetensors"
    cquant.save(qm, path)
    fresh = cquant.load_into(_toy(tie=True, seed=2), path, strict=False)
    assert type(fresh.wte) is torch.nn.Embedding and fresh.lm_head.weight is fresh.wte.weight
    with torch.no_grad():
        assert torch.equal(fresh.wte.weight, torch.from_numpy(ops.dequantize(qm.wte.qweight)))


transformers = None
try:
    import transformers  # noqa: F811
except ImportError:  # pragma: no cover
    pass
needs_hf = pytest.mark.skipif(torch is None or transformers is None, reason="torch / transformers not installed")


@needs_hf
def test_transformers_gpt2_tied_lm_head(tmp_path):
    from cquant.adapters.torch import QuantizedTorchEmbedding
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        ref = g(ids).logits
    q = cquant.Quantizer(embeddings=True)
    qg = q.quantize(copy.deepcopy(g))
    wte = qg.transformer.wte
    assert isinstance(wte, QuantizedTorchEmbedding) and wte.tied_to is qg.lm_head
    assert isinstance(qg.transformer.wpe, QuantizedTorchEmbedding)
    with torch.no_grad():
        y = qg(ids).logits
    assert float((y - ref).norm() / ref.norm()) < 0.05
    assert qg.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    # stored once, counted once
    assert not any(k.startswith("transformer.wte.") for k in qg.state_dict())
    assert [r.name for r in report(qg) if r.shared_with] == ["lm_head"]
    path = tmp_path / "gpt2.safetensors"
    cquant.save(qg, path)
    fresh = cquant.load_into(transformers.GPT2LMHeadModel(cfg).eval(), path)
    assert fresh.transformer.wte.tied_to is fresh.lm_head
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, y)
    # save_pretrained / from_pretrained too
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    cquant.save_pretrained(qg, tmp_path / "hf")
    back = cquant.from_pretrained(tmp_path / "hf")
    assert isinstance(back.transformer.wte, QuantizedTorchEmbedding) and back.transformer.wte.tied_to is back.lm_head
    with torch.no_grad():
        assert torch.equal(back(ids).logits, y)


@needs_hf
def test_transformers_bert_tables():
    from cquant.adapters.torch import QuantizedTorchEmbedding
    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    b = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 200, (2, 6))
    with torch.no_grad():
        ref = b(ids).last_hidden_state
    cquant.Quantizer.quantize_dynamic(b, embeddings="*word_embeddings")
    assert isinstance(b.embeddings.word_embeddings, QuantizedTorchEmbedding)
    assert type(b.embeddings.position_embeddings) is torch.nn.Embedding
    with torch.no_grad():
        y = b(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(y.flatten(0, 1), ref.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.99
