"""Threads and processes: one quantized layer shared by many Python threads, thread-count changes
while others compute, pickling / deep copies, and multiprocessing workers (spawn and fork).

Results must be bit-identical to a single-threaded run on the same ISA path: the kernels partition
the output between pool threads and never reduce across them, so neither the number of callers
nor cquant.set_num_threads changes a single bit. Every wait has a timeout, so a deadlock fails the
test instead of hanging the suite."""
from __future__ import annotations

import copy
import multiprocessing as mp
import os
import pickle
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cquant
from cquant import ops

TIMEOUT = 120  # seconds for any join / result: generous for sanitizer builds, finite for deadlocks
MODES = ["dynamic", "weight_only"]
SCHEMES = [("per_channel", None), ("per_group", 32), ("per_tensor", None)]


def make_layer(seed=0, n=160, k=256, granularity="per_channel", group_size=None):
    # n * k * m >= 1M multiply-adds for the usual m=40: calls engage the thread pool (cq_threads_for)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return ops.quantize_weight(w, granularity=granularity, group_size=group_size), bias


def make_inputs(count, seed=1, m=24, k=256):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((m, k)).astype(np.float32) for _ in range(count)]


@pytest.fixture
def restore_threads():
    saved = cquant.get_num_threads()
    yield
    cquant.set_num_threads(saved)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity,group_size", SCHEMES)
def test_many_threads_one_layer_barrier(isa, restore_threads, mode, granularity, group_size):
    """16 Python threads released together by a barrier call ops.linear on the same weight."""
    qw, bias = make_layer(granularity=granularity, group_size=group_size)
    xs = make_inputs(16, m=40)
    cquant.set_num_threads(2)
    expected = [ops.linear(x, qw, bias, mode=mode) for x in xs]  # one caller at a time
    barrier = threading.Barrier(len(xs), timeout=TIMEOUT)

    def work(i):
        barrier.wait()
        return [ops.linear(xs[i], qw, bias, mode=mode) for _ in range(5)]

    with ThreadPoolExecutor(len(xs)) as ex:
        results = [f.result(timeout=TIMEOUT) for f in [ex.submit(work, i) for i in range(len(xs))]]
    for i, outs in enumerate(results):
        for y in outs:
            np.testing.assert_array_equal(y, expected[i], err_msg=f"thread {i}, {mode}, {granularity}")


def test_set_num_threads_while_computing(restore_threads):
    """Threads compute while another keeps changing the pool size: no crash, no hang, same bits."""
    qw, bias = make_layer(n=128, k=512)
    xs = make_inputs(4, m=64, k=512)  # big enough that the pool is engaged
    cquant.set_num_threads(1)
    expected = {mode: [ops.linear(x, qw, bias, mode=mode) for x in xs] for mode in MODES}
    stop = threading.Event()
    errors = []

    def changer():
        n = 0
        while not stop.is_set():
            cquant.set_num_threads(1 + n % 4)
            n += 1

    def compute(i):
        try:
            for it in range(30):
                mode = MODES[(i + it) % 2]
                y = ops.linear(xs[i], qw, bias, mode=mode)
                if not np.array_equal(y, expected[mode][i]):
                    errors.append(f"caller {i} iteration {it} ({mode}) differs")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    t_change = threading.Thread(target=changer)
    callers = [threading.Thread(target=compute, args=(i,)) for i in range(len(xs))]
    t_change.start()
    for t in callers:
        t.start()
    for t in callers:
        t.join(TIMEOUT)
    stop.set()
    t_change.join(TIMEOUT)
    assert not any(t.is_alive() for t in callers + [t_change]), "a thread hung"
    assert errors == []
    assert 1 <= cquant.get_num_threads() <= 4


