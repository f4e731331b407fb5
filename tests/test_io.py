"""Quantized checkpoints: cquant.save / cquant.load / cquant.load_into, and the streaming reader/writer."""
import json
import os
import struct

import numpy as np
import pytest

import cquant
from cquant import nn
from cquant.bert import BertConfig, BertModel
from cquant.io import (FORMAT_VERSION, KEY_LAYERS, KEY_VERSION, Checkpoint, CheckpointError,
                       SafetensorsReader, StreamWriter, bf16_to_f32)
from cquant.models import ModelConfig, build_default_model, sample_inputs
from cquant.quantization import QuantizedLinear

st = pytest.importorskip("safetensors", reason="safetensors is not installed (optional: pip install safetensors)")
from safetensors.numpy import load_file, save_file  # noqa: E402


def _tiny_bert(seed=0, **kw):
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, **kw)
    m = BertModel(cfg)
    rng = np.random.default_rng(seed)
    for name, p in m.state_dict().items():
        if name.endswith("LayerNorm.weight"):
            p[...] = 1 + 0.1 * rng.standard_normal(p.shape)
        else:
            p[...] = 0.05 * rng.standard_normal(p.shape)
    return m


def _ids(seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 97, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_nn_model_roundtrip_rebuilds_model(tmp_path):
    m = _tiny_bert()
    cquant.Quantizer.quantize_dynamic(m, granularity="per_group", group_size=16)
    ids, mask = _ids()
    y = m(ids, mask)
    path = tmp_path / "bert.safetensors"
    cquant.save(m, path, metadata={"note": "tiny"})
    m2 = cquant.load(path)
    assert isinstance(m2, BertModel)
    assert isinstance(m2.encoder.layer[1].output.dense, QuantizedLinear)
    np.testing.assert_array_equal(m2(ids, mask), y)          # bit-identical: same codes, same kernels

    raw = load_file(str(path))
    with SafetensorsReader(path) as r:
        meta = r.metadata
    assert meta[KEY_VERSION] == FORMAT_VERSION and meta["note"] == "tiny"
    layers = json.loads(meta[KEY_LAYERS])
    q = m.encoder.layer[0].attention._modules["self"].query
    lm = layers["encoder.layer.0.attention.self.query"]
    assert lm == {"mode": "dynamic", "granularity": "per_group", "group_size": 16, "shape": [32, 32],
                  "bias": True, "layout": "out_in"}
    codes = raw["encoder.layer.0.attention.self.query.weight_q"]
    assert codes.dtype == np.int8 and codes.shape == (32, 32)        # canonical (N, K), not packed
    np.testing.assert_array_equal(codes, q.qweight.q)
    scale = raw["encoder.layer.0.attention.self.query.weight_scale"]
    assert scale.dtype == np.float32 and scale.shape == (32, 2)
    assert raw["embeddings.word_embeddings.weight"].dtype == np.float32


def test_load_without_build_and_load_into_fresh_model(tmp_path):
    cfg = ModelConfig.small()
    m = build_default_model(0, cfg)
    cquant.Quantizer.quantize_dynamic(m, mode="weight_only", exclude=["head"])
    x = sample_inputs(2, 8, config=cfg)
    y = m(x)
    path = tmp_path / "mlp.safetensors"
    cquant.save(m, path)
    ck = cquant.load(path)
    assert isinstance(ck, Checkpoint) and len(ck.layers) == 2 * cfg.depth
    fresh = build_default_model(123, cfg)                           # other weights: all overwritten
    cquant.load_into(fresh, path)
    assert isinstance(fresh.blocks[0].fc1, QuantizedLinear) and fresh.blocks[0].fc1.mode == "weight_only"
    assert isinstance(fresh.head, nn.Linear)
    np.testing.assert_array_equal(fresh(x), y)


def test_load_into_mismatch_leaves_model_unchanged(tmp_path):
    cfg = ModelConfig.small()
    m = build_default_model(0, cfg)
    cquant.Quantizer.quantize_dynamic(m)
    path = tmp_path / "mlp.safetensors"
    cquant.save(m, path)
    other = build_default_model(0, cfg, hidden=64)
    before = other.blocks[0].fc1
    with pytest.raises(CheckpointError, match="fc1"):
        cquant.load_into(other, path)
    assert other.blocks[0].fc1 is before
    extra = build_default_model(0, cfg, depth=3)
    with pytest.raises(CheckpointError, match="missing"):
        cquant.load_into(extra, path)
    assert isinstance(extra.blocks[0].fc1, nn.Linear)


def test_file_is_about_a_quarter_of_float32(tmp_path):
    m = build_default_model(0, ModelConfig(vocab_size=64, max_seq=16, dim=256, hidden=1024, depth=2,
                                           num_classes=256))
    fp = tmp_path / "fp32.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in m.state_dict().items()}, str(fp))
    cquant.Quantizer.quantize_dynamic(m)
    qp = tmp_path / "int8.safetensors"
    cquant.save(m, qp)
    ratio = os.path.getsize(qp) / os.path.getsize(fp)
    assert 0.24 < ratio < 0.28, ratio


def test_duck_typed_model_roundtrip(tmp_path):
    class Dense:
        def __init__(self, w, b):
            self.weight, self.bias = w, b
            self.in_features, self.out_features = w.shape[1], w.shape[0]

        def forward(self, x):
            return x @ self.weight.T + self.bias

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    model = {"layers": [Dense(w.copy(), b.copy())]}
    cquant.Quantizer.quantize_dynamic(model)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    y = model["layers"][0].forward(x)
    cquant.save(model, tmp_path / "duck.safetensors")
    fresh = {"layers": [Dense(w.copy(), b.copy())]}
    cquant.load_into(fresh, tmp_path / "duck.safetensors")
    assert fresh["layers"][0].weight is None
    np.testing.assert_array_equal(fresh["layers"][0].forward(x), y)


def test_mapping_save(tmp_path):
    qw = cquant.ops.quantize_weight(np.arange(12, dtype=np.float32).reshape(3, 4), "per_tensor")
    from cquant.quantization import QuantizedLinearForward
    cquant.save({"fc": QuantizedLinearForward(qw, None, "weight_only"), "extra": np.ones(3)}, tmp_path / "m.safetensors")
    ck = cquant.load(tmp_path / "m.safetensors")
    assert ck.layers["fc"].mode == "weight_only" and ck.layers["fc"].bias is None
    np.testing.assert_array_equal(ck.layers["fc"].qweight.q, qw.q)
    np.testing.assert_array_equal(ck.tensors["extra"], np.ones(3))


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    (b"hello", "not a readable safetensors|not a safetensors"),
])
def test_load_errors(tmp_path, content, match):
    p = tmp_path / "bad.safetensors"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        cquant.load(p)


