"""cquant's parallel loops on an OpenMP runtime's thread team (cq_use_openmp, ops.use_openmp) instead
of its own pool, and the PyTorch adapter handing torch's runtime over on import. Results must be the
pool's bit for bit; refused paths change nothing; a fork()ed child is back on the pool."""
import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cquant import errors, ops

F32 = np.float32


@pytest.fixture
def restore_runtime():
    """The runtime in use before the test (an earlier torch test may have shared torch's), put back."""
    before = ops.using_openmp()
    yield
    if not before:
        ops.use_openmp(None)
    elif "torch" in sys.modules:
        from cquant.adapters.torch import share_torch_openmp  # noqa: PLC0415  (optional: torch)
        share_torch_openmp()


def _system_gomp():
    """The compiler's libgomp, loaded into this process (None where there is none)."""
    name = ctypes.util.find_library("gomp")
    if not name:
        return None
    try:
        ctypes.CDLL(name)
    except OSError:
        return None
    return name


def test_refused_paths_change_nothing(restore_runtime):
    ops.use_openmp(None)
    for bad in ("/nonexistent/libgomp.so.1", "libc.so.6"):  # not loaded; loaded without GOMP_parallel
        with pytest.raises(errors.ValueError, match="not an OpenMP runtime loaded"):
            ops.use_openmp(bad)
        assert not ops.using_openmp()
    with pytest.raises(errors.ValueError, match="NUL"):
        ops.use_openmp("libgomp\0.so")
    with pytest.raises(errors.TypeError):
        ops.use_openmp(3)
    assert not ops.using_openmp()


def test_team_gives_the_pools_results(restore_runtime, isa):
    name = _system_gomp()
    if name is None:
        pytest.skip("no libgomp on this machine")
    rng = np.random.default_rng(3)
    threads = ops.get_num_threads()
    ops.set_num_threads(3)
    try:
        for n, k, m in ((384, 384, 640), (1536, 384, 100), (256, 4096, 1), (100, 224, 33)):
            w = rng.standard_normal((n, k)).astype(F32)
            x = rng.standard_normal((m, k)).astype(F32)
            b = rng.standard_normal(n).astype(F32)
            for gran, group in (("per_channel", None), ("per_group", 32)):
                qw = ops.quantize_weight(w, gran, group)
                for mode in ("dynamic", "weight_only"):
                    ops.use_openmp(None)
                    want = ops.linear(x, qw, b, mode=mode)
                    kernel = ops.last_kernel()
                    ops.use_openmp(name)
                    assert ops.using_openmp()
                    got = ops.linear(x, qw, b, mode=mode)
                    assert ops.last_kernel() == kernel
                    np.testing.assert_array_equal(got, want, err_msg=f"{mode} {gran} ({n}, {k}) M={m}")
    finally:
        ops.set_num_threads(threads)


def test_forked_child_is_back_on_the_pool(restore_runtime):
    name = _system_gomp()
    if name is None:
        pytest.skip("no libgomp on this machine")
    code = textwrap.dedent(f"""
        import ctypes, os, sys
        import numpy as np
        from cquant import ops
        ctypes.CDLL({name!r})
        ops.use_openmp({name!r})
        ops.set_num_threads(2)
        w = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
        x = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
        qw = ops.quantize_weight(w)
        want = ops.linear(x, qw)
        pid = os.fork()
        if pid == 0:
            ok = not ops.using_openmp() and np.array_equal(ops.linear(x, qw), want)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_forked_child_is_back_on_the_pool_before_any_cquant_job(restore_runtime):
    """The runtime's team running (an OpenMP region of its owner) but no multi-threaded cquant job yet
    when the process forks: the child must still go back to the pool (the fork handler used to be
    installed by the first pool job only, and such a child hung in the dead team's barrier: a torch
    DataLoader worker after a model was loaded)."""
    name = _system_gomp()
    if name is None:
        pytest.skip("no libgomp on this machine")
    code = textwrap.dedent(f"""
        import ctypes, os, sys
        import numpy as np
        from cquant import ops
        gomp = ctypes.CDLL({name!r})
        body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda data: None)
        gomp.GOMP_parallel(body, None, 2, 0)          # the team exists now, as torch's after an op
        ops.use_openmp({name!r})
        ops.set_num_threads(2)
        rng = np.random.default_rng(0)
        codes = rng.integers(-127, 128, (512, 512)).astype(np.int8)
        qw = ops.QuantizedWeight.from_codes(codes, np.full(512, 0.01, np.float32), "per_channel")
        x = rng.standard_normal((256, 512)).astype(np.float32)
        pid = os.fork()
        if pid == 0:
            y = ops.linear(x, qw)                     # multi-threaded: hung before the fix
            ops.set_num_threads(1)
            ok = not ops.using_openmp() and np.array_equal(y, ops.linear(x, qw))
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- the PyTorch adapter: torch's runtime shared on import -------------------------------------

