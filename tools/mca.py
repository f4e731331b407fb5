#!/usr/bin/env python3
"""Predict the inner-loop throughput of cquant's SIMD micro-kernels with llvm-mca.

For every kernel source (csrc/x86/**/*.c, or the files given) this compiles the file to assembly
with gcc, finds in each function the innermost loop with the most vector multiply instructions
(vpdpbusd, vpmaddubsw, vfmadd*ps, tdpbssd, ...), and runs llvm-mca on that loop body for each
target CPU. Per (loop, CPU) it prints the predicted cycles per iteration, MACs per cycle and how
close that is to the "port limit": llvm-mca's throughput for a block made only of the loop's
multiply instructions (register operands, independent accumulators), i.e. what the loop would do if
nothing but its multiplies cost anything.

    python3 tools/mca.py                          # all kernels, default CPUs
    python3 tools/mca.py csrc/x86/avx512vnni/*.c --cpus icelake-server,sapphirerapids
    python3 tools/mca.py FILE --all-loops --show-asm --json out.json
    python3 tools/mca.py --selftest               # parser/loop-finder check, needs no llvm

Standard library only. See tools/README-mca.md for how to read the numbers and the caveats.
"""
import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CPUS = ["icelake-server", "cascadelake", "skylake-avx512", "sapphirerapids", "znver3", "znver4"]
# (znver4 needs LLVM >= 16; an older llvm-mca skips it with a message)
CFLAGS = ["-O3", "-std=c99", "-D_GNU_SOURCE", "-fno-strict-aliasing", "-Icsrc/include", "-Icsrc",
          "-Icsrc/src", "-masm=att"]
TRIPLE = "x86_64-unknown-linux-gnu"
PEAK_BLOCK = 24          # instructions in the synthetic block that measures one instruction's peak rate

# Approximate documented peak issue rates (instructions per cycle), printed next to llvm-mca's own
# figure only as a sanity check; the "port limit" column never uses them. None = the CPU lacks the
# instruction. Sources (approximate, per core, for SKUs with two 512-bit FMA units, i.e. most Xeon
# Gold/Platinum; one-unit SKUs issue zmm multiplies at half these rates): Intel 64 and IA-32
# Architectures Optimization Reference Manual (Skylake-SP/Cascade Lake/Ice Lake-SP/Sapphire Rapids:
# 512-bit multiplies on ports 0 and 5, 256-bit on ports 0 and 1; no VNNI before Cascade Lake) and the
# uops.info measurements; AMD Software Optimization Guide for family 19h (Zen 3: two 256-bit
# FMA/multiply pipes, no AVX-512, no VNNI). Zen 4: 512-bit operations on the two 256-bit pipes, so
# one zmm vpdpbusd / FMA per cycle, measured (fourteenth session, EPYC family 25 model 17: 236
# GMAC/s vpdpbusd zmm and 59 GMAC/s FMA zmm per core at ~3.7 GHz); LLVM 19's znver4 model issues
# vpdpbusd zmm at one per two cycles.
_XEON = ("skylake-avx512", "cascadelake", "icelake-server", "sapphirerapids")
DOC_PEAK = {
    ("i8dot", 512): dict({c: 2 for c in _XEON}, **{"skylake-avx512": None, "znver3": None, "znver4": 1}),
    ("i8dot", 256): dict({c: 2 for c in _XEON}, **{"skylake-avx512": None, "znver3": None, "znver4": 2}),
    ("i8madd", 512): dict({c: 2 for c in _XEON}, znver3=None, znver4=1),
    ("i8madd", 256): dict({c: 2 for c in _XEON}, znver3=2, znver4=2),
    ("fma", 512): dict({c: 2 for c in _XEON}, znver3=None, znver4=1),
    ("fma", 256): dict({c: 2 for c in _XEON}, znver3=2, znver4=2),
}
DOC_PEAK[("i16madd", 512)] = DOC_PEAK[("i8madd", 512)]
DOC_PEAK[("i16madd", 256)] = DOC_PEAK[("i8madd", 256)]
DOC_PEAK[("i16dot", 512)] = DOC_PEAK[("i8dot", 512)]
DOC_PEAK[("i16dot", 256)] = DOC_PEAK[("i8dot", 256)]

# ----------------------------------------------------------------------------------------------
# Instruction classification
# ----------------------------------------------------------------------------------------------
PREFIXES = {"{vex}", "{vex2}", "{vex3}", "{evex}", "lock", "rep", "repz", "repe", "repnz", "repne",
            "notrack", "data16", "addr32", "{disp8}", "{disp32}"}
VREG_RE = re.compile(r"%([xyzt])mm(\d+)")
WIDTH = {"x": 128, "y": 256, "z": 512}
FMA_RE = re.compile(r"^vf(n?)m(add|sub|addsub|subadd)(132|213|231)(p|s)([sdh])$")
I8DOT_RE = re.compile(r"^vpdpb[su][su]ds?$")          # vpdpbusd(s), AVX-VNNI-INT8 vpdpbssd ...
I16DOT_RE = re.compile(r"^vpdpw[su][su]ds?$")         # vpdpwssd(s) ...
AMX_I8_RE = re.compile(r"^tdpb[su][su]d$")            # tdpbssd, tdpbsud, tdpbusd, tdpbuud
AMX_F_RE = re.compile(r"^tdp(bf16|fp16)ps$")


def split_ins(ins):
    """'{vex} vpdpbusd %ymm1, %ymm2, %ymm3' -> ('{vex} ', 'vpdpbusd', '%ymm1, %ymm2, %ymm3')."""
    toks = ins.split(None, 1)
    prefix = ""
    while toks and toks[0].lower() in PREFIXES:
        prefix += toks[0] + " "
        toks = toks[1].split(None, 1) if len(toks) > 1 else []
    if not toks:
        return prefix, "", ""
    return prefix, toks[0].lower(), toks[1].strip() if len(toks) > 1 else ""


