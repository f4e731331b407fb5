"""Hostile and lying inputs (issue 12): checkpoints whose metadata or header lies, pickles of
QuantizedWeight, paths that are links, directories or FIFOs, CQUANT_NUM_THREADS spellings and
unaligned arrays. Every one must end in a clear cquant exception (CheckpointError naming the file
and the field) or, for the CLI, one line and exit status 2: never a crash, traceback, hang, lost
file or half-modified model."""
import copy
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import cquant
from cquant import cli, errors, ops
from cquant.io import (KEY_LAYERS, KEY_MODEL, KEY_VERSION, Checkpoint, CheckpointError, SafetensorsReader,
                       StreamWriter, st_dtype)
from cquant.quantization import QuantizedLinearForward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ---- helpers -------------------------------------------------------------------------------------

def write_st(path, arrays, metadata=None):
    """A safetensors file from numpy arrays, with cquant's streaming writer (no safetensors package)."""
    with open(path, "wb") as f:
        w = StreamWriter(f, [(k, st_dtype(v), v.shape) for k, v in arrays.items()], metadata)
        for k, v in arrays.items():
            w.write(k, np.ascontiguousarray(v))
        w.close()


def read_st(path):
    with SafetensorsReader(path) as r:
        return {k: np.array(r.tensor(k)) for k in r.infos}, dict(r.metadata)


