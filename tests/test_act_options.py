"""Activation options of the quantized linear (cq_linear_ex): a per-column pre-scale ``x_mul``
(SmoothQuant's 1/s applied inside the activation quantizer) and static activations ``x_scale`` (one
calibrated scale for every row). Checked on every ISA path against the independent numpy oracle
(tests/oracle.py), bit for bit in dynamic mode, and against the plain call on a pre-multiplied x."""
import os

import numpy as np
import pytest

from cquant import errors, ops

import oracle
from test_oracle import expected_dynamic_kernel, path  # noqa: F401  (the per-ISA fixture)

F32 = np.float32
#: under `make asan-py` (2-5x slower per call): N = 64 (whole panels, no tail) is left out of the
#: oracle grid, which keeps the tails, the heap buffer (K > 2048) and NaN rows where ASan looks
SANITIZER = bool(os.environ.get("CQUANT_SANITIZER"))
SCHEMES = [("per_channel", None, 8), ("per_group", 32, 8), ("per_tensor", None, 8), ("per_group", 32, 4),
           ("per_channel", None, 4)]


def _inputs(m, n, k, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-2, 2, (n, 1))).astype(F32)
    x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))).astype(F32)
    x[:, rng.integers(0, k, 3)] *= 40.0  # outlier columns, what smoothing is for
    mul = (10.0 ** rng.uniform(-1.5, 1.5, k)).astype(F32)
    bias = (rng.standard_normal(n) * 3).astype(F32)
    return w, x, mul, bias


def _qw(w, gran, group, bits):
    return ops.QuantizedWeight.from_codes(*oracle.quantize(w, gran, group, bits), gran, group, bits=bits) \
        if bits == 4 else ops.quantize_weight(w, gran, group)


