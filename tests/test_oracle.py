"""cquant against the independent numpy oracle (tests/oracle.py), on every ISA path this machine has.

- quantize / quantize_rows / quantize_rows_u8 / dequantize: bit-exact;
- gemm_s8s8s32: exact against int64;
- dynamic linear: bit-exact against the oracle's integer sums + float32 epilogue (the epilogue's
  operation order is mirrored, see oracle.py), and the micro-kernel that ran is the one the
  registry's configs choose (the KERNEL TABLE below, transcribed from csrc/src/registry.c);
- weight-only linear: within a K-scaled float32 budget of a float64 reference;
- thread count, packed-format changes and K > 131072 (chunked int64 sums) change nothing.
Paths absent from this CPU/build are skipped, never failed.
"""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import cquant
from cquant import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402

PATHS = ["scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx"]
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])

# ================================ KERNEL TABLE ======================================================
# Transcribed from csrc/src/registry.c (QD8_ROWS, F32_ROWS, rank()) and dispatch.c
# (cq_best_format). A call takes the first row, best first, that its path allows (row rank <= the
# active path's rank), that reads the weight's packed format (Python repacks a weight to the
# path's best format for its N) and whose shape limits hold.
RANK = {"scalar": 0, "avx2": 1, "avxvnni": 2, "avx512": 3, "avx512vnni": 4, "amx": 5}
REF_QD8 = ("qd8_f32_qc8w_gemm_4xNc4_ref", "qd8_f32_qc8w_gemv4_1x4Nc4_ref")
# dynamic int8 / gemm_s8s8s32: (path, format, gemm kernel, gemv4 kernel or None,
#                               min_m, k4_multiple (of ceil(K/4)), no_groups: False (any scale
#                               groups), True (one int32 sum per output only), "g32|g64n" (also
#                               groups of 32 k or a multiple of 64 k, within one int32 chunk))
QD8_ROWS = [
    ("amx", "n64k4", "qd8_f32_qc8w_gemm_32x64c4_amx", None, 16, 16, "g32|g64n"),
    ("avx512vnni", "n64k4", "qd8_f32_qc8w_gemm_6x64c4_avx512vnni",
     "qd8_f32_qc8w_gemv4_1x256c4_avx512vnni", 0, 0, False),
    ("avx512", "n64k4", "qd8_f32_qc8w_gemm_4x64c4_avx512bw", None, 0, 0, False),
    ("avxvnni", "n16k4", "qd8_f32_qc8w_gemm_4x16c4_avxvnni", "qd8_f32_qc8w_gemv4_1x64c4_avxvnni", 0, 0, False),
    ("avx2", "n16k4", "qd8_f32_qc8w_gemm_4x16c4_avx2", "qd8_f32_qc8w_gemv4_1x64c4_avx2", 0, 0, False),
    ("scalar", "n16k4", *REF_QD8, 0, 0, False),
    ("scalar", "n64k4", *REF_QD8, 0, 0, False),
]
# weight-only int8: (path, format, gemm kernel (M >= gemv_m), gemv4 kernel (M < gemv_m), gemv_m)
F32_ROWS = [
    ("avx512", "n64k4", "f32_qc8w_gemm_6x64_avx512f", "f32_qc8w_gemv4_6x256c4_avx512f", 9),
    ("avx2", "n16k4", "f32_qc8w_gemm_6x16_avx2", "f32_qc8w_gemv4_6x64c4_avx2", 9),
    ("scalar", "n16k4", "f32_qc8w_gemm_6xN_ref", "f32_qc8w_gemv4_6x4Nc4_ref", 9),
    ("scalar", "n64k4", "f32_qc8w_gemm_6xN_ref", "f32_qc8w_gemv4_6x4Nc4_ref", 9),
]
CHUNK_K = oracle.CHUNK_K  # CQ_CHUNK4 * 4: longer sums (or groups) take the chunked int64 path


def _allowed(path, row_path):
    if row_path == "avxvnni" and path != "avxvnni":  # registry.c allowed(): only where the CPU has it
        return path in ("avx512vnni", "amx") and "avxvnni" in ops.available_isas()
    return RANK[row_path] <= RANK[path]


def table_best_format(path, n):
    """dispatch.c cq_best_format: the first allowed QD8 row's format; a 64-wide format falls back
    to n16k4 when padding n to whole panels would exceed 1.25 n."""
    fmt = next(r[1] for r in QD8_ROWS if _allowed(path, r[0]))
    if fmt == "n64k4" and -(-n // 64) * 64 * 4 > 5 * n:
        fmt = "n16k4"
    return fmt


PAIRSAFE_AVX2 = "qd8_f32_qc8w_gemm_4x16c4_pairsafe_avx2"
# the configs with a pair-safe tile (registry.c gemm_ps): row path -> (tile, panel width)
PAIRSAFE = {"avx2": (PAIRSAFE_AVX2, 16), "avx512": ("qd8_f32_qc8w_gemm_4x64c4_pairsafe_avx512bw", 64)}


def pairsafe_entries(x, x_scale=None, per_row=False):
    """Residual entries the pair-safe preparation makes for rows x (as the kernel quantizes them):
    aligned pairs of codes of the same sign with |a| + |b| > 128; in all, or per row."""
    q = (oracle.quantize_rows_s8(x)[0] if x_scale is None else oracle.quantize_rows_static(x, x_scale)[0])
    q = q.astype(np.int32)
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)))
    a, b = q[:, 0::2], q[:, 1::2]
    e = ((a * b > 0) & (np.abs(a) + np.abs(b) > 128)).sum(axis=1)
    return e if per_row else int(e.sum())


