"""Candidate bundles: schedules built here, measured on a GPU box that has only the TVM runtime.

A bundle is a folder with one exported library (`kernels.so`, GPU machine code embedded) and
`manifest.json` naming each function in it: its kernel, shape, m, schedule and how many rows
to run it with. `trimode.schedules.measure` reads the bundle; building needs the TVM compiler.
"""
from __future__ import annotations

import json
from pathlib import Path

LIBRARY = "kernels.so"
MANIFEST = "manifest.json"
# Rows a "dynamic" (prefill) kernel is measured with.
PREFILL_ROWS = 512


def q8_specs(shapes: dict[str, tuple[int, int]], ms, candidates: str) -> list[dict]:
    """What to build: every (shape, m) with the default schedule, all tuning candidates
    (candidates="all") or the default alone ("default"); plus the dlight baseline for m=1 and
    the largest block m, the schedules the issue measured first."""
    from trimode.compiler.kernels import q8_matmul_cuda as q8

    specs = []
    for shape_name, (n, k) in shapes.items():
        for m in ms:
            default = q8.default_schedule(n, k, m)
            schedules = [default]
            if candidates == "all":
                schedules += [c for c in q8.schedule_candidates(n, k, m) if c != default]
            for schedule in schedules:
                specs.append({"kernel": "q8_matmul", "shape_name": shape_name, "shape": [n, k],
                              "m": m, "schedule": schedule, "name": q8.schedule_name(schedule),
                              "default": schedule == default})
        blocks = [m for m in ms if m != "dynamic"]
        for m in sorted({min(blocks), max(blocks)}) if blocks else ():
            specs.append({"kernel": "q8_matmul", "shape_name": shape_name, "shape": [n, k],
                          "m": m, "schedule": None, "name": "dlight", "default": False})
    return specs


def _primfunc(spec, target):
    from trimode.compiler.kernels import q8_matmul_cuda as q8

    n, k = spec["shape"]
    if spec["schedule"] is not None:
        return q8.q8_matmul(n, k, spec["m"], "float16", target, spec["schedule"])
    return _dlight_baseline(n, k, spec["m"], target)


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


def build_bundle(specs: list[dict], out_dir: Path, arch: str = "sm_90a") -> Path:
    """Compile every spec into one library under `out_dir`; returns the manifest's path."""
    import tvm

    from trimode.compiler.cuda_env import cuda_build_context, library_has_gpu_binary

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    funcs, entries = {}, []
    for index, spec in enumerate(specs):
        symbol = f"k{index}"
        try:
            funcs[symbol] = _primfunc(spec, target).with_attr("global_symbol", symbol)
        except Exception as err:  # a baseline rule that does not apply must not stop the rest
            print(f"skipped {spec['shape_name']} m={spec['m']} {spec['name']}: {err}".splitlines()[0])
            continue
        rows = PREFILL_ROWS if spec["m"] == "dynamic" else spec["m"]
        entries.append({**spec, "symbol": symbol, "rows": rows})
    with cuda_build_context(target):
        library = tvm.compile(tvm.IRModule(funcs), target=target)
    library_path = out_dir / LIBRARY
    library.export_library(str(library_path))
    if not library_has_gpu_binary(library_path):
        raise RuntimeError(f"{library_path} carries CUDA source, not machine code")
    manifest = {"arch": arch, "library": LIBRARY, "kernels": entries}
    manifest_path = out_dir / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest_path