def vec_width(ops):
    """Width in bits of the destination (last) vector register, 0 if none."""
    regs = VREG_RE.findall(ops)
    if not regs:
        return 0
    kind = regs[-1][0]
    return 8192 if kind == "t" else WIDTH[kind]


def classify(ins):
    """(kind, MACs per instruction, width) for a vector multiply instruction, else None.
    kinds: i8dot (vpdpbusd...), i8madd (vpmaddubsw), i16dot (vpdpwssd), i16madd (vpmaddwd),
    fma (vfmadd...), amx (tdpb*d), amxf (tdpbf16ps). MACs count one multiply-add of two elements;
    AMX assumes full 16x64-byte tiles. vpmaddwd MACs are zeroed later when the loop also has
    vpmaddubsw (there it only widens pairs: madd(x, 1))."""
    _, mn, ops = split_ins(ins)
    w = vec_width(ops) or 128
    if I8DOT_RE.match(mn):
        return "i8dot", w // 8, w
    if mn in ("vpmaddubsw", "pmaddubsw"):
        return "i8madd", w // 8, w
    if I16DOT_RE.match(mn):
        return "i16dot", w // 16, w
    if mn in ("vpmaddwd", "pmaddwd"):
        return "i16madd", w // 16, w
    m = FMA_RE.match(mn)
    if m:
        if m.group(4) == "s":
            return "fma", 1, 0
        return "fma", w // {"s": 32, "d": 64, "h": 16}[m.group(5)], w
    if mn in ("vdpbf16ps",):
        return "fma", w // 16, w
    if AMX_I8_RE.match(mn):
        return "amx", 16 * 16 * 64, 8192
    if AMX_F_RE.match(mn):
        return "amxf", 16 * 16 * 32, 8192
    if mn == "vpermps":  # a table lookup standing for a multiply (the int4 GEMV: T_k[nibble] = x_k * q)
        return "lut", w // 32, w
    return None


def is_cond_jump(mn):
    return (mn.startswith("j") and mn not in ("jmp", "jmpq", "jmpl")) or mn in ("loop", "loope", "loopne")


def reg_form(ins, i):
    """Register-only version of multiply instruction `ins`, writing accumulator number i (used to
    build the port-limit blocks: independent accumulators, no loads)."""
    prefix, mn, ops = split_ins(ins)
    kind, _, w = classify(ins)
    if kind in ("amx", "amxf"):
        return f"{mn}\t%tmm6, %tmm7, %tmm{i % 6}"
    letter = {512: "z", 256: "y"}.get(w, "x")
    if not mn.startswith("v"):           # legacy SSE two-operand form
        return f"{prefix}{mn}\t%xmm0, %xmm{2 + i % 14}"
    nregs = 30 if letter == "z" else 14  # zmm16-31 exist only with EVEX
    return f"{prefix}{mn}\t%{letter}mm0, %{letter}mm1, %{letter}mm{2 + i % nregs}"


def ins_key(ins):
    """Display key of a multiply instruction: 'vpdpbusd zmm'; the FMA forms (132/213/231, fnmadd,
    fmsub, ...) share one key, 'vfmadd*ps ymm', as they use the same units."""
    prefix, mn, ops = split_ins(ins)
    m = FMA_RE.match(mn)
    if m:
        mn = f"vfmadd*{m.group(4)}{m.group(5)}"
    regs = VREG_RE.findall(ops)
    r = regs[-1][0] + "mm" if regs else ""
    return (prefix.strip() + " " if prefix.strip() else "") + mn + (" " + r if r else "")


# ----------------------------------------------------------------------------------------------
# Assembly parsing: functions, labels, loops
# ----------------------------------------------------------------------------------------------
LABEL_RE = re.compile(r"^([A-Za-z_.$][\w.$@]*|\d+):(.*)$")


def strip_comment(line):
    # AT&T comments start with '#'; '#' does not otherwise occur in gcc/clang x86 output.
    i = line.find("#")
    return line[:i] if i >= 0 else line


def parse_asm(text):
    """-> list of (function name, items); items are ('label', name) or ('ins', text). Directives
    (.cfi_*, .p2align, .type, ...) are dropped; only code sections are kept."""
    funcs = []
    cur = None
    code = True
    stack = []
    prev = True
    for raw in text.splitlines():
        line = strip_comment(raw).strip()
        while line:
            m = LABEL_RE.match(line)
            if not m:
                break
            name, line = m.group(1), m.group(2).strip()
            if not code:
                continue
            if not name.startswith(".L") and not name.isdigit():
                cur = (name, [])
                funcs.append(cur)
            elif cur is not None:
                cur[1].append(("label", name))
        if not line:
            continue
        if line.startswith("."):
            tok = line.split(None, 1)
            d, arg = tok[0], (tok[1] if len(tok) > 1 else "")
            secname = arg.split(",")[0].strip().strip('"')
            if d == ".text":
                prev, code = code, True
            elif d in (".data", ".bss", ".rodata"):
                prev, code = code, False
            elif d == ".section":
                prev, code = code, secname.startswith(".text")
            elif d == ".pushsection":
                stack.append(code)
                code = secname.startswith(".text")
            elif d == ".popsection" and stack:
                code = stack.pop()
            elif d == ".previous":
                prev, code = code, prev
            continue
        if code and cur is not None:
            cur[1].append(("ins", " ".join(line.split())))
    return funcs


