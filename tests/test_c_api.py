"""The C API's guards as the Python side sees them: cq_linear refuses an output that overlaps an
input (CQ_ERR_ALIAS, turned into a cquant ValueError by ops), cq_isa_error explains a CQUANT_ISA
that cannot be used, cq_shutdown joins the pool and kernels keep working (issue 10, items 15, 17)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cquant import errors, ops
from cquant._native import ffi, lib


def _packed(n, k, rng):
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = np.empty((n, k), np.int8)
    s = np.empty(n, np.float32)
    assert lib.cq_quantize(ffi.from_buffer("float[]", w), n, k, lib.CQ_PER_CHANNEL, 0,
                           ffi.from_buffer("int8_t[]", q), ffi.from_buffer("float[]", s)) == 0
    size = lib.cq_packed_size(lib.CQ_FORMAT_AUTO, n, k, 0)
    packed = np.zeros(size, np.uint8)
    assert lib.cq_pack(lib.CQ_FORMAT_AUTO, ffi.from_buffer("int8_t[]", q), n, k, 0,
                       ffi.from_buffer("uint8_t[]", packed)) == 0
    return packed, s


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_linear_refuses_aliased_output(mode):
    rng = np.random.default_rng(0)
    n = k = 32
    packed, s = _packed(n, k, rng)
    buf = rng.standard_normal(4 * k + 8).astype(np.float32)
    keep = buf.copy()
    p = ffi.from_buffer("float[]", buf)
    args = (ops.MODES[mode], p, 4, k, ffi.from_buffer("uint8_t[]", packed), ffi.from_buffer("float[]", s),
            lib.CQ_PER_CHANNEL, 0, n, ffi.NULL)
    assert lib.cq_linear(*args, p) == lib.CQ_ERR_ALIAS            # y == x: in place
    assert lib.cq_linear(*args, p + 5) == lib.CQ_ERR_ALIAS        # partly overlapping
    assert np.array_equal(buf, keep)                              # nothing written
    y = np.empty((4, n), np.float32)
    assert lib.cq_linear(*args, ffi.from_buffer("float[]", y)) == 0
    with pytest.raises(errors.ValueError, match="overlaps an input.*separate array") as ei:
        ops._raise(lib.CQ_ERR_ALIAS, "linear")
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, errors.QuantizationError)


def test_isa_error_names_the_bad_variable():
    assert lib.cq_set_isa(lib.cq_get_isa()) == 0  # an earlier refused selection (another test) is cleared
    assert ffi.string(lib.cq_isa_error()).decode() == ""
    code = ("from cquant._native import ffi, lib; lib.cq_get_isa(); "
            "print(ffi.string(lib.cq_isa_error()).decode())")
    env = dict(os.environ, CQUANT_ISA="avx9")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "CQUANT_ISA='avx9': unknown path; expected one of scalar, avx2" in out.stdout, out.stderr


def test_shutdown_then_kernels_still_work():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    qw = ops.quantize_weight(w)
    before = ops.get_num_threads()
    try:
        ops.set_num_threads(2)
        y1 = ops.linear(x, qw)
        assert lib.cq_shutdown() == 0
        assert lib.cq_shutdown() == 0
        y2 = ops.linear(x, qw)
        assert np.array_equal(y1, y2)
        assert lib.cq_shutdown() == 0
    finally:
        ops.set_num_threads(before)
