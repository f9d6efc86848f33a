"""The TVM runtime without the TVM compiler.

`import tvm` loads libtvm_compiler (hundreds of MB, seconds); running a compiled module
needs only libtvm_runtime (+ libtvm_runtime_cuda for GPUs) and tvm_ffi. This module is the
one place the runtime touches them; nothing here imports `tvm`.
"""
from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

RTLD = ctypes.RTLD_GLOBAL
POOLED_ALLOCATOR = 2
DEVICE_TYPES = {"llvm": 1, "cuda": 2}  # DLPack device types: kDLCPU, kDLCUDA
# Host arrays this large that are uploaded (the weights, which every step streams from memory)
# go to memory the kernel is asked to back with 2 MB pages. With 4 KB pages the hardware
# prefetchers stop at every page and the TLB misses: on the 3B, 2 MB pages made a 4-token
# block 1.1x and decode 1.05x faster (BENCHMARKS.md).
HUGE_PAGE = 2 << 20
# TVM's allocator leaves a large tensor 64 bytes past a page (glibc's mmap chunk header,
# rounded up to the 64-byte alignment), the phase the CPU kernels were tuned at. Page-aligned,
# the decode kernel streamed no faster than on 4 KB pages (bench/cpu_streaming_matmul.py).
PAGE_PHASE = 64


def tvm_lib_dir() -> Path:
    """The wheel's tvm/lib, or $TRIMODE_TVM_LIB_DIR where only the runtime libraries were
    copied (a GPU box without the 300 MB compiler)."""
    if os.environ.get("TRIMODE_TVM_LIB_DIR"):
        return Path(os.environ["TRIMODE_TVM_LIB_DIR"])
    spec = importlib.util.find_spec("tvm")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise RuntimeError("apache-tvm is not installed (pip install apache-tvm)")
    return Path(spec.origin).parent / "lib"


def physical_cores() -> int:
    """Cores this process may run on, SMT siblings counted once (llama.cpp's default -t)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


UNUSED_BY_THE_RUNTIME = ("torch", "ml_dtypes")


@lru_cache(maxsize=None)
def load_runtime(gpu: bool):
    """Loads the runtime libraries once; returns the tvm_ffi module."""
    # tvm_ffi imports what is installed of torch (1-5 s, for DLPack and stream bridges) and
    # ml_dtypes (~0.5 s, numpy dtypes for bfloat16 and fp8): no runtime tensor needs either.
    # Those imports are made to fail fast while tvm_ffi loads; both stay importable.
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
    blocked = [name for name in UNUSED_BY_THE_RUNTIME if name not in sys.modules]
    # TVM's pool otherwise takes half the logical CPUs on x86, assuming two threads per core:
    # one thread on a 2-core machine without SMT. Read when the pool starts.
    os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    for name in blocked:
        sys.modules[name] = None
    try:
        import tvm_ffi  # first: it loads libtvm_ffi.so, which libtvm_runtime links against
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]

    lib_dir = tvm_lib_dir()
    ctypes.CDLL(str(lib_dir / "libtvm_runtime.so"), RTLD)
    if gpu:
        ctypes.CDLL(str(lib_dir / "libtvm_runtime_cuda.so"), RTLD)
    return tvm_ffi


@lru_cache(maxsize=None)
def cuda_device_count() -> int:
    """GPUs the driver reports (0 without a driver), asked of libcuda directly."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):  # no driver, or the build-time stand-in (cuda_env.py)
        return 0


def default_target() -> str:
    return "cuda" if cuda_device_count() > 0 else "llvm"


