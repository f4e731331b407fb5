"""PyTorch adapter: Linear and GPT-2 Conv1D layers onto cquant's kernels (skipped without torch)."""
import copy
import gc
import pickle
import subprocess
import sys
import weakref

import numpy as np
import pytest

import cquant
from cquant import errors, ops

torch = pytest.importorskip("torch", reason="torch is not installed (optional: pip install torch)")
from cquant.adapters.torch import (AutogradError, QuantizedTorchLinear, quantize_module,  # noqa: E402
                                   report as torch_report)


class Conv1D(torch.nn.Module):
    """GPT-2's transposed linear (transformers.pytorch_utils.Conv1D): weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.05)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Block(torch.nn.Module):
    def __init__(self, d=64, h=96):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.norm = torch.nn.LayerNorm(d)
        self.c_fc = Conv1D(h, d)               # GPT-2 style
        self.act = torch.nn.GELU()
        self.proj = torch.nn.Linear(h, d)
        self.head = torch.nn.Linear(d, 10, bias=False)

    def forward(self, ids):
        x = self.norm(self.emb(ids))
        x = x + self.proj(self.act(self.c_fc(x)))
        return self.head(x)


def _model(seed=0):
    torch.manual_seed(seed)
    return Block().eval()


def _ids(*shape):
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_quantizer_accepts_torch_module_and_matches_float():
    m = _model()
    ids = _ids(3, 7)
    with torch.inference_mode():
        ref = m(ids)
    q = cquant.Quantizer(mode="dynamic", granularity="per_channel")
    qm = q.quantize(m)
    assert qm is m
    assert isinstance(m.c_fc, QuantizedTorchLinear) and m.c_fc.source == "Conv1D"
    assert isinstance(m.proj, QuantizedTorchLinear) and isinstance(m.head, QuantizedTorchLinear)
    assert isinstance(m.emb, torch.nn.Embedding)  # never quantized, and said so
    status = {r.name: (r.status, r.reason) for r in q.summary}
    assert status["c_fc"][0] == status["proj"][0] == status["head"][0] == "quantized"
    assert status["emb"][0] == "skipped" and "embedding" in status["emb"][1]
    with torch.inference_mode():
        y = qm(ids)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _rel(y, ref) < 0.02


def test_quantize_dynamic_classmethod_and_modes():
    for mode, tol in (("weight_only", 1e-2), ("dynamic", 3e-2)):
        lin = _model().proj
        xin = torch.randn(2, 5, 96)
        with torch.no_grad():
            ref = lin(xin)
        qlin = cquant.Quantizer.quantize_dynamic(lin, mode=mode)   # a bare Linear: a new module
        assert isinstance(qlin, QuantizedTorchLinear) and qlin.mode == mode
        with torch.no_grad():
            assert _rel(qlin(xin), ref) < tol


def test_exact_against_ops_linear_and_leading_dims():
    m = _model()
    w = m.proj.weight.detach().numpy().copy()
    b = m.proj.bias.detach().numpy().copy()
    quantize_module(m, granularity="per_group", group_size=32, include=["proj"])
    assert isinstance(m.proj, QuantizedTorchLinear) and not isinstance(m.c_fc, QuantizedTorchLinear)
    qw = ops.quantize_weight(w, granularity="per_group", group_size=32)
    for shape in [(96,), (1, 96), (2, 3, 96), (2, 1, 4, 96), (0, 96)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            y = m.proj(x)
        assert tuple(y.shape) == shape[:-1] + (64,)
        np.testing.assert_array_equal(y.numpy(), ops.linear(x.numpy(), qw, b))


def test_conv1d_matches_transposed_linear():
    torch.manual_seed(3)
    c = Conv1D(48, 32).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = c(x)
    qc = quantize_module(c, mode="weight_only")
    qw = ops.quantize_weight(np.ascontiguousarray(c.weight.detach().numpy().T))
    with torch.no_grad():
        y = qc(x)
    np.testing.assert_allclose(y.numpy(), ops.linear(x.numpy(), qw, c.bias.detach().numpy(), mode="weight_only"),
                               rtol=1e-5, atol=1e-6)
    assert _rel(y, ref) < 1e-2


def test_zero_copy_input_and_output(monkeypatch):
    m = _model()
    quantize_module(m)
    seen = {}
    orig = m.proj.qforward.__class__.__call__

    def spy(self, a):
        seen["ptr"] = a.__array_interface__["data"][0]
        out = orig(self, a)
        seen["out"] = out.__array_interface__["data"][0]
        return out

    monkeypatch.setattr(m.proj.qforward.__class__, "__call__", spy)
    x = torch.randn(3, 96)
    with torch.inference_mode():
        y = m.proj(x)
    assert seen["ptr"] == x.data_ptr()       # the kernel read the tensor's own memory
    assert seen["out"] == y.data_ptr()       # and the output tensor wraps the kernel's array


def test_dtype_and_layout_conversions():
    m = _model()
    quantize_module(m, mode="weight_only")
    x = torch.randn(4, 96)
    with torch.no_grad():
        y32 = m.proj(x)
        for dt in (torch.float64, torch.float16, torch.bfloat16):
            y = m.proj(x.to(dt))
            assert y.dtype == dt
            assert _rel(y.float(), y32) < 1e-2
        xt = torch.randn(96, 4).t()              # non-contiguous view
        np.testing.assert_allclose(m.proj(xt).numpy(), m.proj(xt.contiguous()).numpy(), rtol=1e-6)
    with pytest.raises(errors.TypeError, match="floating-point"):
        m.proj(torch.ones(2, 96, dtype=torch.int64))
    with pytest.raises(errors.ShapeError, match="in_features=96"):
        m.proj(torch.randn(2, 95))


def test_inference_only_train_and_backward_say_so():
    """Issue 10 item 7: .train() and .backward() say clearly that the model is for inference."""
    m = _model()
    m.train()
    quantize_module(m)
    assert m.training is False                  # quantizing leaves the model in eval mode
    with pytest.raises(AutogradError, match="inference only") as e:
        m.train()
    assert "model.eval()" in str(e.value) and "QAT" in str(e.value)
    with pytest.raises(RuntimeError):           # also a builtin RuntimeError
        m.proj.train()
    m.eval()
    x = torch.randn(2, 96, requires_grad=True)
    y = m.proj(x)                               # a forward in grad mode works ...
    with pytest.raises(AutogradError, match="inference only"):
        y.sum().backward()                      # ... its backward says why it cannot be
    ids = _ids(2, 3)
    out = m(ids)                                # the embedding's weight requires grad
    assert out.requires_grad
    with pytest.raises(AutogradError, match="no backward"):
        out.sum().backward()
    with torch.no_grad():
        assert m.proj(x).requires_grad is False
        torch.testing.assert_close(m(ids), out.detach(), rtol=0, atol=0)
    with torch.inference_mode():
        y = m(ids)
    assert y.shape == (2, 3, 10)


def test_grad_mode_in_place_ops_and_all_quantized_models():
    """Found by a new-user review: (1) a ReLU(inplace=True) after a quantized layer, in grad mode with
    something upstream requiring grad, raised torch's "is a view and is being modified inplace";
    (2) an all-quantized model's output did not require grad, so backward() raised torch's "element
    0 of tensors does not require grad" instead of saying why. Both as the float model does now."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.ReLU(inplace=True),
                            torch.nn.Linear(32, 8)).eval()
    x = torch.randn(3, 16)
    q = cquant.Quantizer.quantize_dynamic(copy.deepcopy(m))
    with torch.no_grad():
        want = q(x)
    y = q(x)                                    # grad mode: the LayerNorm's weight requires grad
    torch.testing.assert_close(y.detach(), want, rtol=0, atol=0)
    with pytest.raises(errors.AutogradError, match="inference only"):
        y.sum().backward()
    mlp = cquant.Quantizer.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(),
                                                                torch.nn.Linear(8, 4)).eval())
    out = mlp(x)
    assert out.requires_grad                    # as the float model's output would
    with pytest.raises(errors.AutogradError, match="inference only"):
        out.sum().backward()
    with torch.no_grad():
        assert not mlp(x).requires_grad