@pytest.mark.parametrize("gran,group,bits", SCHEMES, ids=[f"{g}{s or ''}-int{b}" for g, s, b in SCHEMES])
def test_prescale_and_static_match_oracle(path, gran, group, bits):
    ran = 0
    for k in (32, 96, 2048, 2080):  # 2080: the quantizer's heap buffer (k > 2048)
        for n in (7, 130) if SANITIZER else (7, 64, 130):
            for m in (1, 2, 5, 40):
                w, x, mul, bias = _inputs(m, n, k, m * 1000 + n * 10 + k)
                if m > 3:
                    x[3, k // 3] = np.nan  # a non-finite row stays non-finite (static too)
                qw = _qw(w, gran, group, bits)
                qo, so = oracle.quantize(w, gran, group, bits)
                xm = (x * mul).astype(F32)  # numpy's float32 product: what the kernel must quantize
                # pre-scale: bit-identical to the plain call on x * mul and to the oracle
                y = ops.linear(x, qw, bias, x_mul=mul)
                assert ops.last_kernel() == expected_dynamic_kernel(path, m, n, k, gran, group, bits=bits, x=xm)
                np.testing.assert_array_equal(y, ops.linear(xm, qw, bias))
                want = oracle.linear_dynamic(xm, qo, so, gran, group, bias, fma_groups=True)
                np.testing.assert_array_equal(y, want, err_msg=f"x_mul M={m} N={n} K={k}")
                # static: a scale that clips the outlier columns (codes clamp to +-127)
                xs = float(np.nanmax(np.abs(np.where(np.isfinite(xm), xm, 0))) / 127 / 8)
                for mm in (None, mul):
                    src = xm if mm is not None else x
                    y = ops.linear(x, qw, bias, x_mul=mm, x_scale=xs)
                    want = oracle.linear_dynamic(src, qo, so, gran, group, bias, fma_groups=True, x_scale=xs)
                    np.testing.assert_array_equal(y, want, err_msg=f"static M={m} N={n} K={k}")
                    if m > 3:
                        assert np.isnan(y[3]).all() and np.isfinite(np.delete(y, 3, axis=0)).all()
                # weight-only with a pre-scale: the same as the plain call on x * mul
                xf = np.nan_to_num(x, nan=0.0)
                np.testing.assert_array_equal(ops.linear(xf, qw, bias, mode="weight_only", x_mul=mul),
                                              ops.linear((xf * mul).astype(F32), qw, bias, mode="weight_only"))
                ran += 1
    assert ran


def test_static_scale_is_used_not_rows_absmax(path):
    """With x_scale the row's own absmax plays no part: codes are round(x / x_scale) clamped."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 64)).astype(F32)
    qw = ops.quantize_weight(w)
    x = rng.standard_normal((3, 64)).astype(F32)
    a = ops.linear(x, qw, x_scale=0.05)
    b = ops.linear(x * F32(10), qw, x_scale=0.05)  # most codes now clamp at +-127
    assert not np.allclose(a * 10, b, rtol=1e-2)
    ident = ops.QuantizedWeight.from_codes(np.eye(64, dtype=np.int8)[:16], np.ones(16, F32))
    got = ops.linear(x, ident, x_scale=0.05)  # = code * 0.05 * 1
    codes = np.clip(np.round(x[:, :16] / F32(0.05)), -127, 127)
    np.testing.assert_array_equal(got, (codes * F32(0.05)).astype(F32))


def test_bad_options_are_refused():
    w = np.ones((8, 16), F32)
    qw = ops.quantize_weight(w)
    x = np.ones((2, 16), F32)
    with pytest.raises(errors.ShapeError):
        ops.linear(x, qw, x_mul=np.ones(15, F32))
    bad = np.ones(16, F32)
    bad[4] = np.nan
    for mode in ("dynamic", "weight_only"):
        with pytest.raises(errors.NonFiniteError, match="x_mul"):
            ops.linear(x, qw, mode=mode, x_mul=bad)
    for s in (0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e50):
        with pytest.raises(ValueError):
            ops.linear(x, qw, x_scale=s)
    with pytest.raises(ValueError):
        ops.linear(x, qw, mode="weight_only", x_scale=0.1)
    with pytest.raises(TypeError):
        ops.linear(x, qw, x_scale="0.1")
    # the C entry point checks the same (no Python in between)
    from cquant._native import ffi, lib
    pk, ps, code, g = qw._native()[:4]
    y = np.empty((2, 8), F32)
    xp = ffi.from_buffer("float[]", x)
    yp = ffi.from_buffer("float[]", y)
    for s in (-1.0, float("nan"), float("inf")):
        assert lib.cq_linear_ex(lib.CQ_MODE_DYNAMIC, xp, 2, 16, pk, ps, code, g, 8, ffi.NULL, ffi.NULL, 0, s, yp) \
            == lib.CQ_ERR_ARG
    assert lib.cq_linear_ex(lib.CQ_MODE_WEIGHT_ONLY, xp, 2, 16, pk, ps, code, g, 8, ffi.NULL, ffi.NULL, 0, 0.5, yp) \
        == lib.CQ_ERR_ARG
    mul = np.ones(16, F32)
    alias = np.empty(16, F32)
    assert lib.cq_linear_ex(lib.CQ_MODE_DYNAMIC, xp, 2, 16, pk, ps, code, g, 8, ffi.NULL,
                            ffi.from_buffer("float[]", alias), 0, 0.0,
                            ffi.from_buffer("float[]", alias)) == lib.CQ_ERR_ALIAS
    assert lib.cq_linear_ex(lib.CQ_MODE_DYNAMIC, xp, 2, 16, pk, ps, code, g, 8, ffi.NULL,
                            ffi.from_buffer("float[]", mul), 0, 0.0, yp) == lib.CQ_OK


def _hadamard_matrix(b: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("gran,group,bits", SCHEMES[:3], ids=[f"{g}{s or ''}-int{b}" for g, s, b in SCHEMES[:3]])
def test_rotation_matches_oracle(path, gran, group, bits):
    """x_hadamard: the kernel quantizes exactly the oracle's rotated rows (every block size, with and
    without x_mul, both modes, the heap buffer past K = 2048, a NaN row), on every ISA path."""
    ran = 0
    # every block size once, the heap buffer (k > 2048) once; sizes kept small for the ASan run
    cases = ((32, (2, 4, 8, 16, 32), (1, 5, 40)), (96, (2, 32), (1, 40)), (2048, (8, 64, 256), (1, 5)),
             (4096, (128, 1024), (5,)))
    for k, blocks, ms in cases:
        for b in blocks:
            for m in ms:
                n = 24
                w, x, mul, bias = _inputs(m, n, k, m * 7 + k + b)
                if m > 3:
                    x[3, k // 3] = np.nan
                qw = _qw(w, gran, group, bits)
                qo, so = oracle.quantize(w, gran, group, bits)
                for mm in (None, mul):
                    xr = oracle.hadamard_rows(x, b, mm)
                    np.testing.assert_array_equal(ops.hadamard(x, b, mm), xr)
                    y = ops.linear(x, qw, bias, x_mul=mm, x_hadamard=b)
                    assert ops.last_kernel() == expected_dynamic_kernel(path, m, n, k, gran, group, bits=bits, x=xr)
                    want = oracle.linear_dynamic(xr, qo, so, gran, group, bias, fma_groups=True)
                    np.testing.assert_array_equal(y, want, err_msg=f"rotation M={m} K={k} b={b}")
                    if m > 3:
                        assert np.isnan(y[3]).all() and np.isfinite(np.delete(y, 3, axis=0)).all()
                    xs = float(np.nanmax(np.abs(np.where(np.isfinite(xr), xr, 0))) / 127 / 4)
                    want = oracle.linear_dynamic(xr, qo, so, gran, group, bias, fma_groups=True, x_scale=xs)
                    np.testing.assert_array_equal(ops.linear(x, qw, bias, x_mul=mm, x_hadamard=b, x_scale=xs), want)
                    xf = np.nan_to_num(x, nan=0.0)
                    np.testing.assert_array_equal(
                        ops.linear(xf, qw, bias, mode="weight_only", x_mul=mm, x_hadamard=b),
                        ops.linear(oracle.hadamard_rows(xf, b, mm), qw, bias, mode="weight_only"))
                ran += 1
    assert ran


def test_rotation_is_the_block_hadamard_and_keeps_the_product():
    """The rotation is x @ blockdiag(H_b) (H_b H_b = b I), so rotating the weight as W H_b / b leaves
    x W^T unchanged up to float rounding; an outlier column is spread over its block."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 128)).astype(F32)
    x[:, 5] *= 200.0
    for b in (2, 16, 64, 128):
        hb = np.kron(np.eye(128 // b), _hadamard_matrix(b))
        np.testing.assert_allclose(ops.hadamard(x, b), x.astype(np.float64) @ hb, rtol=1e-5, atol=1e-3)
    for short in (np.ones(1, F32), np.ones(64, F32), np.ones((6, 128), F32)):  # never broadcast
        with pytest.raises(errors.ShapeError, match="x_mul has shape"):
            ops.hadamard(x, 64, short)
    w = rng.standard_normal((32, 128)).astype(F32)
    hb = np.kron(np.eye(2), _hadamard_matrix(64))
    wr = (w.astype(np.float64) @ hb / 64).astype(F32)
    qwr, qw = ops.quantize_weight(wr), ops.quantize_weight(w)
    ref = x.astype(np.float64) @ w.T
    err_rot = np.abs(ops.linear(x, qwr, x_hadamard=64) - ref).max()
    err = np.abs(ops.linear(x, qw) - ref).max()
    assert err_rot < err / 2  # the outlier column no longer sets every row's scale alone
    yw = ops.linear(x, qwr, mode="weight_only", x_hadamard=64)
    assert np.linalg.norm(yw - ref) < 1e-2 * np.linalg.norm(ref)  # the same function, int8 weights


def test_bad_rotation_is_refused():
    qw = ops.quantize_weight(np.ones((8, 48), F32))
    x = np.ones((2, 48), F32)
    for b in (1, 3, 6, 32, 64, -16):  # not a power of two >= 2, or not dividing K = 48
        with pytest.raises(ValueError, match="x_hadamard"):
            ops.linear(x, qw, x_hadamard=b)
    with pytest.raises(TypeError):
        ops.linear(x, qw, x_hadamard=16.0)
    from cquant._native import ffi, lib
    pk, ps, code, g = qw._native()[:4]
    y = np.full((2, 8), 7.0, F32)
    for b in (1, 3, 32, -2):
        assert lib.cq_linear_ex(lib.CQ_MODE_DYNAMIC, ffi.from_buffer("float[]", x), 2, 48, pk, ps, code, g, 8,
                                ffi.NULL, ffi.NULL, b, 0.0, ffi.from_buffer("float[]", y)) == lib.CQ_ERR_ARG
    assert (y == 7.0).all()  # nothing written
    big = np.full((1, 48), 3e38, F32)  # the rotated row overflows float32: a non-finite row, NaN out
    assert np.isnan(ops.linear(big, qw, x_hadamard=16)).all()


@pytest.mark.parametrize("gran,group,bits", SCHEMES, ids=[f"{g}{s or ''}-int{b}" for g, s, b in SCHEMES])
def test_linear_multi_is_the_separate_calls(path, gran, group, bits):
    """ops.linear_multi (C cq_linear_multi: one activation pass for several weights on the same x)
    gives each weight exactly what its own ops.linear call gives, in both modes, with every
    activation option, M = 1 (GEMV) to 300, weights of different N and packed formats."""
    rng = np.random.default_rng(11)
    for k, ns, m in ((64, (64, 7, 130), 1), (96, (16, 64), 5), (2048, (300, 64, 64), 40), (128, (1152,), 300)):
        ws = [(rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-1, 1, (n, 1))).astype(F32) for n in ns]
        qws = [_qw(w, gran, group, bits) for w in ws]
        biases = [(rng.standard_normal(n)).astype(F32) if i != 1 else None for i, n in enumerate(ns)]
        x = (rng.standard_normal((m, k)) * 3).astype(F32)
        x[:, 5] *= 30.0
        mul = (10.0 ** rng.uniform(-1, 1, k)).astype(F32)
        for mode in ("dynamic", "weight_only"):
            opts = [{}, dict(x_mul=mul), dict(x_mul=mul, x_hadamard=32)]
            if mode == "dynamic":
                opts += [dict(x_scale=0.05), dict(x_mul=mul, x_hadamard=16, x_scale=0.2)]
            for kw in opts:
                ys = ops.linear_multi(x, qws, biases, mode, **kw)
                assert len(ys) == len(qws)
                for qw, b, y in zip(qws, biases, ys):
                    np.testing.assert_array_equal(y, ops.linear(x, qw, b, mode, **kw),
                                                  err_msg=f"K={k} N={qw.shape[0]} M={m} {mode} {sorted(kw)}")
    # leading dimensions kept, no bias list
    x3 = rng.standard_normal((2, 3, 64)).astype(F32)
    qa, qb = (ops.quantize_weight(rng.standard_normal((n, 64)).astype(F32)) for n in (8, 16))
    ya, yb = ops.linear_multi(x3, [qa, qb])
    assert ya.shape == (2, 3, 8) and yb.shape == (2, 3, 16)
    np.testing.assert_array_equal(yb, ops.linear(x3, qb))


def test_linear_multi_refusals():
    rng = np.random.default_rng(2)
    qa = ops.quantize_weight(rng.standard_normal((8, 64)).astype(F32))
    qb = ops.quantize_weight(rng.standard_normal((8, 32)).astype(F32))
    qg = ops.quantize_weight(rng.standard_normal((8, 64)).astype(F32), "per_group", 32)
    x = rng.standard_normal((3, 64)).astype(F32)
    with pytest.raises(ValueError, match="share K"):
        ops.linear_multi(x, [qa, qb])
    with pytest.raises(ValueError, match="share K"):
        ops.linear_multi(x, [qa, qg])
    with pytest.raises(ValueError):
        ops.linear_multi(x, [])
    with pytest.raises(ValueError, match="biases"):
        ops.linear_multi(x, [qa, qa], [None])
    with pytest.raises(TypeError):
        ops.linear_multi(x, [qa, "w"])
    with pytest.raises(errors.ShapeError):
        ops.linear_multi(x[:, :32], [qa])
    bad = np.ones(64, F32)
    bad[3] = np.inf
    with pytest.raises(errors.NonFiniteError):
        ops.linear_multi(x, [qa, qa], x_mul=bad)
    # C: an output over another linear's weight or output is refused before anything is written
    from cquant._native import ffi, lib
    caches = [q._native() for q in (qa, qa)]
    y0 = np.full((3, 8), 5.0, F32)
    y1 = np.full((3, 8), 5.0, F32)
    pk = ffi.new("void *[]", [ffi.cast("void *", c[0]) for c in caches])
    ps = ffi.new("float *[]", [c[1] for c in caches])
    ns = ffi.new("int64_t[]", [8, 8])
    xp = ffi.from_buffer("float[]", x)
    same = ffi.new("float *[]", [ffi.from_buffer("float[]", y0), ffi.from_buffer("float[]", y0)])
    assert lib.cq_linear_multi(lib.CQ_MODE_DYNAMIC, xp, 3, 64, 2, pk, ps, caches[0][2], caches[0][3], ns,
                               ffi.NULL, ffi.NULL, 0, 0.0, same) == lib.CQ_ERR_ALIAS
    over_scale = ffi.new("float *[]", [ffi.from_buffer("float[]", y1), ffi.cast("float *", caches[1][1])])
    assert lib.cq_linear_multi(lib.CQ_MODE_DYNAMIC, xp, 3, 64, 2, pk, ps, caches[0][2], caches[0][3], ns,
                               ffi.NULL, ffi.NULL, 0, 0.0, over_scale) == lib.CQ_ERR_ALIAS
    assert (y0 == 5.0).all() and (y1 == 5.0).all()
    ok = ffi.new("float *[]", [ffi.from_buffer("float[]", y0), ffi.from_buffer("float[]", y1)])
    for count in (0, -1, 65):
        assert lib.cq_linear_multi(lib.CQ_MODE_DYNAMIC, xp, 3, 64, count, pk, ps, caches[0][2], caches[0][3], ns,
                                   ffi.NULL, ffi.NULL, 0, 0.0, ok) == lib.CQ_ERR_ARG
    assert lib.cq_linear_multi(lib.CQ_MODE_DYNAMIC, xp, 3, 64, 2, pk, ps, caches[0][2], caches[0][3], ns,
                               ffi.NULL, ffi.NULL, 0, 0.0, ok) == lib.CQ_OK
    np.testing.assert_array_equal(y0, ops.linear(x, qa))


def _post_op_cases(rng, gran, group, bits):
    """(qw, x, b, mode, kw, where) for the post-op tests: GEMVs (M = 1 and M < 4), tiles with ragged
    rows and columns, per-group and chunked K, both modes, every activation option."""
    for k, n, m in ((64, 7, 1), (96, 130, 3), (256, 300, 37), (128, 64, 200), (2048, 80, 9)):
        w = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-1, 1, (n, 1))).astype(F32)
        qw = _qw(w, gran, group, bits)
        x = (rng.standard_normal((m, k)) * 3).astype(F32)
        b = rng.standard_normal(n).astype(F32)
        mul = (10.0 ** rng.uniform(-1, 1, k)).astype(F32)
        for mode in ("dynamic", "weight_only"):
            opts = [{}, dict(x_mul=mul, x_hadamard=32)] + ([dict(x_scale=0.05)] if mode == "dynamic" else [])
            for kw in opts:
                yield qw, x, b, mode, kw, f"K={k} N={n} M={m} {mode} {sorted(kw)}"