def pairsafe_fits(x, m, kp4, x_scale=None):
    """linear.c's limits on the entries: m * kp4 / 16 in all, kp4 / 4 + 1 in a row."""
    e = pairsafe_entries(np.asarray(x)[:m], x_scale, per_row=True)
    return int(e.sum()) <= m * kp4 // 16 and int(e.max()) <= kp4 // 4 + 1


def expected_dynamic_kernel(path, m, n, k, granularity="per_channel", group_size=None, gemm=False,
                            bits=8, x=None, x_scale=None):
    """Name cquant.last_kernel() must report after linear(mode="dynamic") (or gemm_s8s8s32).
    An int4 weight runs the kernels of the int8 format of its panel width, over k padded to 8.
    x (the rows the kernel quantizes, after any pre-scale or rotation; x_scale for static ones):
    where the AVX2 config applies to per-channel / per-tensor weights in one int32 chunk, linear.c
    runs its pair-safe tile when n >= 64 and the rows have at most
    m * ceil(k/4) / 16 residual entries, none more than ceil(k/4) / 4 + 1."""
    ng = k // group_size if granularity == "per_group" else 1
    kp4 = -(-k // 4) if bits == 8 else 2 * -(-k // 8)
    # linear.c: the group4 argument (k4 steps of one summed group; 0: one int32 sum per output)
    group4 = 0 if gemm else (k // ng) // 4 if ng > 1 else (kp4 if 4 * kp4 > CHUNK_K else 0)
    fmt = table_best_format(path, n)
    for rpath, rfmt, gk, gv, min_m, k4m, no_groups in QD8_ROWS:
        if not _allowed(path, rpath) or rfmt != fmt:
            continue
        if no_groups == "g32|g64n":
            groups_ok = not group4 or (4 * group4 <= CHUNK_K and (group4 == 8 or group4 % 16 == 0))
        else:
            groups_ok = not (no_groups and group4)
        if m < min_m or (k4m and kp4 % k4m) or not groups_ok:
            continue
        # M = 1: the GEMV, per channel when the sum fits one int32 chunk, per group when a group does
        fits = 4 * kp4 <= CHUNK_K if ng == 1 else k // ng <= CHUNK_K
        use_gemv = not gemm and m == 1 and fits and gv is not None
        if use_gemv:
            return gv
        if rpath in PAIRSAFE and not gemm and not group4 and n >= 64:
            assert x is not None, "this config's kernel depends on the rows: pass x"
            if pairsafe_fits(x, m, kp4, x_scale):
                return PAIRSAFE[rpath][0]
        return gk
    raise AssertionError("no config")


def wo_row(path, fmt):
    """The weight-only config row (F32_ROWS) that a path runs for a weight in this format."""
    return next(r for r in F32_ROWS if _allowed(path, r[0]) and r[1] == fmt)


def expected_wo_kernel(path, m, n):
    row = wo_row(path, table_best_format(path, n))
    return row[3] if m < row[4] else row[2]


def uses_fma_groups(kernel):
    """Every micro-kernel folds per-group sums with an FMA (the scalar reference with fmaf), so
    per-group outputs are bit-identical on every path."""
    return True


# ================================ fixtures ==========================================================
@pytest.fixture(params=PATHS)
def path(request):
    name = request.param
    if name not in ops.available_isas():
        pytest.skip(f"{name} not available on this CPU/build")
    ops.set_isa(name)
    try:
        assert ops.isa() == name
        yield name
        assert ops.isa() == name
    finally:
        ops.set_isa("auto")


def test_kernel_table_matches_best_format(path):
    for n in (1, 7, 16, 47, 48, 51, 52, 64, 65, 100, 128, 130, 192, 256, 4096):
        assert ops.best_format(n) == table_best_format(path, n), n


# ================================ value generators ==================================================
def _rows_like(rng, n, k, kind):
    """float32 (n, k) of a given flavour (the generators are seeded by hypothesis)."""
    if kind == "normal":
        mag = 10.0 ** rng.uniform(-30, 30, size=(n, 1))
        return (rng.standard_normal((n, k)) * mag).astype(np.float32)
    if kind == "ties":  # scale 2^e exactly, values (c + 1/2) 2^e: exact halfway cases
        e = rng.integers(-140, 100, size=(n, 1)).astype(np.float64)
        c = rng.integers(-127, 127, size=(n, k)) + rng.choice([0.5, 0.0], size=(n, k), p=[0.8, 0.2])
        w = c * 2.0 ** e
        w[:, rng.integers(0, k)] = rng.choice([-127.0, 127.0]) * 2.0 ** e[:, 0]
        return w.astype(np.float32)
    if kind == "near_ties":  # 2.5 * scale etc. in float32 (not exactly representable ties)
        base = (rng.standard_normal((n, 1)) * 10.0 ** rng.uniform(-5, 5, (n, 1))).astype(np.float32)
        s = (np.abs(base) / np.float32(127)).astype(np.float32)
        w = (rng.choice([0.5, 1.5, 2.5, -2.5, 126.5, -126.5], size=(n, k)).astype(np.float32) * s)
        w[:, 0] = base[:, 0]
        return w.astype(np.float32)
    if kind == "zeros":
        w = rng.standard_normal((n, k)).astype(np.float32)
        w[rng.random(n) < 0.5] = 0.0
        return w
    if kind == "tiny":  # subnormal maxima: scales subnormal, or underflowing to 0 (-> 1.0)
        return (rng.integers(-60, 60, size=(n, k)) * np.float32(2.0 ** -149)).astype(np.float32)
    if kind == "huge":
        return (rng.uniform(-1, 1, size=(n, k)) * 3.4e38).astype(np.float32)
    raise ValueError(kind)


KINDS = ["normal", "ties", "near_ties", "zeros", "tiny", "huge", "hyp"]
K_ANY = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129]),
                  st.integers(1, 300))