def huge_page_memory(nbytes: int, phase: int = PAGE_PHASE) -> np.ndarray | None:
    """nbytes of fresh memory `phase` bytes past a page, advised to be backed by transparent
    huge pages (madvise); None where they cannot be asked for. Its own mapping:
    memory malloc recycles may already be mapped on 4 KB pages, which madvise leaves as they
    are until khugepaged gets to them."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):  # not Linux
        return None
    memory = mmap.mmap(-1, nbytes + phase, flags=mmap.MAP_PRIVATE)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages
        memory.close()
        return None
    return np.frombuffer(memory, np.uint8)[phase:phase + nbytes]


class Device:
    """One DLPack device plus the few tensor operations the engine needs."""

    def __init__(self, target: str, index: int = 0):
        self.target = target
        self.ffi = load_runtime(target == "cuda")
        self.device = self.ffi.device("cuda" if target == "cuda" else "cpu", index)
        self.device_type, self.index = DEVICE_TYPES[target], index
        get = self.ffi.get_global_func
        self._alloc = get("runtime.TVMTensorAllocWithScope")
        self._copy_from = get("runtime.TVMTensorCopyFromBytes")
        self._copy_to = get("runtime.TVMTensorCopyToBytes")
        self._view = get("runtime.TVMTensorCreateView")
        self._sync = get("runtime.Device_StreamSync")

    def empty(self, shape, dtype: str):
        return self._alloc(self.ffi.Shape([int(s) for s in shape]), self.ffi.dtype(dtype),
                           self.device, None)

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        memory = (huge_page_memory(array.nbytes)
                  if self.target != "cuda" and array.nbytes >= HUGE_PAGE else None)
        if memory is None:
            tensor = self.empty(array.shape, str(array.dtype))
        else:  # the tensor holds the array, the array its mapping: unmapped when both are gone
            tensor = self.ffi.from_dlpack(memory.view(array.dtype).reshape(array.shape))
        self.write(tensor, array)
        return tensor

    def write(self, tensor, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._copy_from(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)

    def download(self, tensor) -> np.ndarray:
        out = np.empty(tuple(tensor.shape), dtype=str(tensor.dtype))
        self._copy_to(tensor, ctypes.c_void_p(out.ctypes.data), out.nbytes)
        return out

    def download_rows(self, tensor, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 (along the first axis) of a contiguous tensor, and no more."""
        shape = [int(s) for s in tensor.shape]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(str(tensor.dtype)).itemsize
        view = self._view(tensor, self.ffi.Shape([stop - start, *shape[1:]]), tensor.dtype,
                          start * row_bytes)
        return self.download(view)

    def download_span(self, tensor, row: int, start: int, stop: int) -> np.ndarray:
        """Elements start..stop-1 of one row of a contiguous 2-D tensor, and no more."""
        width, itemsize = int(tensor.shape[1]), np.dtype(str(tensor.dtype)).itemsize
        view = self._view(tensor, self.ffi.Shape([stop - start]), tensor.dtype,
                          (row * width + start) * itemsize)
        return self.download(view)

    def sync(self) -> None:
        """Waits until the device has finished the work queued so far."""
        self._sync(self.device, 0)  # 0: the default stream, where the VM launches

    def load_library(self, library: Path):
        """Loads an exported VM library (once per process and file)."""
        return self.ffi.load_module(str(Path(library).resolve()))

    def new_vm(self, library):
        """A fresh VirtualMachine over a loaded library. Each holds its own CUDA graphs and
        the buffers they own, so a VM serves one sequence (graphs bake in its tensors)."""
        vm = library["vm_load_executable"]()
        host = DEVICE_TYPES["llvm"]
        vm["vm_initialization"](self.device_type, self.index, POOLED_ALLOCATOR, host, 0, POOLED_ALLOCATOR)
        return vm


def cuda_arch(index: int = 0) -> str:
    """The GPU's architecture as nvcc names it (sm_90a on Hopper, for wgmma)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuInit(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, index)  # COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, index)
    arch = f"sm_{major.value}{minor.value}"
    return arch + "a" if major.value == 9 else arch


def cuda_device_name(index: int = 0) -> str | None:
    """The GPU's name as the driver reports it (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    if cuda_device_count() <= index:
        return None
    cuda = ctypes.CDLL("libcuda.so.1")
    name = ctypes.create_string_buffer(256)
    device = ctypes.c_int(0)
    if cuda.cuDeviceGet(ctypes.byref(device), index) != 0 or cuda.cuDeviceGetName(name, 256, device) != 0:
        return None
    return name.value.decode()
