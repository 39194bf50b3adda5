"""How the native kernels are found: built into a cache, forced either way, absent cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from msbp import native

SCRIPT = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, msbp
    layer = msbp.SparseLinear(6, 8, config=msbp.SparseBackpropConfig(k=2))
    layer(torch.randn(3, 6)).sum().backward()
print(json.dumps({"native": msbp.native.use_native(), "rows": int((layer.weight.grad.abs().sum(1)
    > 0).sum()), "warnings": [str(w.message) for w in caught if "native kernels" in
    str(w.message)], "status": msbp.native.status()["active"]}))
"""


def _run(tmp_path, **env):
    full = {**os.environ, "MSBP_CACHE_DIR": str(tmp_path / "cache"), **env}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_a_compiler_it_warns_once_and_runs_the_pytorch_path(tmp_path):
    result = _run(tmp_path, CXX="/nonexistent/c++", MSBP_BACKEND="auto")
    assert result["native"] is False and result["status"] == "python"
    assert result["rows"] == 2
    assert len(result["warnings"]) == 1


def test_python_backend_never_builds(tmp_path):
    result = _run(tmp_path, CXX="/nonexistent/c++", MSBP_BACKEND="python")
    assert result == {"native": False, "rows": 2, "warnings": [], "status": "python"}
    assert not (tmp_path / "cache").exists()


def test_native_backend_says_why_not(tmp_path):
    full = {**os.environ, "MSBP_CACHE_DIR": str(tmp_path / "c"), "CXX": "/nonexistent/c++",
            "MSBP_BACKEND": "native"}
    code = "import msbp; msbp.SparseLinear(4, 4)"
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode != 0 and "NativeUnavailableError" in out.stderr


def test_bad_backend_name_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        native.set_backend("fast")


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_process(tmp_path):
    """A build killed by a signal leaves torch's lock file in the build folder; the next
    process must not wait for it forever (it did), but build or load as if it were not there.
    The finished build is copied (file times kept, so nothing is recompiled) and given such a
    lock."""
    if not native.use_native():
        pytest.skip(f"native kernels unavailable: {native.status()['error']}")
    built = Path(native.status()["build_dir"])
    copy = tmp_path / "cache" / built.name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "msbp.lock"))
    (copy / "lock").touch()
    full = {**os.environ, "MSBP_CACHE_DIR": str(tmp_path / "cache"), "MSBP_BACKEND": "native"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["native"] is True and result["rows"] == 2
    assert not (copy / "lock").exists()


def test_flags_never_target_the_build_machine():
    assert not any("march=native" in f or "mtune=native" in f for f in native.cpu_flags())


@pytest.mark.parametrize("level", ["DEFAULT", "AVX2", "AVX512"])
def test_flags_follow_pytorchs_isa_level(monkeypatch, level):
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: level)
    flags = native.cpu_flags()
    assert ("-mavx2" in flags) == (level != "DEFAULT")
    assert ("-mavx512f" in flags) == (level == "AVX512")
    # a machine of another level sharing the cache must not load this build
    keys = set()
    for other in ("DEFAULT", "AVX2", "AVX512"):
        monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda o=other: o)
        keys.add(native._build_key(native.sources(), native.cpu_flags()))
    assert len(keys) == 3


@pytest.mark.slow
def test_a_build_for_a_lower_isa_level_equals_the_reference(tmp_path):
    """The kernels' vector width follows the ISA level (64-byte vectors under AVX-512, 32 under
    AVX2, SSE pairs below): the oracle tests of the products, the selections and the LSTM, run
    against a build one level below this machine's."""
    import torch

    lower = {"AVX512": "avx2", "AVX2": "default"}.get(torch.backends.cpu.get_cpu_capability())
    if lower is None:
        pytest.skip("this machine runs the baseline level only")
    # inductor's own cache too: its compiled kernels from this machine's level, reused under
    # ATEN_CPU_CAPABILITY=avx2, gave the compiled tagger NaN activations (torch 2.13)
    env = {**os.environ, "MSBP_CACHE_DIR": str(tmp_path / "cache"), "MSBP_BACKEND": "native",
           "ATEN_CPU_CAPABILITY": lower, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    flags = subprocess.run([sys.executable, "-c", "import msbp; print(msbp.native.cpu_flags())"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert flags.returncode == 0, flags.stderr
    assert "-mavx512f" not in flags.stdout and ("-mavx2" in flags.stdout) == (lower == "avx2")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         os.path.join(here, "test_properties.py"), os.path.join(here, "test_sparse_linear_op.py"),
         os.path.join(here, "test_lstm.py")],
        env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1]


def test_info_names_the_active_backend():
    from msbp.environment import info as env_info

    info = env_info()
    assert info["kernels"]["active"] in ("native", "python")
    assert info["kernels"]["active"] == ("native" if native.use_native() else "python")


@pytest.mark.skipif(not native.use_native(), reason="the native kernels are unavailable")
def test_direct_bindings_compute_what_the_dispatched_ops_do():
    """Eager code calls the C++ entry points through the library's own bindings; under a
    TorchDispatchMode it goes through torch.ops (the mode sees the optimizer's op), with the same
    result to the bit: three steps of a sparsified MLP with LazyRowAdam."""
    import contextlib

    import torch
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    import msbp
    from msbp.optim import LazyRowAdam

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.name())
            return func(*args, **(kwargs or {}))

    def run(mode):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        msbp.sparsify(model, msbp.SparseBackpropConfig(k=4, memory=0.5), exclude="2")
        opt = LazyRowAdam(model.parameters(), lr=1e-2)
        x = torch.randn(5, 12)
        for _ in range(3):
            with mode or contextlib.nullcontext():
                assert (native.eager_ops() is torch.ops.msbp) == (mode is not None)
                opt.zero_grad(set_to_none=True)
                model(x).square().sum().backward()
                opt.step()
        return {**model.state_dict(), "memory": model[0].memory.clone()}

    direct = run(None)
    mode = Seen()
    dispatched = run(mode)
    assert "msbp::lazy_row_adam_step_" in mode.ops
    assert direct.keys() == dispatched.keys()
    for name, value in direct.items():
        assert torch.equal(value, dispatched[name]), name


