"""Quantization-aware training (cquant.qat): eval forward == converted model, bit for bit, on every
ISA path; straight-through gradients; convert == the PyTorch adapter on the trained float weights;
training and distillation reduce the loss (skipped without torch)."""
import copy
import importlib.util
import os
import pickle

import numpy as np
import pytest

import cquant
from cquant import errors, ops
from cquant.scheme import QuantScheme

torch = pytest.importorskip("torch", reason="torch is not installed (optional: pip install torch)")
import cquant.qat as qat  # noqa: E402
from cquant.adapters.torch import AutogradError, QuantizedTorchLinear  # noqa: E402


class Conv1D(torch.nn.Module):
    """GPT-2's transposed linear (transformers.pytorch_utils.Conv1D): weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.05)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Net(torch.nn.Module):
    """Linear (K = 128, so the AMX path runs at M >= 16), GPT-2 Conv1D, a bias-free head."""

    def __init__(self, d=128, h=192, out=24):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h)
        self.act = torch.nn.GELU()
        self.c_fc = Conv1D(d, h)            # (h -> d), weight stored (in, out)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, out, bias=False)

    def forward(self, x):
        return self.head(self.norm(x + self.c_fc(self.act(self.fc1(x)))))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _x(m, k=128, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2


def _steps(model, n=5, lr=1e-2, seed=3):
    """A few Adam steps on a random regression target (so weights move off their initial values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 128, generator=g)
    t = torch.randn(32, 24, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(n):
        loss = torch.nn.functional.mse_loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


SCHEMES = ["int8 dynamic per_channel", "int8 dynamic per_tensor", "int8 dynamic per_group(32)",
           "int8 weight_only per_channel", "int8 weight_only per_group(64)"]


# ---- fake quantization is cquant's rule, bit for bit ---------------------------------------------
@pytest.mark.parametrize("gran, g", [("per_tensor", None), ("per_channel", None), ("per_group", 32)])
def test_fake_quant_codes_and_scales_are_cquants(gran, g):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3
    w[5] = 0                                       # all-zero slice: scale 1
    w[6, :64] = 0
    w[7] = torch.randn(128) * 1e-39                # denormals
    w[8, 0] = 127.0                                # ties: 0.5 * step lands exactly half-way
    w[8, 1:] = torch.arange(127, dtype=torch.float32) + 0.5
    fake, q, s = qat.fake_quantize_weight(w, gran, g, return_codes=True)
    q_ref, s_ref = ops.quantize(w.numpy(), gran, g)
    assert np.array_equal(q.numpy().astype(np.int8), q_ref)
    assert np.array_equal(s.numpy().reshape(s_ref.shape), s_ref)
    qw = ops.QuantizedWeight.from_codes(q_ref, s_ref, gran, g)
    assert np.array_equal(fake.numpy(), ops.dequantize(qw))


def test_fake_quant_rows_are_cquants():
    x = _x(37) * torch.rand(37, 1) * 10
    x[3] = 0
    qx, sx = ops.quantize_rows(x.numpy())
    assert np.array_equal(qat.fake_quantize_rows(x).numpy(), qx.astype(np.float32) * sx[:, None])


# ---- eval: bit-identical to the converted model on every ISA path -------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_bit_identical_to_converted_every_isa(scheme):
    prepared = _steps(qat.prepare(_net(), scheme))
    conv = qat.convert(prepared)
    assert sum(isinstance(m, QuantizedTorchLinear) for m in conv.modules()) == 3
    paths = cquant.available_isas()
    try:
        for isa in paths:
            cquant.set_isa(isa)
            assert cquant.isa() == isa
            for m in (1, 3, 16, 37, 64):        # GEMV, small GEMM, AMX-sized batches
                x = _x(m, seed=m)
                with torch.no_grad():
                    a, b = prepared(x), conv(x)
                assert a.dtype == b.dtype == torch.float32
                assert torch.equal(a, b), (isa, m, (a - b).abs().max())
            # also in grad mode (value from the kernel, gradient from the STE path) and for 3-D input
            x3 = _x(2 * 20, seed=7).view(2, 20, 128)
            with torch.no_grad():
                ref = conv(x3)
            assert torch.equal(prepared(x3).detach(), ref), isa
    finally:
        cquant.set_isa("auto")


def test_eval_float64_and_bfloat16_inputs_match_converted():
    prepared = _steps(qat.prepare(_net(), "per_channel"))
    conv = qat.convert(prepared)
    for dt in (torch.float64, torch.bfloat16):
        # the LayerNorm in between runs in the input dtype in both; the quantized layers in float32
        x = _x(9).to(dt)
        with torch.no_grad():
            assert torch.equal(prepared.fc1(x), conv.fc1(x)), dt


# ---- gradients: straight-through -------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8 dynamic per_channel", "int8 weight_only per_group(32)"])
def test_ste_gradients_are_those_of_the_fake_quantized_linear(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    layer = qat.prepare(lin, scheme)
    assert isinstance(layer, qat.QATLinear) and layer.weight is lin.weight
    layer.train()
    x = torch.randn(8, 64, requires_grad=True)
    gy = torch.randn(8, 16)
    layer(x).backward(gy)
    s = QuantScheme.parse(scheme)
    # reference: the same linear on fake-quantized leaves; STE passes their gradients through
    wq = qat.fake_quantize_weight(lin.weight, s.granularity, s.group_size).requires_grad_()
    xq = (qat.fake_quantize_rows(x) if s.activations == "dynamic" else x.detach().clone()).requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(xq, wq, b).backward(gy)
    torch.testing.assert_close(lin.weight.grad, wq.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, xq.grad, rtol=0, atol=0)
    torch.testing.assert_close(lin.bias.grad, b.grad, rtol=0, atol=0)
    assert lin.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_eval_mode_gradients_flow_with_kernel_values():
    prepared = _steps(qat.prepare(_net(), "per_channel"))
    conv = qat.convert(prepared)
    prepared.zero_grad()
    x = _x(16)
    y = prepared(x)                          # eval mode, grad enabled
    assert y.requires_grad
    with torch.no_grad():
        assert torch.equal(y.detach(), conv(x))
    y.square().mean().backward()
    for _, m in qat.qat_layers(prepared):
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    # the same gradient as the fast path's (training mode) gives
    grads = [m.weight.grad.clone() for _, m in qat.qat_layers(prepared)]
    prepared.zero_grad()
    prepared.train()
    prepared(x).square().mean().backward()
    for g, (_, m) in zip(grads, qat.qat_layers(prepared)):
        torch.testing.assert_close(g, m.weight.grad, rtol=1e-4, atol=1e-6)


def test_training_forward_is_close_to_the_kernel():
    prepared = _steps(qat.prepare(_net(), "per_channel"))
    x = _x(33)
    with torch.no_grad():
        exact = prepared(x)
        prepared.train()
        fast = prepared(x)
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-4)  # only float32 summation order differs


def test_train_forward_kernel_is_exact_in_training():
    prepared = qat.prepare(_net(), "per_channel", train_forward="kernel")
    prepared.train()
    x = _x(20)
    y = prepared(x)
    y.sum().backward()
    assert prepared.fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(y.detach(), qat.convert(prepared)(x))


# ---- convert == the adapter on the trained float weights ------------------------------------------
def test_convert_equals_adapter_quantization_of_trained_weights():
    scheme = {"fc1": "weight_only per_group(32)", "c_fc": "per_tensor", "head": "per_channel"}
    prepared = _steps(qat.prepare(_net(), scheme), n=8)
    assert prepared.fc1.scheme == QuantScheme.parse("weight_only per_group(32)")
    conv = qat.convert(prepared)
    ref = cquant.Quantizer.quantize_dynamic(qat.to_float(prepared), scheme=scheme)
    sd, sd_ref = conv.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
    assert [m.scheme for m in conv.modules() if isinstance(m, QuantizedTorchLinear)] == \
        ["int8 weight_only per_group(32)", "int8 dynamic per_tensor", "int8 dynamic per_channel"]
    x = _x(21)
    with torch.no_grad():
        assert torch.equal(conv(x), ref(x))
        assert torch.equal(prepared(x), ref(x))
    # convert left the prepared model as it was (training can go on); inplace=True consumes it
    assert isinstance(prepared.fc1, qat.QATLinear)
    assert isinstance(qat.convert(prepared, inplace=True).fc1, QuantizedTorchLinear)


def test_prepare_shares_parameters_and_state_dict_keys():
    model = _net()
    keys = set(model.state_dict())
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)           # built before prepare: still trains the QAT layers
    w0 = model.fc1.weight.detach().clone()
    prepared = qat.prepare(model)
    assert prepared is model and set(prepared.state_dict()) == keys
    assert [id(p) for p in prepared.parameters()] == [id(p) for p in params]
    prepared.train()
    prepared(_x(8)).sum().backward()
    opt.step()
    assert not torch.equal(model.fc1.weight, w0)
    # a float state_dict loads into the prepared model, and the eval forward follows the new weights
    fresh = _net(seed=5)
    prepared.load_state_dict(fresh.state_dict())
    prepared.eval()
    with torch.no_grad():
        assert torch.equal(prepared(_x(4)), cquant.Quantizer.quantize_dynamic(fresh)(_x(4)))


