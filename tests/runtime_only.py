"""The start of a script run in a fresh interpreter with the TVM runtime libraries alone, as on
the GPU box (tvm_ffi + libtvm_runtime + libtvm_runtime_cuda, no `import tvm`); where no CUDA
driver is installed, the build-only stand-in driver lets libtvm_runtime_cuda load."""

PREAMBLE = """
import ctypes, sys
from trimode.compiler.cuda_env import driver_stub_path
from trimode.schedules.measure import default_lib_dir
try:
    ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
except OSError:
    ctypes.CDLL(str(driver_stub_path()), mode=ctypes.RTLD_GLOBAL)
import tvm_ffi
for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
    ctypes.CDLL(str(default_lib_dir() / name), mode=ctypes.RTLD_GLOBAL)
"""
