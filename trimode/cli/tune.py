"""`trimode tune`: measure schedule candidates (Q8_0 matmuls per shape and row class, attention
plans per row class) and keep the best of each in schedules/<gpu>.json.

Build and measure may run on different machines. With a GPU here, one command does both.
Without one, tune writes a candidate bundle (GPU machine code + manifest) to measure on a GPU
box that has only the TVM runtime (bench/gpu_kernels.py --bundle DIR), and a later
`trimode tune --results q8_results.json` files what that box measured.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import click

# What the compiled model uses (kernel_table.Q8_ROWS): decode, verify/draft blocks, prefill.
ROW_CLASSES = [1, "block", "dynamic"]


@click.command()
@click.option("--target", type=click.Choice(["cuda"]), default="cuda", show_default=True)
@click.option("--geometry", default="14b", show_default=True,
              help="model geometry whose matmul shapes to tune (tiny, 3b, 8b, 14b)")
@click.option("--arch", default=None, help="GPU architecture to build for [default: this GPU's, else sm_90a]")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("artifacts/tune"), show_default=True, help="where candidates are built")
@click.option("--results", "results_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="file measurements made on a GPU box (skips building)")
@click.option("--jobs", default=os.cpu_count() or 1, show_default=True,
              help="candidate libraries compiled in parallel")
@click.option("--database-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where <gpu>.json goes [default: the trimode.schedules package]")
def tune(target, geometry, arch, bundle_dir, results_file, jobs, database_dir):
    """Tune the Q8_0 matmul schedules for every shape of a geometry, and the attention plans
    of its heads, on this GPU."""
    from trimode.schedules import write_database

    if results_file is not None:
        measured = json.loads(results_file.read_text())
        _file(measured, database_dir, write_database)
        return

    from trimode.model.config import GEOMETRIES
    from trimode.runtime.tvm_runtime import cuda_arch, cuda_device_count
    from trimode.schedules.bundle import attention_specs, build_bundle, q8_specs

    if geometry not in GEOMETRIES:
        raise click.BadParameter(f"unknown geometry {geometry!r} (one of {', '.join(GEOMETRIES)})",
                                 param_hint="--geometry")
    has_gpu = cuda_device_count() > 0
    arch = arch or (cuda_arch() if has_gpu else "sm_90a")
    cfg = GEOMETRIES[geometry]
    specs = (q8_specs(cfg.matmul_shapes(), ROW_CLASSES, "all", arch)
             + attention_specs(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, "all"))
    click.echo(f"building {len(specs)} candidates for {arch} into {bundle_dir} ...")
    manifest = build_bundle(specs, bundle_dir, arch, jobs)
    if not has_gpu:
        click.echo(f"no GPU here: measure {manifest.parent} on a GPU box with\n"
                   f"  python3 bench/gpu_kernels.py --bundle {manifest.parent} --out DIR\n"
                   f"then file the results here with\n"
                   f"  trimode tune --results DIR/q8_results.json")
        return

    from trimode.schedules.measure import format_table, measure_bundle

    measured = measure_bundle(manifest.parent)
    click.echo(format_table(measured))
    _file(measured, database_dir, write_database)


def _file(measured: dict, database_dir, write_database) -> None:
    if "gpu" not in measured or "results" not in measured:
        raise click.ClickException("results file lacks 'gpu' and 'results' (write it with bench/gpu_kernels.py)")
    today = datetime.date.today().isoformat()
    path = write_database(measured["gpu"], measured["results"], today, database_dir)
    correct = sum(r["ok"] for r in measured["results"])
    click.echo(f"{correct}/{len(measured['results'])} candidates correct; best per shape written to {path}")
