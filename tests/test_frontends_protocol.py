"""The front-end protocol (cquant.frontends.FrontEnd): one object per model kind, picked by
cquant.frontends.for_model; the operations (Quantizer, report, save / load_into, calibration,
smoothing) go through it and never look at the model's kind themselves."""
import ast
import copy
import os

import numpy as np
import pytest

import cquant
from cquant import frontends as fe
from cquant import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "python", "cquant")

METHODS = ("layers", "norm_layers", "replace", "quantize", "report", "state_tensors", "install",
           "set_param", "weight_in_out", "smoothed", "unwrap")


class DuckLinear:
    def __init__(self, i, o, g):
        self.in_features, self.out_features = i, o
        self.weight = (g.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        self.bias = g.standard_normal(o).astype(np.float32)

    def forward(self, x):
        return x @ self.weight.T + self.bias

    def __call__(self, x):
        return self.forward(x)


class DuckModel:
    def __init__(self, seed=0, d=16):
        g = np.random.default_rng(seed)
        self.layers = [DuckLinear(d, 2 * d, g), DuckLinear(2 * d, d, g)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _nn_model(seed=0, d=16):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d, rng=seed), nn.ReLU(),
                         nn.Linear(2 * d, d, rng=seed + 1))


def _torch_model(seed=0, d=16):
    torch = pytest.importorskip("torch", reason="torch is not installed (optional)")
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 2 * d), torch.nn.ReLU(),
                               torch.nn.Linear(2 * d, d)).eval()


def _x(d=16, seed=3):
    return np.random.default_rng(seed).standard_normal((4, d)).astype(np.float32)


def _out(model, x):
    return fe.run(model, x)


BUILDERS = {"nn": _nn_model, "objects": DuckModel, "torch": _torch_model}


# --------------------------------------------------------------------------------------------------
# the protocol
# --------------------------------------------------------------------------------------------------

def test_every_front_end_implements_every_method():
    fronts = [fe.NN, fe.OBJECTS]
    try:
        import torch  # noqa: F401
        from cquant.adapters.torch_frontend import TORCH
        fronts.append(TORCH)
    except ImportError:
        pass
    for front in fronts:
        assert isinstance(front, fe.FrontEnd)
        assert front.name in ("nn", "objects", "torch")
        for m in METHODS:
            assert callable(getattr(front, m)), (front, m)
        # the tree front-ends and the torch one define what the base class leaves open
        for m in ("layers", "norm_layers", "replace", "quantize", "report", "state_tensors", "install"):
            assert getattr(type(front), m) is not getattr(fe.FrontEnd, m), (front.name, m)


def test_base_class_leaves_the_operations_open():
    base = fe.FrontEnd()
    with pytest.raises(NotImplementedError):
        base.layers(None)
    with pytest.raises(NotImplementedError):
        base.state_tensors(None)
    with pytest.raises(NotImplementedError):
        base.install(None, None)


@pytest.mark.parametrize("kind", ["nn", "objects", "torch"])
def test_for_model_picks_the_front_end(kind):
    model = BUILDERS[kind]()
    front = fe.for_model(model)
    assert front.name == kind == fe.frontend(model)
    assert fe.for_model(model) is front  # one object per front-end
    assert fe.for_model({"a": np.zeros(3)}) is fe.OBJECTS
    assert fe.for_model([model]) is fe.OBJECTS  # a list holding a model is a duck-typed tree


