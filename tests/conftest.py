"""Shared fixtures: `isa` runs a test once per instruction-set path this CPU has, and asserts
that the path that actually ran is the one requested (cquant.isa())."""
import numpy as np
import pytest

import cquant

ALL_ISAS = ["scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx"]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    name = request.param
    if name not in cquant.available_isas():
        pytest.skip(f"{name} not available on this CPU/build")
    cquant.set_isa(name)
    assert cquant.isa() == name, f"asked for {name}, running {cquant.isa()}"
    yield name
    assert cquant.isa() == name
    cquant.set_isa("auto")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