F32_ELEMS = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def float_matrix(draw, n, k):
    kind = draw(st.sampled_from(KINDS))
    if kind == "hyp":
        return draw(hnp.arrays(np.float32, (n, k), elements=F32_ELEMS))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    return _rows_like(rng, n, k, kind)


# ================================ quantization ======================================================
@settings(max_examples=100, **HYP)
@given(data=st.data())
def test_quantize_weight_bit_exact(path, data):
    gran = data.draw(st.sampled_from(["per_channel", "per_tensor", "per_group"]))
    n = data.draw(st.integers(1, 9))
    if gran == "per_group":
        g = data.draw(st.sampled_from([4, 8, 12, 32, 64, 128]))
        k = g * data.draw(st.integers(1, 4))
    else:
        g, k = None, data.draw(K_ANY)
    w = data.draw(float_matrix(n, k))
    q, s = ops.quantize(w, gran, g)
    qo, so = oracle.quantize(w, gran, g)
    np.testing.assert_array_equal(s, so)
    np.testing.assert_array_equal(q, qo)
    assert q.min(initial=0) >= -127
    qw = ops.QuantizedWeight.from_codes(q, s, gran, g)
    np.testing.assert_array_equal(qw.q, qo)
    np.testing.assert_array_equal(ops.dequantize(qw), oracle.dequantize(qo, so, gran, g))


@settings(max_examples=100, **HYP)
@given(data=st.data())
def test_quantize_rows_bit_exact(path, data):
    m = data.draw(st.integers(1, 9))
    k = data.draw(K_ANY)
    x = data.draw(float_matrix(m, k))
    bad = data.draw(st.lists(st.integers(0, m - 1), max_size=3))
    for r in bad:  # NaN / Inf rows (activations only)
        x[r, data.draw(st.integers(0, k - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if data.draw(st.booleans()):
        x64 = x.astype(np.float64)
        if data.draw(st.booleans()):
            x64[0, 0] = 1e39  # beyond float32: Inf after conversion, a non-finite row
        x = x64
    q, s = ops.quantize_rows(x)
    qo, so = oracle.quantize_rows_s8(x)
    np.testing.assert_array_equal(s, so)
    np.testing.assert_array_equal(q, qo)
    u, su = ops.quantize_rows_u8(x)
    uo, suo = oracle.quantize_rows_u8(x)
    assert u.dtype == np.uint8
    np.testing.assert_array_equal(su, suo)
    np.testing.assert_array_equal(u, uo)


def test_quantize_large_threaded(path):
    """Sizes that take the threaded and chunked (1 << 16 elements) quantization drivers."""
    rng = np.random.default_rng(21)
    w = (rng.standard_normal((300, 4001)) * 10.0 ** rng.uniform(-4, 4, (300, 1))).astype(np.float32)
    w[7] = 0.0
    for gran, g in (("per_tensor", None), ("per_channel", None)):
        q, s = ops.quantize(w, gran, g)
        qo, so = oracle.quantize(w, gran, g)
        np.testing.assert_array_equal(s, so)
        np.testing.assert_array_equal(q, qo)
    w[11, 5] = np.nan
    q, s = ops.quantize_rows(w)
    qo, so = oracle.quantize_rows_s8(w)
    np.testing.assert_array_equal(s, so)
    np.testing.assert_array_equal(q, qo)


# ================================ gemm_s8s8s32 ======================================================
def _codes(rng, shape, kind):
    if kind == "random":
        return rng.integers(-127, 128, size=shape).astype(np.int8)
    if kind == "+127":
        return np.full(shape, 127, np.int8)
    if kind == "-127":
        return np.full(shape, -127, np.int8)
    if kind == "extremes":
        return rng.choice(np.array([-127, 127], np.int8), size=shape)
    return np.zeros(shape, np.int8)


def _check_gemm(path, a, b):
    c = ops.gemm_s8s8s32(a, b)
    assert c.dtype == np.int32
    np.testing.assert_array_equal(c.astype(np.int64), oracle.int_sums(a, b))
    m, k = a.shape
    assert ops.last_kernel() == expected_dynamic_kernel(path, m, b.shape[0], k, gemm=True)


@settings(max_examples=60, **HYP)
@given(m=st.integers(1, 10), n=st.integers(1, 70), k=K_ANY,
       ka=st.sampled_from(["random", "+127", "-127", "extremes", "zero"]),
       kb=st.sampled_from(["random", "+127", "-127", "extremes"]), seed=st.integers(0, 2 ** 32 - 1))
def test_gemm_exact_hypothesis(path, m, n, k, ka, kb, seed):
    rng = np.random.default_rng(seed)
    _check_gemm(path, _codes(rng, (m, k), ka), _codes(rng, (n, k), kb))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 64, 4099), (8, 64, 64), (33, 65, 1024),
                                   (9, 192, 1000), (2, 3, 3001), (16, 48, 256)])
