"""Test-wide settings: one intra-op thread, and every test starts from the same RNG state and
with lowrank's once-per-process rank warnings not yet given."""

import pytest
import torch

from lowrank.adapters import ranks


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use matrices of a few dozen entries, where a second thread cannot help: handing
    each tiny GEMM to a thread pool costs more than the GEMM, and on a loaded 2-core machine the
    pool's spin-waiting made iterative tests (fit_uv's thousand steps) up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Seed torch's global RNG so that any code path that uses it is reproducible."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _rank_warnings_anew(monkeypatch):
    """RankWarning is issued once per process and (variant, shape, rank): give each test a fresh
    record, so whether a test sees the warning does not depend on which tests ran before it."""
    monkeypatch.setattr(ranks, "_RANK_WARNED", set())