def raw_st(path, header, data=b"", pad=True):
    """A file with a hand-written JSON header (anything, valid or not) and data bytes."""
    hdr = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        hdr += b" " * (-len(hdr) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + data)


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_exit_2(rc, err):
    assert rc == 2, err
    assert err.startswith("cquant: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def small_checkpoint(tmp_path, bias=True, name="ck.safetensors", mode="dynamic", granularity="per_channel",
                     group_size=None):
    """A valid cquant checkpoint of one layer 'fc' (8, 16) plus one other tensor."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    qw = ops.quantize_weight(w, granularity, group_size)
    b = rng.standard_normal(8).astype(np.float32) if bias else None
    p = tmp_path / name
    cquant.save({"fc": QuantizedLinearForward(qw, b, mode), "other": np.arange(3, dtype=np.float32)}, p)
    return p


def rewrite(src, dst, meta=None, tensors=None):
    """Copy a checkpoint, changing its metadata (``meta(dict)``) and/or tensors (``tensors(dict)``)."""
    arrays, metadata = read_st(src)
    if meta is not None:
        meta(metadata)
    if tensors is not None:
        tensors(arrays)
    write_st(dst, arrays, metadata)
    return dst


def set_layer_field(field, value):
    def f(md):
        layers = json.loads(md[KEY_LAYERS])
        if value is _DELETE:
            del layers["fc"][field]
        else:
            layers["fc"][field] = value
        md[KEY_LAYERS] = json.dumps(layers)
    return f


_DELETE = object()


# ---- 1. the CLI must not overwrite its input through a link ----------------------------------------

@pytest.mark.parametrize("how", ["symlink_in", "symlink_out", "hardlink", "dotdot"])
def test_quantize_refuses_to_overwrite_its_input_through_a_link(tmp_path, capsys, how):
    real = tmp_path / "real.safetensors"
    write_st(real, {"fc.weight": np.ones((8, 16), np.float32)})
    before = real.read_bytes()
    alias = tmp_path / "alias.safetensors"
    if how == "symlink_in":      # cquant quantize alias -o real
        alias.symlink_to(real)
        src, dst = alias, real
    elif how == "symlink_out":   # cquant quantize real -o alias (the output link points at the input)
        alias.symlink_to(real)
        src, dst = real, alias
    elif how == "hardlink":
        os.link(real, alias)
        src, dst = alias, real
    else:
        (tmp_path / "sub").mkdir()
        src, dst = real, tmp_path / "sub" / ".." / "real.safetensors"
    rc, _, err = run_cli(["quantize", src, "-o", dst], capsys)
    assert_one_line_exit_2(rc, err)
    assert "the same file" in err
    assert real.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- 2. cquant.load: an explicit registry, bounded allocation, CheckpointError for everything -------

def _bert_checkpoint(tmp_path):
    from cquant.bert import BertConfig, BertModel
    cfg = BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=6)
    m = BertModel(cfg)
    rng = np.random.default_rng(0)
    for p in m.state_dict().values():
        p[...] = 0.1 * rng.standard_normal(p.shape)
    cquant.Quantizer.quantize_dynamic(m)
    path = tmp_path / "bert.safetensors"
    cquant.save(m, path)
    return path, m


def _set_model(path, dst, fn):
    def f(md):
        spec = json.loads(md[KEY_MODEL])
        fn(spec)
        md[KEY_MODEL] = json.dumps(spec)
    return rewrite(path, dst, meta=f)


def test_load_rebuilds_registered_class_only(tmp_path):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path, m = _bert_checkpoint(tmp_path)
    ids = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(cquant.load(path)(ids), m(ids))        # the registered BertModel builds
    for cls in ("cquant.__main__:X", "cquant.cli:main", "os:system", "cquant.bert:BertConfig",
                "cquant.bert:BertModel.__init__"):
        bad = _set_model(path, tmp_path / "bad.safetensors", lambda s: s.__setitem__("class", cls))
        with pytest.raises(CheckpointError, match=r"bad\.safetensors.*'class'.*not a class cquant\.load may build"):
            cquant.load(bad)
    assert isinstance(cquant.load(bad, build=False), Checkpoint)          # the tensors are still readable


def test_load_refuses_main_module_without_running_it(tmp_path):
    """cquant.__main__ runs the CLI on import (and exits): it must never be imported by load."""
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path, _ = _bert_checkpoint(tmp_path)
    bad = _set_model(path, tmp_path / "main.safetensors", lambda s: s.__setitem__("class", "cquant.__main__:X"))
    code = textwrap.dedent(f"""
        import sys, cquant
        try:
            cquant.load({str(bad)!r})
        except cquant.io.CheckpointError as e:
            print("refused:", e)
        print("main imported:", "cquant.__main__" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "main imported: False" in r.stdout, r.stdout


@pytest.mark.parametrize("field, value", [("vocab_size", 250_000_000), ("vocab_size", 2.5e8),
                                          ("hidden_size", 100_000), ("max_position_embeddings", 10**9),
                                          ("num_hidden_layers", 10**6), ("intermediate_size", 10**8),
                                          ("type_vocab_size", -1), ("num_hidden_layers", True)])
def test_load_validates_config_against_tensors_before_allocating(tmp_path, field, value):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path, _ = _bert_checkpoint(tmp_path)
    bad = _set_model(path, tmp_path / "big.safetensors", lambda s: s["config"].__setitem__(field, value))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=rf"big\.safetensors.*{field}"):
            cquant.load(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak                     # a 396-byte lie must not cost a gigabyte


@pytest.mark.parametrize("case", [
    "layers_list", "layers_string", "layer_not_object", "mode_missing", "granularity_missing", "shape_missing",
    "bias_missing", "shape_strings", "shape_three", "group_size_string", "group_size_on_per_channel",
    "layout_unknown", "layers_bad_json", "model_bad_json", "model_list", "model_no_class", "model_class_int",
    "config_list", "config_unknown_field", "smoothed_not_list", "version_2",
])
def test_malformed_metadata_is_a_checkpoint_error_naming_file_and_field(tmp_path, case):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    if case.startswith(("model", "config", "smoothed")):
        path, _ = _bert_checkpoint(tmp_path)
    else:
        path = small_checkpoint(tmp_path)
    layer = set_layer_field
    mutate = {
        "layers_list": (lambda md: md.__setitem__(KEY_LAYERS, "[1, 2]"), KEY_LAYERS),
        "layers_string": (lambda md: md.__setitem__(KEY_LAYERS, '"fc"'), KEY_LAYERS),
        "layer_not_object": (lambda md: md.__setitem__(KEY_LAYERS, '{"fc": 3}'), "'fc'"),
        "mode_missing": (layer("mode", _DELETE), "'mode'"),
        "granularity_missing": (layer("granularity", _DELETE), "'granularity'"),
        "shape_missing": (layer("shape", _DELETE), "'shape'"),
        "bias_missing": (layer("bias", _DELETE), "'bias'"),
        "shape_strings": (layer("shape", ["8", "16"]), "'shape'"),
        "shape_three": (layer("shape", [8, 16, 1]), "'shape'"),
        "group_size_string": (lambda md: (layer("granularity", "per_group")(md), layer("group_size", "8")(md)),
                              "'group_size'"),
        "group_size_on_per_channel": (layer("group_size", 8), "'group_size'"),
        "layout_unknown": (layer("layout", "sideways"), "'layout'"),
        "layers_bad_json": (lambda md: md.__setitem__(KEY_LAYERS, "{"), KEY_LAYERS),
        "model_bad_json": (lambda md: md.__setitem__(KEY_MODEL, "{"), KEY_MODEL),
        "model_list": (lambda md: md.__setitem__(KEY_MODEL, "[]"), KEY_MODEL),
        "model_no_class": (lambda md: md.__setitem__(KEY_MODEL, '{"config": {}}'), "class"),
        "model_class_int": (lambda md: md.__setitem__(KEY_MODEL, '{"class": 3}'), "class"),
        "config_list": (lambda md: md.__setitem__(KEY_MODEL, json.dumps(
            {"class": "cquant.bert:BertModel", "config": [1]})), "'config'"),
        "config_unknown_field": (lambda md: md.__setitem__(KEY_MODEL, json.dumps(
            {"class": "cquant.bert:BertModel", "config": {**json.loads(md[KEY_MODEL])["config"], "bogus": 1}})),
            "'config'"),
        "smoothed_not_list": (lambda md: md.__setitem__(KEY_MODEL, json.dumps(
            {"class": "cquant.bert:BertModel", "config": {**json.loads(md[KEY_MODEL])["config"], "smoothed": 5}})),
            "'smoothed'"),
        "version_2": (lambda md: md.__setitem__(KEY_VERSION, "2"), "version 2"),
    }[case]
    bad = rewrite(path, tmp_path / "bad.safetensors", meta=mutate[0])
    with pytest.raises(CheckpointError) as ei:
        cquant.load(bad)
    msg = str(ei.value)
    assert str(bad) in msg and mutate[1] in msg, msg


# ---- 3. pickles of QuantizedWeight are validated like __init__ ---------------------------------------

class _Evil:
    """Pickles as a QuantizedWeight with the given state (what a hostile pickle can hold)."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (ops.QuantizedWeight.__new__, (ops.QuantizedWeight,), self.state)


def _state(qw, **changes):
    st = qw.__getstate__()
    st.update(changes)
    return st


def test_pickle_roundtrip_still_works():
    qw = ops.quantize_weight(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), "per_group", 8)
    for back in (pickle.loads(pickle.dumps(qw)), copy.deepcopy(qw)):
        np.testing.assert_array_equal(back.q, qw.q)
        x = np.ones((2, 16), np.float32)
        np.testing.assert_array_equal(ops.linear(x, back), ops.linear(x, qw))


def test_pickle_with_shape_larger_than_its_buffer_is_refused_not_a_crash():
    """Before: the state was set as is, and linear read 65536 x 65536 codes out of 256 bytes (SIGSEGV).
    Run in a child so that a crash cannot take pytest down."""
    code = textwrap.dedent("""
        import pickle, numpy as np, cquant
        from cquant import ops
        qw = ops.quantize_weight(np.ones((16, 16), np.float32))
        st = qw.__getstate__()
        st["shape"] = (65536, 65536)
        st["scale"] = np.ones(65536, np.float32)
        class Evil:
            def __reduce__(self):
                return (ops.QuantizedWeight.__new__, (ops.QuantizedWeight,), st)
        data = pickle.dumps(Evil())
        try:
            w = pickle.loads(data)
        except cquant.QuantizationError as e:
            print("refused:", type(e).__name__, e)
        else:
            ops.linear(np.ones((1, 65536), np.float32), w)
            print("ran")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.startswith("refused: ValueError"), r.stdout


@pytest.mark.parametrize("case", ["scale_int64", "scale_list", "packed_int16", "packed_list", "shape_floats",
                                  "shape_3d", "granularity_bad", "group_size_str", "scale_shape", "scale_nan",
                                  "codes_minus_128", "sums_tampered", "header_shape_lie", "missing_key",
                                  "not_a_dict", "truncated_packed"])
def test_pickle_state_is_validated(case):
    qw = ops.quantize_weight(np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32))
    packed = qw.packed.copy()
    st = {
        "scale_int64": lambda: _state(qw, scale=qw.scale.astype(np.int64)),
        "scale_list": lambda: _state(qw, scale=list(qw.scale)),
        "packed_int16": lambda: _state(qw, packed=packed.astype(np.int16)),
        "packed_list": lambda: _state(qw, packed=list(packed)),
        "shape_floats": lambda: _state(qw, shape=(8.0, 16.0)),
        "shape_3d": lambda: _state(qw, shape=(8, 16, 1)),
        "granularity_bad": lambda: _state(qw, granularity="per_row"),
        "group_size_str": lambda: _state(qw, granularity="per_group", group_size="8"),
        "scale_shape": lambda: _state(qw, scale=np.ones(3, np.float32)),
        "scale_nan": lambda: _state(qw, scale=np.full(8, np.nan, np.float32)),
        "codes_minus_128": lambda: _state(qw, packed=_with_code(packed, -128)),
        "sums_tampered": lambda: _state(qw, packed=_with_code(packed, 5, at=-1)),
        "header_shape_lie": lambda: _state(qw, shape=(4, 16), scale=np.ones(4, np.float32)),
        "missing_key": lambda: {k: v for k, v in qw.__getstate__().items() if k != "scale"},
        "not_a_dict": lambda: [1, 2, 3],
        "truncated_packed": lambda: _state(qw, packed=packed[:-4]),
    }[case]()
    with pytest.raises(errors.QuantizationError):
        pickle.loads(pickle.dumps(_Evil(st)))


def _with_code(packed, value, at=None):
    """A copy of a packed buffer with one byte changed: a code (just past the 64-byte header) or,
    with at=-1, the last byte (column sums or padding)."""
    p = packed.copy()
    p[64 if at is None else at] = np.int8(value) if value != 5 else np.int8(p[at] ^ 5)
    return p


# ---- 4. load_into a duck-typed model: validated first, atomic, no dunder paths ----------------------

class Dense:
    def __init__(self, n, k, seed=0):
        rng = np.random.default_rng(seed)
        self.weight = rng.standard_normal((n, k)).astype(np.float32)
        self.bias = np.zeros(n, np.float32)

    def forward(self, x):
        return x @ self.weight.T + self.bias


