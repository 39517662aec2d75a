"""qwen_ref.allocator: after retain_freed_memory(), a large tensor allocated again reuses freed pages."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from qwen_ref.allocator import retain_freed_memory


def _faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # once per process; later calls change nothing

    def step():  # a forward's pattern: tensors of 64 MiB (past glibc's largest default mmap threshold, 32 MiB)
        a = torch.empty(16 * 2**20)
        a.fill_(1.0)
        b = torch.full_like(a, 2.0)
        c = a + b
        del a, b, c

    step()  # the heap grows to hold them
    # without the settings each of the three is a fresh mapping, a fault for each of its 16,384 pages (49,155 in
    # every step, measured); with them the pages are reused (0 in most steps, a few thousand in some)
    assert min(_faults_of(step) for _ in range(4)) < 1000


def test_load_applies_it(tiny, monkeypatch):
    import qwen_ref
    from qwen_ref import qwen

    calls = []
    monkeypatch.setattr(qwen, "retain_freed_memory", lambda: calls.append(1) or True)
    qwen_ref.load(tiny("qwen2.5"))
    assert calls == [1]
