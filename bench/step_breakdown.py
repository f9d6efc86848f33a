"""Where a step's time goes: the measured step against its Q8_0 matmuls timed alone.

Reads what one run of bench/gpu_check.sh writes to $OUT: gpu_check.json (the steps of the
graph build), gpu_check_eager.json (the same without CUDA graphs, if run) and q8_results.json
(every Q8_0 kernel timed alone: the default schedules are the ones the artifacts use). For
decode and each block T it prints the step, the sum of its matmuls (layers x (qkv + o +
gate_up + down) + head at that row count) and the rest: attention, the small kernels, the
launches between them and the host. Runs anywhere (no GPU, no TVM):

    python bench/step_breakdown.py OUT_DIR [--geometry 14b]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trimode.model.config import GEOMETRIES  # noqa: E402

LAYER_MATMULS = ("qkv", "o", "gate_up", "down")


def default_times(q8_results: dict) -> dict[tuple[str, int], float]:
    """(shape name, rows) -> us of the default schedule (m = 1 for decode, the block class
    at its measured rows)."""
    times = {}
    for r in q8_results["results"]:
        if r.get("kernel") == "q8_matmul" and r.get("default") and r.get("ok") and r["m"] != "dynamic":
            times[(r["shape_name"], r["rows"])] = r["time_us"]
    return times


def matmul_seconds(times: dict, n_layers: int, rows: int) -> float | None:
    """The step's matmuls timed alone, or None where a shape was not measured at these rows."""
    try:
        per_layer = sum(times[(name, rows)] for name in LAYER_MATMULS)
        return (n_layers * per_layer + times[("head", rows)]) * 1e-6
    except KeyError:
        return None


def breakdown(step_report: dict, q8_results: dict, n_layers: int, eager_report: dict | None = None,
              entries: tuple[str, ...] = ("decode", "verify", "draft")) -> list[dict]:
    times = default_times(q8_results)
    eager = {(r["entry"], r["tokens"], r["fill"]): r["seconds"] for r in (eager_report or {}).get("rows", [])}
    out = []
    for r in step_report["rows"]:
        if r["entry"] not in entries:
            continue
        matmuls = matmul_seconds(times, n_layers, r["tokens"])
        out.append({"name": r["name"], "fill": r["fill"], "step_ms": 1e3 * r["seconds"],
                    "matmul_ms": None if matmuls is None else 1e3 * matmuls,
                    "rest_ms": None if matmuls is None else 1e3 * (r["seconds"] - matmuls),
                    "eager_ms": 1e3 * eager[(r["entry"], r["tokens"], r["fill"])]
                    if (r["entry"], r["tokens"], r["fill"]) in eager else None})
    return out


def render(rows: list[dict]) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    lines = ["| step | fill | ms | Q8_0 matmuls alone, ms | rest, ms | without graphs, ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['fill']} | {ms(r['step_ms'])} | {ms(r['matmul_ms'])} | "
                     f"{ms(r['rest_ms'])} | {ms(r['eager_ms'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--geometry", default="14b", choices=sorted(GEOMETRIES))
    args = ap.parse_args()
    read = lambda name: json.loads((args.out_dir / name).read_text())  # noqa: E731
    q8 = read("q8_results.json")
    eager = read("gpu_check_eager.json") if (args.out_dir / "gpu_check_eager.json").exists() else None
    rows = breakdown(read("gpu_check.json"), q8, GEOMETRIES[args.geometry].n_layers, eager)
    if (args.out_dir / "gpu_check_block16.json").exists():
        rows += breakdown(read("gpu_check_block16.json"), q8, GEOMETRIES[args.geometry].n_layers,
                          entries=("verify", "draft"))
    print(render(rows))


if __name__ == "__main__":
    main()