def test_prepare_selection_matches_the_adapter():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(40, 32)
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
            self.a = torch.nn.Linear(32, 32)
            self.b = torch.nn.Linear(32, 32)
            self.lm_head = torch.nn.Linear(32, 40, bias=False)
            self.lm_head.weight = self.emb.weight    # tied to a float module: the adapter skips it

        def forward(self, ids):
            h = self.emb(ids)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.lm_head(self.b(self.a(h)))

    torch.manual_seed(0)
    m = M().eval()
    p = qat.prepare(copy.deepcopy(m), {"b": None, "*": "per_channel"})
    assert isinstance(p.a, qat.QATLinear)
    assert type(p.b) is torch.nn.Linear                      # kept float by the scheme rule
    assert type(p.lm_head) is torch.nn.Linear                # tied to the embedding
    assert isinstance(p.attn, torch.nn.MultiheadAttention)   # no QAT module for attention yet
    p2 = qat.prepare(copy.deepcopy(m), include=["b"])
    assert [n for n, _ in qat.qat_layers(p2)] == ["b"]
    p3 = qat.prepare(copy.deepcopy(m), exclude="a")
    assert [n for n, _ in qat.qat_layers(p3)] == ["b"]
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    conv = qat.convert(p)
    assert type(conv.attn) is torch.nn.MultiheadAttention and type(conv.b) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(p(ids), conv(ids))