def test_gemm_exact_shapes(path, m, n, k):
    rng = np.random.default_rng(m * 1000 + k)
    for ka, kb in [("random", "random"), ("+127", "+127"), ("-127", "+127"), ("extremes", "extremes")]:
        _check_gemm(path, _codes(rng, (m, k), ka), _codes(rng, (n, k), kb))


def test_gemm_exact_max_k(path):
    k = ops.MAX_K_S32  # 133144: 127 * 127 * k still fits int32
    assert k == 133144
    rng = np.random.default_rng(7)
    for ka, kb in [("+127", "+127"), ("-127", "+127"), ("random", "extremes")]:
        _check_gemm(path, _codes(rng, (2, k), ka), _codes(rng, (3, k), kb))
    c = ops.gemm_s8s8s32(np.full((1, k), 127, np.int8), np.full((1, k), 127, np.int8))
    assert int(c[0, 0]) == 127 * 127 * k


# ================================ dynamic linear grid ===============================================
GRID_M = [1, 2, 5, 8, 16, 33, 64]
GRID_N = [1, 7, 16, 47, 48, 64, 65, 130, 192]  # 192: a multi-panel n64k4 weight (64 is the only
GRID_K = [1, 3, 4, 63, 64, 100, 128, 256]      # other N of the brief's list that packs as n64k4)
SCHEMES = [("per_channel", None), ("per_tensor", None), ("per_group", 4), ("per_group", 32),
           ("per_group", 64), ("per_group", 128)]


def _grid_inputs(n, k):
    rng = np.random.default_rng(n * 7919 + k)
    w = (rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-3, 3, (n, 1))).astype(np.float32)
    if n > 2:
        w[1] = 0.0  # an all-zero output row (scale 1.0)
    x = (rng.standard_normal((max(GRID_M), k)) * 10.0 ** rng.uniform(-3, 3, (max(GRID_M), 1)))
    x = x.astype(np.float32)
    x[1] = 0.0        # an all-zero activation row
    x[3, k // 2] = np.nan  # a non-finite row: NaN outputs in that row only
    x[6, 0] = -np.inf
    bias = (rng.standard_normal(n) * 3).astype(np.float32) if (n + k) % 2 else None
    return w, x, bias


@pytest.mark.parametrize("gran,group", SCHEMES, ids=[f"{g}{s or ''}" for g, s in SCHEMES])
def test_linear_dynamic_grid(path, gran, group):
    ran = 0
    for k in GRID_K:
        if group is not None and k % group:
            continue
        for n in GRID_N:
            w, x, bias = _grid_inputs(n, k)
            q, s = ops.quantize(w, gran, group)
            qo, so = oracle.quantize(w, gran, group)
            np.testing.assert_array_equal(q, qo)
            np.testing.assert_array_equal(s, so)
            qw = ops.QuantizedWeight.from_codes(q, s, gran, group)
            want = {}
            for m in GRID_M:
                y = ops.linear(x[:m], qw, bias)
                kern = expected_dynamic_kernel(path, m, n, k, gran, group, x=x)
                assert ops.last_kernel() == kern, (m, n, k, gran, group)
                fma = uses_fma_groups(kern)
                if fma not in want:  # rows are independent: one oracle call for all M
                    want[fma] = oracle.linear_dynamic(x, qo, so, gran, group, bias, fma_groups=fma)
                np.testing.assert_array_equal(y, want[fma][:m], err_msg=f"M={m} N={n} K={k} {kern}")
                if m > 3:
                    assert np.isnan(y[3]).all()
                ran += 1
            assert qw.format == table_best_format(path, n)
    assert ran > 0


# ================================ weight-only =======================================================
@pytest.mark.parametrize("gran,group", [("per_channel", None), ("per_tensor", None), ("per_group", 32)])
def test_linear_weight_only(path, gran, group):
    for k in [1, 3, 63, 64, 100, 128, 1024, 4096]:
        if group is not None and k % group:
            continue
        for n in [1, 7, 47, 64, 130, 192]:
            w, x, bias = _grid_inputs(n, k)
            x = x[[0, 1, 2, 4, 5, 7, 8, 9, 10, 11, 12]]  # finite rows
            qw = ops.quantize_weight(w, gran, group)
            qo, so = oracle.quantize(w, gran, group)
            yo, budget = oracle.linear_weight_only(x, qo, so, gran, group, bias)  # rows independent
            for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]:
                y = ops.linear(x[:m], qw, bias, mode="weight_only")
                assert ops.last_kernel() == expected_wo_kernel(path, m, n), (m, n, k)
                err = np.abs(y.astype(np.float64) - yo[:m])
                assert (err <= budget[:m]).all(), (m, n, k, float((err / budget[:m]).max()))


