"""Build the CUDA attention kernels at the 14B geometry for bench/gpu_attention.py.

Runs on the build machine (full TVM, nvcc, no GPU needed). Writes into OUT_DIR (default
.carry/attention, ignored by git):
  attention.so    -- one library, sm_90a fatbin: the model's kernels decode (CUDA cores) and
                     verify / draft / prefill (tensor cores, attention_mma), and the CUDA-core
                     kernel for the last three as verify_fma / draft_fma / prefill_fma, so
                     one run measures the two side by side
  and into .carry/tvmlib libtvm_runtime.so and libtvm_runtime_cuda.so from the TVM wheel, so
  the GPU machine needs only these, tvm_ffi and numpy (no `import tvm`).
Usage: python bench/build_gpu_attention.py [OUT_DIR]
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import tvm

from trimode.artifacts import dependent_launch_enabled
from trimode.compiler.cuda_env import cuda_build_context, library_has_gpu_binary
from trimode.compiler.grid_dependency import tir_pipeline
from trimode.compiler.kernels import attention_mma
from trimode.compiler.kernels.attention_cuda import attention_cuda, default_plan

N_HEADS, N_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, "float16"
TARGET = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
# entry name -> (causal, row class); gpu_attention.py runs the same names.
ENTRIES = {
    "decode": (True, "one"),
    "verify": (True, "block"),
    "draft": (False, "block"),
    "prefill": (True, "many"),
}


def build(out_dir: Path) -> Path:
    funcs = {}
    for name, (causal, rows) in ENTRIES.items():
        fma = attention_cuda(N_HEADS, N_KV_HEADS, HEAD_DIM, causal, DTYPE, 1 if rows == "one" else "dynamic",
                             plan=default_plan(N_HEADS, N_KV_HEADS, rows, HEAD_DIM))
        if rows == "one":
            funcs[name] = fma.with_attr("global_symbol", name)
            continue
        funcs[f"{name}_fma"] = fma.with_attr("global_symbol", f"{name}_fma")
        funcs[name] = attention_mma.attention_mma(N_HEADS, N_KV_HEADS, HEAD_DIM, causal, DTYPE,
                                                  rows).with_attr("global_symbol", name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with cuda_build_context(TARGET):
        lib = tvm.compile(tvm.IRModule(funcs), target=TARGET,  # launched as the model launches them
                          tir_pipeline=tir_pipeline(dependent_launch_enabled({"kind": "cuda"})))
    path = out_dir / "attention.so"
    lib.export_library(str(path))
    if not library_has_gpu_binary(path):
        raise SystemExit(f"{path} carries CUDA source, not a GPU binary: the GPU side would "
                         "need the TVM compiler.")
    libs = Path(__file__).resolve().parent.parent / ".carry" / "tvmlib"
    libs.mkdir(parents=True, exist_ok=True)
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(Path(tvm.__file__).parent / "lib" / name, libs / name)
    return path


if __name__ == "__main__":
    started = time.time()
    built = build(Path(sys.argv[1] if len(sys.argv) > 1 else ".carry/attention"))
    print(f"built {built} ({built.stat().st_size / 1e6:.1f} MB) in {time.time() - started:.0f} s")
