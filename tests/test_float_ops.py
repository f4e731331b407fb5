"""The float32 kernels around the GEMMs (softmax_rows, attention, add_layer_norm, GELU) against
float64 numpy references, on every ISA path this CPU and build have (scalar, avx2, avxvnni, avx512,
avx512vnni, amx: the float kernels of the AVX-512 paths are the same code).

Measured (Sapphire Rapids, all paths): with logits that float32 holds exactly, the softmax is
within 4.5 * 2^-24 (2.7e-7) relative of the float64 softmax (the tests allow 8 * 2^-24); with
arbitrary float32 inputs the logits' own rounding adds |v| * 2^-24 (measured <= 2 * 2^-24 *
(1 + |v| + |max|), allowed 4). exp of values more than 87 below the row maximum is 0 (no
subnormals: an absolute error below e^-87 = 1.65e-38)."""
import math

import numpy as np
import pytest

import cquant
from cquant import errors, nn, ops
from cquant._native import ffi, lib

E24 = 2.0 ** -24
TINY = 1.65e-38  # e^-87: exp more than 87 below the row maximum is flushed to 0 (SIMD paths)


@pytest.fixture(params=["scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx"])
def path(request):
    name = request.param
    if name not in ops.available_isas():
        pytest.skip(f"{name} not available on this CPU/build")
    ops.set_isa(name)
    assert ops.isa() == name
    yield name
    ops.set_isa("auto")


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def dyadic(a, q=64):
    """float32 values on a 1/q grid: their sums below are exact in float32."""
    return (np.round(np.asarray(a, np.float64) * q) / q).astype(np.float32)


def softmax64(v):
    v = np.asarray(v, np.float64)
    with np.errstate(invalid="ignore"):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)


# ---- softmax_rows -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 64, 100, 385])
@pytest.mark.parametrize("mag", [1.0, 30.0, 1e4])
def test_softmax_exact_logits(path, rng, k, mag):
    x = dyadic(rng.standard_normal((48, k)) * mag)
    b = dyadic(rng.standard_normal((6, k)) * mag)
    y = ops.softmax_rows(x.copy(), b, None, 0.5)  # 8 rows per bias row
    ref = softmax64(x.astype(np.float64) * 0.5 + np.repeat(b, 8, axis=0))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.abs(y - ref) <= 8 * E24 * ref + TINY)
    # no bias, scale 1
    np.testing.assert_array_less(np.abs(ops.softmax_rows(x.copy()) - softmax64(x)), 8 * E24 * softmax64(x) + TINY + 1e-45)


@pytest.mark.parametrize("k", [1, 5, 32, 77])
def test_softmax_float_logits(path, rng, k):
    x = (rng.standard_normal((40, k)) * 20).astype(np.float32)
    b = (rng.standard_normal((5, k)) * 20).astype(np.float32)
    y = ops.softmax_rows(x.copy(), b, 8, 0.37)
    v = x.astype(np.float64) * 0.37 + np.repeat(b, 8, axis=0)
    ref = softmax64(v)
    budget = 4 * E24 * ref * (1 + np.abs(v) + np.abs(v).max(-1, keepdims=True)) + TINY
    assert np.all(np.abs(y - ref) <= budget)


def test_softmax_masks(path):
    x = np.array([[1.0, 2.0, 3.0, 4.0]] * 6, np.float32)
    fmin = np.finfo(np.float32).min
    bias = np.array([[0, 0, -np.inf, -np.inf],            # -Inf mask
                     [0, -1e9, 0, -1e9],                  # -1e9 mask
                     [fmin, fmin, fmin, 0],               # BERT's finfo.min mask
                     [-np.inf] * 4,                       # everything masked with -Inf: NaN (as torch)
                     [fmin] * 4,                          # everything masked with finfo.min: x is absorbed, uniform
                     [0, 0, 0, 0]], np.float32)
    y = ops.softmax_rows(x.copy(), bias, 1)
    np.testing.assert_allclose(y[0], softmax64([1, 2]).tolist() + [0, 0], rtol=1e-6)
    assert y[0, 2] == 0 and y[0, 3] == 0
    np.testing.assert_allclose(y[1], [softmax64([1, 3])[0], 0, softmax64([1, 3])[1], 0], rtol=1e-6)
    np.testing.assert_array_equal(y[2], [0, 0, 0, 1])
    assert np.isnan(y[3]).all()
    np.testing.assert_array_equal(y[4], 0.25)             # as torch in float32
    np.testing.assert_allclose(y[5], softmax64(x[5]), rtol=1e-6)


