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


def test_autograd_refused_with_clear_error():
    m = _model()
    quantize_module(m)
    x = torch.randn(2, 96, requires_grad=True)
    with pytest.raises(AutogradError, match="inference only"):
        m.proj(x)
    with pytest.raises(RuntimeError):          # also a builtin RuntimeError
        m.proj(x)
    with torch.no_grad():
        assert m.proj(x).requires_grad is False
    with torch.inference_mode():
        y = m(_ids(2, 3))
    assert y.shape == (2, 3, 10)


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


def test_multihead_attention_out_proj_skipped_loudly(caplog):
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    q = cquant.Quantizer()
    with caplog.at_level("WARNING", logger="cquant"):
        q.quantize(mha)
    assert any(r.name == "out_proj" and r.status == "skipped" and "MultiheadAttention" in r.reason
               for r in q.summary)
    assert "out_proj" in caplog.text
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        mha(x, x, x)  # still works


def test_nonfinite_weight_leaves_model_untouched():
    m = _model()
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="head"):
        quantize_module(m)
    assert isinstance(m.proj, torch.nn.Linear) and isinstance(m.c_fc, Conv1D)


def test_quantized_model_pickles_and_deepcopies():
    m = _model()
    quantize_module(m)
    ids = _ids(2, 4)
    with torch.no_grad():
        y = m(ids)
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            torch.testing.assert_close(clone(ids), y, rtol=0, atol=0)


def test_cquant_import_does_not_import_torch():
    code = ("import sys, numpy as np, cquant, cquant.io, cquant.cli, cquant.bert\n"
            "from cquant import nn\n"
            "m = nn.Sequential(nn.Linear(8, 8, rng=0))\n"
            "cquant.Quantizer.quantize_dynamic(m)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
