"""CUDA builds on a machine without a GPU: the exported libraries must carry machine code."""
from __future__ import annotations

import json
import re
import shutil

import pytest

tvm = pytest.importorskip("tvm")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)

from tvm.script import tirx as T  # noqa: E402

from runtime_only import PREAMBLE  # noqa: E402
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


def test_stand_in_driver_reports_no_gpu():
    import ctypes

    from trimode.compiler.cuda_env import _real_driver_present, ensure_cuda_runtime_loaded

    if ensure_cuda_runtime_loaded():
        pytest.skip("a real CUDA driver is installed here")
    assert not _real_driver_present()  # the loaded stand-in is not mistaken for a driver
    driver = ctypes.CDLL("libcuda.so.1")
    count = ctypes.c_int(-1)
    assert driver.cuInit(0) == 100 and driver.cuDeviceGetCount(ctypes.byref(count)) == 100


def test_source_only_library_is_not_a_binary(tmp_path):
    fake = tmp_path / "source.so"
    fake.write_bytes(b"\x7fELF....." + b'extern "C" __global__ void k() {}')
    assert not library_has_gpu_binary(fake)


# --- Q8_0 matmul kernels -----------------------------------------------------------------------
from trimode.compiler.kernels import q8_matmul_cuda  # noqa: E402
from trimode.model.config import ModelError  # noqa: E402

# (n, k): tiny geometry (hidden 96) with an odd N and a K that is not a multiple of 64, and
# the 14B's qkv and head shapes.
SHAPES = [(96, 96), (100, 160), (6144, 5120), (131072, 5120)]


def _build_matmuls(tmp_path, specs, name):
    funcs = {}
    for i, (n, k, m, schedule) in enumerate(specs):
        func = q8_matmul_cuda.q8_matmul(n, k, m, "float16", H100, schedule)
        funcs[f"mm{i}"] = func.with_attr("global_symbol", f"mm{i}")
    with cuda_build_context(H100):
        lib = tvm.compile(tvm.IRModule(funcs), target=H100)
    path = tmp_path / f"{name}.so"
    lib.export_library(str(path))
    return path


def test_default_schedules_build_to_gpu_binary(tmp_path):
    specs = [(n, k, m, None) for n, k in SHAPES for m in (1, "block", "dynamic")]
    path = _build_matmuls(tmp_path, specs, "defaults")
    assert library_has_gpu_binary(path)
    # the split-K kernel's scratch and tickets are module-scope device variables
    assert b"_tickets" in path.read_bytes()


def test_tuning_candidates_build(tmp_path):
    # tune measures these on the GPU box
    # every gemv row count and mma n-tile count at the most warps (most shared memory), and
    # every split-K tiling at its most splits
    candidates = q8_matmul_cuda.schedule_candidates(100, 160, 5)
    specs = [(100, 160, 5, c) for c in candidates if c.get("k_warps") == 8]
    splitk = {}
    for c in q8_matmul_cuda.schedule_candidates(6144, 5120, "block"):
        if c["kind"] == "mma_splitk":
            tiling = (c["n_tiles"], c["warps"], c["k_group"])
            splitk[tiling] = max(splitk.get(tiling, c), c, key=lambda s: s["splits"])
    assert len(splitk) == 10
    specs += [(6144, 5120, "block", c) for c in splitk.values()]
    specs.append((100, 160, 64, {"kind": "mma", "n_tiles": 4, "k_warps": 2}))  # most registers
    # Hopper's wgmma prefill GEMM: the narrow tile at odd N, the wide one (most registers)
    wgmma = [c for c in q8_matmul_cuda.schedule_candidates(6144, 5120, "dynamic") if c.get("mma") == "wgmma"]
    assert {(c["tile_n"], c["k_stage"], c["stages"]) for c in wgmma} == set(q8_matmul_cuda.WGMMA_GEMM_PLANS)
    assert not any(c.get("mma") == "wgmma" for c in q8_matmul_cuda.schedule_candidates(6144, 5120, "dynamic", "sm_80"))
    specs += [(100, 160, "dynamic", wgmma[0]), (6144, 5120, "dynamic", wgmma[-1])]
    assert library_has_gpu_binary(_build_matmuls(tmp_path, specs, "candidates"))


def test_default_schedule_reads_with_cuda_cores_for_decode_and_tensor_cores_for_blocks():
    assert q8_matmul_cuda.default_schedule(6144, 5120, 1)["kind"] == "gemv"
    assert q8_matmul_cuda.default_schedule(6144, 5120, 32)["kind"] == "mma_splitk"
    assert q8_matmul_cuda.default_schedule(6144, 5120, "block")["kind"] == "mma_splitk"
    assert q8_matmul_cuda.default_schedule(6144, 5120, "dynamic")["kind"] == "gemm"