def _layer(n, k, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return QuantizedLinearForward(ops.quantize_weight(w), np.ones(n, np.float32), "dynamic")


def _snapshot(model):
    return [(id(layer), dict(vars(layer))) for layer in model["layers"]]


def test_load_into_duck_missing_layer_leaves_model_untouched():
    model = {"layers": [Dense(8, 16), Dense(8, 16)]}
    before = _snapshot(model)
    ck = Checkpoint(layers={"layers.0": _layer(8, 16), "layers.5": _layer(8, 16)})
    with pytest.raises(CheckpointError, match="layers.5"):
        cquant.load_into(model, ck)
    assert _snapshot(model) == before and "forward" not in vars(model["layers"][0])


def test_load_into_duck_checks_shapes():
    model = {"layers": [Dense(8, 16)]}
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"\(3, 5\).*\(8, 16\)"):
        cquant.load_into(model, Checkpoint(layers={"layers.0": _layer(3, 5)}))
    assert _snapshot(model) == before
    cquant.load_into(model, Checkpoint(layers={"layers.0": _layer(8, 16)}))
    assert model["layers"][0].weight is None and model["layers"][0].forward(np.ones((1, 16), np.float32)).shape == (1, 8)


@pytest.mark.parametrize("name", ["a.__class__", "a._private", "a.__dict__", "a.forward", "a..b", "a.weight"])
def test_load_into_duck_refuses_dunder_private_and_non_layer_paths(name):
    class Holder:
        pass

    h = Holder()
    h.a = Dense(8, 16)
    fwd_before = Dense.forward
    with pytest.raises(CheckpointError):
        cquant.load_into(h, Checkpoint(layers={name: _layer(8, 16)}))
    assert Dense.forward is fwd_before and "forward" not in vars(h.a)
    assert Dense(8, 16).forward.__func__ is fwd_before


def test_load_into_duck_rolls_back_when_an_install_fails():
    class Frozen(Dense):
        def __setattr__(self, name, value):
            if name == "forward" and getattr(self, "_frozen", False):
                raise AttributeError("read-only")
            object.__setattr__(self, name, value)

    good, frozen = Dense(8, 16), Frozen(8, 16)
    frozen._frozen = True
    model = {"layers": [good, frozen]}
    before = _snapshot(model)
    with pytest.raises(AttributeError):
        cquant.load_into(model, Checkpoint(layers={"layers.0": _layer(8, 16), "layers.1": _layer(8, 16)}))
    assert _snapshot(model) == before


# ---- 5. lying layer tensors ---------------------------------------------------------------------------

@pytest.mark.parametrize("case, match", [
    ("bias_true_no_tensor", "bias"),
    ("scale_nan", "NaN"),
    ("scale_inf", "Inf"),
    ("scale_negative", "negative"),
    ("scale_int64", "dtype I64"),
    ("bias_int32", "dtype I32"),
    ("bias_nan", "NaN"),
    ("codes_minus_128", "-128"),
    ("codes_int16", "dtype I16"),
    ("scale_count", r"shape \[3\]"),
    ("codes_shape", "shape"),
    ("weight_q_missing", "weight_q"),
])
def test_lying_layer_tensors_are_refused(tmp_path, case, match):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path = small_checkpoint(tmp_path, bias=case != "bias_true_no_tensor")

    def t(arrays):
        if case == "bias_true_no_tensor":
            pass
        elif case == "scale_nan":
            arrays["fc.weight_scale"][2] = np.nan
        elif case == "scale_inf":
            arrays["fc.weight_scale"][0] = np.inf
        elif case == "scale_negative":
            arrays["fc.weight_scale"][0] *= -1
        elif case == "scale_int64":
            arrays["fc.weight_scale"] = np.ones(8, np.int64)
        elif case == "bias_int32":
            arrays["fc.bias"] = np.ones(8, np.int32)
        elif case == "bias_nan":
            arrays["fc.bias"][1] = np.nan
        elif case == "codes_minus_128":
            arrays["fc.weight_q"][0, 0] = -128
        elif case == "codes_int16":
            arrays["fc.weight_q"] = arrays["fc.weight_q"].astype(np.int16)
        elif case == "scale_count":
            arrays["fc.weight_scale"] = np.ones(3, np.float32)
        elif case == "codes_shape":
            arrays["fc.weight_q"] = np.ones((16, 8), np.int8)
        elif case == "weight_q_missing":
            del arrays["fc.weight_q"]

    meta = set_layer_field("bias", True) if case == "bias_true_no_tensor" else None
    bad = rewrite(path, tmp_path / "bad.safetensors", meta=meta, tensors=t)
    with pytest.raises(CheckpointError, match=match) as ei:
        cquant.load(bad)
    assert str(bad) in str(ei.value)


def test_float_bias_of_other_precision_still_loads(tmp_path):
    """`cquant quantize` copies a float16 bias as it was: that is not a lie."""
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path = small_checkpoint(tmp_path)
    ok = rewrite(path, tmp_path / "f16.safetensors",
                 tensors=lambda a: a.__setitem__("fc.bias", a["fc.bias"].astype(np.float16)))
    ck = cquant.load(ok)
    assert ck.layers["fc"].bias.dtype == np.float32


# ---- 6. hostile safetensors headers (the CLI's reader, also used by load) -----------------------------

