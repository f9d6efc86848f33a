"""CUDA builds on a machine without a GPU: the exported libraries must carry machine code."""
from __future__ import annotations

import shutil

import pytest

tvm = pytest.importorskip("tvm")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)

from tvm.script import tirx as T  # noqa: E402

from trimode.compiler.cuda_env import cuda_build_context, library_has_gpu_binary  # noqa: E402

H100 = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})


@T.prim_func
def add_one(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
    for i in T.thread_binding(64, thread="threadIdx.x"):
        b[i] = a[i] + T.float32(1)


def test_tiny_module_exports_gpu_binary(tmp_path):
    with cuda_build_context(H100):
        lib = tvm.compile(tvm.IRModule({"add_one": add_one}), target=H100)
    path = tmp_path / "add_one.so"
    lib.export_library(str(path))
    assert library_has_gpu_binary(path)


def test_source_only_library_is_not_a_binary(tmp_path):
    fake = tmp_path / "source.so"
    fake.write_bytes(b"\x7fELF....." + b'extern "C" __global__ void k() {}')
    assert not library_has_gpu_binary(fake)