def test_softmax_nan_and_inf_rows_are_isolated(path, rng):
    x = rng.standard_normal((5, 19)).astype(np.float32)
    x[1, 7] = np.nan
    x[3, 0] = np.inf
    y = ops.softmax_rows(x.copy())
    assert np.isnan(y[1]).all() and np.isnan(y[3]).all()   # numpy and torch give NaN rows too
    for r in (0, 2, 4):
        np.testing.assert_allclose(y[r], softmax64(x[r]), rtol=1e-6)
    x = np.full((2, 3), -np.inf, np.float32)
    assert np.isnan(ops.softmax_rows(x)).all()


def test_softmax_shapes(path, rng):
    np.testing.assert_array_equal(ops.softmax_rows(rng.standard_normal((9, 1)).astype(np.float32)), 1.0)
    e = np.zeros((0, 4), np.float32)
    assert ops.softmax_rows(e) is e
    # attention scores (B, heads, T, T) with a (B, T) key mask: no broadcast copy
    b, h, t = 3, 4, 11
    s = rng.standard_normal((b, h, t, t)).astype(np.float32)
    mask = np.ones((b, t), np.float32)
    mask[1, 6:] = 0
    bias = (1 - mask) * np.finfo(np.float32).min
    y = ops.softmax_rows(s.copy(), bias, scale=0.25)
    ref = softmax64(s.astype(np.float64) * 0.25 + bias[:, None, None, :])
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-30)
    assert (y[1, :, :, 6:] == 0).all()
    # the rows of the last bias row may be fewer than rows_per_bias
    x = rng.standard_normal((7, 5)).astype(np.float32)
    bb = rng.standard_normal((2, 5)).astype(np.float32)
    y = ops.softmax_rows(x.copy(), bb, rows_per_bias=4)
    np.testing.assert_allclose(y, softmax64(x + np.repeat(bb, 4, axis=0)[:7]), rtol=1e-6)


def test_softmax_threads_bit_identical(rng):
    x = rng.standard_normal((4096, 48)).astype(np.float32)
    saved = cquant.get_num_threads()
    try:
        cquant.set_num_threads(1)
        a = ops.softmax_rows(x.copy(), scale=0.3)
        cquant.set_num_threads(max(2, saved))
        b = ops.softmax_rows(x.copy(), scale=0.3)
    finally:
        cquant.set_num_threads(saved)
    np.testing.assert_array_equal(a, b)


def test_softmax_errors():
    with pytest.raises(errors.TypeError):
        ops.softmax_rows(np.ones((2, 3), np.float64))          # in place: float32 only
    with pytest.raises(errors.TypeError):
        ops.softmax_rows(np.ones((3, 4), np.float32)[:, :2])   # not contiguous
    with pytest.raises(errors.TypeError):
        ops.softmax_rows([[1.0, 2.0]])
    with pytest.raises(errors.ShapeError):
        ops.softmax_rows(np.ones((2, 0), np.float32))
    with pytest.raises(errors.ShapeError):
        ops.softmax_rows(np.ones((), np.float32))
    with pytest.raises(errors.ShapeError):
        ops.softmax_rows(np.ones((4, 3), np.float32), np.ones(4, np.float32))        # not rows of 3
    with pytest.raises(errors.ShapeError):
        ops.softmax_rows(np.ones((5, 3), np.float32), np.ones((2, 3), np.float32))   # 5 rows over 2
    with pytest.raises(errors.ShapeError):
        ops.softmax_rows(np.ones((5, 3), np.float32), np.ones((2, 3), np.float32), rows_per_bias=2)
    with pytest.raises(errors.ShapeError):
        ops.softmax_rows(np.ones((4, 3), np.float32), np.ones((2, 3), np.float32), rows_per_bias=0)
    with pytest.raises(errors.TypeError):
        ops.softmax_rows(np.ones((4, 3), np.float32), np.ones((2, 3), np.int32))