def test_prefill_gemm_takes_the_block_schedule_only_when_it_is_split_k():
    import tvm_ffi

    slab = {"kind": "mma", "n_tiles": 2, "k_warps": 4}  # a block class tuned to the slab kernel
    splitk = {"kind": "mma_splitk", "n_tiles": 1, "warps": 8, "k_group": 1, "splits": 3}
    default = q8_matmul_cuda.default_schedule(6144, 5120, "block")
    build = lambda small: q8_matmul_cuda.q8_matmul(6144, 5120, "dynamic", "float16", H100, None, small)  # noqa: E731
    assert tvm_ffi.structural_equal(build(slab), build(default))
    assert tvm_ffi.structural_equal(build(None), build(default))
    assert not tvm_ffi.structural_equal(build(splitk), build(default))


def test_prefill_gemm_builds_with_its_short_prompt_kernel(tmp_path):
    # rows <= 64 take the split-K kernel (a copy of its own), longer prompts the tiled GEMM
    splitk = {"kind": "mma_splitk", "n_tiles": 1, "warps": 8, "k_group": 1, "splits": 3}
    funcs = {"g": q8_matmul_cuda.q8_matmul(6144, 5120, "dynamic", "float16", H100, None, splitk)
             .with_attr("global_symbol", "g")}
    with cuda_build_context(H100):
        built = tvm.tirx.build(tvm.IRModule(funcs), target=H100)
    source = built.imports[0].inspect_source()
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", source))
    assert len(kernels) == 2  # one per branch on the row count
    assert "trimode_q8_gemm_n6144_k5120_t128_s2_k32(" in source
    # the GEMM's stages live in dynamic shared memory, which the host passes at each launch
    assert re.search(r"extern __shared__ __align__\(\d+\) uchar \w+\[\];", source)
    assert f"store i64 {q8_matmul_cuda.GemmPlan(128, 2).shared_bytes()}," in built.inspect_source("ll")
    assert "trimode_q8_splitk_n6144_k5120_mprefill_nt1_w8_g1_s3(" in source
    with cuda_build_context(H100):
        lib = tvm.compile(tvm.IRModule(funcs), target=H100)
    path = tmp_path / "gemm.so"
    lib.export_library(str(path))
    assert library_has_gpu_binary(path)


@pytest.mark.parametrize("n, k", [(6144, 5120), (5120, 4096), (32768, 5120), (5120, 16384), (131072, 5120)])
def test_default_block_grids_fill_the_gpu_without_splits_shorter_than_two_stages(n, k):
    schedule = q8_matmul_cuda.default_schedule(n, k, "block")
    plan = q8_matmul_cuda.SplitKPlan.of(n, k, schedule)
    blocks = plan.column_tiles(n) * plan.splits
    assert blocks >= q8_matmul_cuda.SPLITK_TARGET_BLOCKS or plan.splits == k // (2 * 64 * plan.k_group)
    assert plan.split_k(k) >= 2 * 64 * plan.k_group
    assert (plan.splits - 1) * plan.split_k(k) < k <= plan.splits * plan.split_k(k)  # no empty split


@pytest.mark.parametrize("n, k, m, dtype, schedule, message", [
    (96, 100, 1, "float16", None, "multiple of 32"),
    (96, 96, 65, "float16", None, "m must be"),
    (96, 96, 1, "float32", None, "float16"),
    (96, 96, "dynamic", "float16", {"kind": "gemv", "rows_per_warp": 1, "k_warps": 1}, "gemv"),
    (96, 96, 1, "float16", {"kind": "wmma"}, "unknown"),
    (96, 96, 64, "float16", {"kind": "mma", "n_tiles": 4, "k_warps": 8}, "shared memory"),
    (96, 96, "block", "float16", {"kind": "mma_splitk", "n_tiles": 2, "warps": 8, "k_group": 3,
                                  "splits": 1}, "shared memory"),
    (96, 96, "block", "float16", {"kind": "mma_splitk", "n_tiles": 2, "warps": 64, "k_group": 1,
                                  "splits": 1}, "not a valid tiling"),
    (96, 96, "dynamic", "float16", {"kind": "mma_splitk", "n_tiles": 2, "warps": 8, "k_group": 1,
                                    "splits": 1}, "not any m"),
    (96, 96, "blocks", "float16", None, "m must be"),
    (96, 96, "block", "float16", {"kind": "gemm"}, "serves prefill"),
    (96, 96, "block", "float16", {"kind": "mma_splitk", "n_tiles": 4, "warps": 8, "k_group": 1,
                                  "splits": 1, "mma": "wgmma"}, "warpgroups of 64 weight rows"),
    (96, 96, "block", "float16", {"kind": "mma_splitk", "n_tiles": 2, "warps": 8, "k_group": 1,
                                  "splits": 1, "mma": "hmma"}, "mma is"),
    (96, 96, "dynamic", "float16", {"kind": "gemm", "tile_m": 64, "stages": 3, "mma": "wgmma"}, "wgmma tiles"),
    (96, 96, "dynamic", "float16", {"kind": "gemm", "tile_m": 128, "stages": 3, "tile_n": 256}, "mma.sync GEMM tiles"),
])
def test_bad_requests_raise_one_sentence(n, k, m, dtype, schedule, message):
    with pytest.raises(ModelError, match=message):
        q8_matmul_cuda.q8_matmul(n, k, m, dtype, H100, schedule)