def _torch():
    if os.environ.get("CQUANT_SANITIZER"):  # as the other torch tests (Makefile: ASAN_DESELECT)
        pytest.skip("torch under the preloaded ASan runtime")
    return pytest.importorskip("torch", reason="torch is not installed (optional: pip install torch)")


def test_adapter_shares_torchs_runtime(restore_runtime):
    torch = _torch()
    from cquant.adapters.torch import share_torch_openmp, torch_openmp_runtime  # noqa: PLC0415
    path = torch_openmp_runtime()
    if path is None:
        pytest.skip("no OpenMP runtime mapped by this torch build")
    # torch's own copy (torch/lib/libgomp.so.1 in the pip wheels), or the compiler's where another
    # test loaded that first (same soname: torch then links the one already loaded)
    with open("/proc/self/maps") as f:
        assert path in f.read()
    assert share_torch_openmp() == path and ops.using_openmp()
    assert share_torch_openmp(False) is None and not ops.using_openmp()
    # through the adapter, on the team and on the pool: the same output
    lin = torch.nn.Linear(384, 768)
    from cquant import Quantizer  # noqa: PLC0415
    q = Quantizer.quantize_dynamic(torch.nn.Sequential(lin))
    x = torch.randn(200, 384)
    with torch.inference_mode():
        pool = q(x).clone()
        share_torch_openmp()
        team = q(x)
    assert torch.equal(pool, team)


def _run(env_value, code):
    env = dict(os.environ)
    env.pop("CQUANT_OPENMP", None)
    if env_value is not None:
        env["CQUANT_OPENMP"] = env_value
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", code], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("value,shared,warns", [(None, True, False), ("1", True, False), ("0", False, False),
                                                (" 0 ", False, False), ("yes", True, True)])
def test_cquant_openmp_variable(value, shared, warns):
    _torch()
    code = ("import torch, cquant.adapters.torch as t\nfrom cquant import ops\n"
            "print('shared', ops.using_openmp(), t.torch_openmp_runtime() is not None)")
    r = _run(value, code)
    assert r.returncode == 0, r.stderr
    found = r.stdout.split()[-1] == "True"
    assert r.stdout.split()[-2] == str(shared and found)
    assert ("CQUANT_OPENMP='yes' ignored" in r.stderr) == warns


def test_runtime_found_in_maps(tmp_path):
    torch = _torch()
    from cquant.adapters.torch import torch_openmp_runtime  # noqa: PLC0415
    root = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    mine = os.path.join(root, "torch", "lib", "libgomp.so.1")
    other = "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    line = "7f0000000000-7f0000001000 r-xp 00000000 08:01 1234                       {}\n"

    def maps(*paths):
        p = tmp_path / "maps"
        p.write_text("".join(line.format(x) for x in paths) + "7ffd0000-7ffd1000 rw-p 00000000 00:00 0  [stack]\n")
        return str(p)

    assert torch_openmp_runtime(maps(other, mine, mine)) == mine     # torch's own, among others
    assert torch_openmp_runtime(maps(other)) == other                # the only one mapped
    assert torch_openmp_runtime(maps("/opt/a/libiomp5.so", other)) is None  # two foreign: cannot tell
    assert torch_openmp_runtime(maps("/usr/lib/libm.so.6")) is None
    assert torch_openmp_runtime(str(tmp_path / "missing")) is None
