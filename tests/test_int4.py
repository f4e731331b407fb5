"""int4 weights (two codes per byte): quantization bit-exact with the numpy oracle, dynamic outputs
bit-exact with the oracle's integer sums on every path (the kernel that ran asserted), weight-only
within the float32 summation budget, K tails (K % 8), group sizes, the chunked huge-K path, sizes
measured from the arrays held, and refusals."""
import pickle

import numpy as np
import pytest

import oracle
from cquant import errors, ops
from test_oracle import expected_dynamic_kernel, path, table_best_format  # noqa: F401  (fixture)

SHAPES = [  # (n, k, granularity, group)
    (1, 8, "per_channel", None), (7, 13, "per_channel", None), (64, 256, "per_channel", None),
    (65, 1000, "per_tensor", None), (130, 4104, "per_channel", None), (100, 200, "per_group", 40),
    (48, 256, "per_group", 32), (130, 1024, "per_group", 64), (64, 512, "per_group", 128),
    (33, 512, "per_group", 256), (16, 3, "per_channel", None),
    # 33 groups: the M = 1 per-group GEMV expands blocks of whole groups, the last block partial: 12
    # groups a block in 16-wide panels (n = 70 packs N16 on every path), 3 in 64-wide ones (n = 256
    # packs N64 on the AVX-512 paths); groups longer than a block (256 k in 64-wide panels) take the
    # per-group expansion
    (70, 1320, "per_group", 40), (256, 1320, "per_group", 40), (128, 1024, "per_group", 256),
]


def _w(rng, n, k):
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[0, :min(k, 3)] = [5.0, -5.0, 0.3][:min(k, 3)]  # ties and extremes
    if n > 2:
        w[2] = 0.0  # an all-zero row: scale 1, codes 0
    return w


@pytest.mark.parametrize("n,k,gran,group", SHAPES)
def test_int4_quantize_bit_exact(n, k, gran, group):
    w = _w(np.random.default_rng(n * 7 + k), n, k)
    q, s = ops.quantize(w, gran, group, bits=4)
    qo, so = oracle.quantize(w, gran, group, bits=4)
    np.testing.assert_array_equal(q, qo)
    np.testing.assert_array_equal(s, so)
    assert q.min() >= -7 and q.max() <= 7
    qw = ops.QuantizedWeight.from_codes(q, s, gran, group, bits=4)
    assert qw.bits == 4 and qw.format.endswith("i4")
    np.testing.assert_array_equal(qw.q, q)  # pack / unpack round trip, any K
    np.testing.assert_array_equal(ops.dequantize(qw), oracle.dequantize(qo, so, gran, group))


@pytest.mark.parametrize("n,k,gran,group", SHAPES)
def test_int4_linear_every_path(path, n, k, gran, group):  # noqa: F811
    rng = np.random.default_rng(n + 31 * k)
    w = _w(rng, n, k)
    qw = ops.quantize_weight(w, gran, group, bits=4)
    qo, so = oracle.quantize(w, gran, group, bits=4)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((40, k)).astype(np.float32)
    x[3, 0] = np.nan
    want = oracle.linear_dynamic(x, qo, so, gran, group, bias, fma_groups=True)
    yo, budget = oracle.linear_weight_only(np.delete(x, 3, axis=0), qo, so, gran, group, bias)
    # the int4 GEMV in integers (x as 24-bit fixed point) where the panels are 64 wide
    x24 = path in ("avx512vnni", "amx") and qw.format.lower().startswith("n64")
    _, budget24 = oracle.linear_weight_only(np.delete(x, 3, axis=0), qo, so, gran, group, bias, fixed24=True)
    for m in (1, 2, 5, 17, 40):
        y = ops.linear(x[:m], qw, bias)
        assert ops.last_kernel() == expected_dynamic_kernel(path, m, n, k, gran, group, bits=4, x=x), m
        np.testing.assert_array_equal(y, want[:m], err_msg=f"M={m} {ops.last_kernel()}")
        xf = np.delete(x, 3, axis=0)[:m]
        yw = ops.linear(xf, qw, bias, mode="weight_only")
        bud = budget
        if m < 4:  # codes expanded in registers by an int4 GEMV of the path
            kern = ops.last_kernel()
            assert kern.startswith("x24_qc4w_gemv4" if x24 else "f32_qc4w_gemv4"), kern
            assert kern.endswith("_ref") == (path == "scalar"), kern
            bud = budget24 if x24 else budget
        err = np.abs(yw.astype(np.float64) - yo[:m])
        assert (err <= bud[:m]).all(), (m, ops.last_kernel(), float((err / bud[:m]).max()))
    assert qw.format == table_best_format(path, n).replace("k4", "k8i4")