def test_load_refuses_float_checkpoint_truncated_file_and_future_version(tmp_path):
    p = tmp_path / "float.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, str(p))
    with pytest.raises(CheckpointError, match="not a cquant checkpoint"):
        cquant.load(p)
    m = _tiny_bert()
    cquant.Quantizer.quantize_dynamic(m)
    good = tmp_path / "q.safetensors"
    cquant.save(m, good)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError):
        cquant.load(tmp_path / "trunc.safetensors")
    raw = load_file(str(good))
    meta = SafetensorsReader(good).metadata
    meta[KEY_VERSION] = "999"
    save_file(raw, str(tmp_path / "v999.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="version 999"):
        cquant.load(tmp_path / "v999.safetensors")


def test_save_failure_leaves_no_file(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(Exception):                       # fails inside the writer
        cquant.save({"ok": np.ones(3, np.float32), "x": np.array([None], dtype=object)}, target)
    assert list(tmp_path.iterdir()) == []


def test_torch_model_save_and_load_into(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from cquant.adapters.torch import QuantizedTorchLinear
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8)).eval()

    m = make()
    cquant.Quantizer.quantize_dynamic(m, granularity="per_group", group_size=16)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        y = m(x)
    cquant.save(m, tmp_path / "t.safetensors")
    ck = cquant.load(tmp_path / "t.safetensors")
    assert set(ck.layers) == {"0", "2"} and set(ck.tensors) == {"1.weight", "1.bias"}
    fresh = make()
    cquant.load_into(fresh, tmp_path / "t.safetensors")
    assert isinstance(fresh[0], QuantizedTorchLinear) and isinstance(fresh[2], QuantizedTorchLinear)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="model"):
        cquant.load_into(torch.nn.Sequential(torch.nn.Linear(16, 32)), tmp_path / "t.safetensors")


def test_stream_writer_reader_roundtrip_against_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
              "c": rng.standard_normal((2, 2, 2)).astype(np.float16), "empty": np.zeros((0, 4), np.float32),
              "s": np.array(3.5, np.float64)}
    p = tmp_path / "s.safetensors"
    with open(p, "wb") as f:
        w = StreamWriter(f, [(k, {"float32": "F32", "int64": "I64", "float16": "F16", "float64": "F64"}[str(v.dtype)],
                              v.shape) for k, v in arrays.items()], {"k": "v"})
        for k, v in arrays.items():
            w.write(k, v)
        w.close()
    back = load_file(str(p))                     # the safetensors package reads our writer's output
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    with SafetensorsReader(p) as r:                # and our reader reads it
        assert r.metadata == {"k": "v"}
        for k, v in arrays.items():
            np.testing.assert_array_equal(r.tensor(k), v)