def test_per_group_that_does_not_fit_falls_back_like_the_quantizer():
    lin = torch.nn.Linear(96, 8)
    layer = qat.prepare(copy.deepcopy(lin), "per_group(64)")
    assert layer.scheme.granularity == "per_channel"
    with pytest.raises(errors.ValueError, match="does not fit"):
        qat.prepare(copy.deepcopy(lin), "per_group(64)", strict=True)


def test_root_linear_pickle_and_deepcopy():
    torch.manual_seed(0)
    layer = _steps_linear(qat.prepare(torch.nn.Linear(128, 24), "per_group(32)"))
    x = _x(5)
    with torch.no_grad():
        y = layer(x)
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert torch.equal(other(x), y)
        conv = qat.convert(layer)
        assert isinstance(conv, QuantizedTorchLinear) and torch.equal(conv(x), y)


def _steps_linear(layer):
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    layer.train()
    for _ in range(3):
        layer(_x(8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return layer.eval()


def test_transformer_encoder_layer_fast_path_is_off():
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    p = qat.prepare(copy.deepcopy(enc), "per_channel")
    assert isinstance(p.linear1, qat.QATLinear) and not p.activation_relu_or_gelu
    conv = qat.convert(p)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert torch.equal(p(x), conv(x))


def test_converted_model_is_inference_only_and_points_to_qat():
    conv = qat.convert(qat.prepare(_net()))
    with pytest.raises(AutogradError) as e:
        conv.train()
    assert "cquant.qat" in str(e.value) and "model.eval()" in str(e.value)


def test_bad_arguments():
    with pytest.raises(errors.TypeError):
        qat.prepare(object())
    with pytest.raises(errors.ValueError):
        qat.prepare(_net(), train_forward="slow")
    with pytest.raises(errors.ValueError, match="prepare"):
        qat.convert(_net())
    with pytest.raises(errors.ShapeError):
        qat.prepare(_net()).fc1(torch.randn(3, 7))
    with pytest.raises(errors.TypeError):
        qat.prepare(_net()).eval().fc1(torch.ones(3, 128, dtype=torch.int64))


# ---- training -------------------------------------------------------------------------------------------
def _blobs(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, 32, generator=g) * 2
    y = torch.randint(0, 6, (n,), generator=g)
    return centers[y] + torch.randn(n, 32, generator=g), y


def test_plain_training_loop_reduces_loss():
    x, y = _blobs()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 6))
    model = qat.prepare(model, "per_channel")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(60):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-8:]) < 0.3 * np.mean(losses[:8]), losses
    model.eval()
    conv = qat.convert(model)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, conv(x))
    assert (logits.argmax(1) == y).float().mean() > 0.9


