"""Build, here, everything bench/gpu_kernels.py needs on a GPU box that has no TVM compiler.

Writes (all ignored by git, carried by name to the GPU box):
  .carry/q8/        kernels<i>.so (sm_90a fatbin embedded) + manifest.json: every Q8_0 matmul
                    candidate schedule for the 14B shapes for decode (m = 1), blocks (run at
                    16 and 32 rows) and prefill (512 rows), plus the tiny geometry's shapes,
                    plus dlight baselines; and every attention plan of the 14B's heads
  .carry/tvmlib/   libtvm_runtime.so, libtvm_runtime_cuda.so from this venv's apache-tvm
  .whl/             apache-tvm-ffi 0.1.14.post1 for CPython 3.12 (the GPU box's Python)

Usage: python bench/build_gpu_kernels.py [--candidates all|default] [--geometry 14b]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
TVM_FFI = "apache-tvm-ffi==0.1.14.post1"
MS = [1, "block", "dynamic"]


def fetch_tvm_ffi_wheel(dest: Path) -> None:
    if any(dest.glob("apache_tvm_ffi-0.1.14.post1-cp312-*.whl")):
        return
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(dest), TVM_FFI], check=True)


def copy_runtime_libs(dest: Path) -> None:
    from trimode.schedules.measure import default_lib_dir

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(default_lib_dir() / name, dest / name)


@click.command()
@click.option("--geometry", default="14b", show_default=True, help="geometry whose shapes to build")
@click.option("--candidates", type=click.Choice(["all", "default"]), default="all", show_default=True)
@click.option("--arch", default="sm_90a", show_default=True)
@click.option("--jobs", default=os.cpu_count() or 1, show_default=True, help="libraries built in parallel")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=ROOT / ".carry" / "q8",
              show_default=True)
def main(geometry, candidates, arch, jobs, out_dir):
    from trimode.model.config import GEOMETRIES
    from trimode.schedules.bundle import attention_specs, build_bundle, q8_specs

    if geometry not in GEOMETRIES:
        raise click.BadParameter(f"unknown geometry {geometry!r} (one of {', '.join(GEOMETRIES)})")
    shapes = GEOMETRIES[geometry].matmul_shapes()
    cfg = GEOMETRIES[geometry]
    specs = q8_specs(shapes, MS, candidates, arch) + attention_specs(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                                               candidates)
    # the tiny geometry: odd sizes (K = 96 is not a multiple of 64) must be right too
    tiny = {f"tiny_{name}": shape for name, shape in GEOMETRIES["tiny"].matmul_shapes().items()}
    specs += q8_specs(tiny, MS, "default")
    specs += q8_specs({"tiny_odd": (100, 160)}, [1, 5, 64, "block", "dynamic"], candidates, arch)
    started = time.time()
    manifest = build_bundle(specs, out_dir, arch, jobs)
    click.echo(f"built {len(specs)} kernels into {manifest.parent} in {time.time() - started:.0f} s")
    copy_runtime_libs(ROOT / ".carry" / "tvmlib")
    fetch_tvm_ffi_wheel(ROOT / ".whl")
    click.echo("carry: .carry .whl   then run: see bench/gpu_kernels.py")


if __name__ == "__main__":
    main()