def test_reader_bf16_and_validation(tmp_path):
    f32 = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    bits = (f32.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bf16_to_f32(bits), f32)
    hdr = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    p = tmp_path / "t.safetensors"
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)        # 8 of 16 data bytes
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsReader(p)
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        SafetensorsReader(p)


def test_load_of_a_model_that_cannot_rebuild_itself_says_use_load_into(tmp_path):
    from cquant import nn
    m = nn.Sequential(nn.Linear(16, 32, rng=1), nn.GELU(), nn.Linear(32, 8, rng=2))
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    q = cquant.Quantizer.quantize_dynamic(m)
    y = q(x)
    path = tmp_path / "q.safetensors"
    cquant.save(q, path)
    ck = cquant.load(path)
    with pytest.raises(TypeError, match="load_into"):
        ck(x)
    fresh = nn.Sequential(nn.Linear(16, 32, rng=5), nn.GELU(), nn.Linear(32, 8, rng=6))
    cquant.load_into(fresh, path)
    np.testing.assert_array_equal(fresh(x), y)


def test_load_does_not_unpack_the_int8_weights(tmp_path, monkeypatch):
    """cquant.load's checks read the model's state_dict keys and dtypes: state_dict() unpacked every
    int8 weight to (N, K) codes (twice), the peak of a load beside the file's mapped pages (which are
    now handed back as each tensor is copied)."""
    from cquant.bert import BertConfig, BertModel
    m = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=16))
    cquant.Quantizer.quantize_dynamic(m, embeddings=True)
    f = str(tmp_path / "m.safetensors")
    cquant.save(m, f)
    calls = []
    real = cquant.ops.QuantizedWeight.q
    monkeypatch.setattr(cquant.ops.QuantizedWeight, "q", property(lambda self: calls.append(1) or real.fget(self)))
    back = cquant.load(f)
    assert calls == []
    ids = np.arange(10)[None] % 50
    np.testing.assert_array_equal(back(ids), m(ids))
    assert set(back._state_dtypes()) == set(back.state_dict())


def test_save_unpacks_one_layer_at_a_time(tmp_path, monkeypatch):
    """cquant.save wrote from a state_dict in which every int8 weight was unpacked at once (peak:
    twice the model); each layer's codes are now unpacked when that tensor is written."""
    from cquant import checkpoint_file
    from cquant.bert import BertConfig, BertModel
    m = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=16))
    cquant.Quantizer.quantize_dynamic(m, embeddings=True)
    n_codes = sum(1 for k in m.state_dict() if k.endswith("weight_q"))
    unpacked, at_write = [0], []
    real_write, real_q = checkpoint_file.StreamWriter.write, cquant.ops.QuantizedWeight.q

    def write(self, name, data):
        at_write.append((name, unpacked[0]))
        return real_write(self, name, data)

    def q(self):
        unpacked[0] += 1
        return real_q.fget(self)
    monkeypatch.setattr(checkpoint_file.StreamWriter, "write", write)
    monkeypatch.setattr(cquant.ops.QuantizedWeight, "q", property(q))
    cquant.save(m, tmp_path / "m.safetensors")
    monkeypatch.undo()
    assert unpacked[0] == n_codes > 0
    codes_written = [i for i, (name, _) in enumerate(at_write) if name.endswith("weight_q")]
    # when the k-th weight_q is written, k layers have been unpacked (all n before any write, before)
    assert [at_write[i][1] for i in codes_written] == list(range(1, n_codes + 1))
    back = cquant.load(tmp_path / "m.safetensors")
    ids = np.arange(10)[None] % 50
    np.testing.assert_array_equal(back(ids), m(ids))
