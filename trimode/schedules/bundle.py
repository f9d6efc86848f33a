"""Candidate bundles: schedules built here, measured on a GPU box that has only the TVM runtime.

A bundle is a folder of exported libraries (`kernels<i>.so`, GPU machine code embedded) and
`manifest.json` naming each function: its library, kernel, shape (attention: heads), m (the
row class), schedule and how many rows to run it with. `trimode.schedules.measure` reads the
bundle; building needs the TVM compiler.
"""
from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
# The rows each row class is measured at, its time being their sum: prefill at 512 and at
# issue 7's 2048; a verify/draft kernel at the default draft block (draft length 15 + 1) and
# at the block of issue 7's target. A static m is measured at m.
MEASURED_ROWS = {"dynamic": [512, 2048], "block": [16, 32]}
# The dlight baseline needs a static row count: the largest measured.
BASELINE_ROWS = {"block": 32}


def measured_rows(m) -> list[int]:
    return MEASURED_ROWS.get(m, [m])


def q8_specs(shapes: dict[str, tuple[int, int]], ms, candidates: str, arch: str = "sm_90a") -> list[dict]:
    """What to build for a GPU of `arch`: every (shape, m) with the default schedule, all
    tuning candidates (candidates="all") or the default alone ("default"); plus the dlight
    baseline (TVM's default schedules, what the issue measured first) for decode and blocks."""
    from trimode.compiler.kernels import q8_matmul_cuda as q8

    specs = []
    for shape_name, (n, k) in shapes.items():
        shape_specs = []
        for m in ms:
            if m == "dynamic" and shape_name.endswith("head"):
                continue  # a prefill's logits are its last row's: the head runs at m = 1
            default = q8.default_schedule(n, k, m)
            schedules = [default]
            if candidates == "all":
                schedules += [c for c in q8.schedule_candidates(n, k, m, arch) if c != default]
            for schedule in schedules:
                shape_specs.append({"kernel": "q8_matmul", "shape_name": shape_name, "shape": [n, k],
                                    "m": m, "rows": measured_rows(m), "schedule": schedule,
                                    "name": q8.schedule_name(schedule), "default": schedule == default})
            if m != "dynamic":
                rows = BASELINE_ROWS.get(m, m)
                shape_specs.append({"kernel": "q8_matmul", "shape_name": shape_name, "shape": [n, k],
                                    "m": m, "rows": [rows], "schedule": None, "name": "dlight",
                                    "default": False})
        # wgmma kernels last in their shape: gpu_kernels.py measures a shape in one process, and
        # one of these faulting on a GPU (none has run on one yet) would lose only what follows
        specs += sorted(shape_specs, key=lambda spec: (spec["schedule"] or {}).get("mma") == "wgmma")  # stable
    return specs


# The T and cache fill attention plans are measured at, per row class.
ATTENTION_CASES = {"one": (1, 4096), "block": (32, 4096), "many": (512, 0)}


def attention_specs(n_heads: int, n_kv_heads: int, head_dim: int, candidates: str) -> list[dict]:
    """What to build for attention: per row class its default plan, or every candidate plan
    (candidates="all"). Measured causal (verify and draft share a plan)."""
    import dataclasses

    from trimode.compiler.kernel_table import cuda_attention_kernel
    from trimode.compiler.kernels import attention_cuda, attention_mma

    specs = []
    for rows, (t, fill) in ATTENTION_CASES.items():
        kernel = cuda_attention_kernel(rows, head_dim)  # the model's choice
        module = attention_mma if kernel == "attention_mma" else attention_cuda
        default = module.default_plan(n_heads, n_kv_heads, rows, head_dim)
        plans = module.plan_candidates(n_heads, n_kv_heads, rows, head_dim) if candidates == "all" else [default]
        for plan in plans:
            schedule = dataclasses.asdict(plan)
            specs.append({"kernel": kernel, "key": f"{kernel}/{rows}", "shape_name": f"attention_{rows}",
                          "heads": [n_heads, n_kv_heads, head_dim], "m": rows, "rows": [t], "fill": fill,
                          "schedule": schedule, "default": plan == default,
                          "name": "r{rows_per_cta}_k{keys_per_tile}_c{target_ctas}_s{max_splits}".format(
                              **schedule)})
    return specs