def _hostile_header(case):
    if case == "shape_2_70":
        return {"w.weight": {"dtype": "F32", "shape": [2**70, 1], "data_offsets": [0, 16]}}, b"\0" * 16
    if case == "shape_2_62_plus_1":   # (2**62 + 1) * 4 * 4 bytes wraps to 16 in int64
        return {"w.weight": {"dtype": "F32", "shape": [2**62 + 1, 4], "data_offsets": [0, 16]}}, b"\0" * 16
    if case == "shape_2_32_squared":  # 2**64 elements wrap to 0
        return {"w.weight": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, b""
    if case == "wrapped_copied":      # a copied (non-quantized) tensor whose shape wraps
        return {"x": {"dtype": "I64", "shape": [2**61, 1], "data_offsets": [0, 0]},
                "w.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 64
    if case == "nested":
        return b"{" + b'"a":' * 0 + b"[" * 100000 + b"]" * 100000 + b"}", b""
    if case == "nested_value":
        return b'{"w": ' + b"[" * 100000 + b"]" * 100000 + b"}", b""
    if case == "float_shape":
        return {"w.weight": {"dtype": "F32", "shape": [8.7, 16], "data_offsets": [0, 512]}}, b"\0" * 512
    if case == "bool_shape":
        return {"w.weight": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, b"\0" * 16
    if case == "overlap":
        return {"a.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                "b.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [16, 48]}}, b"\0" * 48
    if case == "same_bytes":
        return {"a.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                "b.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, b"\0" * 32
    if case == "gap":
        return {"a.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                "b.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [40, 72]}}, b"\0" * 72
    if case == "trailing":
        return {"a.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, b"\0" * 40
    if case == "negative_offset":
        return {"a.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [-32, 0]}}, b""
    if case == "dtype_list":
        return {"a.weight": {"dtype": ["F32"], "shape": [2, 4], "data_offsets": [0, 32]}}, b"\0" * 32
    if case == "entry_list":
        return {"a.weight": [1, 2, 3]}, b""
    if case == "duplicate_key":
        one = '{"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}'
        return ('{"a.weight": ' + one + ', "a.weight": ' + one + "}").encode(), b"\0" * 32
    if case == "too_many_dims":
        return {"a": {"dtype": "U8", "shape": [1] * 100, "data_offsets": [0, 1]}}, b"\0"
    if case == "huge_int":
        return b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}', b"\0"
    if case == "metadata_list":
        return {"__metadata__": [1], "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
    raise AssertionError(case)


HOSTILE_HEADERS = ["shape_2_70", "shape_2_62_plus_1", "shape_2_32_squared", "wrapped_copied", "nested",
                   "nested_value", "float_shape", "bool_shape", "overlap", "same_bytes", "gap", "trailing",
                   "negative_offset", "dtype_list", "entry_list", "duplicate_key", "too_many_dims", "huge_int",
                   "metadata_list"]


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_cli_hostile_header_one_line_exit_2(tmp_path, capsys, case):
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    header, data = _hostile_header(case)
    raw_st(src, header, data)
    for argv in (["quantize", src, "-o", dst], ["report", src]):
        rc, _, err = run_cli(argv, capsys)
        assert_one_line_exit_2(rc, err)
        assert str(src) in err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_load_hostile_header_is_checkpoint_error(tmp_path, case):
    src = tmp_path / "in.safetensors"
    header, data = _hostile_header(case)
    raw_st(src, header, data)
    with pytest.raises(CheckpointError, match="in.safetensors"):
        cquant.load(src)


def test_reader_still_accepts_empty_tensors_and_scalars(tmp_path):
    p = tmp_path / "ok.safetensors"
    write_st(p, {"e": np.zeros((0, 4), np.float32), "s": np.array(2.5, np.float64), "e2": np.zeros((3, 0), np.int8),
                 "a": np.arange(6, dtype=np.int16).reshape(2, 3)})
    arrays, _ = read_st(p)
    assert arrays["e"].shape == (0, 4) and arrays["s"] == 2.5 and arrays["a"][1, 2] == 5


# ---- 7. cquant report validates cquant checkpoints as load does ---------------------------------------

@pytest.mark.parametrize("case", ["layers_list", "granularity_missing", "weight_q_missing", "reference_shape",
                                  "codes_minus_128", "mode_fast", "granularity_per_row", "scale_count",
                                  "version_2", "scale_nan", "reference_nonfloat"])
def test_report_validates_cquant_checkpoints(tmp_path, capsys, case):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path = small_checkpoint(tmp_path)
    ref = tmp_path / "ref.safetensors"
    write_st(ref, {"fc.weight": np.ones((8, 16), np.float32)})
    meta, tensors, extra = None, None, []
    if case == "layers_list":
        meta = lambda md: md.__setitem__(KEY_LAYERS, "[1]")  # noqa: E731
    elif case == "granularity_missing":
        meta = set_layer_field("granularity", _DELETE)
    elif case == "weight_q_missing":
        tensors = lambda a: a.pop("fc.weight_q")  # noqa: E731
    elif case == "reference_shape":
        write_st(ref, {"fc.weight": np.ones((5, 3), np.float32)})
        extra = ["--reference", ref]
    elif case == "reference_nonfloat":
        write_st(ref, {"fc.weight": np.ones((8, 16), np.int64)})
        extra = ["--reference", ref]
    elif case == "codes_minus_128":
        tensors = lambda a: a["fc.weight_q"].__setitem__((1, 1), -128)  # noqa: E731
    elif case == "mode_fast":
        meta = set_layer_field("mode", "fast")
    elif case == "granularity_per_row":
        meta = set_layer_field("granularity", "per_row")
    elif case == "scale_count":
        tensors = lambda a: a.__setitem__("fc.weight_scale", np.ones(3, np.float32))  # noqa: E731
    elif case == "version_2":
        meta = lambda md: md.__setitem__(KEY_VERSION, "2")  # noqa: E731
    elif case == "scale_nan":
        tensors = lambda a: a["fc.weight_scale"].__setitem__(0, np.nan)  # noqa: E731
    bad = rewrite(path, tmp_path / "bad.safetensors", meta=meta, tensors=tensors)
    rc, out, err = run_cli(["report", bad] + extra, capsys)
    assert_one_line_exit_2(rc, err)


def test_report_of_a_valid_checkpoint_with_reference(tmp_path, capsys):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path = small_checkpoint(tmp_path)
    ref = tmp_path / "ref.safetensors"
    write_st(ref, {"fc.weight": np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)})
    rc, out, err = run_cli(["report", path, "--reference", ref], capsys)
    assert rc == 0, err
    assert "fc" in out and "8x16" in out


# ---- 8. no temporary file left behind, and messages name the user's path ------------------------------

def test_output_is_a_directory(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    write_st(src, {"fc.weight": np.ones((8, 16), np.float32)})
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    rc, _, err = run_cli(["quantize", src, "-o", outdir], capsys)
    assert_one_line_exit_2(rc, err)
    assert str(outdir) in err and ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "outdir"]
    assert list(outdir.iterdir()) == []


def test_save_to_a_directory_leaves_nothing(tmp_path):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    d = tmp_path / "d"
    d.mkdir()
    qw = ops.quantize_weight(np.ones((4, 8), np.float32))
    with pytest.raises(CheckpointError, match="is a directory") as ei:
        cquant.save({"fc": QuantizedLinearForward(qw, None, "dynamic")}, d)
    assert ".tmp" not in str(ei.value)
    assert [p.name for p in tmp_path.iterdir()] == ["d"] and list(d.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_output_is_a_fifo_or_device_is_refused(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    write_st(src, {"fc.weight": np.ones((8, 16), np.float32)})
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    rc, _, err = run_cli(["quantize", src, "-o", fifo], capsys)
    assert_one_line_exit_2(rc, err)
    assert "not a regular file" in err
    import stat
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)       # not replaced by a regular file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_through_a_symlink_writes_the_target(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    write_st(src, {"fc.weight": np.ones((8, 16), np.float32)})
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "q.safetensors"
    link = tmp_path / "q.safetensors"
    link.symlink_to(target)
    rc, _, err = run_cli(["quantize", src, "-o", link, "-q"], capsys)
    assert rc == 0, err
    assert link.is_symlink() and target.is_file()
    with SafetensorsReader(target) as r:
        assert "fc.weight_q" in r.infos


# ---- 9. FIFOs and other non-regular inputs never block ------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_input_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        import sys, cquant
        from cquant import cli
        rc = cli.main(["quantize", {str(fifo)!r}, "-o", {str(tmp_path / 'o.safetensors')!r}])
        rc2 = cli.main(["report", {str(fifo)!r}])
        try:
            cquant.load({str(fifo)!r})
            print("loaded?!")
        except cquant.io.CheckpointError as e:
            print("load refused:", e)
        print("rc", rc, rc2)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "rc 2 2" in r.stdout and "load refused:" in r.stdout and "not a regular file" in r.stdout
    assert r.stderr.count("cquant: error:") == 2 and "not a regular file" in r.stderr


def test_device_input_is_refused(capsys):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    rc, _, err = run_cli(["report", "/dev/zero"], capsys)
    assert_one_line_exit_2(rc, err)
    assert "not a regular file" in err


# ---- 10. CQUANT_NUM_THREADS: one parser (C), one rule, a truthful warning -----------------------------

def test_thread_count_parser_rule():
    from cquant._native import lib
    accepted = {b"3": 3, b" 3 ": 3, b"3 ": 3, b"\t4\n": 4, b"003": 3, b"256": 256, b"1": 1}
    for text, n in accepted.items():
        assert lib.cq_parse_num_threads(text) == n, text
    for text in (b"+3", b"-3", b"0", b"257", b"", b"   ", b"3x", b"x3", b"3 4", b"99999999999999999999", b"0x10",
                 b"3.0"):
        assert lib.cq_parse_num_threads(text) < 0, text


def _threads_child(value):
    env = dict(ENV, CQUANT_NUM_THREADS=value)
    code = "import warnings; warnings.simplefilter('always'); import cquant; print(cquant.get_num_threads())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip()), r.stderr


def test_thread_env_warning_tells_the_truth():
    n, err = _threads_child("3 ")          # before: silently ignored (C refused the blank, Python did not warn)
    assert n == 3 and "CQUANT_NUM_THREADS" not in err
    n, err = _threads_child("7")
    assert n == 7 and err == ""
    default, _ = _threads_child("")        # empty: the default, no warning
    for bad in ("+3", "abc", "0", "300"):  # before: '+3' warned "ignored" yet ran 3 threads
        n, err = _threads_child(bad)
        assert f"CQUANT_NUM_THREADS={bad!r}" in err and "ignored" in err, err
        assert f"using {n} thread(s)" in err and n == default, (err, n, default)


# ---- 12. unaligned float32 arrays are copied before they reach C ---------------------------------------

class _LibSpy:
    """Wraps cquant._native.lib: records every float / int32 pointer argument not aligned to 4 bytes."""

    def __init__(self, lib, ffi):
        self._lib, self._ffi, self.bad, self.calls = lib, ffi, [], []

    def _check(self, fname, args):
        ffi = self._ffi
        for a in args:
            if isinstance(a, ffi.CData):
                t = ffi.typeof(a)
                if t.kind in ("pointer", "array") and t.item.cname in ("float", "int32_t") and a != ffi.NULL:
                    if int(ffi.cast("uintptr_t", a)) % 4:
                        self.bad.append(fname)

    def wrap(self, fname, f):
        def call(*args):
            self.calls.append(fname)
            self._check(fname, args)
            return f(*args)
        return call

    def __getattr__(self, name):
        f = getattr(self._lib, name)
        return self.wrap(name, f) if callable(f) else f


def _unaligned(shape, fill, dtype=np.float32):
    a = np.asarray(fill, dtype=dtype)
    buf = bytearray(a.nbytes + 1)
    u = np.frombuffer(buf, dtype=dtype, offset=1, count=a.size).reshape(shape)
    u[...] = a.reshape(shape)
    assert not u.flags.aligned
    return u


def test_unaligned_arrays_are_copied_before_c(monkeypatch):
    rng = np.random.default_rng(0)
    spy = _LibSpy(ops.lib, ops.ffi)
    monkeypatch.setattr(ops, "lib", spy)
    monkeypatch.setattr(ops, "_cq_linear", spy.wrap("cq_linear", ops._cq_linear))
    w = rng.standard_normal((8, 16)).astype(np.float32)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    wu, xu, bu = _unaligned((8, 16), w), _unaligned((3, 16), x), _unaligned((8,), np.ones(8))
    qw = ops.quantize_weight(wu)
    np.testing.assert_array_equal(qw.q, ops.quantize_weight(w).q)
    qw2 = ops.QuantizedWeight(qw.packed, _unaligned((8,), qw.scale), qw.shape, qw.granularity)
    for mode in ("dynamic", "weight_only"):
        np.testing.assert_array_equal(ops.linear(xu, qw2, bu, mode=mode),
                                      ops.linear(x, qw, np.ones(8, np.float32), mode=mode))
    ops.quantize_rows(xu)
    ops.quantize_rows_u8(xu)
    np.testing.assert_array_equal(ops.gelu(xu), ops.gelu(x))
    np.testing.assert_array_equal(ops.layer_norm(xu, _unaligned((16,), np.ones(16)), _unaligned((16,), np.zeros(16))),
                                  ops.layer_norm(x, np.ones(16, np.float32), np.zeros(16, np.float32)))
    ops.add_layer_norm(xu, _unaligned((3, 16), x), residual_mul=_unaligned((16,), np.ones(16)))
    s = rng.standard_normal((2, 4, 4)).astype(np.float32)
    ops.softmax_rows(s.copy(), bias=_unaligned((2, 4), np.zeros(8)))
    qkv = _unaligned((1, 4, 8), rng.standard_normal(32))
    ops.attention(qkv, qkv, qkv, 2, mask_bias=_unaligned((1, 4), np.zeros(4)))
    ops.dequantize(qw2)
    assert {"cq_linear", "cq_gelu", "cq_add_layer_norm_ex", "cq_softmax_rows", "cq_attention"} <= set(spy.calls)
    assert any(c.startswith("cq_quantize") for c in spy.calls)
    assert spy.bad == [], sorted(set(spy.bad))
    with pytest.raises(errors.TypeError, match="aligned"):       # in place: cannot be copied
        ops.gelu_inplace(_unaligned((2, 4), np.zeros(8)))


def test_cli_quantizes_a_file_whose_tensors_are_unaligned(tmp_path, capsys):
    """A header of odd length (valid safetensors) puts every tensor at an odd address of the map."""
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    hdr = json.dumps({"fc.weight": {"dtype": "F32", "shape": [8, 16], "data_offsets": [0, w.nbytes]}}).encode()
    hdr += b" " * ((-len(hdr) % 8) + 1)                       # data section at 8 + odd
    src, dst = tmp_path / "odd.safetensors", tmp_path / "q.safetensors"
    raw_st(src, hdr, w.tobytes(), pad=False)
    with SafetensorsReader(src) as r:
        assert not r.tensor("fc.weight").flags.aligned
    rc, _, err = run_cli(["quantize", src, "-o", dst, "-q"], capsys)
    assert rc == 0, err
    with SafetensorsReader(dst) as r:
        np.testing.assert_array_equal(r.tensor("fc.weight_q"), ops.quantize(w)[0])
    rc, out, err = run_cli(["report", src], capsys)
    assert rc == 0, err


# ---- smoothing then a failure: the model as it was (review 2026-11-30) ----------------------------

def _smooth_model():
    from cquant import nn
    return nn.Sequential(nn.Linear(16, 32, rng=1), nn.GELU(), nn.Linear(32, 8, rng=2))


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return repr(a) == repr(b) and sa.keys() == sb.keys() and all(
        np.array_equal(sa[k], sb[k], equal_nan=True) for k in sa)


def test_smoothing_then_failure_leaves_the_model_untouched():
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    # a NaN weight: NonFiniteError naming the layer, before smoothing changes anything
    m = _smooth_model()
    m[2].weight[0, 0] = np.nan
    ref = copy.deepcopy(m)
    with pytest.raises(errors.NonFiniteError, match="'2'"):
        cquant.Quantizer.quantize_dynamic(m, calibration=[x], smoothing=0.5)
    assert _same_model(m, ref)
    # a scheme that does not fit, refused by quantization after smoothing ran: smoothing undone
    for rotate in (False, True):
        m = _smooth_model()
        ref = copy.deepcopy(m)
        with pytest.raises(errors.ValueError, match="does not fit"):
            cquant.Quantizer.quantize_dynamic(m, calibration=[x], smoothing=0.5, granularity="per_group",
                                              group_size=12, strict=True, rotate=rotate)
        assert _same_model(m, ref) and not hasattr(m, "_cquant_input_scales")
        np.testing.assert_array_equal(m(x), ref(x))


def test_smoothing_tolerates_a_nan_calibration_row():
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    x[1, 3] = np.nan  # calibration skips such rows' statistics; the fold check must not call it a change
    m = cquant.Quantizer.quantize_dynamic(_smooth_model(), calibration=[x], smoothing=0.5)
    assert np.isfinite(m(x[[0, 2, 3]])).all()


def test_smoothing_failure_inside_smooth_undoes_its_folds(monkeypatch):
    from cquant import smoothing
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    calls = []
    real = smoothing.rotation_block

    def boom(k, rotate):  # fails after the first group was smoothed
        calls.append(k)
        if len(calls) > 1:
            raise RuntimeError("injected")
        return real(k, rotate)
    monkeypatch.setattr(smoothing, "rotation_block", boom)
    from cquant import nn
    m2 = nn.Sequential(nn.Linear(16, 32, rng=1), nn.GELU(), nn.Linear(32, 8, rng=2), nn.GELU(),
                       nn.Linear(8, 4, rng=3))
    ref2 = copy.deepcopy(m2)
    with pytest.raises(RuntimeError, match="injected"):
        smoothing.smooth(m2, [x], alpha=0.5, rotate=True)
    assert len(calls) == 2 and _same_model(m2, ref2)


# ---- state_dict loads refuse what checkpoints refuse ----------------------------------------------

@pytest.mark.parametrize("key, value, err", [("0.weight_scale", np.nan, errors.NonFiniteError),
                                             ("0.weight_scale", np.inf, errors.NonFiniteError),
                                             ("0.weight_scale", -0.01, errors.ValueError),
                                             ("0.bias", np.nan, errors.NonFiniteError)])
def test_nn_load_state_dict_refuses_bad_values(key, value, err):
    from cquant import nn
    m = cquant.Quantizer.quantize_dynamic(nn.Sequential(nn.Linear(16, 8, rng=1)))
    sd = {k: v.copy() for k, v in m.state_dict().items()}
    before = {k: v.copy() for k, v in sd.items()}
    sd[key][0] = value
    with pytest.raises(err, match=key.replace(".", r"\.")):
        m.load_state_dict(sd)
    assert all(np.array_equal(m.state_dict()[k], before[k]) for k in before)  # nothing installed


def test_nn_load_state_dict_refuses_integer_scales():
    from cquant import nn
    m = cquant.Quantizer.quantize_dynamic(nn.Sequential(nn.Linear(16, 8, rng=1)))
    sd = dict(m.state_dict())
    sd["0.weight_scale"] = np.ones(8, np.int64)
    with pytest.raises(errors.TypeError, match="0.weight_scale"):
        m.load_state_dict(sd)


def test_quantized_weight_refuses_bad_scales():
    qw = ops.quantize_weight(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    for bad, err in ((-qw.scale, errors.ValueError), (qw.scale * np.nan, errors.NonFiniteError),
                     (qw.scale.astype(np.int64), errors.TypeError)):
        with pytest.raises(err):
            ops.QuantizedWeight(qw.packed, bad, qw.shape, qw.granularity, qw.group_size)
    neg = pickle.loads(pickle.dumps(qw))
    neg.scale = -qw.scale  # a crafted pickle with negative scales
    with pytest.raises(errors.ValueError, match="negative"):
        pickle.loads(pickle.dumps(neg))


def test_torch_load_state_dict_refuses_bad_values():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tm = cquant.Quantizer.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 8)))
    x = torch.randn(3, 16)
    y0 = tm(x)
    for key, value, msg in (("0.weight_scale", float("nan"), "NaN"), ("0.weight_scale", -1.0, "negative"),
                            ("0.bias", float("inf"), "NaN or Inf")):
        sd = {k: v.clone() for k, v in tm.state_dict().items()}
        sd[key][0] = value
        with pytest.raises(RuntimeError, match=msg):
            tm.load_state_dict(sd)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    sd["0.weight_scale"] = sd["0.weight_scale"].to(torch.int64)
    with pytest.raises(RuntimeError, match="must be a float array"):
        tm.load_state_dict(sd)
    assert torch.equal(tm(x), y0)


def test_raw_python_errors_become_cquant_errors():
    """Arguments of the wrong kind get cquant's errors, not IndexError / unhashable-type TypeError
    (review 2026-11-30)."""
    with pytest.raises(errors.TypeError, match="must be a str"):
        ops.set_isa(["avx2"])
    with pytest.raises(errors.ShapeError, match="at least one dimension"):
        ops.hadamard(np.float32(1), 2)
    with pytest.raises(errors.ValueError, match=">= 0"):
        ops.best_format(-1)


def test_torch_lazy_linear_is_skipped_with_a_reason():
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Linear(8, 4))
    q = cquant.Quantizer()
    out = q.quantize(m)
    why = {r.name: (r.status, r.reason) for r in q.summary}
    assert why["0"][0] == "skipped" and "not initialized" in why["0"][1] and why["1"][0] == "quantized"
    assert isinstance(out[0], torch.nn.LazyLinear)
    cal = cquant.calibrate(torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.Linear(8, 4)), [torch.randn(2, 5)])
    assert list(cal) == ["1"]  # the lazy layer had no sizes when the statistics were set up


