"""Fixtures every test folder shares; plain helpers (model builders, paths, run readers) are in support.py."""

import pytest
import torch

from tests.support import BNB_CPU_PATHS


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: intra-op threading only costs time (badly so on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# bitsandbytes picks its CPU 4-bit code path by the CPU's features: on CPUs with AVX512-BF16 a Linear4bit repacks its
# weight in place on an eval forward. Each layer reads the choice from `has_avx512bf16()` when it is built, so patching
# that function before a model is loaded puts the layer on either path on any machine. Tests that take this fixture run
# once per path, so a bug that only one kind of CPU shows fails CI on every CPU.


@pytest.fixture(params=BNB_CPU_PATHS)
def bnb_cpu_path(request, monkeypatch):
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: request.param == "avx512_bf16")
    return request.param
