"""Quantization-aware training on real data: scikit-learn's bundled digits, an MLP in torch.

    pip install torch scikit-learn          # (make ci-extras installs both)
    python examples/qat_digits.py [--epochs 60] [--qat-epochs 20] [--threads N]

The 1797 8x8 digit images that ship inside scikit-learn (no download) are split 75/25 (stratified,
fixed seed). A 64-256-256-10 MLP is trained in float32, then, for each scheme:

- PTQ: the float32 model quantized with cquant's PyTorch adapter (``cquant.Quantizer``);
- QAT: ``cquant.qat.prepare`` on a copy of the float32 model, fine-tuned for ``--qat-epochs`` with
  fake-quantized weights (and per-row int8 activations in dynamic mode), evaluated in eval mode
  (the deployed kernels), then ``cquant.qat.convert``: the converted model's logits are checked to
  be bit-identical to the QAT model's.

Test accuracy of float32 / PTQ / QAT is printed side by side. int4 schemes are included when this
build of cquant has int4 weights (``QuantScheme(bits=4)``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cquant  # noqa: E402
from cquant import errors  # noqa: E402
from cquant.scheme import QuantScheme  # noqa: E402

#: schemes tried, as text (int4 ones are skipped with a note where int4 is not available)
SCHEMES = ("int8 dynamic per_channel", "int8 dynamic per_tensor", "int4 weight_only per_channel",
           "int4 dynamic per_channel", "int4 dynamic per_group(32)")


def load_data(seed: int = 0):
    """(X_train, y_train, X_test, y_test) as torch tensors: pixels / 16 in [0, 1]."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data / 16.0, d.target, test_size=0.25, random_state=seed,
                                          stratify=d.target)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return f(xtr), g(ytr), f(xte), g(yte)


def make_mlp(hidden: int = 256, seed: int = 0):
    import torch
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


def train(model, x, y, epochs: int, lr: float, seed: int = 0, batch: int = 64) -> float:
    """Adam with cosine decay, cross-entropy; returns the last epoch's mean training loss."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        tot = 0.0
        for s in range(0, len(x), batch):
            idx = perm[s:s + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        last = tot / len(x)
    model.eval()
    return last


def logits(model, x):
    import torch
    model.eval()
    with torch.no_grad():
        return model(x)


def accuracy(model, x, y) -> float:
    return float((logits(model, x).argmax(1) == y).float().mean()) * 100.0


def scheme_or_none(text: str) -> Optional[QuantScheme]:
    """The scheme, or None where this build cannot make it (int4 before int4 lands)."""
    try:
        return QuantScheme.parse(text)
    except errors.QuantizationError:
        return None


def run(schemes: Sequence[str] = SCHEMES, epochs: int = 60, qat_epochs: int = 20, seed: int = 0,
        qat_lr: float = 3e-4, verbose: bool = True) -> Dict[str, object]:
    """Train float32, then PTQ and QAT for each scheme. Returns {"float32": acc, "rows": [...]}."""
    import torch
    import cquant.qat as qat
    x, y, xt, yt = load_data(seed)
    t0 = time.perf_counter()
    fmodel = make_mlp(seed=seed)
    train(fmodel, x, y, epochs, 1e-3, seed)
    facc = accuracy(fmodel, xt, yt)
    if verbose:
        print(f"digits: {len(x)} train / {len(xt)} test images; float32 MLP trained in "
              f"{time.perf_counter() - t0:.1f} s: test accuracy {facc:.2f}%", flush=True)
    rows: List[Dict[str, object]] = []
    for text in schemes:
        s = scheme_or_none(text)
        if s is None:
            rows.append({"scheme": text, "skipped": "not available in this build (no int4 yet)"})
            if verbose:
                print(f"  {text}: skipped (not available in this build)", flush=True)
            continue
        t0 = time.perf_counter()
        ptq = cquant.Quantizer.quantize_dynamic(copy.deepcopy(fmodel), scheme=s)
        pacc = accuracy(ptq, xt, yt)
        student = qat.prepare(copy.deepcopy(fmodel), scheme=s)
        train(student, x, y, qat_epochs, qat_lr, seed + 1)
        qlog = logits(student, xt)
        qacc = float((qlog.argmax(1) == yt).float().mean()) * 100.0
        conv = qat.convert(student)
        same = bool(torch.equal(logits(conv, xt), qlog))
        rows.append({"scheme": str(s), "float32": facc, "ptq": pacc, "qat": qacc, "bit_identical": same,
                     "seconds": time.perf_counter() - t0})
        if verbose:
            print(f"  {s}: PTQ {pacc:.2f}%, QAT {qacc:.2f}% ({time.perf_counter() - t0:.1f} s; "
                  f"converted == QAT eval: {same})", flush=True)
    return {"float32": facc, "rows": rows}


def format_table(res: Dict[str, object]) -> str:
    lines = ["| scheme | float32 | PTQ | QAT | QAT eval == converted |", "|---|---:|---:|---:|---|"]
    for r in res["rows"]:  # type: ignore[union-attr]
        if "skipped" in r:
            lines.append(f"| {r['scheme']} | | | | {r['skipped']} |")
        else:
            lines.append(f"| {r['scheme']} | {r['float32']:.2f}% | {r['ptq']:.2f}% | {r['qat']:.2f}% | "
                         f"{'bit-identical' if r['bit_identical'] else 'DIFFERENT'} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=60, help="float32 training epochs")
    ap.add_argument("--qat-epochs", type=int, default=20, help="QAT fine-tuning epochs per scheme")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1) and cquant threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import sklearn  # noqa: F401
        import torch
    except ImportError as e:
        print(f"qat_digits: skipped ({e.name} is not installed: pip install torch scikit-learn)")
        return 0
    # a 64-256-256-10 MLP on batches of 64 is too small for threads: one is fastest (and does not
    # fight other processes on a small machine)
    torch.set_num_threads(args.threads or 1)
    if args.threads:
        cquant.set_num_threads(args.threads)
    print(f"cquant {cquant.__version__}, path {cquant.isa()}, {cquant.get_num_threads()} thread(s)")
    res = run(epochs=args.epochs, qat_epochs=args.qat_epochs, seed=args.seed)
    print()
    print(format_table(res))
    bad = [r for r in res["rows"] if "skipped" not in r and not r["bit_identical"]]  # type: ignore[union-attr]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