RUNTIME_ONLY_LOAD = PREAMBLE + """
import json
from pathlib import Path
bundle = Path(sys.argv[1])
for entry in json.loads((bundle / "manifest.json").read_text())["kernels"]:
    module = tvm_ffi.load_module(str(bundle / entry["library"]))
    assert module.get_function(entry["symbol"]) is not None, entry["symbol"]
assert "tvm" not in sys.modules  # the compiler package was never needed
print("loaded")
"""


def test_bundle_loads_with_the_runtime_libraries_alone(tmp_path):
    import json
    import subprocess
    import sys

    from trimode.schedules.bundle import attention_specs, build_bundle, q8_specs

    specs = q8_specs({"odd": (100, 160)}, [1, "block", "dynamic"], "default")
    names = {(spec["m"], spec["name"]) for spec in specs}
    assert names == {(1, "gemv_r2_kw1"), ("block", "splitk_nt2_w8_g2_s1"), ("dynamic", "gemm_t128_s2_k32"),
                     (1, "dlight"), ("block", "dlight")}
    specs = [spec for spec in specs if spec["name"] != "dlight"]  # keep the test quick
    specs += attention_specs(4, 1, 32, "default")  # the tiny heads: one plan per row class
    manifest = build_bundle(specs, tmp_path, "sm_90a", jobs=2)
    entries = json.loads(manifest.read_text())["kernels"]
    assert len(entries) == len(specs)
    assert {e["key"] for e in entries if "key" in e} == {"attention/one", "attention_mma/block",
                                                         "attention_mma/many"}
    assert {entry["library"] for entry in entries} == {"kernels0.so", "kernels1.so"}
    assert all(library_has_gpu_binary(tmp_path / name) for name in ("kernels0.so", "kernels1.so"))
    q8 = [e for e in entries if e["kernel"] == "q8_matmul"]
    assert [e["rows"] for e in q8 if e["m"] == "dynamic"] == [[512, 2048]]
    assert [e["rows"] for e in q8 if e["m"] == "block"] == [[16, 32]]
    out = subprocess.run([sys.executable, "-c", RUNTIME_ONLY_LOAD, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]


def test_tune_without_a_gpu_leaves_a_bundle_to_measure_elsewhere(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from trimode.cli.tune import tune
    from trimode.runtime import tvm_runtime
    from trimode.schedules import bundle

    monkeypatch.setattr(tvm_runtime, "cuda_device_count", lambda: 0)
    few = bundle.q8_specs({"odd": (100, 160)}, [1], "default")[:1]
    monkeypatch.setattr(bundle, "q8_specs", lambda shapes, ms, candidates, arch: few)
    out = CliRunner().invoke(tune, ["--geometry", "tiny", "--bundle", str(tmp_path), "--jobs", "1"])
    assert out.exit_code == 0, out.output
    assert "no GPU here" in out.output and "trimode tune --results" in out.output
    assert json.loads((tmp_path / "manifest.json").read_text())["kernels"][0]["name"] == "gemv_r2_kw1"
    assert library_has_gpu_binary(tmp_path / "kernels0.so")


def test_dlight_leaves_the_hand_written_kernels_alone():
    from tvm.s_tir import dlight

    funcs = {f"mm{m}": q8_matmul_cuda.q8_matmul(100, 160, m, "float16", H100)
             for m in (1, 5, "block", "dynamic")}
    module = tvm.IRModule(funcs)
    with H100:
        scheduled = dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(),
                                                dlight.gpu.Fallback())(module)
    for name, func in funcs.items():
        tvm.ir.assert_structural_equal(scheduled[name], func)


@pytest.mark.parametrize("n, k, k_warps", [(6144, 5120, 2), (5120, 4096, 4), (5120, 16384, 4),
                                            (32768, 5120, 2), (131072, 5120, 2), (100, 160, 1)])
def test_default_decode_warps_split_k_evenly(n, k, k_warps):
    schedule = q8_matmul_cuda.default_schedule(n, k, 1)
    assert schedule["k_warps"] == k_warps
    assert -(-k // q8_matmul_cuda.GEMV_K_CHUNK) % schedule["k_warps"] == 0


def test_the_shipped_default_model_compiles_for_cuda(tmp_path):
    # its decode attention (3 query heads a kv head, head_dim 48) once had no thread tiling
    # and then tripped TVM's vectoriser: a user with a GPU could not run the README's command
    from trimode.compiler.build import compile_model
    from trimode.model.default_model import model_or_default
    from trimode.model.gguf_file import load_model
    from trimode.runtime.engine import quantized_parts

    model = load_model(model_or_default(None))
    out = compile_model(model.config, quantized_parts(model.weights), "cuda", "sm_90a", root=tmp_path,
                        log=lambda msg: None)
    assert library_has_gpu_binary(out / "model.so")
    # beside the four entries, the sampler's: each row's largest logits and its chunk masses
    # (a CPU build has neither: its rows are in host memory already)
    assert json.loads((out / "manifest.json").read_text())["entries"] == [
        "prefill", "decode", "verify", "draft", "top_candidates", "chunk_mass"]