def _primfunc(spec, target):
    from trimode.compiler.kernels import q8_matmul_cuda as q8

    if spec["kernel"] == "attention":
        from trimode.compiler.kernels import attention_cuda

        plan = attention_cuda.AttentionPlan(**spec["schedule"])
        t = 1 if spec["m"] == "one" else "dynamic"
        return attention_cuda.attention_cuda(*spec["heads"], True, "float16", t, plan=plan)
    if spec["kernel"] == "attention_mma":
        from trimode.compiler.kernels import attention_cuda, attention_mma

        plan = attention_cuda.AttentionPlan(**spec["schedule"])
        return attention_mma.attention_mma(*spec["heads"], True, "float16", spec["m"], plan)
    n, k = spec["shape"]
    if spec["schedule"] is not None:
        return q8.q8_matmul(n, k, spec["m"], "float16", target, spec["schedule"])
    return _dlight_baseline(n, k, spec["rows"][0], target)


def _dlight_baseline(n, k, m, target):
    """TVM's default: dequantize and matmul as two blocks, scheduled by dlight's GPU rules."""
    import tvm
    from tvm.s_tir import dlight

    module = tvm.IRModule({"main": _dequant_matmul_blocks(n, k, m)})
    with target:
        module = dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(),
                                             dlight.gpu.LowBatchGEMV(), dlight.gpu.Fallback())(module)
    return module["main"]


def _dequant_matmul_blocks(n, k, m):
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def q8_matmul(x: T.Buffer((T.int64(m), T.int64(k)), "float16"),
                  q: T.Buffer((T.int64(n), T.int64(k)), "int8"),
                  scale: T.Buffer((T.int64(n), T.int64(k // 32)), "float16"),
                  y: T.Buffer((T.int64(m), T.int64(n)), "float16")):
        T.func_attr({"tirx.noalias": True})
        w = T.sblock_alloc_buffer((T.int64(n), T.int64(k)), "float16")
        acc = T.sblock_alloc_buffer((T.int64(m), T.int64(n)), "float32")
        for j, c in T.grid(T.int64(n), T.int64(k)):
            with T.sblock("dequant"):
                vj, vc = T.axis.remap("SS", [j, c])
                w[vj, vc] = T.Cast("float16", q[vj, vc]) * scale[vj, vc // 32]
        for r, j, c in T.grid(T.int64(m), T.int64(n), T.int64(k)):
            with T.sblock("matmul"):
                vr, vj, vc = T.axis.remap("SSR", [r, j, c])
                with T.init():
                    acc[vr, vj] = T.float32(0)
                acc[vr, vj] = acc[vr, vj] + T.Cast("float32", x[vr, vc]) * T.Cast("float32", w[vj, vc])
        for r, j in T.grid(T.int64(m), T.int64(n)):
            with T.sblock("cast"):
                vr, vj = T.axis.remap("SS", [r, j])
                y[vr, vj] = T.Cast("float16", acc[vr, vj])

    return q8_matmul


def build_bundle(specs: list[dict], out_dir: Path, arch: str = "sm_90a", jobs: int = 1) -> Path:
    """Compile every spec into `jobs` libraries under `out_dir` (built in parallel: nvcc
    compiles one library's kernels on one core); returns the manifest's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("kernels*.so"):
        stale.unlink()
    numbered = [{**spec, "symbol": f"k{index}"} for index, spec in enumerate(specs)]
    jobs = max(1, min(jobs, len(numbered)))
    groups = [(numbered[i::jobs], out_dir / f"kernels{i}.so", arch) for i in range(jobs)]
    if jobs == 1:
        built = [_build_library(*groups[0])]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            built = list(pool.map(_build_library, *zip(*groups)))
    entries = sorted((entry for group in built for entry in group), key=lambda e: int(e["symbol"][1:]))
    manifest = {"arch": arch, "kernels": entries}
    manifest_path = out_dir / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest_path


def _build_library(specs: list[dict], library_path: Path, arch: str) -> list[dict]:
    import tvm

    from trimode.artifacts import dependent_launch_enabled
    from trimode.compiler.cuda_env import cuda_build_context, library_has_gpu_binary
    from trimode.compiler.grid_dependency import tir_pipeline

    # the static limit: kernels here use no dynamic shared memory
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
                                "max_threads_per_block": 1024, "thread_warp_size": 32})
    funcs, entries = {}, []
    for spec in specs:
        try:
            funcs[spec["symbol"]] = _primfunc(spec, target).with_attr("global_symbol", spec["symbol"])
        except Exception as err:  # a baseline rule that does not apply must not stop the rest
            print(f"skipped {spec['shape_name']} m={spec['m']} {spec['name']}: {err}".splitlines()[0])
            continue
        entries.append({**spec, "library": library_path.name})
    with cuda_build_context(target):  # launched as the model launches them
        library = tvm.compile(tvm.IRModule(funcs), target=target,
                              tir_pipeline=tir_pipeline(dependent_launch_enabled({"kind": "cuda"})))
    library.export_library(str(library_path))
    if not library_has_gpu_binary(library_path):
        raise RuntimeError(f"{library_path} carries CUDA source, not machine code")
    return entries