def test_c_status_codes():
    x = ffi.new("float[]", 8)
    assert lib.cq_softmax_rows(x, 2, 0, ffi.NULL, 1, 1.0) == lib.CQ_ERR_SHAPE
    assert lib.cq_softmax_rows(x, -1, 4, ffi.NULL, 1, 1.0) == lib.CQ_ERR_SHAPE
    assert lib.cq_softmax_rows(x, 2, 4, x, 0, 1.0) == lib.CQ_ERR_SHAPE
    assert lib.cq_softmax_rows(ffi.NULL, 2, 4, ffi.NULL, 1, 1.0) == lib.CQ_ERR_NULL
    assert lib.cq_softmax_rows(ffi.NULL, 0, 4, ffi.NULL, 1, 1.0) == lib.CQ_OK
    assert lib.cq_softmax_rows(x, 2**62, 2**62, ffi.NULL, 1, 1.0) == lib.CQ_ERR_OVERFLOW
    assert lib.cq_add_layer_norm(x, x, 2, 0, ffi.NULL, ffi.NULL, 1e-5, x) == lib.CQ_ERR_SHAPE
    assert lib.cq_add_layer_norm(x, x, 2, 4, ffi.NULL, ffi.NULL, -1.0, x) == lib.CQ_ERR_ARG
    assert lib.cq_add_layer_norm(ffi.NULL, x, 2, 4, ffi.NULL, ffi.NULL, 1e-5, x) == lib.CQ_ERR_NULL
    assert lib.cq_add_layer_norm(x, x, 2**62, 2**62, ffi.NULL, ffi.NULL, 1e-5, x) == lib.CQ_ERR_OVERFLOW
    att = lib.cq_attention
    assert att(x, x, x, 3, 1, 2, 1, 4, ffi.NULL, 1.0, x, 4) == lib.CQ_ERR_SHAPE          # ld < heads * head_dim
    assert att(x, x, x, 4, 1, 2, 1, 4, ffi.NULL, 1.0, x, 3) == lib.CQ_ERR_SHAPE          # ldo too
    assert att(x, x, x, 4, 1, 2, 0, 4, ffi.NULL, 1.0, x, 4) == lib.CQ_ERR_SHAPE          # heads 0
    assert att(x, x, x, 4, 1, 2, 1, 0, ffi.NULL, 1.0, x, 4) == lib.CQ_ERR_SHAPE          # head_dim 0
    assert att(x, x, x, 4, -1, 2, 1, 4, ffi.NULL, 1.0, x, 4) == lib.CQ_ERR_SHAPE
    assert att(x, ffi.NULL, x, 4, 1, 2, 1, 4, ffi.NULL, 1.0, x, 4) == lib.CQ_ERR_NULL
    assert att(ffi.NULL, ffi.NULL, ffi.NULL, 4, 0, 2, 1, 4, ffi.NULL, 1.0, ffi.NULL, 4) == lib.CQ_OK
    assert att(x, x, x, 2**40, 2**30, 2**30, 1, 4, ffi.NULL, 1.0, x, 4) == lib.CQ_ERR_OVERFLOW
    assert att(x, x, x, 2**62, 1, 1, 2**31, 2**31, ffi.NULL, 1.0, x, 2**62) == lib.CQ_ERR_OVERFLOW