def test_set_isa_while_computing(restore_threads):
    """Switching the ISA path while others compute: each call finishes on the path it started
    with, so every result is one of the per-path results (integers exact, floats close)."""
    paths = [p for p in ("scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx") if p in cquant.available_isas()]
    if len(paths) < 2:
        pytest.skip("only one ISA path on this CPU/build")
    qw, bias = make_layer()
    x = make_inputs(1, m=32)[0]
    per_path = {}
    for p in paths:
        cquant.set_isa(p)
        per_path[p] = ops.linear(x, qw, bias, mode="dynamic")
    stop = threading.Event()
    errors = []

    def switcher():
        i = 0
        while not stop.is_set():
            cquant.set_isa(paths[i % len(paths)])
            i += 1

    def compute():
        for _ in range(40):
            y = ops.linear(x, qw, bias, mode="dynamic")
            if not any(np.allclose(y, ref, rtol=1e-5, atol=1e-6) for ref in per_path.values()):
                errors.append("result matches no path")

    threads = [threading.Thread(target=switcher)] + [threading.Thread(target=compute) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(TIMEOUT)
    finally:
        stop.set()
        threads[0].join(TIMEOUT)
        cquant.set_isa("auto")
    assert not any(t.is_alive() for t in threads)
    assert errors == []


@pytest.mark.parametrize("granularity,group_size", SCHEMES)
def test_pickle_and_deepcopy_give_same_outputs(granularity, group_size):
    qw, bias = make_layer(granularity=granularity, group_size=group_size)
    x = make_inputs(1)[0]
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        clone = pickle.loads(pickle.dumps(qw, protocol=proto))
        assert clone.shape == qw.shape and clone.granularity == qw.granularity
        np.testing.assert_array_equal(clone.packed, qw.packed)
        np.testing.assert_array_equal(clone.scale, qw.scale)
        for mode in MODES:
            np.testing.assert_array_equal(ops.linear(x, clone, bias, mode=mode), ops.linear(x, qw, bias, mode=mode))
    dup = copy.deepcopy(qw)
    assert dup.packed is not qw.packed  # its own arrays
    for mode in MODES:
        np.testing.assert_array_equal(ops.linear(x, dup, bias, mode=mode), ops.linear(x, qw, bias, mode=mode))
    # a clone used first (its cached pointers built) still pickles cleanly
    ops.linear(x, dup, bias)
    np.testing.assert_array_equal(ops.linear(x, pickle.loads(pickle.dumps(dup)), bias), ops.linear(x, qw, bias))


def _quantized_model():
    """A small model from the model layer, quantized, or None where that layer is not usable."""
    try:
        from cquant import models
        from cquant.quantization import Quantizer
    except ImportError:
        return None, None
    model = models.build_default_model(0, models.ModelConfig.small())
    qmodel = Quantizer.quantize_dynamic(model, mode="dynamic", granularity="per_channel")
    tokens = np.arange(2 * 8).reshape(2, 8) % models.ModelConfig.small().vocab_size
    return qmodel, tokens


def test_quantized_model_pickles_and_copies():
    try:
        qmodel, tokens = _quantized_model()
    except Exception as exc:  # the model layer is not ours to test: only use it where it works
        pytest.skip(f"model layer not usable here: {exc!r}")
    if qmodel is None:
        pytest.skip("cquant.quantization not available")
    y = qmodel(tokens)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(qmodel))(tokens), y)
    np.testing.assert_array_equal(copy.deepcopy(qmodel)(tokens), y)


# ---- processes ------------------------------------------------------------------------------------
# Workers live at module level so spawned interpreters can import them by name.
def _worker_linear(args):
    qw, bias, x, mode, threads = args
    import cquant as cq
    from cquant import ops as o
    cq.set_num_threads(threads)
    return cq.isa(), o.linear(x, qw, bias, mode=mode)


def _run_pool(method, tasks):
    ctx = mp.get_context(method)
    with ctx.Pool(2) as pool:
        async_res = pool.map_async(_worker_linear, tasks)
        return async_res.get(TIMEOUT)


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_multiprocessing_workers_same_outputs(method, restore_threads):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"start method {method} not available")
    qw, bias = make_layer(n=64, k=512)
    xs = make_inputs(4, m=48, k=512)
    # Engage the parent's pool first, so a forked child inherits a process whose workers it does
    # not have (the atfork handler must reset the pool there).
    cquant.set_num_threads(2)
    expected = {mode: [ops.linear(x, qw, bias, mode=mode) for x in xs] for mode in MODES}
    tasks = [(qw, bias, x, mode, 1 + i % 2) for mode in MODES for i, x in enumerate(xs)]
    results = _run_pool(method, tasks)
    parent_isa = cquant.isa()
    for (_, _, _, mode, _), (child_isa, y), i in zip(tasks, results, list(range(len(xs))) * 2):
        assert child_isa == parent_isa  # same CPU, same environment: same path
        np.testing.assert_array_equal(y, expected[mode][i], err_msg=f"{method} worker, {mode}, input {i}")


