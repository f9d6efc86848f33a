"""Compile a model geometry for a target into one VM library, cached under artifacts/.

An artifact is a folder holding `model.so` (the VM executable with every entry) and
`manifest.json` (what the runtime needs to call it: parameter names, shapes and dtypes in
call order, activation dtype, entries). Its name hashes everything that changes the build.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from trimode import __version__
from trimode.artifacts import (MANIFEST, amx_enabled, artifact_dir, build_key, cuda_graphs_enabled,
                               dependent_launch_enabled, int8_activations_enabled, layout_key,
                               resolve_target, schedules_for)
from trimode.model.config import ModelConfig
from trimode.model.kv_cache import check_kv_cache


def compile_model(cfg: ModelConfig, quantized: dict[str, bool], target_name: str = "llvm",
                  arch: str | None = None, root: Path | None = None, force: bool = False,
                  log=lambda msg: print(msg, file=sys.stderr), gpu_name: str | None = None,
                  kv_cache: str = "f16") -> Path:
    """Returns the artifact folder, building it unless an identical build is cached.
    gpu_name picks the tuned schedule database (schedules/<gpu>.json) of a CUDA build;
    kv_cache how the K/V cache keeps a row (model/kv_cache.py)."""
    check_kv_cache(kv_cache, cfg.head_dim, target_name)
    target = resolve_target(target_name, arch)
    schedules, schedules_id = schedules_for(target, gpu_name)
    key = build_key(cfg, quantized, target, schedules_id, kv_cache)
    out = artifact_dir(cfg, quantized, target_name, key, root)
    if (out / MANIFEST).exists() and not force:
        return out  # a cache hit never pays for importing the compiler

    import tvm

    from trimode.compiler.kernel_table import Kernels
    from trimode.compiler.model import NLDModel, mark_static_arguments
    from trimode.compiler.pipeline import build_library, cpu_target, register_lanes

    started = time.time()
    log(f"compiling {cfg.geometry_key()} for {target_name} -> {out}")
    if target_name == "cuda":
        log(f"  schedules: tuned database {schedules_id}" if schedules else
            f"  schedules: no tuned database for GPU {gpu_name or '(none named)'}; kernel defaults")
    int8_dot, amx = int8_activations_enabled(target), amx_enabled(target)
    lanes = register_lanes(cpu_target(target, int8_dot)) if target_name == "llvm" else 8
    kernels = Kernels(cfg, target_name, schedules, int8_dot, lanes, kv_cache, amx)
    model = NLDModel(cfg, quantized, kernels)
    mod, named_params = model.export_tvm(spec=model.entry_specs())
    mod = mark_static_arguments(mod)
    log(f"  exported Relax module ({len(named_params)} parameters) in {time.time() - started:.1f}s")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        graph_entries = build_library(mod, target, str(tmp / "model.so"), log,
                                      cuda_graphs=cuda_graphs_enabled(target),
                                      dependent_launch=dependent_launch_enabled(target),
                                      int8_dot=kernels.int8_activations, amx=amx)
        manifest = {
            "key": key,
            "target": target_name,
            "target_spec": target,
            "dtype": kernels.dtype,
            "kv_dtype": kernels.kv_dtype,
            "kv_cache": kv_cache,
            "activations": kernels.matmul_activations,
            "int8_dot": kernels.int8_activations,
            "amx": amx,
            "layout": layout_key(cfg, quantized),
            "config": cfg.geometry_key(),
            "entries": list(model.entry_specs()),
            "cuda_graph_entries": graph_entries,
            "dependent_launch": dependent_launch_enabled(target),
            "params": [{"name": name, "shape": [int(s) for s in p.shape], "dtype": p.dtype}
                       for name, p in named_params],
            "tvm": tvm.__version__,
            "trimode": __version__,
            "build_seconds": round(time.time() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a half-written artifact is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  built in {time.time() - started:.1f}s")
    return out