class Loop:
    def __init__(self, func, label, items):
        self.func = func
        self.label = label
        self.items = items                     # label ... backward jump, inclusive
        self.ins = [v for k, v in items if k == "ins"]
        # vpermps counts as a multiply only in the int4 weight-only GEMVs, whose codes it looks up
        # (x_k * q from a 16-entry table); elsewhere it is a permute
        self.muls = [i for i in self.ins if classify(i) and (classify(i)[0] != "lut" or "qc4w" in func)]
        has_madd8 = any(classify(i)[0] == "i8madd" for i in self.muls)
        self.macs = 0
        self.counts = {}
        for i in self.muls:
            kind, macs, _ = classify(i)
            if kind == "i16madd" and has_madd8:
                macs = 0
            self.macs += macs
            k = ins_key(i)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.n_i8dot = sum(1 for i in self.muls if classify(i)[0] in ("i8dot", "i8madd", "amx"))
        self.n_fma = sum(1 for i in self.muls if classify(i)[0] == "fma")

    def body(self):
        return "".join(f"{v}:\n" if k == "label" else f"\t{v}\n" for k, v in self.items)

    def bound_block(self):
        return "".join(reg_form(ins, n) + "\n" for n, ins in enumerate(self.muls))


NORETURN = ("ret", "retq", "retl", "ud2", "hlt", "jmp", "jmpq", "jmpl")


def successors(items, pos):
    """Control-flow successors of each item (labels fall through; calls return; an indirect or
    non-local jump leaves the function)."""
    succ = []
    n = len(items)
    for i, (k, v) in enumerate(items):
        nxt = [i + 1] if i + 1 < n else []
        if k == "ins":
            _, mn, ops = split_ins(v)
            tgt = pos.get(ops.strip())
            if mn in NORETURN:
                nxt = [tgt] if mn.startswith("jmp") and tgt is not None else []
            elif is_cond_jump(mn) and tgt is not None:
                nxt = nxt + [tgt]
        succ.append(nxt)
    return succ