def test_int4_huge_k_chunked(path):  # noqa: F811
    """K past the exact int32 chunk (131072): the int4 panel is expanded block by block inside each
    chunk; sums still exact."""
    n, k = 20, 131072 + 136
    rng = np.random.default_rng(5)
    q = rng.integers(-7, 8, size=(n, k), dtype=np.int8)
    q[0] = 7
    s = (rng.random(n).astype(np.float32) + 0.5) / 7
    qw = ops.QuantizedWeight.from_codes(q, s, "per_channel", bits=4)
    x = np.full((3, k), 1.0, np.float32)
    x[1] = rng.standard_normal(k).astype(np.float32)
    want = oracle.linear_dynamic(x, q, s, "per_channel")
    for m in (1, 3):
        np.testing.assert_array_equal(ops.linear(x[:m], qw), want[:m], err_msg=ops.last_kernel())


def test_int4_bytes_measured():
    """Held bytes, measured from the arrays: int4 codes take half the bytes of int8."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 1024)).astype(np.float32)
    q8 = ops.quantize_weight(w)
    q4 = ops.quantize_weight(w, bits=4)
    assert q4.packed.nbytes < 0.53 * q8.packed.nbytes
    g4 = ops.quantize_weight(w, "per_group", 32, bits=4)
    assert g4.nbytes >= g4.packed.nbytes + g4.scale.nbytes


def test_int4_pickle_round_trip():
    w = np.random.default_rng(1).standard_normal((70, 96)).astype(np.float32)
    qw = ops.quantize_weight(w, "per_group", 32, bits=4)
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32)
    q2 = pickle.loads(pickle.dumps(qw))
    assert q2.bits == 4
    np.testing.assert_array_equal(ops.linear(x, q2), ops.linear(x, qw))


def test_int4_refusals():
    w = np.ones((8, 512), np.float32)
    with pytest.raises(errors.ValueError, match="bits"):
        ops.quantize_weight(w, bits=3)
    with pytest.raises(errors.ValueError, match="multiple of 8"):
        ops.quantize_weight(w, "per_group", 4, bits=4)
    with pytest.raises(errors.ValueError, match="at most 256"):
        ops.quantize_weight(w, "per_group", 512, bits=4)
    q = np.zeros((8, 16), np.int8)
    q[0, 0] = 8
    with pytest.raises(errors.ValueError, match=r"\[-7, 7\]"):
        ops.QuantizedWeight.from_codes(q, np.ones(8, np.float32), bits=4)
    with pytest.raises(errors.ValueError, match="4-bit"):
        ops.QuantizedWeight.from_codes(np.zeros((8, 16), np.int8), np.ones(8, np.float32), format="n64k8i4",
                                       bits=8)


@pytest.mark.parametrize("isa", ["avx512vnni", "amx"])
def test_int4_gemv_in_integers_falls_back_where_it_must(isa):
    """The int4 weight-only GEMV in integers (x as 24-bit fixed point, x24_*) runs only on rows it
    can represent and weights up to 4 MiB of codes; everything else takes the float GEMV, with the
    same results the budget allows (the kernel that ran asserted)."""
    if isa not in ops.available_isas():
        pytest.skip(f"{isa} not available here")
    rng = np.random.default_rng(11)
    n, k = 128, 264
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    qw = ops.quantize_weight(w, "per_group", 8, bits=4)
    qo, so = oracle.quantize(w, "per_group", 8, bits=4)
    ops.set_isa(isa)
    try:
        def run(x, want_x24):
            y = ops.linear(x, qw, bias, mode="weight_only")
            assert ops.last_kernel().startswith("x24_" if want_x24 else "f32_qc4w_gemv4"), ops.last_kernel()
            return y

        x = rng.standard_normal((2, k)).astype(np.float32)
        x[1, 5] = 3e5  # one large channel: the others keep 2^-22 of it
        yo, budget = oracle.linear_weight_only(x, qo, so, "per_group", 8, bias, fixed24=True)
        y = run(x, True)
        assert (np.abs(y - yo) <= budget).all()
        np.testing.assert_array_equal(run(np.zeros((1, k), np.float32), True), bias[None, :])
        for bad in (np.nan, np.inf):  # a non-finite row: the float GEMV, NaN / Inf in that row only
            xb = x.copy()
            xb[0, 7] = bad
            yb = run(xb, False)
            assert not np.isfinite(yb[0]).any()
            assert (np.abs(yb[1] - yo[1]) <= budget[1]).all()
        for scale in (1e-30, 1e30):  # max|x| outside [2^-60, 2^60]: the float GEMV
            xs = (x * np.float32(scale)).astype(np.float32)
            ys_o, ys_b = oracle.linear_weight_only(xs, qo, so, "per_group", 8, bias)
            assert (np.abs(run(xs, False) - ys_o) <= ys_b).all()
        big = ops.quantize_weight(rng.standard_normal((2048, 4104)).astype(np.float32), "per_channel", bits=4)
        ops.linear(x[:, :1].repeat(4104, axis=1), big, mode="weight_only")  # 4.2 MB of codes
        assert ops.last_kernel().startswith("f32_qc4w_gemv4"), ops.last_kernel()
        assert big.format.lower().startswith("n64")
    finally:
        ops.set_isa("auto")