def _fork_child_run(qw, bias, x, conn):
    try:
        conn.send(ops.linear(x, qw, bias, mode="dynamic"))
    finally:
        conn.close()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_fork_while_other_threads_compute(restore_threads):
    """fork() while another thread is inside a kernel: the child must not inherit a locked or
    half-running pool (pthread_atfork handler), and computes the same bits with its own pool."""
    qw, bias = make_layer(n=128, k=512)
    x = make_inputs(1, m=64, k=512)[0]
    cquant.set_num_threads(2)
    expected = ops.linear(x, qw, bias, mode="dynamic")
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            ops.linear(x, qw, bias, mode="weight_only")

    bg = threading.Thread(target=busy)
    bg.start()
    ctx = mp.get_context("fork")
    try:
        for _ in range(4):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_fork_child_run, args=(qw, bias, x, child_conn))
            p.start()
            child_conn.close()
            assert parent_conn.poll(TIMEOUT), "forked child did not answer (deadlock?)"
            np.testing.assert_array_equal(parent_conn.recv(), expected)
            p.join(TIMEOUT)
            assert p.exitcode == 0
    finally:
        stop.set()
        bg.join(TIMEOUT)


def test_env_thread_count_in_child_process(tmp_path):
    """CQUANT_NUM_THREADS is read by a fresh process; results do not depend on it."""
    import subprocess
    import sys
    qw, bias = make_layer()
    x = make_inputs(1)[0]
    expected = ops.linear(x, qw, bias)
    path = tmp_path / "job.pkl"
    path.write_bytes(pickle.dumps((qw, bias, x)))
    code = ("import pickle, sys, numpy as np, cquant; from cquant import ops\n"
            f"qw, b, x = pickle.loads(open({str(path)!r}, 'rb').read())\n"
            "np.save(sys.argv[1], ops.linear(x, qw, b)); print(cquant.get_num_threads())")
    for n in (1, 3):
        out = tmp_path / f"y{n}.npy"
        env = dict(os.environ, CQUANT_NUM_THREADS=str(n))
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(cquant.__file__)),
                                                        env.get("PYTHONPATH", "")] if p)
        res = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True,
                             text=True, timeout=TIMEOUT)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == str(n)
        np.testing.assert_array_equal(np.load(out), expected)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_lowering_the_thread_count_stops_the_extra_workers(restore_threads):
    """Every started worker wakes for every job: after a call at a high count, lowering it must stop
    the extra workers (the next jobs woke all of them: a small call took 1.8-9.6x as long). Counted
    as the process's threads, not timed."""
    shared = ops.using_openmp()  # (an earlier torch test handed torch's runtime over: the pool for this one)
    ops.use_openmp(None)
    try:
        _count_workers()
    finally:
        if shared and "torch" in sys.modules:
            from cquant.adapters.torch import share_torch_openmp  # noqa: PLC0415  (optional: torch)
            share_torch_openmp()


def _count_workers():
    qw, bias = make_layer()
    x = np.random.default_rng(3).standard_normal((400, 256)).astype(np.float32)  # 16M MACs: threaded
    cquant.set_num_threads(24)
    ops.linear(x, qw, bias)
    many = len(os.listdir("/proc/self/task"))
    cquant.set_num_threads(2)
    ops.linear(x, qw, bias)
    few = len(os.listdir("/proc/self/task"))
    assert many - few >= 10, (many, few)          # (the job had fewer units than 24: ~20 workers)


def _torch_child(m, x, q):
    import torch
    with torch.no_grad():
        q.put(m(x).numpy())


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_quantized_torch_model_passed_to_a_torch_multiprocessing_child(method):
    """torch.multiprocessing moves a pickled tensor's storage into shared memory: the layer pickled
    throwaway tensors of its arrays (for torch.save), whose descriptors closed before the child
    started ("bad value(s) in fds_to_keep" / the child died). Tensors now only for protocol 2."""
    torch = pytest.importorskip("torch")
    import torch.multiprocessing as tmp
    if method not in mp.get_all_start_methods():
        pytest.skip(f"start method {method} not available")
    torch.manual_seed(0)
    m = cquant.Quantizer.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(64, 32)).eval())
    x = torch.randn(2, 64)
    ctx = tmp.get_context(method)
    q = ctx.SimpleQueue()
    p = ctx.Process(target=_torch_child, args=(m, x, q))
    p.start()
    p.join(TIMEOUT)
    assert p.exitcode == 0
    with torch.no_grad():
        np.testing.assert_array_equal(q.get(), m(x).numpy())