def scc_ids(succ):
    """Strongly connected component number of each node (iterative Tarjan)."""
    n = len(succ)
    index, low, comp = [-1] * n, [0] * n, [-1] * n
    stack, on = [], [False] * n
    counter = ncomp = 0
    for root in range(n):
        if index[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            v, ci = work.pop()
            if ci == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on[v] = True
            if ci < len(succ[v]):
                work.append((v, ci + 1))
                w = succ[v][ci]
                if index[w] < 0:
                    work.append((w, 0))
                elif on[w]:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on[w] = False
                    comp[w] = ncomp
                    if w == v:
                        break
                ncomp += 1
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    return comp


def find_loops(items):
    """All loops of one function: (label, start index, end index, innermost). A loop is a label
    that is the target of a later conditional jump from which control can actually get back to
    the label (same strongly connected component of the control-flow graph: gcc often lays out
    epilogue code so that plain forward paths jump backwards, and those are no loops). The body
    runs from the label to the last such jump; it is innermost when no other loop label lies
    inside it."""
    pos = {}
    for i, (k, v) in enumerate(items):
        if k == "label":
            pos.setdefault(v, i)
    comp = None
    back = {}
    for i, (k, v) in enumerate(items):
        if k != "ins":
            continue
        _, mn, ops = split_ins(v)
        if is_cond_jump(mn):
            tgt = ops.strip()
            if tgt in pos and pos[tgt] < i:
                if comp is None:
                    comp = scc_ids(successors(items, pos))
                if comp[pos[tgt]] == comp[i]:
                    back[tgt] = max(back.get(tgt, -1), i)
    loops = []
    for lab, j in sorted(back.items(), key=lambda kv: pos[kv[0]]):
        p = pos[lab]
        inner = not any(items[q][0] == "label" and items[q][1] in back and items[q][1] != lab
                        for q in range(p + 1, j + 1))
        loops.append((lab, p, j, inner))
    return loops


def select_loops(funcs, all_loops=False):
    """Per function the innermost loop with the most multiplies (ties: more MACs, then first);
    with all_loops every innermost loop that has a multiply. Functions without one are skipped."""
    out = []
    for name, items in funcs:
        cands = [Loop(name, lab, items[p:j + 1]) for lab, p, j, inner in find_loops(items) if inner]
        cands = [c for c in cands if c.muls]
        if not cands:
            continue
        if all_loops:
            out.extend(cands)
        else:
            best = cands[0]
            for c in cands[1:]:
                if (len(c.muls), c.macs) > (len(best.muls), best.macs):
                    best = c
            out.append(best)
    return out


# ----------------------------------------------------------------------------------------------
# llvm-mca output
# ----------------------------------------------------------------------------------------------
def parse_mca(out):
    r = {}
    for key, pat, conv in (("iterations", r"^Iterations:\s+(\d+)", int),
                           ("instructions", r"^Instructions:\s+(\d+)", int),
                           ("total_cycles", r"^Total Cycles:\s+(\d+)", int),
                           ("total_uops", r"^Total uOps:\s+(\d+)", int),
                           ("ipc", r"^IPC:\s+([\d.]+)", float),
                           ("block_rthroughput", r"^Block RThroughput:\s+([\d.]+)", float)):
        m = re.search(pat, out, re.M)
        if m:
            r[key] = conv(m.group(1))
    lines = out.splitlines()
    names = {}
    pressure = {}
    placeholders = []
    for n, line in enumerate(lines):
        if line.startswith("Resources:"):
            for l2 in lines[n + 1:]:
                m = re.match(r"^\[(\d+)(\.\d+)?\]\s+-\s+(\S+)", l2)
                if not m:
                    break
                # units of one group ([12.0], [12.1] - Zn3FPP45) get the unit number appended
                names[m.group(1) + (m.group(2) or "")] = m.group(3) + (m.group(2) or "")
        elif line.startswith("Resource pressure per iteration:") and n + 2 < len(lines):
            idx = re.findall(r"\[([\d.]+)\]", lines[n + 1])
            vals = lines[n + 2].split()
            for i, v in zip(idx, vals):
                pressure[names.get(i, i)] = 0.0 if v == "-" else float(v)
        elif line.startswith("Instruction Info:"):
            for l2 in lines[n + 1:]:
                if l2.startswith("Resources:") or l2.startswith("Resource pressure"):
                    break
                m = re.match(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+((?:[*U]\s+)*)(\S.*)$", l2)
                if m and int(m.group(2)) >= 100 and "U" in m.group(4):
                    placeholders.append(split_ins(m.group(5))[1])
    r["pressure"] = pressure
    r["placeholders"] = sorted(set(placeholders))
    r["model"] = model_prefix(list(names.values()))
    if r.get("iterations") and "total_cycles" in r:
        r["cycles_per_iter"] = r["total_cycles"] / r["iterations"]
    return r


def model_prefix(names):
    """'ICXDivider', 'ICXPort0', ... -> 'ICX' (the scheduling model llvm-mca used)."""
    if not names:
        return "?"
    p = os.path.commonprefix(names)
    # drop a trailing capital that starts a word in some name ('ICXP' from ICXPort0/ICXPort1)
    while len(p) > 1 and p[-1].isupper() and any(len(n) > len(p) and n[len(p)].islower() for n in names):
        p = p[:-1]
    return p or "?"


def busiest(pressure, model):
    if not pressure:
        return ""
    top = max(pressure.values())
    if top <= 0:
        return ""
    hot = [k for k, v in pressure.items() if v >= top * 0.98]
    short = []
    for k in hot:
        s = k[len(model):] if model != "?" and k.startswith(model) else k
        s = re.sub(r"^Port(\d+)$", r"p\1", s)
        short.append(s)
    return f"{' '.join(short)} {top:.2f}"


# ----------------------------------------------------------------------------------------------
# Tools: llvm-mca, compiler, assembler-based ISA check
# ----------------------------------------------------------------------------------------------
def _llvm_version(path):
    """Major LLVM version from a path such as /usr/lib/llvm-17/bin/llvm-mca or llvm-mca-17."""
    m = re.search(r"llvm-mca-(\d+)$", path) or re.search(r"/llvm-(\d+)/", os.path.realpath(path))
    return int(m.group(1)) if m else 0


def find_llvm_mca():
    """$LLVM_MCA, else the newest of llvm-mca, llvm-mca-NN (PATH) and /usr/lib/llvm-*/bin/llvm-mca."""
    env = os.environ.get("LLVM_MCA")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    cands = []
    if shutil.which("llvm-mca"):
        cands.append(shutil.which("llvm-mca"))
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cands += glob.glob(os.path.join(d or ".", "llvm-mca-[0-9]*"))
    cands += glob.glob("/usr/lib/llvm-*/bin/llvm-mca")
    cands = [c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)]
    # newest first; at equal version keep the earlier (plain llvm-mca on PATH)
    return max(cands, key=lambda c: (_llvm_version(c), -cands.index(c))) if cands else None


def run(cmd, inp=None, cwd=None, timeout=120):
    try:
        p = subprocess.run(cmd, input=inp, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, "", str(e)


def mca_cpus(mca):
    rc, out, err = run([mca, f"-mtriple={TRIPLE}", "-mcpu=help"], inp="")
    return set(re.findall(r"^\s+([a-z0-9][\w.-]*)\s+- Select the", out + err, re.M))


def gas_extensions(asm):
    rc, out, err = run([asm, "--help"])
    txt = out + err
    m = re.search(r"EXTENSION is combination of.*?:(.*?)\n\s+-m", txt, re.S)
    if not m:
        return set()
    return set(re.findall(r"[a-z0-9_.]+", m.group(1).replace("(possibly \"no\"-prefixed)", "")))


# CPUs newer than some compilers (GCC 12 has no -march=znver4): the same ISA as flags of an older one
GCC_MARCH_FALLBACK = {
    "znver4": ["-march=znver3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512cd",
               "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi", "-mavx512vbmi2", "-mavx512ifma",
               "-mavx512bitalg", "-mavx512vpopcntdq", "-mgfni", "-mvaes", "-mvpclmulqdq"],
}


def cpu_gas_march(cc, cpu, exts):
    """gas -march string for the ISA extensions gcc enables with -march=CPU, or None."""
    rc, out, err = run([cc, f"-march={cpu}", "-dM", "-E", "-x", "c", os.devnull])
    if rc != 0 and cpu in GCC_MARCH_FALLBACK:
        rc, out, err = run([cc] + GCC_MARCH_FALLBACK[cpu] + ["-dM", "-E", "-x", "c", os.devnull])
    if rc != 0:
        return None
    feats = []
    for mac in re.findall(r"^#define __([A-Z0-9_]+)__ 1$", out, re.M):
        low = mac.lower()
        for cand in (low, low.replace("_", "."), re.sub(r"^(avx512|avx|amx)(?!_)", r"\1_", low)):
            if cand in exts:
                feats.append(cand)
                break
    return "generic64" + "".join("+" + f for f in sorted(set(feats)))


def isa_missing(asm, march, body):
    """Mnemonics of `body` that GNU as rejects for `march` ([] if all are fine, None if unknown)."""
    if not asm or not march:
        return None
    rc, out, err = run([asm, "--64", f"-march={march}", "-o", os.devnull], inp=body)
    if rc == 0:
        return []
    bad = re.findall(r"`([^']+)' is not supported on", err) + re.findall(r"unsupported instruction `([^']+)'", err)
    bad += [re.sub(r"\d+$", "", r).lstrip("%") + " registers" for r in re.findall(r"bad register name `([^']+)'", err)]
    return sorted(set(bad), key=lambda b: (b.endswith("registers"), b)) if bad else None


# ----------------------------------------------------------------------------------------------
# Main analysis
# ----------------------------------------------------------------------------------------------
def kernel_files(args):
    if args.files:
        out = []
        for f in args.files:
            p = Path(f)
            if not p.exists() and (ROOT / f).exists():
                p = ROOT / f
            if not p.exists():
                print(f"mca: no such file: {f}", file=sys.stderr)
                continue
            out.extend(sorted(p.resolve().rglob("*.c")) if p.is_dir() else [p.resolve()])
        return out, None
    x86 = ROOT / "csrc" / "x86"
    if x86.is_dir():
        return sorted(p.resolve() for p in x86.rglob("*.c")), None
    old = sorted(p.resolve() for p in (ROOT / "csrc").glob("cq_kernels_*.c"))
    return old, "note: csrc/x86/ does not exist yet; analysing the old-layout csrc/cq_kernels_*.c"


def rel(p):
    try:
        return str(Path(p).relative_to(ROOT))
    except ValueError:
        return str(p)


def fmt_table(header, rows, nleft, last_left=False):
    """Fixed-width table; the first nleft columns (and the last one with last_left) are left-aligned. A row shorter than the header
    ends in a cell that spans the remaining columns (used for 'n/a (...)')."""
    full = [header] + [r for r in rows if len(r) == len(header)]
    w = [max(len(str(r[i])) for r in full) for i in range(len(header))]
    for r in rows:
        if len(r) < len(header):
            for i in range(len(r) - 1):
                w[i] = max(w[i], len(str(r[i])))

    def line(r):
        cells = [str(c).ljust(w[i]) if i < nleft or i == len(r) - 1 and (len(r) < len(header) or last_left)
                 else str(c).rjust(w[i]) for i, c in enumerate(r)]
        return "  ".join(cells).rstrip()
    return "\n".join([line(header), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="kernel .c files or folders (default: csrc/x86/**/*.c)")
    ap.add_argument("--cpus", default=",".join(DEFAULT_CPUS), help="comma-separated llvm-mca CPU names")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--all-loops", action="store_true",
                    help="report every innermost loop with a multiply, not only the one with the most")
    ap.add_argument("--show-asm", action="store_true", help="print each analysed loop body")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--cc", default=os.environ.get("MCA_CC", "gcc"), help="compiler (default gcc)")
    ap.add_argument("--cflags", default="", help="extra compiler flags (one string)")
    ap.add_argument("--llvm-mca", dest="llvm_mca", help="llvm-mca binary (default: search PATH, /usr/lib/llvm-*/bin)")
    ap.add_argument("--selftest", action="store_true", help="check the parser and loop finder, then exit")
    args = ap.parse_args(argv)

    if args.selftest:
        return selftest()

    mca = args.llvm_mca or find_llvm_mca()
    if not mca:
        print("mca: llvm-mca not found (looked for llvm-mca, llvm-mca-NN on PATH and /usr/lib/llvm-*/bin).\n"
              "     Install it with:  apt-get install llvm   (or set LLVM_MCA=/path/to/llvm-mca)\n"
              "     Skipping the llvm-mca kernel analysis.")
        return 0
    cc = shutil.which(args.cc)
    if not cc:
        print(f"mca: compiler '{args.cc}' not found; install gcc or pass --cc.", file=sys.stderr)
        return 1
    asm = shutil.which("as")

    rc, vout, verr = run([mca, "--version"])
    mver = (re.search(r"LLVM version ([\d.]+)", vout + verr) or re.search(r"version ([\d.]+)", vout + verr))
    mver = mver.group(1) if mver else "?"
    known = mca_cpus(mca)
    cpus = []
    for c in [c.strip() for c in args.cpus.split(",") if c.strip()]:
        if known and c not in known:
            print(f"mca: llvm-mca {mver} does not know CPU '{c}'; skipped")
        else:
            cpus.append(c)
    if not cpus:
        print("mca: no CPU left to analyse")
        return 0

    files, note = kernel_files(args)
    if note:
        print(note)
    if not files:
        print("mca: no kernel sources to analyse (default: csrc/x86/**/*.c)")
        return 1

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 4))
    cache = {}

    def mca_run(cpu, text):
        key = (cpu, text)
        if key not in cache:
            cache[key] = pool.submit(run, [mca, f"-mtriple={TRIPLE}", f"-mcpu={cpu}",
                                           f"-iterations={args.iterations}", "-"], text)
        return cache[key]

    # Per CPU: the scheduling model llvm-mca uses, and the ISA (gas -march) gcc gives it.
    exts = gas_extensions(asm) if asm else set()
    probe = {c: mca_run(c, "\tvaddps\t%xmm0, %xmm1, %xmm2\n") for c in cpus}
    march_f = {c: pool.submit(cpu_gas_march, cc, c, exts) if exts else None for c in cpus}
    extra = args.cflags.split()
    comp = {f: pool.submit(run, [cc] + CFLAGS + extra + ["-S", "-o", "-", str(f)], None, str(ROOT)) for f in files}
    models = {c: parse_mca(probe[c].result()[1]).get("model", "?") for c in cpus}
    march = {c: (march_f[c].result() if march_f[c] else None) for c in cpus}

    rc_all = 0
    results = []
    for f in files:
        crc, sout, serr = comp[f].result()
        entry = {"file": rel(f), "loops": []}
        results.append(entry)
        if crc != 0:
            entry["error"] = serr.strip()
            rc_all = 1
            continue
        for lp in select_loops(parse_asm(sout), args.all_loops):
            lj = {"function": lp.func, "label": lp.label, "instructions": len(lp.ins), "multiplies": len(lp.muls),
                  "i8dot": lp.n_i8dot, "fma": lp.n_fma, "macs_per_iter": lp.macs, "counts": lp.counts,
                  "body": lp.body(), "cpus": {}, "_loop": lp}
            entry["loops"].append(lj)
            for c in cpus:
                lj["cpus"][c] = {"_isa": pool.submit(isa_missing, asm, march[c], lp.body()),
                                 "_run": mca_run(c, lp.body()), "_bound": mca_run(c, lp.bound_block())}
    # Peak issue rate of each multiply instruction seen (PEAK_BLOCK independent reg-reg copies).
    peak_ins = {}
    for e in results:
        for lj in e["loops"]:
            for i in lj["_loop"].muls:
                peak_ins.setdefault(ins_key(i), i)
    peak_blk = {k: "".join(reg_form(i, n) + "\n" for n in range(PEAK_BLOCK)) for k, i in peak_ins.items()}
    peak_f = {(k, c): (pool.submit(isa_missing, asm, march[c], peak_blk[k]), mca_run(c, peak_blk[k]))
              for k in peak_blk for c in cpus}

    # ---- collect ----
    for e in results:
        for lj in e["loops"]:
            lp = lj.pop("_loop")
            for c in cpus:
                d = lj["cpus"][c]
                bad = d.pop("_isa").result()
                rrc, rout, rerr = d.pop("_run").result()
                brc, bout, berr = d.pop("_bound").result()
                if bad:
                    d.update(status="n/a", reason=f"ISA not on this CPU: {', '.join(bad[:3])}")
                    continue
                if rrc != 0:
                    m = re.search(r"note: instruction:\s*(.*)", rerr)
                    why = ("unsupported instruction " + split_ins(m.group(1).strip())[1]) if m else \
                        (rerr.strip().splitlines() or ["error"])[0]
                    d.update(status="n/a", reason=f"llvm-mca: {why}")
                    continue
                r = parse_mca(rout)
                b = parse_mca(bout) if brc == 0 else {}
                cyc = r.get("cycles_per_iter")
                if not cyc:
                    d.update(status="n/a", reason="llvm-mca output not understood")
                    continue
                lim = b.get("block_rthroughput")
                d.update(status="ok", model=r["model"], cycles_per_iter=round(cyc, 3),
                         block_rthroughput=r.get("block_rthroughput"), ipc=r.get("ipc"),
                         macs_per_cycle=round(lp.macs / cyc, 2),
                         limit_cycles_per_iter=lim,
                         limit_macs_per_cycle=round(lp.macs / lim, 2) if lim else None,
                         pct_of_limit=round(100 * lim / cyc, 1) if lim else None,
                         busiest=busiest(r["pressure"], r["model"]), pressure=r["pressure"],
                         placeholder_schedule=r["placeholders"])
    peak = {}
    for (k, c), (isa_f, fut) in peak_f.items():
        prc, pout, _ = fut.result()
        p = parse_mca(pout) if prc == 0 and not isa_f.result() else {}
        rt = p.get("block_rthroughput")
        peak.setdefault(k, {})[c] = round(PEAK_BLOCK / rt, 2) if rt else None
    pool.shutdown()

    # ---- print ----
    print(f"llvm-mca {mver} ({mca}), {os.path.basename(cc)} {' '.join(CFLAGS + extra)}, {args.iterations} iterations")
    print("scheduling models: " + ", ".join(f"{c}={models[c]}" for c in cpus))
    shared = {}
    for c in cpus:
        shared.setdefault(models[c], []).append(c)
    for m, cs in shared.items():
        if len(cs) > 1 and m != "?":
            print(f"  note: {', '.join(cs)} all use the {m} model in this llvm-mca (identical predictions)")
    if not asm or not exts:
        print("  note: GNU as not usable: no ISA check, CPUs may be credited with instructions they lack")
    placeholder_note = set()
    for e in results:
        print(f"\n== {e['file']}")
        if "error" in e:
            print("compile failed:\n" + "\n".join("   " + l for l in e["error"].splitlines()[:15]))
            continue
        if not e["loops"]:
            print("(no loop with vector multiply instructions)")
            continue
        hdr = ["function", "loop", "cpu", "model", "ins", "i8dot", "fma", "MAC/it", "cyc/it", "RThru",
               "MAC/cyc", "limit", "%limit", "busiest"]
        rows = []
        for lj in e["loops"]:
            for c in cpus:
                d = lj["cpus"][c]
                head = [lj["function"], lj["label"], c]
                if d["status"] != "ok":
                    rows.append(head + [f"n/a ({d['reason']})"])
                    continue
                flag = ""
                if d["placeholder_schedule"]:
                    flag = "!"
                    placeholder_note.update((c, m) for m in d["placeholder_schedule"])
                rows.append(head + [d["model"] + flag, lj["instructions"], lj["i8dot"], lj["fma"], lj["macs_per_iter"],
                                    f"{d['cycles_per_iter']:.2f}", f"{d['block_rthroughput']:.2f}",
                                    f"{d['macs_per_cycle']:.1f}",
                                    f"{d['limit_macs_per_cycle']:.1f}" if d["limit_macs_per_cycle"] else "?",
                                    f"{d['pct_of_limit']:.0f}%" if d["pct_of_limit"] else "?", d["busiest"]])
        print(fmt_table(hdr, rows, 4, last_left=True))
        if args.show_asm:
            for lj in e["loops"]:
                print(f"\n-- {lj['function']} {lj['label']}:")
                print(lj["body"].rstrip())
    if peak:
        print("\nPeak issue rate per cycle (llvm-mca block RThroughput of "
              f"{PEAK_BLOCK} independent reg-reg copies; doc = approx. documented, see DOC_PEAK)")
        hdr = ["instruction"] + cpus
        rows = []
        for k in sorted(peak):
            kind = classify(peak_ins[k])
            doc = DOC_PEAK.get((kind[0], kind[2]), {})
            cells = []
            for c in cpus:
                v = peak[k].get(c)
                dv = doc.get(c, "?") if doc else "?"
                dv = "-" if dv is None else dv
                cells.append(f"{v:.2f} (doc {dv})" if v is not None else f"n/a (doc {dv})")
            rows.append([k] + cells)
        print(fmt_table(hdr, rows, 1))
    if placeholder_note:
        print("\n! llvm-mca has no real schedule for: " + ", ".join(sorted({m for _, m in placeholder_note})) +
              " (placeholder latency 100); treat those rows as meaningless.")
    print("\nMAC/it: multiply-accumulates per loop iteration (vpdpbusd zmm = 64, vpmaddubsw ymm = 32, vfmadd ps zmm = 16; "
          "vpmaddwd next to vpmaddubsw = 0).\ncyc/it: simulated cycles per iteration; RThru: llvm-mca block "
          "reciprocal throughput (resource bound, no dependencies).\nlimit: MAC/cyc if only the multiply "
          "instructions counted (llvm-mca on them alone); %limit = limit cycles / cyc/it. busiest: most "
          "loaded resource, pressure per iteration.")

    if args.json:
        out = {"llvm_mca": mca, "llvm_mca_version": mver, "iterations": args.iterations,
               "cflags": CFLAGS + extra, "cpus": {c: {"model": models[c], "gas_march": march[c]} for c in cpus},
               "peak_per_cycle": peak, "files": results}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return rc_all