def test_distillation_from_the_float_model_reduces_loss():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    student = qat.prepare(teacher, "per_tensor", inplace=False)
    assert type(teacher[0]) is torch.nn.Linear
    with torch.no_grad():  # a student that drifted from the teacher (e.g. fine-tuned elsewhere)
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.03)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = teacher(x)
        start = torch.nn.functional.mse_loss(student.eval()(x), target).item()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    student.train()
    for step in range(40):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = torch.nn.functional.mse_loss(student(x[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    with torch.no_grad():
        end = torch.nn.functional.mse_loss(student(x), target).item()
        assert torch.equal(student(x), qat.convert(student)(x))
    assert end < 0.5 * start, (start, end)


# ---- int4 (bits=4) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gran, g", [("per_tensor", None), ("per_channel", None), ("per_group", 32)])
def test_int4_fake_quant_codes_are_cquants(gran, g):
    torch.manual_seed(0)
    w = torch.randn(24, 128) * torch.rand(24, 1) * 3
    w[2] = 0
    w[3, :8] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5, -6.5])   # ties at scale 1
    _, q, s = qat.fake_quantize_weight(w, gran, g, bits=4, return_codes=True)
    q_ref, s_ref = ops.quantize(w.numpy(), gran, g, bits=4)
    assert q.abs().max() <= 7
    assert np.array_equal(q.numpy().astype(np.int8), q_ref)
    assert np.array_equal(s.numpy().reshape(s_ref.shape), s_ref)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_int4_qat_layer_eval_is_the_int4_kernel_every_isa(mode):
    """A QATLinear with an int4 scheme runs the int4 kernel in eval mode, bit for bit, and its fast
    training path is close to it."""
    s = QuantScheme.from_args(mode, "per_group", 32, bits=4)
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40)
    layer = qat.QATLinear(lin, s).eval()
    qw = ops.quantize_weight(lin.weight.detach().numpy(), "per_group", 32, bits=4)
    b = lin.bias.detach().numpy().copy()
    try:
        for isa in cquant.available_isas():
            cquant.set_isa(isa)
            for m in (1, 5, 37):
                x = _x(m, seed=m)
                with torch.no_grad():
                    y = layer(x)
                assert np.array_equal(y.numpy(), ops.linear(x.numpy(), qw, b, mode=mode)), (isa, m)
    finally:
        cquant.set_isa("auto")
    x = _x(37)
    with torch.no_grad():
        exact = layer(x)
        fast = layer.train()(x)
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text", ["int4 dynamic per_channel", "int4 weight_only per_group(32)"])
def test_int4_eval_bit_identical_every_isa(text):
    s = QuantScheme.parse(text)
    fake, q, _ = qat.fake_quantize_weight(torch.randn(24, 128), s.granularity, s.group_size, bits=4,
                                          return_codes=True)
    assert q.abs().max() <= 7
    prepared = _steps(qat.prepare(_net(), s))
    conv = qat.convert(prepared)
    try:
        for isa in cquant.available_isas():
            cquant.set_isa(isa)
            for m in (1, 5, 37):
                x = _x(m, seed=m)
                with torch.no_grad():
                    assert torch.equal(prepared(x), conv(x)), (isa, m)
    finally:
        cquant.set_isa("auto")


# ---- the digits demonstration (examples/qat_digits.py) ------------------------------------------
def test_digits_example_runs():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (optional: pip install scikit-learn)")
    spec = importlib.util.spec_from_file_location(
        "qat_digits_example", os.path.join(os.path.dirname(__file__), "..", "examples", "qat_digits.py"))
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = ex.run(schemes=["int8 dynamic per_channel"], epochs=8, qat_epochs=2, verbose=False)
    finally:
        torch.set_num_threads(threads)
    row = res["rows"][0]
    assert res["float32"] > 85 and row["bit_identical"]
    assert row["qat"] > row["float32"] - 3 and row["ptq"] > row["float32"] - 3


def test_prepare_again_with_another_scheme_is_refused():
    """A second prepare kept the layers' first scheme silently; the same scheme again (e.g. to
    prepare layers added since) still works."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    qat.prepare(m, "per_channel")
    with pytest.raises(cquant.errors.ValueError, match=r"0 \(int8 dynamic per_channel -> int8 dynamic per_group\(32\)\)"):
        qat.prepare(m, "per_group(32)")
    assert [l.scheme.name for _, l in qat.qat_layers(m)] == ["per_channel", "per_channel"]
    m.add_module("3", torch.nn.Linear(8, 4))
    qat.prepare(m, "per_channel")
    assert len(qat.qat_layers(m)) == 3
    qat.prepare(m, "per_group(32)", include=["9"])  # selects no prepared layer: nothing to refuse
    qat.to_float(m, inplace=True)
    qat.prepare(m, "per_group(32)")
    assert [l.scheme.name for _, l in qat.qat_layers(m)] == ["per_group(32)", "per_group(32)", "per_channel"]


def test_prepare_again_with_a_class_keyed_scheme():
    """The re-prepare check resolved class rules against the QAT module, not the float one: the same
    {nn.Linear: scheme} again was refused."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    sch = {torch.nn.Linear: "per_group(32)"}
    qat.prepare(m, sch)
    m.add_module("3", torch.nn.Linear(8, 4))
    qat.prepare(m, sch)
    assert len(qat.qat_layers(m)) == 3