def test_smoothing_failure_during_a_fold_check_undoes_that_fold(monkeypatch):
    """An exception while a fold is being checked (the model's forward failing on the folded model:
    transformers' T5 read .weight of a wrapper) undoes that fold too, not only the kept ones."""
    from cquant import nn, smoothing
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    m = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32, rng=1), nn.GELU(), nn.Linear(32, 8, rng=2))
    ref = copy.deepcopy(m)
    real = smoothing._rel_change

    def boom(y, r):
        raise RuntimeError("injected in the fold check")
    monkeypatch.setattr(smoothing, "_rel_change", boom)
    with pytest.raises(RuntimeError, match="injected"):
        smoothing.smooth(m, [x], alpha=0.5)
    monkeypatch.setattr(smoothing, "_rel_change", real)
    assert _same_model(m, ref)
    np.testing.assert_array_equal(m(x), ref(x))


def test_torch_t5_quantizes_and_runs():
    """transformers' T5 FFN reads ``self.wo.weight.dtype``: quantized (and smoothed) layers answer
    ``weight`` with None, so the model runs (it raised AttributeError)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(num_layers=1, num_decoder_layers=1, d_model=32, d_ff=64, d_kv=8, num_heads=4,
                                vocab_size=50)
    ids = torch.randint(0, 50, (2, 5))
    for kw in ({}, {"calibration": [{"input_ids": ids, "decoder_input_ids": ids}], "smoothing": 0.5}):
        m = transformers.T5ForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            ref = m(input_ids=ids, decoder_input_ids=ids).logits
        q = cquant.Quantizer.quantize_dynamic(m, **kw)
        with torch.no_grad():
            y = q(input_ids=ids, decoder_input_ids=ids).logits
        assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.99


def test_torch_calibration_runs_in_eval_mode_and_keeps_the_mode():
    """A freshly built torch model is in train mode: calibration, smoothing's checks and the budget
    run it in eval mode (no dropout: the static scales were those of dropped-out activations), and
    each module's own training flag is put back."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(32, 8))

    def fresh():  # the same weights, in train mode
        return copy.deepcopy(base).train()
    x = torch.randn(64, 16)
    ev = cquant.calibrate(fresh().eval(), [x])
    m = fresh()
    tr = cquant.calibrate(m, [x])
    assert m.training and all(c.training for c in m.children())
    np.testing.assert_array_equal(ev["3"].absmax, tr["3"].absmax)
    q = cquant.Quantizer(mode="static")
    q.quantize(fresh(), calibration=[x])
    q2 = cquant.Quantizer(mode="static")
    q2.quantize(fresh().eval(), calibration=[x])
    assert q.act_scales == q2.act_scales
    cquant.Quantizer.quantize_dynamic(fresh(), calibration=[x], smoothing=0.5)  # its checks hold


