"""Large uploads to the CPU (the weights) on memory advised to transparent huge pages
(tvm_runtime.huge_page_memory): what the compiled model computes on it, and its lifetime."""
from __future__ import annotations

import gc
import mmap
from pathlib import Path

import numpy as np
import pytest

from trimode.model.config import GEOMETRIES
from trimode.model.random_weights import random_weights
from trimode.runtime import tvm_runtime
from trimode.runtime.bench import host_huge_pages_mib
from trimode.runtime.engine import Engine
from trimode.runtime.tvm_runtime import Device

needs_madvise = pytest.mark.skipif(tvm_runtime.huge_page_memory(1) is None,
                                   reason="this OS cannot be asked for transparent huge pages")


def mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps entry holding address: its range and VmFlags; None if unmapped."""
    found = None
    for line in open("/proc/self/smaps").read().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # an entry's first line: "lo-hi perms offset dev inode path"
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = {"range": (lo, hi)} if lo <= address < hi else None
        elif found and head == "VmFlags:":
            found["flags"] = line.split()[1:]
            return found
    return None


def address_of(tensor) -> int:
    return np.from_dlpack(tensor).ctypes.data


@needs_madvise
def test_large_uploads_lie_on_memory_advised_huge_pages_at_the_allocators_phase():
    dev = Device("llvm")
    values = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)
    tensor = dev.upload(values)
    assert "hg" in mapping_of(address_of(tensor))["flags"]  # madvise(MADV_HUGEPAGE) took
    assert address_of(tensor) % mmap.PAGESIZE == tvm_runtime.PAGE_PHASE
    np.testing.assert_array_equal(dev.download(tensor), values)
    rewritten = values + 1
    dev.write(tensor, rewritten)
    np.testing.assert_array_equal(dev.download(tensor), rewritten)
    np.testing.assert_array_equal(dev.download_rows(tensor, 3, 7), rewritten[3:7])
    np.testing.assert_array_equal(dev.download_span(tensor, 5, 10, 20), rewritten[5, 10:20])


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@needs_madvise
@pytest.mark.skipif(not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
                    reason="transparent huge pages are off on this machine")
def test_bench_counts_the_memory_on_huge_pages():
    gc.collect()
    before = host_huge_pages_mib()
    tensor = Device("llvm").upload(np.ones(8 << 20, np.uint8))  # 8 MiB: three 2 MB pages' room
    assert host_huge_pages_mib() - before >= 2  # one at least (the kernel may fall back)
    del tensor


@needs_madvise
def test_a_tensors_mapping_goes_when_the_tensor_does():
    tensor = Device("llvm").upload(np.ones(tvm_runtime.HUGE_PAGE, np.uint8))
    address = address_of(tensor)
    assert mapping_of(address) is not None
    del tensor
    gc.collect()
    assert mapping_of(address) is None


def test_small_uploads_and_systems_without_madvise_use_tvms_allocator(monkeypatch):
    dev = Device("llvm")
    asked = []
    monkeypatch.setattr(tvm_runtime, "huge_page_memory", lambda n: asked.append(n))
    np.testing.assert_array_equal(dev.download(dev.upload(np.arange(16.0))), np.arange(16.0))
    assert asked == []  # below HUGE_PAGE nothing is asked
    monkeypatch.undo()
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    assert tvm_runtime.huge_page_memory(1 << 22) is None
    values = np.arange(1 << 20, dtype=np.float32)  # TVM's allocation, the same tensor
    np.testing.assert_array_equal(dev.download(dev.upload(values)), values)


@needs_madvise
@pytest.mark.parametrize("kv_cache", ["f16", "q8_0"])
def test_every_entry_computes_the_same_on_huge_page_memory(monkeypatch, kv_cache):
    """Every upload on its own advised mapping (the threshold at a byte) against none: the
    tiny model's logits bit for bit."""
    cfg = GEOMETRIES["tiny"]
    weights = random_weights(cfg, seed=5, quantized=True)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, 12).tolist()
    results = {}
    for threshold in (1, 1 << 62):
        monkeypatch.setattr(tvm_runtime, "HUGE_PAGE", threshold)
        engine = Engine(cfg, weights, "llvm", kv_cache=kv_cache)
        fwd = engine.new_sequence(64)
        if threshold == 1:
            assert all("hg" in mapping_of(address_of(p))["flags"] for p in engine.params)
        results[threshold] = [fwd.causal(tokens, last_only=True).logits(), fwd.causal([7]).logits(),
                              fwd.bidirectional([cfg.mask_token_id] * 3 + [3]).logits(),
                              fwd.causal(tokens[:4]).logits()]
    for on_huge, on_tvm in zip(*results.values()):
        np.testing.assert_array_equal(on_huge, on_tvm)
