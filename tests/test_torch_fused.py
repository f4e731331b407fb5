"""cquant.fuse: transformers BERT-family blocks around the quantized linears run on cquant's C
LayerNorm, GELU and attention (cquant.adapters.torch_fused). Checked on a small BertModel built
from a BertConfig (no download): same structure and state_dict, outputs close to the unfused
quantized model (weight-only, so no activation rounding flips), masks, fallbacks, pickling."""
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cquant  # noqa: E402
from cquant import ops  # noqa: E402
from cquant.adapters.torch_fused import FusedIntermediate, FusedOutput, FusedSelfAttention, fuse  # noqa: E402


def _bert(seed=0, act="gelu"):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, hidden_act=act)
    return transformers.BertModel(cfg).eval()


def _inputs(seed=1, b=3, t=11, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[1, 7:] = 0
        mask[2, 3:] = 0
    return ids, mask


def _run(m, ids, mask):
    with torch.inference_mode():
        return m(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_fused_matches_unfused(mode):
    q = cquant.Quantizer.quantize_dynamic(_bert(), mode=mode)
    f = copy.deepcopy(q)
    names = fuse(f)
    kinds = {type(mod).__mro__[1] for n, mod in f.named_modules() if n in names}
    assert kinds == {FusedOutput, FusedIntermediate, FusedSelfAttention}
    assert len(names) == 2 * 4                                    # 4 blocks per layer
    assert list(f.state_dict()) == list(q.state_dict())           # same keys, same tensors
    for k, v in q.state_dict().items():
        assert torch.equal(v, f.state_dict()[k]), k
    ids, mask = _inputs()
    a, b = _run(q, ids, mask), _run(f, ids, mask)
    valid = mask.numpy().astype(bool)
    if mode == "weight_only":  # float everywhere: only the LayerNorm / GELU / softmax roundings differ
        np.testing.assert_allclose(b[valid], a[valid], rtol=2e-4, atol=2e-4)
    else:  # int8 activations: a rounding flip now and then, same accuracy
        cos = (a[valid] * b[valid]).sum(-1) / np.linalg.norm(a[valid], axis=-1) / np.linalg.norm(b[valid], axis=-1)
        assert cos.min() > 0.999


def test_fast_path_runs_and_no_mask_too(monkeypatch):
    f = cquant.Quantizer.quantize_dynamic(_bert(), mode="weight_only")
    q = copy.deepcopy(f)
    fuse(f)
    calls = []
    for name in ("attention", "add_layer_norm", "gelu_inplace"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    real_linear = ops.linear
    def act_name(act):
        return str(act) if act is None or isinstance(act, str) else type(act).__name__
    monkeypatch.setattr(ops, "linear", lambda *a, **k: (calls.append("linear+" + act_name(k.get("activation"))),
                                                        real_linear(*a, **k))[1])
    for pad in (True, False):
        calls.clear()
        ids, mask = _inputs(pad=pad)
        out = _run(f, ids, mask)
        # the output blocks' add + LayerNorm runs inside their dense layer's call (cq_linear_add_ln)
        assert calls.count("attention") == 2 and calls.count("linear+AddLayerNorm") == 4
        assert calls.count("add_layer_norm") == 0
        # the GELU runs inside the FFN input layer's kernel, not as a pass of its own
        assert calls.count("linear+gelu") == 2 and calls.count("gelu_inplace") == 0
        valid = mask.numpy().astype(bool)
        np.testing.assert_allclose(out[valid], _run(q, ids, mask)[valid], rtol=2e-4, atol=2e-4)


def test_fallbacks_keep_torch_semantics():
    q = cquant.Quantizer.quantize_dynamic(_bert(), mode="weight_only")
    f = copy.deepcopy(q)
    fuse(f)
    ids, mask = _inputs()
    # autograd enabled (LayerNorm weights require grad): fast path, output refuses backward
    out = f(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="inference"):
        out.sum().backward()
    # float64 hidden states (a .double() model) are not the fast path's: the original forward runs
    blk = f.encoder.layer[0].intermediate
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    with torch.inference_mode():
        got = blk(x.float())
        want = torch.nn.functional.gelu(blk.dense(x.float()))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # a per-query (causal-like) mask is not a key mask: the original attention runs
    att = f.encoder.layer[0].attention.self
    h = torch.randn(2, 6, 64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    with torch.inference_mode():
        got, _ = att(h, attention_mask=causal)
        want, _ = type(att).__mro__[3].forward(att, h, attention_mask=causal)  # the transformers class
    torch.testing.assert_close(got, want)


def test_fully_masked_sequence_keeps_torch_semantics():
    """A sequence whose attention mask is all 0 (sdpa's bool mask: torch gives it a zero context,
    an additive mask equal weights): the fused model gives what the unfused one gives, for every
    row of the batch, on the sdpa and the eager attention."""
    for impl in ("sdpa", "eager"):
        m = _bert()
        m.config._attn_implementation = impl
        q = cquant.Quantizer.quantize_dynamic(m, mode="weight_only")
        f = copy.deepcopy(q)
        fuse(f)
        ids, mask = _inputs()
        mask[0, :] = 0
        np.testing.assert_allclose(_run(f, ids, mask), _run(q, ids, mask), rtol=2e-4, atol=2e-4, err_msg=impl)


def test_pickle_deepcopy_and_idempotent():
    f = cquant.Quantizer.quantize_dynamic(_bert(), mode="dynamic")
    first = fuse(f)
    assert fuse(f) == first                                      # already fused: nothing changes
    ids, mask = _inputs()
    want = _run(f, ids, mask)
    for g in (pickle.loads(pickle.dumps(f)), copy.deepcopy(f)):
        np.testing.assert_array_equal(_run(g, ids, mask), want)
        assert type(g.encoder.layer[0].output).__name__ == "FusedBertOutput"


def test_unquantized_or_other_blocks_are_left_alone():
    m = _bert()
    assert fuse(m) == []                                         # float model: linears not quantized
    q = cquant.Quantizer.quantize_dynamic(_bert(act="gelu_new"), mode="dynamic")
    names = fuse(q)                                              # tanh GELU: the intermediate stays
    assert not any(n.endswith("intermediate") for n in names) and names
    with pytest.raises(TypeError):
        fuse("not a module")


def test_probe_refuses_a_block_whose_forward_differs():
    """X-MOD's SelfOutput has dense / LayerNorm / dropout and the (hidden_states, input_tensor)
    signature, but applies no LayerNorm (its attention does): names cannot tell, the probe does."""
    if not hasattr(transformers, "XmodConfig"):
        pytest.skip("transformers without X-MOD")
    torch.manual_seed(0)
    cfg = transformers.XmodConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40, languages=["en_XX"])
    m = transformers.XmodModel(cfg).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 2.0)
                mod.bias.uniform_(-1, 1)
    q = cquant.Quantizer.quantize_dynamic(m, mode="weight_only")
    f = copy.deepcopy(q)
    names = fuse(f)
    assert "encoder.layer.0.attention.output" not in names
    ids, mask = _inputs(t=9)
    ids = ids % 100
    with torch.inference_mode():
        lang = torch.zeros(ids.shape[0], dtype=torch.long)
        a = q(input_ids=ids, attention_mask=mask, lang_ids=lang).last_hidden_state.numpy()
        b = f(input_ids=ids, attention_mask=mask, lang_ids=lang).last_hidden_state.numpy()
    valid = mask.numpy().astype(bool)
    np.testing.assert_allclose(b[valid], a[valid], rtol=2e-4, atol=2e-4)


def test_fuse_after_smoothing_and_with_hooks(monkeypatch):
    """Smoothing's pre-scale wrappers are fused too (1/s into the kernel); forward hooks on a
    linear (calibration, user hooks) make the block run its original forward, so they fire."""
    m = _bert()
    ids, mask = _inputs()
    batches = [dict(input_ids=ids, attention_mask=mask)]
    q = cquant.Quantizer.quantize_dynamic(m, mode="weight_only", calibration=batches, smoothing=0.5, inplace=False)
    assert any(type(mod).__name__ == "SmoothedTorchLinear" for mod in q.modules())
    f = copy.deepcopy(q)
    assert len(fuse(f)) == 8
    valid = mask.numpy().astype(bool)
    np.testing.assert_allclose(_run(f, ids, mask)[valid], _run(q, ids, mask)[valid], rtol=2e-4, atol=2e-4)
    seen = []
    h = f.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: seen.append(1))
    _run(f, ids, mask)
    assert seen == [1]
    h.remove()
    calls = []
    real = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *a, **k: (calls.append(k.get("activation")), real(*a, **k))[1])
    _run(f, ids, mask)
    assert calls.count("gelu") == 2                              # hook gone: the fast path again