def _scalar_wo_rows(x, qw, b):
    """Weight-only outputs of every row of x alone, on the scalar path (the GEMVs' bit-exact reference)."""
    prev = ops.isa()
    try:
        ops.set_isa("scalar")
        return np.stack([ops.linear(x[r:r + 1], qw, b, mode="weight_only")[0] for r in range(len(x))])
    finally:
        ops.set_isa(prev)


@pytest.mark.parametrize("gran,group", [("per_channel", None), ("per_group", 64)])
def test_weight_only_gemv_rows_independent(path, gran, group):
    """The weight-only GEMV takes up to gemv_m - 1 rows in calls of several rows (each weight vector
    converted once for all of them): every row's outputs are bit for bit those of the row alone, the
    scalar reference's, for every M it covers and ragged N / K."""
    rng = np.random.default_rng(5)
    for n, k in [(64, 256), (130, 100), (300, 1024), (16, 64), (768, 2048)]:
        if group is not None and k % group:
            continue
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((8, k)).astype(np.float32)
        x[3] *= 1e3
        qw = ops.quantize_weight(w, gran, group)
        b = rng.standard_normal(n).astype(np.float32)
        alone = np.stack([ops.linear(x[r:r + 1], qw, b, mode="weight_only")[0] for r in range(8)])
        gemv_m = wo_row(path, qw.format)[4]
        threads = ops.get_num_threads()
        try:
            for t in (1, 2):  # 2 threads: few groups of 4 panels also split the rows in two blocks
                ops.set_num_threads(t)
                for m in range(2, gemv_m):
                    y = ops.linear(x[:m], qw, b, mode="weight_only")
                    assert ops.last_kernel() == expected_wo_kernel(path, m, n)
                    assert np.array_equal(y.view(np.uint32), alone[:m].view(np.uint32)), (n, k, m, t)
        finally:
            ops.set_num_threads(threads)
        ref = _scalar_wo_rows(x[:8], qw, b)
        assert np.array_equal(alone.view(np.uint32), ref.view(np.uint32)), (n, k)


