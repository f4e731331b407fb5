"""Write the inputs of examples/c/read_checkpoint.c: a small quantized model saved by cquant.save
(the checkpoint layout of README "Checkpoints") and a reference file with an input x and, per
quantized layer L, ``y.L`` = cquant's own output of that layer on x (cquant.ops.linear with the
layer's mode), both safetensors. `make cexamples` runs it, then the C reader on every ISA path.

    python examples/c/write_checkpoint.py OUT_DIR   ->  OUT_DIR/model.safetensors, OUT_DIR/reference.safetensors

The layers cover both modes and every granularity (per_tensor, per_channel, per_group) with and
without a bias, and shapes that are not multiples of the 16/64-row panels.
"""
import os
import sys

import numpy as np

import cquant
from cquant import nn, ops


def build_model() -> nn.Sequential:
    rng = np.random.default_rng(20261129)
    return nn.Sequential(nn.Linear(40, 48, rng=rng), nn.GELU(), nn.Linear(48, 64, bias=False, rng=rng),
                         nn.GELU(), nn.Linear(64, 19, rng=rng))


def write_broken(path: str, out_dir: str) -> None:
    """Copies of the checkpoint that lie, which the reader must refuse (exit status 2): cut short,
    a tensor whose offsets overlap another's, a size that disagrees with shape * dtype, and a header
    length past the end of the file."""
    import json
    import struct
    raw = open(path, "rb").read()
    (hl,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + hl]), raw[8 + hl:]

    def write(name: str, hdr: dict, body: bytes, length: int = -1) -> None:
        h = json.dumps(hdr, separators=(",", ":")).encode()
        with open(os.path.join(out_dir, f"bad-{name}.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(h) if length < 0 else length) + h + body)

    write("truncated", header, data[:-10])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    h = json.loads(json.dumps(header))
    b, e = h[names[1]]["data_offsets"]
    h[names[1]]["data_offsets"] = [b - 4, e - 4]  # overlaps the tensor before it, leaves a gap after
    write("overlap", h, data)
    h = json.loads(json.dumps(header))
    h[names[0]]["shape"] = [h[names[0]]["shape"][0] + 1] + h[names[0]]["shape"][1:]
    write("size", h, data)
    write("header-length", header, data, length=len(raw))


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    model = build_model()
    # one mode / granularity per layer (names are the Sequential's indices)
    plan = [("0", "weight_only", "per_channel", None), ("2", "dynamic", "per_group", 16),
            ("4", "dynamic", "per_tensor", None)]
    for name, mode, gran, group in plan:
        cquant.Quantizer.quantize_dynamic(model, mode=mode, granularity=gran, group_size=group,
                                          include=[name])
    path = os.path.join(out_dir, "model.safetensors")
    cquant.save(model, path)

    # The reference: each layer's output computed by cquant from what the checkpoint holds.
    ck = cquant.load(path, build=False)
    rng = np.random.default_rng(7)
    x_by_k = {}
    ref = {}
    for name, layer in sorted(ck.layers.items()):
        qw = layer.qweight
        n, k = qw.shape
        x = x_by_k.setdefault(k, rng.standard_normal((5, k)).astype(np.float32))
        ref[f"x.{name}"] = x
        ref[f"y.{name}"] = ops.linear(x, qw, layer.bias, mode=layer.mode)
    from safetensors.numpy import save_file
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    write_broken(path, out_dir)
    print(f"wrote {path} ({len(ck.layers)} quantized layers), reference.safetensors and bad-*.safetensors")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: write_checkpoint.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
