"""`trimode compile`: build (or find cached) compiled modules for a model file or a geometry."""
from __future__ import annotations

import click

from trimode.cli import kv_cache_of, kv_cache_options


@click.command("compile")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--geometry", type=click.Choice(["tiny", "3b", "8b", "14b"]),
              help="Compile a published geometry (all-Q8_0 weights) without a model file.")
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default=None,
              help="Default: cuda when a GPU is present, else llvm.")
@click.option("--arch", default=None, help="CUDA architecture, e.g. sm_90a (default: this GPU's, else sm_90a).")
@click.option("--gpu", default=None,
              help="GPU whose tuned schedules to use (trimode/schedules/<gpu>.json), e.g. "
                   "'NVIDIA H100 80GB HBM3' (default: this machine's GPU).")
@click.option("--force", is_flag=True, help="Rebuild even if a cached artifact exists.")
@kv_cache_options
def compile_cmd(model, geometry, target, arch, gpu, force, cache_type_k, cache_type_v):
    """Compile MODEL (or --geometry) into artifacts/ and print the artifact folder."""
    from trimode.compiler.build import compile_model
    from trimode.model.config import GEOMETRIES
    from trimode.runtime.tvm_runtime import (cuda_arch, cuda_device_count, cuda_device_name,
                                             default_target)

    if (model is None) == (geometry is None):
        raise click.UsageError("give a MODEL file or --geometry (one of them)")
    kv_cache = kv_cache_of(cache_type_k, cache_type_v)
    if model:
        from trimode.model.gguf_file import load_model
        from trimode.runtime.engine import quantized_parts

        loaded = load_model(model)
        cfg, quantized = loaded.config, quantized_parts(loaded.weights)
    else:
        cfg, quantized = GEOMETRIES[geometry], {"embed": True, "layers": True, "output": True}
    target = target or default_target()
    if target == "cuda" and cuda_device_count() > 0:
        arch = arch or cuda_arch()
        gpu = gpu or cuda_device_name()
    out = compile_model(cfg, quantized, target, arch, force=force, gpu_name=gpu, kv_cache=kv_cache)
    click.echo(str(out))