def test_fx_symbolic_trace_of_smoothed_models_and_quantized_attention():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                            torch.nn.Linear(64, 8)).eval()
    x = torch.randn(5, 32)
    for rotate in (False, True):
        sm = cquant.Quantizer.quantize_dynamic(copy.deepcopy(m), calibration=[torch.randn(8, 32)],
                                               smoothing=0.5, rotate=rotate)
        g = torch.fx.symbolic_trace(sm)
        assert sum(n.target is torch.ops.cquant.linear for n in g.graph.nodes) == 2
        with torch.no_grad():
            torch.testing.assert_close(g(x), sm(x), rtol=1e-5, atol=1e-5)

    class Att(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, t):
            return self.a(t, t, t, need_weights=False)[0]
    qa = cquant.Quantizer.quantize_dynamic(Att().eval())
    with pytest.raises(errors.TypeError, match="symbolic_trace.*export"):
        torch.fx.symbolic_trace(qa)


def test_per_layer_schemes_log_no_warning_for_their_internal_calls(caplog):
    """A per-layer scheme naming a layer that stays float (tied to an embedding) logs why, once, and
    not the internal per-scheme calls' "include pattern matched no quantizable layer" / "no Linear
    layer was quantized" (the user gave no include, and layers were quantized)."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 16)
            self.fc = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.fc(self.emb(ids)))
    qz = cquant.Quantizer(scheme={"*": "per_channel", "head": "int4 dynamic per_channel"})
    with caplog.at_level("WARNING", logger="cquant"):
        qz.quantize(Tied().eval())
    text = caplog.text
    assert "matched no quantizable layer" not in text and "no Linear layer was quantized" not in text
    assert "head" in text and "tied" in text
    assert [r.name for r in qz.summary if r.status == "quantized"] == ["fc"]


def test_float_weights_are_freed():
    m = _model()
    refs = [weakref.ref(m.proj.weight), weakref.ref(m.c_fc.weight), weakref.ref(m.head.weight)]
    cquant.Quantizer.quantize_dynamic(m)
    gc.collect()
    assert all(r() is None for r in refs)
    assert not any(n.endswith(("proj.weight", "c_fc.weight", "head.weight")) for n, _ in m.named_parameters())


def test_exclude_inplace_false_and_report():
    m = _model()
    q = cquant.Quantizer(exclude=["head"])
    qm = q.quantize(m, inplace=False)
    assert isinstance(m.proj, torch.nn.Linear)  # original untouched
    assert isinstance(qm.head, torch.nn.Linear) and isinstance(qm.proj, QuantizedTorchLinear)
    assert any(r.name == "head" and "excluded" in r.reason for r in q.summary)
    rows = torch_report(qm)
    assert {r.name for r in rows} == {"c_fc", "proj"}
    assert all(r.bytes_after < r.bytes_before / 3 for r in rows)


def test_shared_module_replaced_everywhere_and_shared_weight_once():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    seq = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    tied = torch.nn.Linear(16, 16)
    tied.weight = lin.weight
    root = torch.nn.ModuleDict({"seq": seq, "tied": tied})
    quantize_module(root)
    assert root["seq"][0] is root["seq"][2] and isinstance(root["seq"][0], QuantizedTorchLinear)
    assert root["tied"].qweight is root["seq"][0].qweight


def _mha_inputs(batch_first, kdim=16):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 5, 16, generator=g)
    kv = torch.randn(3, 7, kdim, generator=g)
    if not batch_first:
        q, kv = q.transpose(0, 1).contiguous(), kv.transpose(0, 1).contiguous()
    am = torch.rand(5, 7, generator=g) > 0.7
    am[:, 0] = False
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    return q, kv, am, kpm


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_quantized(batch_first):
    """Issue 10 item 2: in_proj (q, k, v) and out_proj of nn.MultiheadAttention are quantized."""
    from cquant.adapters.torch import QuantizedMultiheadAttention
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    q, kv, am, kpm = _mha_inputs(batch_first)
    calls = [dict(), dict(attn_mask=am), dict(key_padding_mask=kpm), dict(attn_mask=am.float() * -1e4,
             key_padding_mask=kpm, average_attn_weights=False), dict(need_weights=False, attn_mask=am)]
    with torch.no_grad():
        refs = [mha(q, kv, kv, **kw) for kw in calls]
        ref_self = mha(q, q, q, is_causal=True, attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(5))
    qz = cquant.Quantizer(mode="weight_only")
    qm = qz.quantize(mha, inplace=False)
    assert isinstance(qm, QuantizedMultiheadAttention)
    names = {r.name for r in qz.summary if r.status == "quantized"}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert not [n for n, p in qm.named_parameters()]            # no float weight left
    assert {r.name for r in torch_report(qm)} == names
    with torch.no_grad():
        for kw, (o_ref, w_ref) in zip(calls, refs):
            o, w = qm(q, kv, kv, **kw)
            assert o.shape == o_ref.shape and _rel(o, o_ref) < 1e-2, kw
            assert (w is None) == (w_ref is None)
            if w is not None:
                assert w.shape == w_ref.shape and _rel(w, w_ref) < 1e-2
        o, _ = qm(q, q, q, is_causal=True, attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(5))
        assert _rel(o, ref_self[0]) < 1e-2
        # unbatched input
        qu = q[:, 0] if not batch_first else q[0]
        o_ref, w_ref = mha(qu, qu, qu)
        o, w = qm(qu, qu, qu)
        assert o.shape == o_ref.shape and _rel(o, o_ref) < 1e-2 and w.shape == w_ref.shape


def test_multihead_attention_kdim_vdim_and_unsupported_skipped(caplog):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=12, batch_first=True).eval()
    q = torch.randn(2, 5, 16)
    k, v = torch.randn(2, 6, 8), torch.randn(2, 6, 12)
    with torch.no_grad():
        ref = mha(q, k, v)[0]
        qm = quantize_module(mha, mode="weight_only")
        assert _rel(qm(q, k, v)[0], ref) < 1e-2
    odd = torch.nn.MultiheadAttention(16, 2, add_bias_kv=True)
    qz = cquant.Quantizer()
    with caplog.at_level("WARNING", logger="cquant"):
        qz.quantize(odd)
    assert any(r.status == "skipped" and "add_bias_kv" in r.reason for r in qz.summary)
    assert "add_bias_kv" in caplog.text


def test_transformer_weights_all_quantized():
    """A 3+3-layer nn.Transformer: every 2-D weight is quantized (60% were attention weights)."""
    torch.manual_seed(0)
    t = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=3, num_decoder_layers=3,
                             dim_feedforward=64, batch_first=True).eval()
    two_d = [n for n, p in t.named_parameters() if p.dim() == 2]
    assert any("in_proj_weight" in n for n in two_d)
    quantize_module(t)
    assert [n for n, p in t.named_parameters() if p.dim() == 2] == []
    assert len(list(torch_report(t))) == 3 * 6 + 3 * 10  # enc: 4 attn + 2 ff; dec: 8 attn + 2 ff


def test_nonfinite_weight_leaves_model_untouched():
    m = _model()
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="head"):
        quantize_module(m)
    assert isinstance(m.proj, torch.nn.Linear) and isinstance(m.c_fc, Conv1D)


def test_quantized_model_pickles_deepcopies_and_torch_saves(tmp_path):
    """Issue 10 item 8: forward keeps working after copy.deepcopy, pickle and torch.save."""
    m = _model()
    quantize_module(m)
    ids = _ids(2, 4)
    torch.save(m, tmp_path / "m.pt")
    with torch.no_grad():
        y = m(ids)
        clones = (copy.deepcopy(m), pickle.loads(pickle.dumps(m)),
                  torch.load(tmp_path / "m.pt", weights_only=False))
        for clone in clones:
            torch.testing.assert_close(clone(ids), y, rtol=0, atol=0)
            # the clone's buffers still share memory with its own kernel arrays
            assert clone.proj.weight_scale.data_ptr() == clone.proj.qweight.scale.__array_interface__["data"][0]
            assert clone.proj.qweight is not m.proj.qweight


def _unique_bytes(model):
    """Bytes held by a torch model, each memory block once: parameters, buffers, and the packed
    codes / scales / biases of quantized layers (numpy)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for m in model.modules():
        if isinstance(m, QuantizedTorchLinear):
            for a in (m.qweight.packed, m.qweight.scale, m.bias_array):
                if a is not None:
                    block = a
                    while isinstance(block.base, np.ndarray):  # the block it views (the packed
                        block = block.base                     # codes: 64-byte aligned)
                    seen[a.__array_interface__["data"][0]] = block.nbytes
    return sum(seen.values())