# ----------------------------------------------------------------------------------------------
# Self-test (no llvm needed)
# ----------------------------------------------------------------------------------------------
SELFTEST_ASM = r"""
	.file	"t.c"
	.text
	.p2align 4
	.globl	k_mr2
	.type	k_mr2, @function
k_mr2:
.LFB1:
	.cfi_startproc
	vpbroadcastd	%eax, %zmm4
.L4:                                # outer loop (over panels)
	movq	(%rdx), %rax
	testq	%r8, %r8
	jle	.L5
	.p2align 4,,10
.L3:                                # inner loop: 3 vpdpbusd zmm
	vpxord	(%rsi){1to16}, %zmm4, %zmm5
	addq	$64, %rax
	vpdpbusd	-64(%rax), %zmm4, %zmm1
	vpdpbusd	-64(%rax), %zmm5, %zmm0
	{vex} vpdpbusd	%ymm5, %ymm6, %ymm7
	cmpq	%rax, %rdi
	jne	.L3
.L2:
	addq	$8, %rdx
	cmpq	%rcx, %r10
	jne	.L4
	ret
.L5:
	jmp	.L2                            # backward unconditional jump: not a loop
.L7:                                # second inner loop: only one multiply
	vpdpbusd	%zmm1, %zmm2, %zmm3
	decq	%rcx
	jnz	.L7
	ret
	.cfi_endproc
	.size	k_mr2, .-k_mr2
	.section	.rodata.cst4,"aM",@progbits,4
.LC0:
	.long	1065353216
	.text
	.type	f_nomul, @function
f_nomul:
.L9:
	vaddps	%ymm0, %ymm1, %ymm1
	jne	.L9
	ret
	.type	gemm_avx2, @function
gemm_avx2:
.L11:
	vpmaddubsw	%ymm8, %ymm0, %ymm8
	vpmaddwd	%ymm1, %ymm8, %ymm8
	vpaddd	%ymm8, %ymm2, %ymm2
	vfmadd231ps	(%rdi), %ymm3, %ymm4
	vfmadd231ss	%xmm3, %xmm4, %xmm5
	sub	$1, %ecx
	ja	.L11
	ret
	.type	fake_loop, @function
fake_loop:
	testq	%rdi, %rdi
	je	.L20
.L21:
	vfmadd231ps	%zmm1, %zmm2, %zmm3
	ret
.L20:
	vpdpbusd	%zmm1, %zmm2, %zmm3
	testq	%rsi, %rsi
	jne	.L21                            # backward jump, but no cycle: not a loop
	ret
"""

