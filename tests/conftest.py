"""Shared pytest configuration for the msbp core tests."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton decides when it is imported and when a kernel is decorated whether kernels run on its
# interpreter; without a GPU the Triton kernel tests (test_sparse_linear_triton.py) need it, so it
# is set here, before any test module can import triton. Nothing else uses Triton on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Modest, deterministic property tests: the whole default run must stay fast on a small CPU.
settings.register_profile(
    "msbp",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("msbp-thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "msbp"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests are small: one thread avoids OpenMP spin-waits that slow them badly on a busy
    machine (measured 50x on a shared 2-core box). Benchmarks set their own thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch. Dynamo's caches live as long as the process: a code
    object that earlier tests compiled for their models (nn.Sequential.forward) reaches its
    recompile limit (8), after which torch.compile fails with fullgraph=True and silently runs
    the model eagerly without it, so that a compiled-against-eager test compares eager with
    eager. (Not imported here: most tests never compile.)"""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()
    yield


@pytest.fixture(params=["native", "python"])
def backend(request):
    """Run a test on the native kernels and on the pure-PyTorch path (the fallback)."""
    import msbp.native

    if request.param == "native" and not msbp.native.use_native():
        pytest.skip(f"native kernels unavailable: {msbp.native.status()['error']}")
    before = msbp.native._requested()
    msbp.native.set_backend(request.param)
    yield request.param
    msbp.native.set_backend(before)
