"""SparseBackpropConfig: validation, k rounding, (de)serialisation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from msbp import SparseBackpropConfig


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        pytest.param("ratio", 0, "0", id="ratio=0"),
        pytest.param("ratio", 0.0, "0.0", id="ratio=0.0"),
        pytest.param("ratio", 1.5, "1.5", id="ratio=1.5"),
        pytest.param("ratio", -0.1, "-0.1", id="ratio=-0.1"),
        pytest.param("ratio", math.nan, "nan", id="ratio=nan"),
        pytest.param("ratio", "0.5", "0.5", id="ratio=str"),
        pytest.param("k", -1, "-1", id="k=-1"),
        pytest.param("k", 2.5, "2.5", id="k=float"),
        pytest.param("k", True, "True", id="k=bool"),
        pytest.param("selection", "foo", "foo", id="selection=foo"),
        pytest.param("memory_layout", "bar", "bar", id="layout=bar"),
        pytest.param("memory", -0.1, "-0.1", id="memory=-0.1"),
        pytest.param("memory", 1.1, "1.1", id="memory=1.1"),
        pytest.param("memory", math.nan, "nan", id="memory=nan"),
        pytest.param("align", 0, "0", id="align=0"),
        pytest.param("align", -8, "-8", id="align=-8"),
        pytest.param("on_nonfinite", "ignore", "ignore", id="on_nonfinite=ignore"),
        pytest.param("grad_inplace", 1, "1", id="grad_inplace=int"),
    ],
)
def test_bad_config_raises_naming_value(field, value, shown):
    with pytest.raises(ValueError) as info:
        SparseBackpropConfig(**{field: value})
    message = str(info.value)
    assert field in message
    assert shown in message


def test_ratio_and_k_both_none_raises():
    with pytest.raises(ValueError, match="ratio"):
        SparseBackpropConfig(ratio=None, k=None)


def test_replace_validates_again():
    cfg = SparseBackpropConfig()
    with pytest.raises(ValueError, match="1.1"):
        cfg.replace(memory=1.1)
    assert cfg.replace(memory=0.5).memory == 0.5
    assert cfg.memory != 0.5  # frozen: the original is untouched


def test_config_is_frozen():
    cfg = SparseBackpropConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(SparseBackpropConfig(), id="default"),
        pytest.param(SparseBackpropConfig(ratio=None, k=7, align=8), id="k-align"),
        pytest.param(
            SparseBackpropConfig(
                ratio=0.25,
                selection="per_example",
                memory=1.0,
                memory_layout="slot",
                on_nonfinite="skip",
                grad_inplace=False,
            ),
            id="all-fields",
        ),
        pytest.param(SparseBackpropConfig(selection="random", memory=0), id="random-int-memory"),
    ],
)
def test_json_round_trip(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    back = SparseBackpropConfig.from_dict(data)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()


def test_from_dict_unknown_field_raises():
    data = SparseBackpropConfig().to_dict()
    data["topk"] = 3
    with pytest.raises(ValueError, match="topk"):
        SparseBackpropConfig.from_dict(data)


def test_from_dict_validates_values():
    data = SparseBackpropConfig().to_dict()
    data["selection"] = "foo"
    with pytest.raises(ValueError, match="foo"):
        SparseBackpropConfig.from_dict(data)


def _expected_k(ratio, k, align, out):
    """k from the documented rule: round(ratio * out) (at least 1) or k; k = 0 means dense;
    rounded up to a multiple of align; clamped to out."""
    if k is not None:
        if k == 0:
            return out
        kk = k
    else:
        kk = max(1, round(ratio * out))
    kk = math.ceil(kk / align) * align
    return min(kk, out)


@pytest.mark.parametrize("out", [1, 5, 10, 64, 500])
@pytest.mark.parametrize("align", [1, 4, 8])
@pytest.mark.parametrize(
    ("ratio", "k"),
    [
        pytest.param(0.04, None, id="ratio=0.04"),
        pytest.param(0.3, None, id="ratio=0.3"),
        pytest.param(1.0, None, id="ratio=1"),
        pytest.param(1e-6, None, id="ratio=tiny"),
        pytest.param(0.5, 3, id="k=3-wins"),
        pytest.param(None, 0, id="k=0-dense"),
        pytest.param(None, 1, id="k=1"),
        pytest.param(None, 1000, id="k>out"),
    ],
)
def test_k_for_rounding(ratio, k, align, out):
    cfg = SparseBackpropConfig(ratio=ratio, k=k, align=align)
    got = cfg.k_for(out)
    assert got == _expected_k(ratio, k, align, out)
    assert 1 <= got <= out
    if got < out:
        assert got % align == 0


@pytest.mark.parametrize(
    ("kwargs", "out", "want"),
    [
        pytest.param({"ratio": 0.04}, 500, 20, id="meprop-mnist"),
        pytest.param({"ratio": 0.04, "align": 8}, 500, 24, id="ratio-align-up"),
        pytest.param({"k": 5, "align": 8}, 100, 8, id="k-align-up"),
        pytest.param({"k": 5, "align": 8}, 6, 6, id="align-clamped"),
        pytest.param({"k": 0}, 37, 37, id="k0-dense"),
        pytest.param({"k": 0, "align": 8}, 37, 37, id="k0-dense-align"),
        pytest.param({"ratio": 1e-9}, 10, 1, id="ratio-at-least-1"),
    ],
)
def test_k_for_examples(kwargs, out, want):
    assert SparseBackpropConfig(**kwargs).k_for(out) == want


def test_k_for_rejects_nonpositive_out():
    with pytest.raises(ValueError, match="0"):
        SparseBackpropConfig().k_for(0)


def test_numpy_numbers_are_taken_as_python_numbers():
    """k, align, ratio and memory from numpy (a sweep over np.arange, a value read from an
    array) were refused ("k must be an int or None, got np.int64(3)"); they are taken, stored as
    Python numbers (the config is hashed, compared and written to JSON), and numpy's bool and
    a float k are still refused."""
    import numpy as np

    cfg = SparseBackpropConfig(k=np.int64(3), memory=np.float32(0.5), align=np.int32(2))
    assert cfg == SparseBackpropConfig(k=3, memory=0.5, align=2)
    assert (type(cfg.k), type(cfg.memory), type(cfg.align)) == (int, float, int)
    assert json.loads(json.dumps(cfg.to_dict()))["k"] == 3
    assert SparseBackpropConfig(ratio=np.float64(0.25)).ratio == 0.25
    for bad in (np.bool_(True), np.float64(3.0)):
        with pytest.raises(ValueError, match="k must be an int"):
            SparseBackpropConfig(k=bad)
