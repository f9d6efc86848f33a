"""`trimode bench`: time every compiled entry of a model or a published geometry against the
device's memory roofline, and against plain PyTorch where torch is installed."""
from __future__ import annotations

import json

import click

from trimode.cli import INT_LIST, kv_cache_of, kv_cache_options


@click.command()
@click.option("-m", "--model", type=click.Path(exists=True, dir_okay=False),
              help="GGUF model to time (its own weights)")
@click.option("--geometry", type=click.Choice(["tiny", "3b", "8b", "14b"]),
              help="time a published geometry with random Q8_0 weights instead of a file")
@click.option("--target", type=click.Choice(["llvm", "cuda"]), help="device (default: cuda if present)")
@click.option("--artifact", type=click.Path(exists=True, file_okay=False),
              help="compiled folder to use as it is (default: the artifact cache, compiling on a miss)")
@click.option("--fills", default="512,4096", show_default=True, type=INT_LIST,
              help="cache lengths to time decode/verify/draft at")
@click.option("--block", default=32, show_default=True, help="rows of the verify and draft passes")
@click.option("--prefill", default=2048, show_default=True, help="prompt length of the prefill timing")
@click.option("-c", "--ctx-size", type=int, help="KV cache size  [default: what the timings need]")
@click.option("--repeat", default=10, show_default=True, help="timed calls per figure (median kept)")
@click.option("--torch/--no-torch", "with_torch", default=True, show_default=True,
              help="also time plain PyTorch bf16 at the same geometry (where torch is installed)")
@click.option("--json", "as_json", is_flag=True, help="print the whole report as one JSON object")
@kv_cache_options
def bench(model, geometry, target, artifact, fills, block, prefill, ctx_size, repeat, with_torch,
          as_json, cache_type_k, cache_type_v):
    """Time decode, verify, draft and prefill; AR tok/s, spec cycle, load time, memory."""
    from trimode.model.config import GEOMETRIES
    from trimode.runtime.bench import BenchPlan, bench_loader, render_table, run_bench
    from trimode.runtime.tvm_runtime import cuda_device_count, default_target

    if (model is None) == (geometry is None):
        raise click.UsageError("give -m MODEL or --geometry (one of them)")
    target = target or default_target()
    if target == "cuda" and cuda_device_count() == 0:
        raise click.UsageError("--target cuda: the driver reports no CUDA GPU here (use --target llvm)")
    log = (lambda msg: click.echo(msg, err=True))

    cfg, load = bench_loader(model, None if model else GEOMETRIES[geometry], target, artifact, log,
                             kv_cache_of(cache_type_k, cache_type_v))
    plan = BenchPlan(fills=fills, block=block, prefill=prefill, repeat=repeat, ctx=ctx_size)
    problem = plan.problem(cfg)
    if problem:
        raise click.UsageError(problem)
    report = run_bench(cfg, plan, target, load, with_torch)
    click.echo(json.dumps(report, indent=1) if as_json else render_table(report))