def test_for_model_does_not_import_torch_for_torch_free_models():
    import subprocess
    import sys
    code = ("import sys, numpy as np\n"
            "from cquant import frontends as fe, nn\n"
            "assert fe.for_model(nn.Linear(2, 3)) is fe.NN\n"
            "assert fe.for_model(object()) is fe.OBJECTS\n"
            "assert 'torch' not in sys.modules and 'cquant.adapters.torch_frontend' not in sys.modules\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["nn", "objects", "torch"])
def test_layers_match_linear_layers(kind):
    model = BUILDERS[kind]()
    front = fe.for_model(model)
    refs = front.layers(model)
    assert [(r.name, r.in_features, r.out_features, r.quantized) for r in refs] == \
        [(r.name, r.in_features, r.out_features, r.quantized) for r in fe.linear_layers(model)]
    assert len(refs) == 2 and not any(r.quantized for r in refs)
    assert [r.name for r in front.layers(model, exclude=[refs[0].name])] == [refs[1].name]
    assert [r.name for r in front.layers(model, include=refs[0].name)] == [refs[0].name]
    with pytest.raises(cquant.errors.TypeError):
        front.layers(model, include=[3])
    norms = front.norm_layers(model)
    assert len(norms) == (0 if kind == "objects" else 1)


@pytest.mark.parametrize("kind", ["nn", "torch"])
def test_replace_puts_the_new_module_everywhere(kind):
    model = BUILDERS[kind]()
    front = fe.for_model(model)
    ref = front.layers(model)[0]
    new = copy.deepcopy(ref.obj)
    assert front.replace(model, ref.obj, new) == 1
    assert front.layers(model)[0].obj is new


def test_duck_replace_changes_attributes_items_and_keys_not_tuples():
    g = np.random.default_rng(0)
    a = DuckLinear(2, 3, g)
    model = DuckModel()
    model.layers.append(a)
    model.named = {"x": a}
    model.frozen = (a,)
    b = DuckLinear(2, 3, g)
    assert fe.OBJECTS.replace(model, a, b) == 2
    assert model.layers[-1] is b and model.named["x"] is b and model.frozen[0] is a


# --------------------------------------------------------------------------------------------------
# round trips through the protocol: layers -> quantize -> report -> save -> load_into
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nn", "objects", "torch"])
def test_round_trip_through_the_protocol(kind, tmp_path):
    model = BUILDERS[kind]()
    front = fe.for_model(model)
    x = _x()
    names = [r.name for r in front.layers(model)]
    q = cquant.Quantizer(mode="dynamic", granularity="per_channel")
    qmodel = front.quantize(q, model, True)
    assert fe.for_model(qmodel) is front
    assert [r.name for r in front.layers(qmodel, quantized=True)] == names
    assert [r.name for r in q.summary if r.status == "quantized"] == names
    y = _out(qmodel, x)

    rows = front.report(qmodel)
    assert [r.name for r in rows] == names and rows == cquant.report(qmodel)

    state = front.state_tensors(qmodel)
    assert isinstance(state, fe.CheckpointState)
    assert sorted(state.layers) == sorted(names)
    for n in names:
        assert f"{n}.weight_q" in state.tensors and f"{n}.weight_scale" in state.tensors

    path = tmp_path / f"{kind}.safetensors"
    cquant.save(qmodel, path)
    ck = cquant.load(path, build=False)
    assert sorted(ck.layers) == sorted(names)

    fresh = BUILDERS[kind]()
    assert front.install(fresh, ck, True) is fresh
    assert [r.name for r in front.layers(fresh, quantized=True)] == names
    np.testing.assert_array_equal(_out(fresh, x), y)
    fresh2 = BUILDERS[kind]()
    cquant.load_into(fresh2, path)
    np.testing.assert_array_equal(_out(fresh2, x), y)


@pytest.mark.parametrize("kind", ["nn", "objects", "torch"])
def test_save_writes_what_state_tensors_gives(kind, tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed (optional)")
    model = BUILDERS[kind]()
    cquant.Quantizer.quantize_dynamic(model)
    state = fe.for_model(model).state_tensors(model)
    path = tmp_path / "m.safetensors"
    cquant.save(model, path)
    raw = st.load_file(str(path))
    assert list(raw) == sorted(state.tensors) or set(raw) == set(state.tensors)
    for k, v in state.tensors.items():
        np.testing.assert_array_equal(raw[k], np.asarray(v))


def test_state_mapping_is_saved_by_the_duck_front_end():
    model = DuckModel()
    cquant.Quantizer.quantize_dynamic(model)
    qf = model.layers[0].forward
    state = fe.OBJECTS.state_tensors({"a": qf, "b": np.ones(3, np.float32)})
    assert list(state.layers) == ["a"] and "b" in state.tensors and "a.weight_q" in state.tensors
    with pytest.raises(cquant.errors.TypeError, match="nothing to save"):
        fe.OBJECTS.state_tensors(DuckModel())


def test_calibration_and_smoothing_name_the_front_end():
    model = _nn_model()
    x = _x()
    cal = cquant.calibrate(model, [x])
    assert cal.frontend == "nn" and len(cal) == 2
    cal_duck = cquant.calibrate(DuckModel(), [x])
    assert cal_duck.frontend == "objects"
    res = cquant.smooth(model, [x])
    assert res.calibration.frontend == "nn"
    with pytest.raises(cquant.errors.TypeError, match="smoothing needs"):
        cquant.smooth(DuckModel(), [x])


def test_torch_smoothing_uses_the_torch_wrapper_and_parameters():
    torch = pytest.importorskip("torch", reason="torch is not installed (optional)")
    from cquant.adapters.torch_frontend import TORCH
    from cquant.adapters.torch_smoothing import SmoothedTorchLinear
    model = _torch_model()
    lin = model[1]
    w = TORCH.smoothed(lin, np.ones(16, np.float32))
    assert isinstance(w, SmoothedTorchLinear)
    TORCH.set_param(lin, "bias", np.zeros(32, np.float32))
    assert isinstance(lin.bias, torch.nn.Parameter) and float(lin.bias.detach().abs().sum()) == 0
    assert not TORCH.weight_in_out(lin)
    assert fe.NN.smoothed(nn.Linear(2, 2), np.ones(2, np.float32)) is None


def test_unwrap_recognises_the_smoothing_wrappers():
    from cquant.smoothing import Smoothed
    lin = nn.Linear(4, 3)
    assert fe.NN.unwrap(Smoothed(lin, np.ones(4, np.float32))) is lin
    assert fe.NN.unwrap(lin) is None and fe.OBJECTS.unwrap(DuckLinear(4, 3, np.random.default_rng(0))) is None
    torch = pytest.importorskip("torch", reason="torch is not installed (optional)")
    from cquant.adapters.torch_frontend import TORCH
    from cquant.adapters.torch_smoothing import SmoothedTorchLinear
    tlin = torch.nn.Linear(4, 3)
    assert TORCH.unwrap(SmoothedTorchLinear(tlin, np.ones(4, np.float32))) is tlin
    assert TORCH.unwrap(tlin) is None


# --------------------------------------------------------------------------------------------------
# the operations do not branch on the front-end themselves
# --------------------------------------------------------------------------------------------------

OPERATIONS = ("quantization.py", "io.py", "calibration.py", "smoothing.py")
FORBIDDEN_CALLS = {"is_torch_module", "frontend", "_is_torch"}


@pytest.mark.parametrize("fname", OPERATIONS)
def test_operations_ask_for_model_not_the_model_kind(fname):
    path = os.path.join(PKG, fname)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in FORBIDDEN_CALLS:
                bad.append(f"{fname}:{node.lineno}: calls {name}()")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if a.name in FORBIDDEN_CALLS:
                    bad.append(f"{fname}:{node.lineno}: imports {a.name}")
                if (getattr(node, "module", None) or "").startswith("adapters.torch"):
                    bad.append(f"{fname}:{node.lineno}: reaches a torch adapter module itself")
    assert not bad, "\n".join(bad)


def test_operations_do_not_import_torch_adapter_modules():
    for fname in OPERATIONS:
        with open(os.path.join(PKG, fname), encoding="utf-8") as f:
            src = f.read()
        assert "from .adapters.torch" not in src, fname