SELFTEST_MCA = """Iterations:        200
Instructions:      2200
Total Cycles:      2611
Total uOps:        2800

Dispatch Width:    6
uOps Per Cycle:    1.07
IPC:               0.84
Block RThroughput: 3.5


Instruction Info:
[1]: #uOps
[2]: Latency
[3]: RThroughput
[4]: MayLoad
[5]: MayStore
[6]: HasSideEffects (U)

[1]    [2]    [3]    [4]    [5]    [6]    Instructions:
 1      1     0.50                        vmovdqa32	%zmm2, %zmm1
 2      12    0.50    *                   vpdpbusd	-64(%rax), %zmm4, %zmm1
 1      100   0.25                  U     tdpbssd	%tmm1, %tmm2, %tmm3


Resources:
[0]   - ICXDivider
[1]   - ICXFPDivider
[2]   - ICXPort0
[3]   - ICXPort1
[4]   - ICXPort5


Resource pressure per iteration:
[0]    [1]    [2]    [3]    [4]
 -      -     3.54   1.95   3.54
"""


def selftest():
    fails = []

    def check(cond, what):
        if not cond:
            fails.append(what)

    funcs = parse_asm(SELFTEST_ASM)
    check([f for f, _ in funcs] == ["k_mr2", "f_nomul", "gemm_avx2", "fake_loop"],
          f"functions: {[f for f, _ in funcs]}")
    check(find_loops(dict(funcs)["fake_loop"]) == [], "backward jump without a cycle taken for a loop")
    items = dict(funcs)["k_mr2"]
    check(not any(v == ".LC0" for _, v in items), ".rodata label leaked into the function")
    check(not any(k == "ins" and v.startswith(".") for k, v in items), "directive kept")
    loops = {lab: inner for lab, _, _, inner in find_loops(items)}
    check(loops == {".L4": False, ".L3": True, ".L7": True}, f"loops of k_mr2: {loops}")
    sel = select_loops(funcs)
    check([(l.func, l.label) for l in sel] == [("k_mr2", ".L3"), ("gemm_avx2", ".L11")],
          f"selected: {[(l.func, l.label) for l in sel]}")
    if len(sel) == 2:
        a, g = sel
        check(len(a.ins) == 7 and len(a.muls) == 3 and a.n_i8dot == 3, f"k_mr2 counts {len(a.ins)} {len(a.muls)}")
        check(a.macs == 64 + 64 + 32, f"k_mr2 MACs {a.macs}")
        check(a.body().startswith(".L3:\n\tvpxord") and a.body().rstrip().endswith("jne .L3"), "k_mr2 body")
        check(a.counts == {"vpdpbusd zmm": 2, "{vex} vpdpbusd ymm": 1}, f"counts {a.counts}")
        check(g.counts == {"vpmaddubsw ymm": 1, "vpmaddwd ymm": 1, "vfmadd*ps ymm": 1, "vfmadd*ss xmm": 1},
              f"gemm_avx2 counts {g.counts}")
        bb = a.bound_block().splitlines()
        check(bb == ["vpdpbusd\t%zmm0, %zmm1, %zmm2", "vpdpbusd\t%zmm0, %zmm1, %zmm3",
                     "{vex} vpdpbusd\t%ymm0, %ymm1, %ymm4"], f"bound block {bb}")
        # vpmaddubsw ymm 32 + vpmaddwd (widening, 0) + vfmadd231ps ymm 8 + vfmadd231ss 1
        check(g.macs == 32 + 0 + 8 + 1 and g.n_i8dot == 1 and g.n_fma == 2, f"gemm_avx2 MACs {g.macs}")
    check(len(select_loops(funcs, all_loops=True)) == 3, "all-loops count")
    check(classify("vpdpbusd %xmm1, %xmm2, %xmm3")[1] == 16, "xmm vpdpbusd MACs")
    check(classify("vfmadd132pd %zmm1, %zmm2, %zmm3")[1] == 8, "pd MACs")
    check(classify("tdpbssd %tmm1, %tmm2, %tmm0")[1] == 16384, "AMX MACs")
    check(classify("vpaddd %zmm1, %zmm2, %zmm3") is None, "vpaddd is not a multiply")
    check(classify("vpermps %zmm1, %zmm2, %zmm3")[:2] == ("lut", 16), "int4 lookup: 16 MACs a zmm")
    lut = Loop("k_qc4w", ".L1", [("label", ".L1"), ("ins", "vpermps %zmm1, %zmm2, %zmm3"),
                                 ("ins", "vaddps %zmm3, %zmm4, %zmm4"), ("ins", "jne .L1")])
    other = Loop("gelu", ".L1", [("label", ".L1"), ("ins", "vpermps %zmm1, %zmm2, %zmm3"), ("ins", "jne .L1")])
    check(lut.macs == 16 and other.muls == [], "vpermps is a multiply in qc4w GEMVs only")
    check(reg_form("pmaddubsw (%rax), %xmm3", 0) == "pmaddubsw\t%xmm0, %xmm2", "SSE reg form")
    r = parse_mca(SELFTEST_MCA)
    check(r.get("total_cycles") == 2611 and r.get("iterations") == 200 and r.get("block_rthroughput") == 3.5,
          f"mca numbers {r}")
    check(abs(r.get("cycles_per_iter", 0) - 13.055) < 1e-9, "cycles per iteration")
    check(r["model"] == "ICX", f"model {r['model']}")
    check(r["pressure"].get("ICXPort0") == 3.54 and r["pressure"].get("ICXDivider") == 0.0, f"pressure {r['pressure']}")
    check(busiest(r["pressure"], "ICX") == "p0 p5 3.54", f"busiest {busiest(r['pressure'], 'ICX')}")
    check(r["placeholders"] == ["tdpbssd"], f"placeholders {r['placeholders']}")
    check(model_prefix(["Zn3AGU0", "Zn3BRU1", "Zn3FPP0"]) == "Zn3", "Zn3 model prefix")
    z = parse_mca("Resources:\n[0]   - Zn3FPP0\n[1.0] - Zn3FPP45\n[1.1] - Zn3FPP45\n[2]   - Zn3FPP1\n\n\n"
                  "Resource pressure per iteration:\n[0]    [1.0]  [1.1]  [2]\n 4.00   -     0.50   4.00\n")
    check(z["pressure"] == {"Zn3FPP0": 4.0, "Zn3FPP45.0": 0.0, "Zn3FPP45.1": 0.5, "Zn3FPP1": 4.0},
          f"grouped pressure {z['pressure']}")
    check(ins_key("vfnmadd132ps (%rax), %ymm1, %ymm2") == "vfmadd*ps ymm", "FMA key")
    check(model_prefix(["SKXDivider", "SKXFPDivider", "SKXPort0"]) == "SKX", "SKX model prefix")
    if fails:
        print("mca selftest FAILED:\n  " + "\n  ".join(fails))
        return 1
    print("mca selftest passed")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:          # output piped into head & co.
        sys.stderr.close()
        sys.exit(0)
