"""The package's import structure: optional heavy dependencies stay lazy, cquant's own modules import
each other at module level without cycles, and the only function-level imports of cquant's own
modules are the marked optional-dependency ones (a torch-free module reaching a torch-only one)."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "python", "cquant")

HEAVY = ("torch", "transformers", "safetensors", "tqdm", "ray")
# modules that import torch at top level (they may import each other there)
TORCH_ONLY = {"cquant.qat", "cquant.adapters.hf"}
MARK = "# optional dependency"


def _modules():
    """{dotted name: path} of every module of the package (packages as their __init__)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(PKG):
        dirnames[:] = [d for d in dirnames if not d.startswith(("_", "."))]
        rel = os.path.relpath(dirpath, os.path.dirname(PKG)).replace(os.sep, ".")
        for f in filenames:
            if f.endswith(".py"):
                out[rel if f == "__init__.py" else f"{rel}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _torch_only(name):
    return name in TORCH_ONLY or name.startswith("cquant.adapters.torch")


TORCH_FREE = sorted(m for m in MODULES if not _torch_only(m) and m != "cquant.__main__")


def _resolve(module, node):
    """The cquant modules a relative ``from`` import names (``from . import a, b`` -> both)."""
    if node.level == 0:
        return [node.module] if node.module and node.module.split(".")[0] == "cquant" else []
    is_pkg = MODULES.get(module, "").endswith("__init__.py")
    parts = module.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    if node.module:
        return [target]
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def _imports(module, nodes):
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            out += [(node, t) for t in _resolve(module, node)]
        elif isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if a.name.split(".")[0] == "cquant"]
    return out


def _module_level(tree):
    """Statements that run on import: the module body, including try/if/with blocks, not functions."""
    stack, out = list(tree.body), []
    while stack:
        node = stack.pop()
        out.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack += list(ast.iter_child_nodes(node))
    return out


def _function_level(tree):
    """Relative imports inside functions (cquant.bench's guarded ``import cquant`` in its benchmark
    child, which reports a broken build instead of failing, is absolute and deliberate)."""
    out = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in fn.body:
                for n in ast.walk(stmt):
                    if isinstance(n, ast.ImportFrom) and n.level > 0:
                        out[id(n)] = n
    return sorted(out.values(), key=lambda n: n.lineno)


def _graph():
    graph = {}
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps = {t for _n, t in _imports(name, _module_level(tree)) if t in MODULES and t != name}
        # importing a submodule runs its package's __init__ first (but never the other way round)
        graph[name] = deps
    return graph


def test_no_import_cycle_in_module_level_imports():
    graph = _graph()
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle = path[path.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_torch_free_modules_import_no_torch_only_module_at_top_level():
    graph = _graph()
    bad = [(m, d) for m in TORCH_FREE for d in graph[m] if _torch_only(d)]
    assert not bad, f"torch-free modules importing torch-only ones at module level: {bad}"


def test_function_level_imports_of_cquant_modules_are_marked_optional():
    found = []
    for name, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as f:
            src = f.read()
        lines = src.splitlines()
        for node, target in _imports(name, _function_level(ast.parse(src, path))):
            text = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if MARK not in text:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {text.strip()}")
            elif _torch_only(name) or not _torch_only(target):
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: marked optional, but {target} "
                             f"needs no optional dependency {name} lacks: {text.strip()}")
    assert not found, "function-level imports of cquant modules (move them to module level, or break the " \
                      "cycle that needs them):\n" + "\n".join(found)


def _run(code):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _import_in_fresh_interpreters(orders):
    """Import each list of modules, in its order, in a fresh interpreter of its own (several at once)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    failed, pending = [], list(orders)
    while pending:
        batch, pending = pending[:8], pending[8:]
        procs = [(order, subprocess.Popen(
            [sys.executable, "-c", "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % (order,)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)) for order in batch]
        for order, proc in procs:
            _out, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                failed.append(f"{order}: {err[-2000:]}")
    assert not failed, "\n".join(failed)


def test_import_does_not_import_heavy_dependencies():
    mods = ["cquant", "cquant.io", "cquant.quantization", "cquant.cli", "cquant.bert", "cquant.smoothing",
            "cquant.calibration", "cquant.compare", "cquant.budget", "cquant.embedding", "cquant.frontends",
            "cquant.scheme", "cquant.nn"]
    mods += [m for m in TORCH_FREE if m not in mods]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "assert not heavy, f'imported at import time: {heavy}'\n")
    _run(code)


def test_each_torch_free_module_imports_alone_and_in_any_order():
    """Each module first in a fresh interpreter (a cycle shows as a partially initialized module),
    then all of them in a few orders."""
    orders = [[m] for m in TORCH_FREE]
    orders += [TORCH_FREE, TORCH_FREE[::-1], TORCH_FREE[1::2] + TORCH_FREE[::2],
               TORCH_FREE[::-2] + TORCH_FREE[-2::-2]]
    _import_in_fresh_interpreters(orders)


def test_torch_modules_import_in_both_orders():
    pytest.importorskip("torch", reason="torch is not installed (optional)")
    mods = sorted(m for m in MODULES if _torch_only(m))
    # forward and reverse: of two modules in a cycle, each is imported first once (torch takes seconds
    # to import, so not each alone; test_no_import_cycle_in_module_level_imports covers the rest)
    orders = [mods, mods[::-1]]
    _import_in_fresh_interpreters(orders)


def test_moved_names_keep_their_old_import_paths():
    from cquant import bert, checkpoint_file, errors, io
    assert io.CheckpointError is errors.CheckpointError is checkpoint_file.CheckpointError
    for name in ("SafetensorsReader", "ShardedReader", "StreamWriter", "atomic_path", "open_checkpoint",
                 "resolve_checkpoint", "FORMAT_VERSION", "INDEX_SUFFIX", "KEY_LAYERS", "KEY_VERSION",
                 "KEY_CQ_VERSION", "KEY_MODEL", "KEY_TIED", "TensorInfo", "BF16Bits", "bf16_to_f32",
                 "st_dtype", "_ST_SIZE", "_ST_TO_NP"):
        assert getattr(io, name) is getattr(checkpoint_file, name), name
    assert bert.SafetensorsReader is io.SafetensorsReader