def test_nn_softmax_uses_the_kernel(rng):
    x = rng.standard_normal((3, 5, 7)).astype(np.float32) * 4
    np.testing.assert_allclose(nn.softmax(x), softmax64(x), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(nn.softmax(x, axis=1), softmax64(x.transpose(0, 2, 1)).transpose(0, 2, 1),
                               rtol=1e-6)
    xs = x[:, :, ::2]                                        # non-contiguous input: copied, not modified
    before = xs.copy()
    np.testing.assert_allclose(nn.softmax(xs), softmax64(before), rtol=1e-6)
    np.testing.assert_array_equal(xs, before)


# ---- attention ----------------------------------------------------------------------------------

def attention64(q, k, v, heads, bias, scale):
    b, t, h = q.shape
    dh = h // heads
    split = lambda a: np.asarray(a, np.float64).reshape(b, t, heads, dh).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(0, 1, 3, 2) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64).reshape(b, 1, 1, t)
    return (softmax64(s) @ split(v)).transpose(0, 2, 1, 3).reshape(b, t, h)


@pytest.mark.parametrize("b, t, heads, dh", [(1, 1, 1, 1), (2, 13, 3, 32), (3, 40, 12, 32), (2, 17, 2, 5),
                                             (1, 70, 2, 64), (2, 9, 4, 23), (1, 130, 1, 40), (2, 8, 2, 16),
                                             (1, 33, 1, 48), (3, 64, 2, 33)])
def test_attention_matches_float64(path, rng, b, t, heads, dh):
    h = heads * dh
    q, k, v = (rng.standard_normal((b, t, h)).astype(np.float32) for _ in range(3))
    mask = np.ones((b, t), np.float32)
    mask[0, t // 2 + 1:] = 0
    bias = (1 - mask) * np.finfo(np.float32).min
    out = ops.attention(q, k, v, heads, bias)
    ref = attention64(q, k, v, heads, bias, 1 / math.sqrt(dh))
    assert out.shape == (b, t, h) and out.dtype == np.float32
    # each output is a convex combination of values of v: error ~ dh float32 roundings of |q||k|
    tol = 1e-6 * (1 + dh / 8)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * np.abs(v).max())
    # the same through a fused (B, T, 3H) projection read in place, a (B, 1, 1, T) mask, out=
    qkv = np.concatenate([q, k, v], axis=-1)
    o2 = np.full_like(q, np.nan)
    r = ops.attention(qkv[..., :h], qkv[..., h:2 * h], qkv[..., 2 * h:], heads, bias[:, None, None, :], out=o2)
    assert r is o2
    np.testing.assert_array_equal(o2, out)
    # no mask, explicit scale
    np.testing.assert_allclose(ops.attention(q, k, v, heads, None, scale=0.3),
                               attention64(q, k, v, heads, None, 0.3), rtol=0, atol=tol * np.abs(v).max())


def test_attention_masks_and_specials(path, rng):
    b, t, heads, dh = 2, 6, 2, 4
    q, k, v = (rng.standard_normal((b, t, heads * dh)).astype(np.float32) for _ in range(3))
    bias = np.zeros((b, t), np.float32)
    bias[0, 3:] = -np.inf
    bias[1, :] = -np.inf                       # every key masked with -Inf: NaN, as torch
    out = ops.attention(q, k, v, heads, bias)
    np.testing.assert_allclose(out[0], attention64(q[:1], k[:1], v[:1], heads, bias[:1], 0.5)[0], atol=2e-6)
    assert np.isnan(out[1]).all()
    # a NaN in one batch's keys stays in that batch
    k2 = k.copy()
    k2[1, 2, 0] = np.nan
    out = ops.attention(q, k2, v, heads, None)
    assert np.isnan(out[1, :, :dh]).all() and np.isfinite(out[1, :, dh:]).all() and np.isfinite(out[0]).all()
    # large scores: max-subtracted, no overflow
    out = ops.attention(q * 1e3, k * 1e3, v, heads, None)
    assert np.isfinite(out).all()