@pytest.mark.skipif(not native.use_native(), reason="the native kernels are unavailable")
def test_profilers_see_the_sparse_layer_node_by_its_name():
    """The C++ autograd function's node is named ``CppNode<msbp::SparseLinearFn>`` in profiles
    and in ``grad_fn`` (in the anonymous namespace it read ``msbp::(anonymous namespace)::...``,
    cut short by the profiler's table)."""
    import torch
    from torch import nn

    import msbp

    model = msbp.sparsify(nn.Sequential(nn.Linear(6, 8)), msbp.SparseBackpropConfig(k=2))
    x = torch.randn(3, 6)
    model(x).sum().backward()  # the first call checks everything, later ones take the C++ call
    assert model(x).grad_fn.name() == "torch::autograd::CppNode<msbp::SparseLinearFn>"


@pytest.mark.skipif(not native.use_native(), reason="the native kernels are unavailable")
@pytest.mark.parametrize("rows", [[1, 4, 8], [-1, 4, 6], [1, 4, 1 << 40]])
def test_place_grad_rows_rejects_rows_out_of_range(rows):
    """``msbp::place_grad_rows_`` added the values into .grad at the rows given, unchecked: a
    row outside [0, out) wrote past the buffer (heap corruption, "free(): invalid size", a
    segfault). Now a clear error, .grad untouched. Found by the malformed-input fuzz."""
    import torch

    w = torch.randn(8, 5, requires_grad=True)
    w.grad = torch.zeros(8, 5)
    keep = w * 1  # noqa: F841  (the weight's AccumulateGrad node exists: route 1)
    state = torch.full((10,), -1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.msbp.place_grad_rows_(w, torch.zeros(8, 5), state, torch.tensor(rows),
                                        torch.randn(3, 5))
    assert bool((w.grad == 0).all())


@pytest.mark.skipif(not native.use_native(), reason="the native kernels are unavailable")
@pytest.mark.parametrize("what", ["state_empty", "state_short", "state_int32", "mask_short",
                                  "mask_bool"])
@pytest.mark.parametrize("op", ["place_grad_rows_", "sparse_linear_fast", "bound_fast"])
def test_native_entry_points_check_state_and_mask(what, op):
    """The kept buffer's state ((out + 2,) int64) and the row mask ((out,) uint8) are read and
    written through raw pointers; an empty or short one, passed to the raw ops, read and wrote
    past it (an empty state crashed the process). Now a RuntimeError naming the shape wanted.
    Found by the malformed-input fuzz."""
    import torch

    if op == "place_grad_rows_" and what.startswith("mask"):
        pytest.skip("place_grad_rows_ takes no mask")
    out, d = 8, 5
    w = torch.randn(out, d, requires_grad=True)
    state = torch.full((out + 2,), -1, dtype=torch.long)
    mask = torch.zeros(out, dtype=torch.uint8)
    bad = {
        "state_empty": torch.empty(0, dtype=torch.long),
        "state_short": torch.full((3,), -1, dtype=torch.long),
        "state_int32": torch.full((out + 2,), -1, dtype=torch.int32),
        "mask_short": torch.zeros(3, dtype=torch.uint8),
        "mask_bool": torch.zeros(out, dtype=torch.bool),
    }[what]
    if what.startswith("state"):
        state = bad
    else:
        mask = bad
    with pytest.raises(RuntimeError, match="state|mask"):
        if op == "place_grad_rows_":
            keep = w * 1  # noqa: F841
            torch.ops.msbp.place_grad_rows_(w, torch.zeros(out, d), state,
                                            torch.tensor([1, 4]), torch.randn(2, d))
        else:
            fast = (torch.ops.msbp.sparse_linear_fast if op == "sparse_linear_fast"
                    else native.eager_module().sparse_linear_fast)
            y = fast(torch.randn(4, d), w, None, torch.zeros(out), torch.zeros(out, d), state,
                     mask, 2, 0, 0.5, False, False, 3.0, "fz", False, None)
            y.square().sum().backward()


@pytest.mark.skipif(not native.use_native(), reason="the native kernels are unavailable")
@pytest.mark.parametrize("row", [6, -5])
def test_clear_kept_rows_rejects_a_state_listing_rows_out_of_range(row):
    """``clear_kept_rows_`` zeroed the rows a state lists, unchecked: a listed row outside the
    buffer wrote past it. Now a clear error. Found by the malformed-input fuzz."""
    import torch

    buf = torch.ones(6, 4)
    state = torch.tensor([2, buf._version, 1, row, -1, -1, -1, -1])
    with pytest.raises(RuntimeError, match="out of range"):
        native.eager_module().clear_kept_rows_([buf], [state])