def test_smoothing_leaves_tied_weights_alone():
    """A Linear whose weight is shared (an lm_head tied to the embedding) is not smoothed: rescaling
    would untie it and the head would become a second, quantized copy (review 2026-11-30)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 32)
            self.norm = torch.nn.LayerNorm(32)
            self.mix = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 100, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.norm(self.mix(self.emb(ids))))
    m = LM().eval()
    ids = torch.randint(0, 100, (4, 7))
    q = cquant.Quantizer()
    out = q.quantize(m, calibration=[ids], smoothing=0.5)
    assert out.head.weight is out.emb.weight  # still one tensor, still float
    notes = " ".join(g.note for g in q.smoothing.groups)
    assert "shared with emb" in notes


def test_torch_refused_train_and_device_move_leave_no_half_state():
    """model.train() on a quantized model raises AutogradError; Module.train had already set the
    root and the modules before the first quantized layer to training (dropout on): the whole model is
    put back in eval mode first. A refused move to the meta device says the tensors moved before the
    quantized layer lost their data (review 2026-11-30)."""
    torch = pytest.importorskip("torch")
    from cquant.adapters.torch import AutogradError
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5), torch.nn.LayerNorm(16),
                            torch.nn.Linear(16, 8))
    cquant.Quantizer(include=["3"]).quantize(m)
    x = torch.randn(4, 16)
    y = m(x)
    with pytest.raises(AutogradError, match="put back in eval mode"):
        m.train()
    assert not any(c.training for c in m.modules())
    assert torch.equal(m(x), y)
    with pytest.raises(cquant.errors.ValueError, match="rebuild or reload"):
        m.to("meta")


# ---- found by a new-user review (2026-11-30): checkpoints whose dtypes lie, tampered pickles ------

def test_load_into_a_torch_model_with_a_0d_buffer(tmp_path):
    """BatchNorm's num_batches_tracked is 0-d: cquant's own checkpoint of the model loads into a fresh
    copy (it used to become shape (1,) on the way in and fail after the Linears were replaced)."""
    torch = pytest.importorskip("torch")

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).eval()
    q = cquant.Quantizer.quantize_dynamic(build())
    cquant.save(q, tmp_path / "bn.safetensors")
    m = cquant.load_into(build(), tmp_path / "bn.safetensors")
    x = torch.randn(3, 8)
    assert torch.equal(m(x), q(x))


def test_f64_bias_beyond_float32_is_refused(tmp_path):
    p = small_checkpoint(tmp_path)

    def big(t):
        t["fc.bias"] = np.full(8, 1e300, np.float64)
    bad = rewrite(p, tmp_path / "big.safetensors", tensors=big)
    with pytest.raises(CheckpointError, match="float32's range"):
        cquant.load(bad)


@pytest.mark.parametrize("value", [np.full(4, 1e300), np.ones(4, bool), np.full(4, 2**40, np.int64)],
                         ids=["f64_overflow", "bool", "int64"])
def test_plain_tensors_whose_dtype_lies_are_refused_and_the_model_kept(tmp_path, value):
    """A LayerNorm weight stored as float64 beyond float32's range, bool or int64: copying would cast
    it silently (Inf, 1.0, 1.1e12); refused before the model is touched, cquant.nn and torch."""
    from cquant import nn

    def build():
        return nn.Sequential(nn.Linear(4, 4, rng=0), nn.LayerNorm(4))
    cquant.save(cquant.Quantizer.quantize_dynamic(build()), tmp_path / "ok.safetensors")
    bad = rewrite(tmp_path / "ok.safetensors", tmp_path / "bad.safetensors",
                  tensors=lambda t: t.__setitem__("1.weight", value))
    m = build()
    with pytest.raises(CheckpointError, match=r"'1\.weight'"):
        cquant.load_into(m, bad)
    assert type(m[0]) is nn.Linear and (m[1].weight == 1).all()
    torch = pytest.importorskip("torch")
    tm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).eval()
    cquant.save(cquant.Quantizer.quantize_dynamic(copy.deepcopy(tm)), tmp_path / "t.safetensors")
    tbad = rewrite(tmp_path / "t.safetensors", tmp_path / "tbad.safetensors",
                   tensors=lambda t: t.__setitem__("1.weight", value))
    with pytest.raises(CheckpointError, match=r"'1\.weight'"):
        cquant.load_into(tm, tbad)
    assert type(tm[0]) is torch.nn.Linear


def test_tampered_pickles_of_quantized_layers_are_refused():
    from cquant import nn
    q = cquant.Quantizer.quantize_dynamic(nn.Sequential(nn.Linear(8, 16, rng=0)))
    layer = pickle.loads(pickle.dumps(q[0]))
    layer.__dict__["in_features"] = 3
    with pytest.raises(errors.ValueError, match="in_features"):
        pickle.loads(pickle.dumps(layer))
    layer = pickle.loads(pickle.dumps(q[0]))
    layer.__dict__["_parameters"]["bias"] = np.full(16, np.nan, np.float32)
    with pytest.raises(errors.NonFiniteError, match="bias"):
        pickle.loads(pickle.dumps(layer))
    qf = QuantizedLinearForward(q[0].qweight, np.zeros(16, np.float32))
    qf.bias = np.full(16, np.inf, np.float32)
    with pytest.raises(errors.NonFiniteError, match="bias"):
        pickle.loads(pickle.dumps(qf))
    qf.bias, qf.mode = None, "sideways"
    with pytest.raises(errors.ValueError, match="mode"):
        pickle.loads(pickle.dumps(qf))
    assert pickle.loads(pickle.dumps(q))[0].in_features == 8      # an honest pickle still loads


@pytest.mark.parametrize("field, value", [("num_attention_heads", 3), ("num_attention_heads", 17),
                                          ("hidden_act", "relu"), ("layer_norm_eps", -1.0)])
def test_load_refuses_a_bert_config_the_model_cannot_run(tmp_path, field, value):
    pytest.importorskip("safetensors", reason="cquant.save needs safetensors")
    path, _ = _bert_checkpoint(tmp_path)
    bad = _set_model(path, tmp_path / "cfg.safetensors", lambda s: s["config"].__setitem__(field, value))
    with pytest.raises(CheckpointError, match=field):
        cquant.load(bad)


def test_a_layer_listed_twice_in_the_metadata_is_refused(tmp_path):
    p = small_checkpoint(tmp_path)

    def twice(md):
        entry = json.dumps(json.loads(md[KEY_LAYERS])["fc"])
        md[KEY_LAYERS] = '{"fc": %s, "fc": %s}' % (entry, entry)
    bad = rewrite(p, tmp_path / "dup.safetensors", meta=twice)
    with pytest.raises(CheckpointError, match="duplicate key 'fc'"):
        cquant.load(bad)


def test_save_refuses_an_index_name_and_the_formats_own_metadata_keys(tmp_path):
    layer = {"fc": QuantizedLinearForward(ops.quantize_weight(np.ones((2, 4), np.float32)))}
    with pytest.raises(CheckpointError, match="index"):
        cquant.save(layer, tmp_path / "m.safetensors.index.json")
    for key in ("cquant.model", "cquant.tied"):
        with pytest.raises(CheckpointError, match=key):
            cquant.save(layer, tmp_path / "m.safetensors", metadata={key: "{}"})
    assert not os.listdir(tmp_path)                                  # nothing written
    cquant.save(layer, tmp_path / "m.safetensors", metadata={"mine": "1"})
    assert cquant.load(tmp_path / "m.safetensors").metadata["mine"] == "1"


def test_paths_bytes_nul_and_dangling_links(tmp_path):
    layer = {"fc": QuantizedLinearForward(ops.quantize_weight(np.ones((2, 4), np.float32)))}
    p = os.fsencode(str(tmp_path / "b.safetensors"))
    cquant.save(layer, p)                                            # bytes paths work
    assert "fc" in cquant.load(p).layers
    with pytest.raises(CheckpointError, match="NUL"):
        cquant.save(layer, str(tmp_path / "a\0b.safetensors"))
    with pytest.raises(CheckpointError, match="NUL"):
        cquant.load(str(tmp_path / "b.safetensors") + "\0")
    link = tmp_path / "link.safetensors"
    os.symlink(tmp_path / "missing" / "x.safetensors", link)
    with pytest.raises(CheckpointError, match=r"missing does not exist \(the path is a link"):
        cquant.save(layer, link)


# ---- the ops layer, from a new-user review (2026-11-30) -----------------------------------------

@pytest.mark.parametrize("m", [1, 3, 4, 8, 33])
def test_weight_only_rows_near_float_max_stay_finite_on_every_path(m):
    """Finite x whose true result is in range: finite outputs on every path and M (the GEMM's float32
    sums overflowed at M >= 4; such rows now go through the GEMV's power-of-two scaling)."""
    qw = ops.quantize_weight(np.ones((16, 8), np.float32))
    row = np.array([2e38, 2e38, -2e38, -2e38, 1, 1, 1, 1], np.float32)
    x = np.tile(row, (m + 1, 1))
    x[0] = 0.5                                                       # an ordinary row among them
    old = ops.isa()
    try:
        for isa in ops.available_isas():
            ops.set_isa(isa)
            y = ops.linear(x, qw, mode="weight_only")
            assert np.isfinite(y).all(), (isa, m)
            assert np.abs(y[1:] - 4.0).max() <= 1e31, (isa, m)       # within the weight-only bound (~5e32)
            np.testing.assert_allclose(y[0], 4.0, rtol=1e-6)
            x2 = x.copy()
            x2[-1, 0] = np.inf                                       # a non-finite row keeps Inf / NaN
            assert not np.isfinite(ops.linear(x2, qw, mode="weight_only")[-1]).all()
    finally:
        ops.set_isa(old)


def test_layer_norm_of_extreme_rows_on_every_path():
    """Rows of +-1e20 (centred squares overflow float32) and +-1e-25 with eps = 0 (they underflow):
    +-1 on every path (statistics again in double for such rows), as the scalar path gave for K < 8."""
    old = ops.isa()
    try:
        for isa in ops.available_isas():
            ops.set_isa(isa)
            for k in (4, 16, 37, 384):
                for v, eps in ((1e20, 1e-5), (1e-25, 0.0), (3e38, 1e-5)):
                    x = np.where(np.arange(k) % 2 == 0, v, -v).astype(np.float32)[None, :]
                    y = ops.layer_norm(x, eps=eps)
                    xd = x[0].astype(np.float64)
                    want = (xd - xd.mean()) / np.sqrt(((xd - xd.mean()) ** 2).mean() + eps)
                    np.testing.assert_allclose(y[0], want, atol=1e-5, err_msg=f"{isa} k={k} v={v}")
                    r = ops.add_layer_norm(x, np.zeros_like(x), eps=eps)
                    np.testing.assert_allclose(r, y, atol=1e-6)
    finally:
        ops.set_isa(old)


def test_alias_and_range_checks_of_the_c_functions():
    from cquant._native import ffi, lib
    x = np.arange(1, 25, dtype=np.float32).reshape(3, 8)
    q = np.zeros((3, 8), np.int8)
    p = ffi.cast("float *", x.ctypes.data)
    assert lib.cq_quantize_rows(p, 3, 8, ffi.cast("int8_t *", q.ctypes.data), p + 8) == lib.CQ_ERR_ALIAS
    assert lib.cq_quantize(p, 3, 8, lib.CQ_PER_CHANNEL, 0, ffi.cast("int8_t *", x.ctypes.data), p + 20) \
        == lib.CQ_ERR_ALIAS
    s = np.ones(3, np.float32)
    out = np.zeros((3, 8), np.float32)
    sp = ffi.cast("float *", s.ctypes.data)
    assert lib.cq_dequantize(ffi.cast("int8_t *", q.ctypes.data), sp, 3, 8, lib.CQ_PER_CHANNEL, 0,
                             ffi.cast("float *", s.ctypes.data)) == lib.CQ_ERR_ALIAS
    q[1, 2] = -128
    assert lib.cq_dequantize(ffi.cast("int8_t *", q.ctypes.data), sp, 3, 8, lib.CQ_PER_CHANNEL, 0,
                             ffi.cast("float *", out.ctypes.data)) == lib.CQ_ERR_RANGE
    assert not out.any()                                             # nothing written
    with pytest.raises(errors.ValueError, match="overlaps"):
        ops.softmax_rows(x, x[0], rows_per_bias=3)                   # the bias is a row of x
    # cq_pack writes its header first: codes inside the packed buffer are refused, as unpacking into it
    size = lib.cq_packed_size(lib.CQ_FORMAT_N16K4, 16, 64, 0)
    buf = np.zeros(size + 2048, np.int8)
    buf[:1024] = np.arange(1024) % 100 - 50
    bp = ffi.cast("int8_t *", buf.ctypes.data)
    assert lib.cq_pack(lib.CQ_FORMAT_N16K4, bp, 16, 64, 0, ffi.cast("void *", bp)) == lib.CQ_ERR_ALIAS
    codes = np.arange(1024, dtype=np.int64).reshape(16, 64) % 100 - 50
    qs = codes.astype(np.int8)
    assert lib.cq_pack(lib.CQ_FORMAT_N16K4, ffi.cast("int8_t *", qs.ctypes.data), 16, 64, 0,
                       ffi.cast("void *", bp)) == lib.CQ_OK
    assert lib.cq_unpack(ffi.cast("void *", bp), 16, 64, bp + 80) == lib.CQ_ERR_ALIAS
    back = np.zeros((16, 64), np.int8)
    assert lib.cq_unpack(ffi.cast("void *", bp), 16, 64, ffi.cast("int8_t *", back.ctypes.data)) == lib.CQ_OK
    np.testing.assert_array_equal(back, qs)


def test_ops_argument_errors_are_cquant_errors():
    x = np.zeros((4, 3), np.float32)
    assert ops.softmax_rows(x.copy(), np.zeros(3, np.float32), rows_per_bias=10**30).shape == (4, 3)
    for bad in ("2", float("nan"), float("inf")):
        with pytest.raises(errors.QuantizationError, match="scale"):
            ops.softmax_rows(x.copy(), scale=bad)
    qw = ops.quantize_weight(np.ones((2, 3), np.float32))
    with pytest.raises(errors.TypeError, match="list or tuple"):
        ops.linear_multi(x, qw)
    with pytest.raises(errors.TypeError, match="biases"):
        ops.linear_multi(x, [qw], biases=5)
    q, s = ops.quantize_rows(np.zeros((0, 3), np.float32))           # zero rows: empty results
    assert q.shape == (0, 3) and s.shape == (0,)
    q, s = ops.quantize_rows_u8(np.zeros((0, 3), np.float32))
    assert q.shape == (0, 3) and q.dtype == np.uint8
