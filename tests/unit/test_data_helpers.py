"""The C++ helpers, their numpy twins and megatron-core's helpers give identical index arrays."""
import importlib.util
import os
import subprocess
import sysconfig

import numpy as np
import pytest

from megaflow.data import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cpp():
    """The built extension; compiled into a temp dir when the checkout was not built (never skipped)."""
    if helpers._cpp is not None:
        return helpers._cpp
    import pybind11
    import tempfile
    out = os.path.join(tempfile.mkdtemp(), "_helpers" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", f"-I{pybind11.get_include()}",
                    f"-I{sysconfig.get_paths()['include']}", os.path.join(ROOT, "csrc", "helpers.cpp"), "-o", out],
                   check=True)
    spec = importlib.util.spec_from_file_location("_helpers", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def use(cpp, monkeypatch):
    monkeypatch.setattr(helpers, "_cpp", cpp)


def _megatron_helpers():
    from megatron.core.datasets import helpers as mh
    return mh


CASES = [  # (sizes, epochs, seq_length, drop_last, extra)
    ([5, 1, 30, 7, 0, 12, 3, 64, 2], 3, 8, True, True),
    ([5, 1, 30, 7, 0, 12, 3, 64, 2], 3, 8, False, True),
    ([5, 1, 30, 7, 0, 12, 3, 64, 2], 2, 7, False, False),
    ([5, 1, 30, 7, 0, 12, 3, 64, 2], 2, 16, True, False),
    ([1] * 50, 1, 4, True, True),
    ([100], 4, 33, False, True),
]


@pytest.mark.parametrize("sizes,epochs,seq,drop_last,extra", CASES)
def test_sample_idx_cpp_numpy_megatron_agree(use, sizes, epochs, seq, drop_last, extra):
    sizes = np.array(sizes, np.int32)
    rng = np.random.RandomState(7)
    doc_idx = np.tile(np.arange(len(sizes), dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    tokens = int(sizes.sum())
    ours_cpp = helpers.build_sample_idx(sizes, doc_idx, seq, epochs, tokens, drop_last, extra, use_cpp=True)
    ours_np = helpers.build_sample_idx(sizes, doc_idx, seq, epochs, tokens, drop_last, extra, use_cpp=False)
    ref = _megatron_helpers().build_sample_idx(sizes, doc_idx, seq, epochs, tokens, drop_last, extra)
    assert ours_cpp.dtype == ours_np.dtype == ref.dtype
    np.testing.assert_array_equal(ours_cpp, ref)
    np.testing.assert_array_equal(ours_np, ref)


def test_sample_idx_random_documents(use):
    rng = np.random.RandomState(0)
    for trial in range(20):
        sizes = rng.randint(0, 50, size=rng.randint(1, 40)).astype(np.int32)
        sizes[rng.randint(len(sizes))] += 2
        epochs, seq = rng.randint(1, 4), rng.randint(2, 40)
        doc_idx = np.tile(np.arange(len(sizes), dtype=np.int32), epochs)
        rng.shuffle(doc_idx)
        tokens = int(sizes.sum())
        extra = bool(trial % 2)
        if epochs * tokens - extra < seq:
            continue
        for drop_last in (True, False):
            ref = _megatron_helpers().build_sample_idx(sizes, doc_idx, seq, epochs, tokens, drop_last, extra)
            for use_cpp in (True, False):
                got = helpers.build_sample_idx(sizes, doc_idx, seq, epochs, tokens, drop_last, extra, use_cpp=use_cpp)
                np.testing.assert_array_equal(got, ref, err_msg=f"trial {trial} cpp={use_cpp}")


@pytest.mark.parametrize("weights,size", [([0.5, 0.3, 0.2], 1000), ([1 / 3] * 3, 999), ([0.999, 0.001], 5000),
                                          ([0.25, 0.25, 0.25, 0.25], 17)])
def test_blending_indices_agree(use, weights, size):
    ref_di, ref_dsi = np.zeros(size, np.int16), np.zeros(size, np.int64)
    _megatron_helpers().build_blending_indices(ref_di, ref_dsi, np.array(weights, np.float64), len(weights), size,
                                               False)
    for use_cpp in (True, False):
        di, dsi = helpers.build_blending_indices(weights, size, use_cpp=use_cpp)
        np.testing.assert_array_equal(di, ref_di)
        np.testing.assert_array_equal(dsi, ref_dsi)


@pytest.mark.parametrize("sizes", [[10, 20, 30], [1, 1000], [7], [3, 3, 3, 1]])
def test_exhaustive_blending_indices_agree(use, sizes):
    total = sum(sizes)
    ref_di, ref_dsi = np.zeros(total, np.int16), np.zeros(total, np.int64)
    _megatron_helpers().build_exhaustive_blending_indices(ref_di, ref_dsi, np.array(sizes, np.int64), len(sizes))
    for use_cpp in (True, False):
        di, dsi = helpers.build_exhaustive_blending_indices(sizes, use_cpp=use_cpp)
        np.testing.assert_array_equal(di, ref_di)
        np.testing.assert_array_equal(dsi, ref_dsi)
        assert np.bincount(di).tolist() == sizes


def test_extension_module_name(cpp):
    assert cpp.__name__.endswith("_helpers")
    assert hasattr(cpp, "build_sample_idx_int32") and hasattr(cpp, "build_blending_indices")
