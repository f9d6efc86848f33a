"""Run ON the GPU box: check and time the Q8_0 matmul kernels built by bench/build_gpu_kernels.py.

Needs only numpy, tvm_ffi (carried as a wheel) and the TVM runtime libraries (carried in
.carry/tvm_lib); no TVM compiler. Prints a table (best schedule per shape and m: time, GB/s,
% of 3000 GB/s, ratio to m = 1, the default schedule's and dlight's times) and writes every
measurement to OUT/q8_results.json, which `trimode tune --results` turns into
schedules/<gpu>.json.

On the device tool (one call; carry [".carry", ".whl"]):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \
  python3 bench/gpu_kernels.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository travels; the package need not be installed

from trimode.schedules.measure import format_table, measure_bundle  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / ".carry" / "q8")
    parser.add_argument("--tvm-lib", type=Path, default=ROOT / ".carry" / "tvm_lib")
    parser.add_argument("--out", type=Path, default=Path("."), help="where q8_results.json goes")
    args = parser.parse_args()
    measured = measure_bundle(args.bundle, args.tvm_lib)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "q8_results.json").write_text(json.dumps(measured, indent=1) + "\n")
    print(format_table(measured))


if __name__ == "__main__":
    main()