def test_tied_weights_gpt2_respected_and_bytes_measured(caplog):
    """Issue 10 item 5: GPT-2's lm_head is tied to wte: kept tied (not stored twice), the skip says
    why, and the report's savings are the bytes the model really stopped holding."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(cfg).eval()
    assert g.lm_head.weight is g.transformer.wte.weight
    before = _unique_bytes(g)
    qz = cquant.Quantizer()
    with caplog.at_level("WARNING", logger="cquant"):
        g = qz.quantize(g)
    assert g.lm_head.weight is g.transformer.wte.weight
    rec = {r.name: r for r in qz.summary}
    assert rec["lm_head"].status == "skipped" and "tied to transformer.wte.weight" in rec["lm_head"].reason
    assert "lm_head" in caplog.text
    rows = torch_report(g)
    saved = sum(r.bytes_before - r.bytes_after for r in rows)
    assert saved > 0 and before - _unique_bytes(g) == saved
    # tied between two Linear layers: quantized once, both quantized
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    b.weight = a.weight
    seq = torch.nn.Sequential(a, b)
    before = _unique_bytes(seq)
    quantize_module(seq)
    assert seq[0].qweight is seq[1].qweight
    assert before - _unique_bytes(seq) == sum(r.bytes_before - r.bytes_after for r in torch_report(seq))


def test_cquant_import_does_not_import_torch():
    code = ("import sys, numpy as np, cquant, cquant.io, cquant.cli, cquant.bert\n"
            "from cquant import nn\n"
            "m = nn.Sequential(nn.Linear(8, 8, rng=0))\n"
            "cquant.Quantizer.quantize_dynamic(m)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- unusual inputs and torch features (review 2026-11-30) -------------------------------------------

def _ln_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)).eval()
    return model, cquant.Quantizer.quantize_dynamic(copy.deepcopy(model))


def test_compile_in_grad_mode_and_backward_raises():
    """AOTAutograd traces the backward while compiling a forward whose input requires grad: the
    backward formula raised there (BackendCompilerFailed). It is now an op that raises when run."""
    _model, q = _ln_linear()
    x = torch.randn(8, 64)
    y = torch.compile(q, backend="aot_eager")(x)
    assert torch.equal(y, q(x)) and y.requires_grad
    with pytest.raises(errors.AutogradError):
        y.sum().backward()


def test_torch_func_vmap_and_grad():
    _model, q = _ln_linear()
    x = torch.randn(4, 8, 64)
    with torch.no_grad():
        assert torch.equal(torch.func.vmap(q)(x), q(x))
        assert torch.equal(torch.func.vmap(q, in_dims=1)(x.transpose(0, 1)), q(x))
    for transform in (torch.func.jacrev, torch.func.grad):
        with pytest.raises(errors.AutogradError):
            transform(lambda v: q(v).sum())(torch.randn(64))


def test_non_tensor_sparse_nested_and_autocast_inputs():
    model, q = _ln_linear()
    lin_f, lin_q = model[1], q[1]
    for bad in (np.zeros((2, 64), np.float32), [[0.0] * 64]):
        with pytest.raises(errors.TypeError, match="expected a torch.Tensor"):
            lin_q(bad)
    d = torch.randn(5, 64) * (torch.rand(5, 64) < 0.2)
    with torch.no_grad():
        for sp in (d.to_sparse(), d.to_sparse_csr()):  # as nn.Linear: multiplied densely
            assert torch.equal(lin_q(sp), lin_q(d))
        nested = torch.nested.nested_tensor([torch.randn(3, 64), torch.randn(2, 64)], layout=torch.jagged)
        with pytest.raises(errors.TypeError, match="nested tensors"):
            lin_q(nested)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype nn.Linear returns there
            assert lin_f(d).dtype == lin_q(d).dtype == torch.bfloat16
            assert torch.equal(torch.compile(lin_q, backend="aot_eager")(d), lin_q(d))  # the op's path too


def test_review_of_the_diff_torch_cases():
    """vmap over something other than the layer's input (the layer ran its eager path and the
    autograd.Function raised under the transform); copy.copy of a layer (its state held the pickling
    wrapper); a strided nested tensor is refused like a jagged one."""
    torch.manual_seed(0)
    q = cquant.Quantizer.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 8)))
    w, s = torch.randn(3, 16), torch.randn(4)
    y = torch.func.vmap(lambda v: q(w) * v)(s)
    with torch.no_grad():
        assert torch.equal(y, torch.stack([q(w) * v for v in s]))
    c = copy.copy(q[0])
    assert torch.equal(c(w), q[0](w))
    with pytest.raises(errors.TypeError, match="nested tensors"):
        q[0](torch.nested.nested_tensor([torch.randn(2, 16), torch.randn(3, 16)]))