@pytest.mark.parametrize("gran,group,bits", SCHEMES, ids=[f"{g}{s or ''}-int{b}" for g, s, b in SCHEMES])
def test_gelu_inside_the_kernel_is_the_separate_pass(path, gran, group, bits):
    """ops.linear(..., activation="gelu") (C cq_linear_post: GELU on each block of outputs as the
    kernel finishes it) is bit for bit ops.gelu(ops.linear(...)) on every path, in both modes, with
    every activation option, for GEMVs (M = 1 and M < 4), tiles with ragged rows and columns,
    per-group and chunked K; NaN / Inf rows keep their GELU."""
    rng = np.random.default_rng(5)
    for qw, x, b, mode, kw, where in _post_op_cases(rng, gran, group, bits):
        want = ops.gelu(ops.linear(x, qw, b, mode, **kw))
        got = ops.linear(x, qw, b, mode, activation="gelu", **kw)
        np.testing.assert_array_equal(got, want, err_msg=where)
    x = rng.standard_normal((3, 64)).astype(F32)
    x[1, 5] = np.nan
    qw = _qw(rng.standard_normal((20, 64)).astype(F32), gran, group, bits)
    np.testing.assert_array_equal(ops.linear(x, qw, activation="gelu"), ops.gelu(ops.linear(x, qw)))