def test_residual_scaled_blocks_fuse_pickle_and_trace(monkeypatch):
    """Smoothing folds into BERT's post-norm LayerNorms: the output blocks that add that LayerNorm's
    output as their residual become residual-scaled (the factor back in, a float32 buffer); fused,
    the factor goes into the C add + LayerNorm pass (no extra pass); both pickle, deep-copy, cast
    and trace."""
    from cquant.adapters.torch_smoothing import ResidualScaled
    m = _bert()
    ids, mask = _inputs()
    valid = mask.numpy().astype(bool)
    batches = [dict(input_ids=ids, attention_mask=mask)]
    ref = _run(m, ids, mask)
    sm = copy.deepcopy(m)
    res = cquant.smooth(sm, batches, alpha=0.5)
    # only the LayerNorm inside each layer folds (its output is no hidden state); those whose output
    # is a layer's output (the hidden states transformers returns) keep wrappers
    rs = [n for n, mod in sm.named_modules() if isinstance(mod, ResidualScaled)]
    assert rs == ["encoder.layer.0.output", "encoder.layer.1.output"]
    assert sum(g.how == "layernorm" and bool(g.residual) for g in res.groups) == 2
    np.testing.assert_allclose(_run(sm, ids, mask)[valid], ref[valid], rtol=1e-4, atol=1e-4)   # float: unchanged
    pickle.dumps(sm)             # smoothing's checks of the hidden states left no capturing hooks behind
    with torch.inference_mode():  # (on copies: transformers' own hooks would stay on these)
        hs = copy.deepcopy(sm)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        hs0 = copy.deepcopy(m)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hs) == 3
    for a, b in zip(hs, hs0):                                   # every hidden state unchanged too
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    assert "encoder.layer.0.output.residual_scale" in sm.state_dict()
    q = cquant.Quantizer.quantize_dynamic(sm, mode="weight_only", inplace=False)
    f = copy.deepcopy(q)
    assert len(fuse(f)) == 8
    seen = []
    real = ops.linear

    def spy(*a, **k):
        act = k.get("activation")
        if isinstance(act, ops.AddLayerNorm):
            seen.append(act.residual_mul is not None)
        return real(*a, **k)
    monkeypatch.setattr(ops, "linear", spy)
    np.testing.assert_allclose(_run(f, ids, mask)[valid], _run(q, ids, mask)[valid], rtol=2e-4, atol=2e-4)
    assert seen == [False, True, False, True]                   # the FFN blocks' add + LayerNorm took the factor
    np.testing.assert_array_equal(_run(copy.deepcopy(f), ids, mask), _run(f, ids, mask))
    back = pickle.loads(pickle.dumps(f))
    assert type(back.encoder.layer[0].output).__name__ == "FusedResidualScaledBertOutput"
    np.testing.assert_array_equal(_run(back, ids, mask), _run(f, ids, mask))
    np.testing.assert_array_equal(_run(pickle.loads(pickle.dumps(q)), ids, mask), _run(q, ids, mask))
    h = copy.deepcopy(sm).half()
    assert h.encoder.layer[0].output.residual_scale.dtype == torch.float32
    with torch.no_grad():
        traced = torch.jit.trace(sm, (ids, mask), strict=False)
        np.testing.assert_allclose(traced(ids, mask)["last_hidden_state"].numpy(), _run(sm, ids, mask), rtol=1e-5, atol=1e-5)


