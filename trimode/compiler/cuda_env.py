"""Building CUDA libraries that carry GPU machine code, also on a machine without a GPU.

TVM's CUDA runtime library (libtvm_runtime_cuda.so) links against the driver's libcuda.so.1.
Where no driver is installed that library silently fails to load, and `export_library` then
stores CUDA *source*, which needs the whole TVM compiler plus nvcc/nvrtc on every load. A
build-only stand-in libcuda.so.1 (every driver symbol the runtime imports, each returning an
error) lets the runtime library load, and with `TVM_CUDA_COMPILE_MODE=nvcc` and the target in
scope the exported library embeds a fatbin for the target's architecture.

The stand-in is built from C source with `cc` at first use into the user's cache folder and is
loaded only when the real driver is absent. It is never installed or shipped.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# What a driver call answers in the stand-in: CUDA_ERROR_NO_DEVICE.
_NO_DEVICE = 100
# Driver API names (cuInit, cuModuleLoadData, ...); runtime API names start with "cuda".
_DRIVER_SYMBOL = re.compile(r"^cu[A-Z]\w*$")
# Magic numbers of what nvcc/nvrtc embed: a fatbin container, or a cubin (an ELF file).
_FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")
_ELF_MAGIC = b"\x7fELF"
_STUB_MARKER = "trimode_build_only_cuda_driver_stub"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "trimode"


def _tvm_lib_dir() -> Path:
    import tvm  # the compiler package: this module is build-time only

    from tvm.base import _LOADED_LIBS

    return Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent


def driver_stub_path() -> Path:
    return cache_dir() / "cuda-driver-stub-v2" / "libcuda.so.1"


def _real_driver_present() -> bool:
    try:
        driver = ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    # once the stand-in is loaded, the soname libcuda.so.1 resolves to it
    return not hasattr(driver, _STUB_MARKER)


def _driver_symbols(runtime_cuda: Path) -> list[str]:
    """The driver symbols `runtime_cuda` imports, read off its dynamic symbol table."""
    if shutil.which("nm") is None:
        raise RuntimeError("building CUDA without a GPU driver needs `nm` (binutils) on PATH")
    listing = subprocess.run(["nm", "-D", "--undefined-only", str(runtime_cuda)],
                             check=True, capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    return sorted(name for name in names if _DRIVER_SYMBOL.match(name))


def build_driver_stub(runtime_cuda: Path, out_dir: Path) -> Path:
    """Compile a stand-in libcuda.so.1 exporting every driver symbol `runtime_cuda` imports."""
    # cuInit and cuDeviceGetCount too: code that asks the driver for GPUs hears "no device"
    symbols = sorted(set(_driver_symbols(runtime_cuda)) | {"cuInit", "cuDeviceGetCount"})
    source = "".join(f"int {name}(void) {{ return {_NO_DEVICE}; }}\n" for name in symbols)
    source += f"int {_STUB_MARKER}(void) {{ return 1; }}\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "libcuda.so.1"
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        c_file = Path(work) / "stub.c"
        c_file.write_text("/* build-only stand-in for the CUDA driver; never ship */\n" + source)
        built = Path(work) / "libcuda.so.1"
        compiler = os.environ.get("CC", "cc")
        subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1",
                        "-o", str(built), str(c_file)], check=True, capture_output=True)
        os.replace(built, target)  # atomic: concurrent builders never see half a file
    return target


def ensure_cuda_runtime_loaded() -> bool:
    """Load libtvm_runtime_cuda into this process, with the driver stand-in if there is no
    driver. Returns True when the real driver is present (kernels can run here)."""
    from tvm.base import _LOADED_LIBS

    real_driver = _real_driver_present()
    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return real_driver
    runtime_cuda = _tvm_lib_dir() / "libtvm_runtime_cuda.so"
    if not real_driver:
        stub = driver_stub_path()
        if not stub.exists():
            build_driver_stub(runtime_cuda, stub.parent)
        # Loaded under the soname libcuda.so.1, it satisfies the runtime library's dependency.
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(runtime_cuda), mode=ctypes.RTLD_GLOBAL)
    return real_driver


@contextlib.contextmanager
def cuda_build_context(target):
    """Scope for `tvm.compile(...)` and `export_library` of CUDA code: the library gets a fatbin
    for `target`'s arch (a tvm.target.Target, e.g. {"kind": "cuda", "arch": "sm_90a"})."""
    ensure_cuda_runtime_loaded()
    previous = os.environ.get("TVM_CUDA_COMPILE_MODE")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    try:
        with target:
            yield target
    finally:
        if previous is None:
            os.environ.pop("TVM_CUDA_COMPILE_MODE", None)
        else:
            os.environ["TVM_CUDA_COMPILE_MODE"] = previous


def library_has_gpu_binary(path) -> bool:
    """True when the exported library at `path` embeds CUDA machine code (a fatbin or cubin)
    and no CUDA source for run-time compilation."""
    blob = Path(path).read_bytes()
    # The host library is itself an ELF file: look for an embedded one past its header.
    has_binary = _FATBIN_MAGIC in blob or blob.find(_ELF_MAGIC, 4) != -1
    has_source = b'extern "C" __global__' in blob
    return has_binary and not has_source