def test_bad_activation_is_refused():
    qw = ops.quantize_weight(np.ones((4, 8), F32))
    x = np.ones((2, 8), F32)
    for bad in ("relu", "GELU", 1, True):
        with pytest.raises(errors.ValueError, match="activation"):
            ops.linear(x, qw, activation=bad)
    from cquant._native import ffi, lib
    pk, ps, code, g = qw._native()[:4]
    y = np.empty((2, 4), F32)
    assert lib.cq_linear_post(ops.MODES["dynamic"], ffi.from_buffer("float[]", x), 2, 8, pk, ps, code, g, 4,
                              ffi.NULL, ffi.NULL, 0, 0.0, 7, ffi.from_buffer("float[]", y)) == lib.CQ_ERR_ARG


@pytest.mark.parametrize("gran,group,bits", SCHEMES, ids=[f"{g}{s or ''}-int{b}" for g, s, b in SCHEMES])
def test_add_layer_norm_inside_the_kernel_is_the_separate_pass(path, gran, group, bits):
    """ops.linear(..., activation=ops.AddLayerNorm(...)) (C cq_linear_add_ln: the add + LayerNorm
    on each block of whole rows as the kernel finishes it, or a pass after the GEMVs and the
    weight-only kernels) is bit for bit ops.add_layer_norm(ops.linear(...), ...) on every path, in
    both modes, with every activation option, with and without the residual factor, gamma and beta;
    a NaN row stays a NaN row."""
    rng = np.random.default_rng(6)
    for qw, x, b, mode, kw, where in _post_op_cases(rng, gran, group, bits):
        n, m = qw.shape[0], x.shape[0]
        res = rng.standard_normal((m, n)).astype(F32)
        gam, bet = (rng.random(n) + 0.5).astype(F32), rng.standard_normal(n).astype(F32)
        rmul = (10.0 ** rng.uniform(-1, 1, n)).astype(F32)
        for ln in ((gam, bet, None), (None, None, rmul), (gam, bet, rmul)):
            want = ops.add_layer_norm(ops.linear(x, qw, b, mode, **kw), res, ln[0], ln[1], 1e-6, residual_mul=ln[2])
            got = ops.linear(x, qw, b, mode, activation=ops.AddLayerNorm(res, ln[0], ln[1], 1e-6, ln[2]), **kw)
            np.testing.assert_array_equal(got, want, err_msg=where)
    x = rng.standard_normal((5, 64)).astype(F32)
    x[2, 7] = np.nan
    qw = _qw(rng.standard_normal((20, 64)).astype(F32), gran, group, bits)
    r = rng.standard_normal((5, 20)).astype(F32)
    got = ops.linear(x, qw, activation=ops.AddLayerNorm(r))
    np.testing.assert_array_equal(got, ops.add_layer_norm(ops.linear(x, qw), r))
    assert np.isnan(got[2]).all() and np.isfinite(got[[0, 1, 3, 4]]).all()