def test_attention_inputs(rng):
    b, t, h = 2, 5, 12
    q, k, v = (rng.standard_normal((b, t, h)) for _ in range(3))   # float64: converted
    ref = attention64(q, k, v, 3, None, 0.5)
    np.testing.assert_allclose(ops.attention(q, k, v, 3), ref, atol=2e-6)
    qt = np.ascontiguousarray(q.transpose(1, 0, 2)).transpose(1, 0, 2).astype(np.float32)  # other strides
    np.testing.assert_allclose(ops.attention(qt, k, v, 3), ref, atol=2e-6)
    e = np.zeros((0, 4, h), np.float32)
    assert ops.attention(e, e, e, 3).shape == (0, 4, h)
    with pytest.raises(errors.ShapeError):
        ops.attention(q, k, v, 5)                        # 12 not a multiple of 5
    with pytest.raises(errors.ShapeError):
        ops.attention(q, k[:, :4], v, 3)
    with pytest.raises(errors.ShapeError):
        ops.attention(q[0], k[0], v[0], 3)
    with pytest.raises(errors.ShapeError):
        ops.attention(q, k, v, 3, np.zeros((b, t + 1), np.float32))
    with pytest.raises(errors.TypeError):
        ops.attention(q.astype(np.int32), k, v, 3)
    q32 = q.astype(np.float32)
    with pytest.raises(errors.ValueError):
        ops.attention(q32, k, v, 3, out=q32)
    with pytest.raises(errors.ShapeError):
        ops.attention(q, k, v, 3, out=np.zeros((b, t, h + 1), np.float32))


def test_attention_threads_bit_identical(rng):
    q, k, v = (rng.standard_normal((8, 48, 384)).astype(np.float32) for _ in range(3))
    saved = cquant.get_num_threads()
    try:
        cquant.set_num_threads(1)
        a = ops.attention(q, k, v, 12)
        cquant.set_num_threads(max(2, saved))
        b = ops.attention(q, k, v, 12)
    finally:
        cquant.set_num_threads(saved)
    np.testing.assert_array_equal(a, b)


# ---- add_layer_norm -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 384), (64, 1536), (4, 33), (2, 17)])
def test_add_layer_norm_matches_numpy(path, rng, shape):
    x = (rng.standard_normal(shape) * 4 + 50).astype(np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape[-1]).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    s = x.astype(np.float32) + r                    # the float32 sum, as the kernel forms it
    s64 = s.astype(np.float64)
    mu = s64.mean(-1, keepdims=True)
    norm = (s64 - mu) / np.sqrt(((s64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    y = ops.add_layer_norm(x, r, g, b, 1e-5)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, norm * g + b, rtol=1e-5, atol=2e-5 * np.abs(g).max())
    np.testing.assert_allclose(ops.add_layer_norm(x, r), norm, rtol=1e-5, atol=2e-5)
    # residual None: plain LayerNorm (the same kernel cq_layer_norm runs)
    np.testing.assert_array_equal(ops.add_layer_norm(s, None, g, b, 1e-5), ops.layer_norm(s, g, b, 1e-5))
    # in place over x, and over the residual
    xc, rc = x.copy(), r.copy()
    assert ops.add_layer_norm(xc, r, g, b, 1e-5, out=xc) is xc
    np.testing.assert_array_equal(xc, y)
    ops.add_layer_norm(x, rc, g, b, 1e-5, out=rc)
    np.testing.assert_array_equal(rc, y)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 384), (64, 1536), (4, 33), (2, 17), (3, 48)])