@pytest.mark.parametrize("n", [130, 256])  # both packed formats (N16K4 runs the AVX2 GEMV)
def test_weight_only_gemv_extreme_magnitudes_bit_exact(path, n):
    """The SIMD GEMVs sum x * (code * 2^24) (the conversion that leaves code i in a lane's top byte)
    and scale back by 2^-24: bit for bit the scalar reference's sums of x * code wherever results are
    subnormal (x down to 1e-45, cancellation down to the subnormal range) or large (127 k max|x| just
    under and just over the 2^100 bound of wo_gemv_rows' rescaling), every row count of the GEMV."""
    rng = np.random.default_rng(17)
    k = 192
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[5] = 0.0
    w[7, ::2] = 1.0
    w[7, 1::2] = -1.0  # with x's equal pairs: sums that cancel to subnormals and zero
    qw = ops.quantize_weight(w)
    b = rng.standard_normal(n).astype(np.float32)
    x = np.zeros((8, k), np.float32)
    x[0] = rng.standard_normal(k) * np.float32(1e-39)  # subnormal x
    x[1, ::2] = np.float32(2.8e-45)  # 2 * 2^-149
    x[1, 1::2] = np.float32(1.4e-45)  # 2^-149
    x[2] = np.repeat(rng.standard_normal(k // 2), 2) * np.float32(3e-38)
    x[2, 7] = np.float32(1e-44)
    bound = 2.0 ** 100 / (127.0 * k)
    x[3] = rng.standard_normal(k) * np.float32(bound / 4)
    x[3, 0] = np.float32(bound * 0.999)  # 127 k max|x| just under the bound: no rescaling
    x[4] = rng.standard_normal(k) * np.float32(bound / 4)
    x[4, 0] = np.float32(bound * 1.001)  # just over: rescaled
    x[5] = rng.standard_normal(k) * np.float32(1e20)
    x[5, ::3] = np.float32(1e-30)
    x[6] = rng.standard_normal(k).astype(np.float32) * np.float32(2.0 ** -126)
    x[7] = rng.standard_normal(k).astype(np.float32)
    assert np.isfinite(x).all()
    ref = _scalar_wo_rows(x, qw, b)
    assert np.isfinite(ref).all()
    gemv_m = wo_row(path, qw.format)[4]
    for m in range(1, gemv_m):
        y = ops.linear(x[:m], qw, b, mode="weight_only")
        assert ops.last_kernel() == expected_wo_kernel(path, m, n)
        assert np.array_equal(y.view(np.uint32), ref[:m].view(np.uint32)), m
    ref_nb = _scalar_wo_rows(x, qw, None)  # no bias: the tiny sums themselves
    for r in range(8):
        y = ops.linear(x[r:r + 1], qw, None, mode="weight_only")
        assert np.array_equal(y[0].view(np.uint32), ref_nb[r].view(np.uint32)), r


# ================================ threads, formats, huge K ========================================
def test_threads_bit_identical(path):
    rng = np.random.default_rng(11)
    m, n, k = 96, 256, 1024
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    weights = [ops.quantize_weight(w, "per_channel"), ops.quantize_weight(w, "per_group", 64)]
    before = cquant.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            cquant.set_num_threads(t)
            outs.append([ops.linear(x, qw, b, mode=md) for qw in weights
                         for md in ("dynamic", "weight_only")]
                        + [ops.linear(x[:1], weights[0], b)])
    finally:
        cquant.set_num_threads(before)
    for a, c in zip(*outs):
        np.testing.assert_array_equal(a, c)


FORMAT_PAIRS = [(a, b) for a in PATHS for b in PATHS if a != b]


@pytest.mark.parametrize("src,dst", FORMAT_PAIRS, ids=[f"{a}-to-{b}" for a, b in FORMAT_PAIRS])
def test_weight_moved_between_paths(src, dst):
    have = ops.available_isas()
    if src not in have or dst not in have:
        pytest.skip("path not available here")
    rng = np.random.default_rng(5)
    k = 256
    x = rng.standard_normal((9, k)).astype(np.float32)
    try:
        for n in (7, 64, 192):
            w = rng.standard_normal((n, k)).astype(np.float32)
            for gran, g in (("per_channel", None), ("per_group", 32)):
                ops.set_isa(src)
                moved = ops.quantize_weight(w, gran, g)
                assert moved.format == table_best_format(src, n)
                ops.set_isa(dst)
                fresh = ops.quantize_weight(w, gran, g)
                for m in (1, 9):
                    y_moved = ops.linear(x[:m], moved, None)
                    k_moved = ops.last_kernel()
                    y_fresh = ops.linear(x[:m], fresh, None)
                    assert ops.last_kernel() == k_moved
                    np.testing.assert_array_equal(y_moved, y_fresh, err_msg=f"{src}->{dst} {n} {gran} M={m}")
                assert moved.format == fresh.format == table_best_format(dst, n)
                np.testing.assert_array_equal(moved.q, fresh.q)
                for fmt in ("n16k4", "n64k4"):  # explicit int8 formats: repacked on use, same results
                    other = ops.QuantizedWeight.from_codes(fresh.q, fresh.scale, gran, g, format=fmt)
                    np.testing.assert_array_equal(ops.linear(x, other, None), ops.linear(x, fresh, None))
    finally:
        ops.set_isa("auto")


@pytest.fixture(scope="module")
def huge_k_weights():
    rng = np.random.default_rng(3)
    out = {}
    for n, k in ((3, 140000), (64, 140000), (3, 280000)):
        w = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((2, k)).astype(np.float32)
        out[n, k] = (w, x)
    return out


HUGE_CASES = [(3, 140000, "per_channel", None), (64, 140000, "per_channel", None),
              (3, 140000, "per_group", 70000), (64, 140000, "per_group", 70000),
              (3, 280000, "per_group", 140000), (3, 140000, "per_tensor", None)]


@pytest.mark.parametrize("n,k,gran,group", HUGE_CASES)
def test_linear_dynamic_huge_k(path, huge_k_weights, n, k, gran, group):
    w, x = huge_k_weights[n, k]
    qo, so = oracle.quantize(w, gran, group)
    qw = ops.QuantizedWeight.from_codes(qo, so, gran, group)
    bias = np.linspace(-1, 1, n).astype(np.float32)
    for m in (1, 2):
        y = ops.linear(x[:m], qw, bias)
        kern = expected_dynamic_kernel(path, m, n, k, gran, group, x=x)
        assert ops.last_kernel() == kern
        want = oracle.linear_dynamic(x[:m], qo, so, gran, group, bias, fma_groups=uses_fma_groups(kern))
        np.testing.assert_array_equal(y, want, err_msg=f"{kern}")


def test_linear_dynamic_huge_k_extreme_codes(path):
    """All codes +-127 with K = 140000: |acc| up to 2.26e9 > 2^31, exact only through int64."""
    k, n = 140000, 3
    x = np.ones((2, k), np.float32)
    x[1, ::2] = -1.0
    q = np.full((n, k), 127, np.int8)
    q[2] = -127
    s = np.array([1.0, 0.5, 2.0], np.float32)
    qw = ops.QuantizedWeight.from_codes(q, s, "per_channel")
    y = ops.linear(x, qw)
    want = oracle.linear_dynamic(x, q, s, "per_channel", fma_groups=uses_fma_groups(ops.last_kernel()))
    np.testing.assert_array_equal(y, want)
    assert y[0, 0] == np.float32(np.float32(127 * 127 * k) * np.float32(1 / 127))


# ================================ the AVX2 pair-safe tile ===========================================
def _pairsafe_rows(kind, m, k, rng):
    """Rows whose codes equal the values (absmax 127: scale 1), of a given residual-entry density."""
    if kind == "gaussian":
        return rng.standard_normal((m, k)).astype(np.float32)
    q = np.zeros((m, k), np.float32)
    if kind == "all127":  # every pair of the same sign and 254 > 128: all pairs are entries
        q[:] = 127
        q[1::2] = -127
    elif kind == "alternating":  # +-127 pairs of opposite signs: never an entry, the widest sums
        q[:, 0::2], q[:, 1::2] = 127, -127
        q[1::2] *= -1
    elif kind.startswith("limit"):  # "limit" / "limit+1": m * ceil(k/4) / 16 entries (pairs (100, 100)), or one more
        q[:, 0] = 127  # the row scale: codes = values
        want = m * (-(-k // 4)) // 16 + (kind == "limit+1")
        for e in range(want):
            r, p = e % m, 1 + e // m
            q[r, 2 * p], q[r, 2 * p + 1] = 100, 100
    else:  # "rowcap" / "rowcap+1": ceil(k/4) / 4 + 1 entries in row 0 (a row's slots), or one more
        q[:, 0] = 127
        for p in range(1, (-(-k // 4)) // 4 + 2 + (kind == "rowcap+1")):
            q[0, 2 * p], q[0, 2 * p + 1] = -100, -100
    return q


@pytest.mark.parametrize("kind", ["gaussian", "all127", "alternating", "limit", "limit+1", "rowcap", "rowcap+1",
                                  "gaussian-long"])
@pytest.mark.parametrize("wkind", ["gaussian", "extreme"])
def test_pairsafe_tile_exact_and_chosen(path, kind, wkind):
    """The AVX2 config runs its pair-safe tile (u8 x s8 without saturation: residual entries for
    the pairs that could saturate) when the rows have at most m * ceil(k/4) / 16 entries and no
    row more than ceil(k/4) / 4 + 1, else the sign tile; either is bit-identical to the oracle,
    with weight codes at +-127 too (the largest pair sums), through linear and linear_multi;
    N = 400 (the tile runs from N = 64). K = 2100 is one k block of the driver;
    "gaussian-long" (K = 16500) is blocks of 1024 k and a tail."""
    rng = np.random.default_rng(len(kind) * 7 + len(wkind))
    m, n, k = (24 if kind.startswith("rowcap") else 12), 400, (16500 if kind.endswith("long") else 2100)
    x = _pairsafe_rows(kind.replace("-long", ""), m, k, rng)
    if wkind == "gaussian":
        w = rng.standard_normal((n, k)).astype(np.float32)
    else:
        w = rng.choice(np.array([-1.0, 1.0], np.float32), size=(n, k))
        w[::3] = 1.0
    qo, so = oracle.quantize(w)
    qw = ops.QuantizedWeight.from_codes(qo, so, "per_channel")
    bias = rng.standard_normal(n).astype(np.float32)
    want = oracle.linear_dynamic(x, qo, so, "per_channel", None, bias, fma_groups=True)
    kern = expected_dynamic_kernel(path, m, n, k, x=x)
    if path == "avx2":
        entries = pairsafe_entries(x, per_row=True)
        kp4 = -(-k // 4)
        limit = m * kp4 // 16
        fits = entries.sum() <= limit and entries.max() <= kp4 // 4 + 1
        assert (kern == PAIRSAFE_AVX2) == (fits and n >= 64)
        assert kind not in ("limit", "limit+1") or entries.sum() == limit + (kind == "limit+1")
        assert kind not in ("rowcap", "rowcap+1") or (entries.max() == kp4 // 4 + 1 + (kind == "rowcap+1")
                                                       and entries.sum() <= limit)
        assert not kind.startswith("gaussian") or kern == PAIRSAFE_AVX2
    y = ops.linear(x, qw, bias)
    assert ops.last_kernel() == kern
    np.testing.assert_array_equal(y, want, err_msg=kern)
    for mm in (1, 2, 5):  # fewer rows: the same rows' results (M = 1: the GEMV)
        np.testing.assert_array_equal(ops.linear(x[:mm], qw, bias), want[:mm], err_msg=ops.last_kernel())
    ys = ops.linear_multi(x, [qw, qw, qw], [bias, None, bias])
    for i, yi in enumerate(ys):
        np.testing.assert_array_equal(yi, want if i != 1 else
                                      oracle.linear_dynamic(x, qo, so, "per_channel", None, None, fma_groups=True))


# ================================ finite in, finite out (issue 12 item 11) ========================
EDGE_N = [16, 64, 130]  # both packed formats, and a ragged last panel


@pytest.mark.parametrize("n", EDGE_N)
def test_weight_only_huge_x_finite_any_m(path, n):
    """|x| = 1e37: the true outputs are ~5e36; the GEMV (M < 4) once summed x * code before the
    scale and overflowed to inf while M >= 4 gave the finite answer. Same result for every M."""
    k = 64
    rng = np.random.default_rng(n)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qw = ops.quantize_weight(w)
    qo, so = oracle.quantize(w)
    x = np.zeros((8, k), np.float32)
    x[:, 0], x[:, 1], x[:, 5] = 1e37, -0.5e37, 3e36
    yo, budget = oracle.linear_weight_only(x, qo, so)
    assert np.isfinite(yo).all() and np.abs(yo).max() > 1e36
    for m in [1, 2, 3, 4, 8]:
        y = ops.linear(x[:m], qw, mode="weight_only")
        assert np.isfinite(y).all(), (m, ops.last_kernel())
        assert (np.abs(y - yo[:m]) <= budget[:m]).all(), m


def test_weight_only_overflow_rerun_with_fused_gelu(path):
    """A row whose tile sums overflow (x finite, the true output near -FLT_MAX) is computed again by
    the GEMV; with a fused GELU the tile's -Inf became 0 before the check and the row kept the
    tile's values (found by review, 2026-12-01): the fused call must equal gelu(linear) bit for bit."""
    rng = np.random.default_rng(1)
    k, n = 1024, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[1:] *= 0.1
    qw = ops.quantize_weight(w, "per_group", 128)
    r = rng.standard_normal(k)
    t = ops.dequantize(qw).astype(np.float64) @ r
    x = np.zeros((12, k), np.float32)
    x[0] = (r * (-3.45e38 / t[0])).astype(np.float32)
    x[5] = rng.standard_normal(k).astype(np.float32)
    y = ops.linear(x, qw, mode="weight_only")
    assert ops.last_kernel() == expected_wo_kernel(path, 12, n)
    yg = ops.linear(x, qw, mode="weight_only", activation="gelu")
    assert np.array_equal(yg.view(np.uint32), ops.gelu(y).view(np.uint32))


@pytest.mark.parametrize("n", EDGE_N)
def test_weight_only_per_group_huge_x(path, n):
    k = 256
    rng = np.random.default_rng(n + 1)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qw = ops.quantize_weight(w, "per_group", 64)
    qo, so = oracle.quantize(w, "per_group", 64)
    x = (rng.standard_normal((5, k)) * 1e36).astype(np.float32)
    yo, budget = oracle.linear_weight_only(x, qo, so, "per_group", 64)
    for m in [1, 3, 5]:
        y = ops.linear(x[:m], qw, mode="weight_only")
        assert np.isfinite(y).all(), m
        assert (np.abs(y - yo[:m]) <= budget[:m]).all(), m


@pytest.mark.parametrize("n", EDGE_N)
def test_dynamic_per_group_huge_w_finite(path, n):
    """|w| = 1e35, group 128: acc_g * sw_g alone is ~1.6e39 (inf); the result (~2.5e37) is finite
    because sx enters each group's product first (acc_g * (sx * sw_g)). Bit-exact with the oracle."""
    k = 256
    w = np.full((n, k), 1e35, np.float32)
    w[:, ::2] *= -1
    w[:, 0] = 1e35
    x = np.ones((6, k), np.float32)
    x[:, ::2] *= -1
    qw = ops.quantize_weight(w, "per_group", 128)
    qo, so = oracle.quantize(w, "per_group", 128)
    want = oracle.linear_dynamic(x, qo, so, "per_group", 128, fma_groups=True)
    ref = x.astype(np.float64) @ oracle.dequantize(qo, so, "per_group", 128).astype(np.float64).T
    assert np.isfinite(want).all() and np.abs(ref).max() > 1e37
    for m in [1, 2, 6]:
        y = ops.linear(x[:m], qw)
        np.testing.assert_array_equal(y, want[:m], err_msg=ops.last_kernel())


@pytest.mark.parametrize("n", EDGE_N)
@pytest.mark.parametrize("gran,group", [("per_channel", None), ("per_group", 32)])
def test_dynamic_zero_sum_huge_scales_is_zero(path, n, gran, group):
    """sx * sw overflows (1e30 * 1e30 / 127^2) but the exact integer sum is 0: the output is 0
    (true value 0), not 0 * inf = NaN."""
    k = 64
    w = np.full((n, k), 1e30, np.float32)
    w[:, 1::2] *= -1
    x = np.full((4, k), 1e30, np.float32)
    qw = ops.quantize_weight(w, gran, group)
    for m in [1, 4]:
        y = ops.linear(x[:m], qw)
        np.testing.assert_array_equal(y, np.zeros((m, n), np.float32), err_msg=ops.last_kernel())