def test_eager_float_mask_is_fused(monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    q = cquant.Quantizer.quantize_dynamic(transformers.BertModel(cfg).eval(), mode="weight_only")
    f = copy.deepcopy(q)
    fuse(f)
    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    ids, mask = _inputs()
    valid = mask.numpy().astype(bool)
    np.testing.assert_allclose(_run(f, ids, mask)[valid], _run(q, ids, mask)[valid], rtol=2e-4, atol=2e-4)
    assert calls == [1]


@pytest.mark.parametrize("kw", [{}, dict(smoothing=0.5, rotate=True)])
def test_fused_attention_quantizes_its_input_once(monkeypatch, kw):
    """The fused self-attention runs query, key and value through one ops.linear_multi call (one
    activation pass; with smoothing and rotation too) whose outputs are those of the three calls."""
    from cquant.adapters import torch_fused
    ids, mask = _inputs()
    cal = [dict(input_ids=ids, attention_mask=mask)] if kw else None
    q = cquant.Quantizer.quantize_dynamic(_bert(), calibration=cal, inplace=False, **kw)
    fuse(q)
    calls = []
    real = ops.linear_multi
    monkeypatch.setattr(ops, "linear_multi", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    shared = _run(q, ids, mask)
    assert calls == [3, 3]
    monkeypatch.setattr(torch_fused, "_linears_np", lambda lins, x: [torch_fused._linear_np(lin, x) for lin in lins])
    np.testing.assert_array_equal(_run(q, ids, mask), shared)


def test_residual_scale_on_a_fused_block_and_through_load_into(tmp_path):
    """A block fused first and residual-scaled afterwards applies the factor once (fused again on
    the residual-scaled class); a cquant.save'd smoothed model loads into a fresh one (load_into)
    with its residual-scaled blocks rebuilt, and a NaN factor is refused."""
    from cquant.adapters.torch_smoothing import scale_residual
    q = cquant.Quantizer.quantize_dynamic(_bert(), mode="weight_only")
    fuse(q)
    blk = q.encoder.layer[0].output
    h = torch.randn(2, 5, 128)
    r = torch.randn(2, 5, 64)
    two = np.full(64, 2.0, np.float32)
    with torch.inference_mode():
        want = blk(h, r * 2)
        undo = scale_residual(blk, two)
        assert type(blk).__name__ == "FusedResidualScaledBertOutput"
        np.testing.assert_allclose(blk(h, r).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
        hook = blk.dense.register_forward_hook(lambda *a: None)  # the fallback (original) forward: once, no recursion
        np.testing.assert_allclose(blk(h, r).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
        hook.remove()
        undo()
        assert type(blk).__name__ == "FusedBertOutput" and "residual_scale" not in blk._buffers
    m = _bert()
    ids, mask = _inputs()
    sm = cquant.Quantizer.quantize_dynamic(m, calibration=[dict(input_ids=ids, attention_mask=mask)],
                                           smoothing=0.5, inplace=False)
    path = str(tmp_path / "s.safetensors")
    cquant.save(sm, path)
    fresh = _bert()
    for name, mod in sm.named_modules():  # the pre-scale wrappers: as the user rebuilds them
        if type(mod).__name__ == "SmoothedTorchLinear":
            parent = fresh.get_submodule(name.rsplit(".", 1)[0])
            from cquant.adapters.torch_smoothing import SmoothedTorchLinear
            setattr(parent, name.rsplit(".", 1)[1],
                    SmoothedTorchLinear(getattr(parent, name.rsplit(".", 1)[1]), np.ones(mod.inv_scale.numel(), np.float32)))
    back = cquant.load_into(fresh, path)
    assert type(back.encoder.layer[0].output).__name__ == "ResidualScaledBertOutput"
    np.testing.assert_array_equal(_run(back, ids, mask), _run(sm, ids, mask))