def test_add_layer_norm_post_op_refusals():
    qw = ops.quantize_weight(np.ones((4, 8), F32))
    x = np.ones((3, 8), F32)
    with pytest.raises(errors.ShapeError, match="residual"):
        ops.linear(x, qw, activation=ops.AddLayerNorm(np.ones((3, 5), F32)))
    with pytest.raises(errors.ShapeError, match="weight"):
        ops.linear(x, qw, activation=ops.AddLayerNorm(np.ones((3, 4), F32), np.ones(5, F32)))
    with pytest.raises(errors.ValueError, match="eps"):
        ops.AddLayerNorm(np.ones((3, 4), F32), eps=-1.0)
    from cquant._native import ffi, lib
    pk, ps, code, g = qw._native()[:4]
    y = np.empty((3, 4), F32)
    r = np.ones((3, 4), F32)
    xp, yp, rp = (ffi.from_buffer("float[]", a) for a in (x, y, r))
    d = ops.MODES["dynamic"]
    assert lib.cq_linear_add_ln(d, xp, 3, 8, pk, ps, code, g, 4, ffi.NULL, ffi.NULL, 0, 0.0, ffi.NULL, ffi.NULL,
                                ffi.NULL, ffi.NULL, 1e-5, yp) == lib.CQ_ERR_NULL
    assert lib.cq_linear_add_ln(d, xp, 3, 8, pk, ps, code, g, 4, ffi.NULL, ffi.NULL, 0, 0.0, rp, ffi.NULL,
                                ffi.NULL, ffi.NULL, -1.0, yp) == lib.CQ_ERR_ARG
    assert lib.cq_linear_add_ln(d, xp, 3, 8, pk, ps, code, g, 4, ffi.NULL, ffi.NULL, 0, 0.0, yp, ffi.NULL,
                                ffi.NULL, ffi.NULL, 1e-5, yp) == lib.CQ_ERR_ALIAS  # y over the residual
    assert lib.cq_linear_add_ln(d, xp, 3, 8, pk, ps, code, g, 4, ffi.NULL, ffi.NULL, 0, 0.0, rp, ffi.NULL,
                                yp, ffi.NULL, 1e-5, yp) == lib.CQ_ERR_ALIAS  # y over gamma
    assert lib.cq_linear_add_ln(d, xp, 3, 8, pk, ps, code, g, 4, ffi.NULL, ffi.NULL, 0, 0.0, rp, ffi.NULL,
                                ffi.NULL, ffi.NULL, 1e-5, yp) == lib.CQ_OK
    np.testing.assert_array_equal(y, ops.add_layer_norm(ops.linear(x, qw), r))
