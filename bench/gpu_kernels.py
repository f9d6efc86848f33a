"""Run ON the GPU box: check and time the Q8_0 matmul kernels built by bench/build_gpu_kernels.py.

Needs only numpy, tvm_ffi (carried as a wheel) and the TVM runtime libraries (carried in
.carry/tvmlib); no TVM compiler. Prints a table (best schedule per shape and m: time, GB/s,
% of 3000 GB/s, ratio to m = 1, the default schedule's and dlight's times) and writes every
measurement to OUT/q8_results.json, which `trimode tune --results` turns into
schedules/<gpu>.json.

On the device tool (one call, about 3-5 minutes; carry [".carry/q8", ".carry/tvmlib", ".whl"]):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/apache_tvm_ffi-0.1.14.post1-*.whl && \
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 bench/gpu_kernels.py --out $OUT
(--defaults-only: the default schedule and dlight per shape and m, about a minute.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository travels; the package need not be installed

from trimode.schedules.measure import format_table, measure_bundle, shape_names  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / ".carry" / "q8")
    parser.add_argument("--tvm-lib", type=Path,
                        default=os.environ.get("TRIMODE_TVM_LIB_DIR", ROOT / ".carry" / "tvmlib"))
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the default schedules and dlight (a quick check, not tuning)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where q8_results.json goes")
    parser.add_argument("--shape", default=None, help="measure this shape only, in this process")
    args = parser.parse_args()
    if args.shape is not None:
        measured = measure_bundle(args.bundle, args.tvm_lib, only=args.shape,
                                  defaults_only=args.defaults_only)
        (args.out / f"{args.shape}.json").write_text(json.dumps(measured) + "\n")
        return
    # One process per shape: a kernel that faults takes its CUDA context down, and with it
    # only the rest of its own shape.
    merged = {"results": []}
    with tempfile.TemporaryDirectory() as parts:
        for name in shape_names(args.bundle):
            subprocess.run([sys.executable, __file__, "--bundle", str(args.bundle), "--tvm-lib",
                            str(args.tvm_lib), "--out", parts, "--shape", name]
                           + ["--defaults-only"] * args.defaults_only)
            part = Path(parts) / f"{name}.json"
            if not part.exists():
                print(f"{name}: the measuring process died (see above)")
                continue
            measured = json.loads(part.read_text())
            merged = {**measured, "results": merged["results"] + measured["results"]}
            # written after every shape: a run cut short by its time limit keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "q8_results.json").write_text(json.dumps(merged, indent=1) + "\n")
    if "gpu" not in merged:
        sys.exit("no shape could be measured")
    print(format_table(merged))


if __name__ == "__main__":
    main()