def test_add_layer_norm_residual_mul(path, rng, shape):
    """LayerNorm(x + residual * residual_mul) (smoothing folded into the LayerNorm that produced the
    residual): bit for bit the plain kernel on the float32 product, on every path; in place too."""
    x = rng.standard_normal(shape).astype(np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    m = np.exp(rng.standard_normal(shape[-1]) * 2).astype(np.float32)
    g = rng.standard_normal(shape[-1]).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    want = ops.add_layer_norm(x, r * m, g, b, 1e-5)
    np.testing.assert_array_equal(ops.add_layer_norm(x, r, g, b, 1e-5, residual_mul=m), want)
    rc = r.copy()
    assert ops.add_layer_norm(x, rc, g, b, 1e-5, out=rc, residual_mul=m) is rc
    np.testing.assert_array_equal(rc, want)
    np.testing.assert_array_equal(ops.add_layer_norm(x, r, residual_mul=np.ones(shape[-1], np.float32)),
                                  ops.add_layer_norm(x, r))


def test_add_layer_norm_residual_mul_errors(rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    m = np.ones(8, np.float32)
    with pytest.raises(errors.ValueError, match="needs a residual"):
        ops.add_layer_norm(x, None, residual_mul=m)
    with pytest.raises(errors.ShapeError):
        ops.add_layer_norm(x, x, residual_mul=np.ones(7, np.float32))
    with pytest.raises(errors.TypeError):
        ops.add_layer_norm(x, x, residual_mul=np.ones(8, np.int32))
    out = np.zeros(32, np.float32)
    with pytest.raises(errors.ValueError, match="overlaps residual_mul"):
        ops.add_layer_norm(x, x, out=out[:24].reshape(3, 8), residual_mul=out[16:24])
    xp = ffi.cast("float *", ffi.from_buffer(x))
    assert lib.cq_add_layer_norm_ex(xp, ffi.NULL, ffi.cast("float *", ffi.from_buffer(m)), 3, 8, ffi.NULL,
                                    ffi.NULL, 1e-5, xp) == lib.CQ_ERR_NULL
    assert lib.cq_add_layer_norm_ex(xp, xp, xp + 8, 3, 8, ffi.NULL, ffi.NULL, 1e-5, xp) == lib.CQ_ERR_ALIAS


def test_add_layer_norm_errors(rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(errors.ShapeError):
        ops.add_layer_norm(x, x[:, :4])
    with pytest.raises(errors.ShapeError):
        ops.add_layer_norm(x, x, np.ones(7, np.float32))
    with pytest.raises(errors.ValueError):
        ops.add_layer_norm(x, x, eps=-1.0)
    with pytest.raises(errors.TypeError):
        ops.add_layer_norm(x.astype(np.int64), x)
    with pytest.raises(errors.TypeError):
        ops.add_layer_norm(x, x, out=np.zeros((3, 8)))
    with pytest.raises(errors.ShapeError):
        ops.add_layer_norm(x, x, out=np.zeros((3, 9), np.float32))
    with pytest.raises(errors.ShapeError):
        ops.add_layer_norm(np.zeros((3, 0), np.float32), None)


# ---- GELU ---------------------------------------------------------------------------------------

def test_gelu_every_path_incl_avx512(path, rng):
    x = np.concatenate([np.linspace(-12, 12, 40001, dtype=np.float32),
                        (rng.standard_normal(4099) * 3).astype(np.float32),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 5.65, 5.66, -5.66, 1e6, -1e6, 3e38, -3e38], np.float32)])
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    y = ops.gelu(x)
    assert (np.abs(y - ref) <= 1e-6 + 3e-7 * np.abs(x)).all()
    special = np.array([np.inf, -np.inf, np.nan, -np.nan], np.float32)
    ys = ops.gelu(special)
    assert ys[0] == np.inf and ys[1] == 0 and np.isnan(ys[2]) and np.isnan(ys[3])
    # in place, odd lengths (masked tails)
    for n in (1, 15, 16, 17, 33, 1000):
        xi = x[:n].copy()
        assert ops.gelu_inplace(xi) is xi
        np.testing.assert_array_equal(xi, y[:n])
    with pytest.raises(errors.TypeError):
        ops.gelu_inplace(x.astype(np.float64))


def test_gelu_large_threaded(rng):
    x = (rng.standard_normal((300, 1536)) * 4).astype(np.float32)
    ref = 0.5 * x.astype(np.float64) * (1 + np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2)))
    assert (np.abs(ops.gelu(x) - ref) <= 1e-6 + 3e-7 * np.abs(x)).all()
