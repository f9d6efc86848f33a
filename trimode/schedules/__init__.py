"""Per-GPU schedule databases (JSON) and their lookup.

One file per GPU model, `<gpu-key>.json` beside this module, written by `trimode tune`:

    {"gpu": "NVIDIA H100 80GB HBM3",
     "entries": {"q8_matmul/6144x5120/m32": {"schedule": {...}, "time_us": 11.9,
                                            "candidates": 14, "measured": "2026-11-27"}}}

Keys are `q8_matmul/<n>x<k>/m<m>` with m an int, "block" or "dynamic" (the row classes of
q8_matmul_cuda), and `<attention kernel>/<rows>` ("attention/one", "attention_mma/block",
"attention_mma/many": kernel_table's plans). Nothing here imports TVM.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

DATABASE_DIR = Path(__file__).resolve().parent


def gpu_key(gpu_name: str) -> str:
    """File-name form of a GPU's name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    key = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    if not key:
        raise ValueError(f"GPU name {gpu_name!r} has no letters or digits")
    return key


def entry_key(kernel: str, shape, m) -> str:
    n, k = shape
    return f"{kernel}/{int(n)}x{int(k)}/m{m}"


def database_path(gpu_name: str, directory: Path | None = None) -> Path:
    return Path(directory or DATABASE_DIR) / f"{gpu_key(gpu_name)}.json"


def load_database(gpu_name: str, directory: Path | None = None) -> dict | None:
    """The GPU's database, or None when this GPU was never tuned."""
    path = database_path(gpu_name, directory)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def lookup(gpu_name: str, kernel: str, shape, m, directory: Path | None = None) -> dict | None:
    """The tuned schedule for `kernel` at `shape` (n, k) and row class `m` (int, "block" or "dynamic")
    on this GPU, or None (unknown GPU or untuned shape: use the kernel's default)."""
    database = load_database(gpu_name, directory)
    if database is None:
        return None
    entry = database["entries"].get(entry_key(kernel, shape, m))
    return None if entry is None else dict(entry["schedule"])


def database_for(gpu_name: str | None, directory: Path | None = None) -> tuple[dict, str]:
    """Every tuned schedule of this GPU keyed by entry_key, and an id naming the database's
    content (part of the artifact key, so re-tuning rebuilds); ({}, "none") when the GPU is
    unknown or was never tuned: the kernels' default schedules apply."""
    if not gpu_name:
        return {}, "none"
    path = database_path(gpu_name, directory)
    if not path.exists():
        return {}, "none"
    raw = path.read_bytes()
    schedules = {key: dict(entry["schedule"]) for key, entry in json.loads(raw)["entries"].items()}
    return schedules, f"{gpu_key(gpu_name)}-{hashlib.sha256(raw).hexdigest()[:12]}"


def best_per_key(measurements: list[dict]) -> dict[str, dict]:
    """The fastest correct schedule for each (kernel, shape, m), as database entries.
    A measurement: {"kernel", "shape": [n, k], "m", "rows", "schedule", "time_us", "ok"}, or
    with its database "key" (attention). A
    row class measured at several row counts (a block at 16 and 32) is ranked by the sum of
    its times, and only a schedule correct at every one of them is kept."""
    totals: dict[tuple, dict] = {}
    for item in measurements:
        key = item.get("key") or entry_key(item["kernel"], item["shape"], item["m"])
        candidate = json.dumps(item["schedule"], sort_keys=True) if item["schedule"] else item["name"]
        total = totals.setdefault((key, candidate), {"schedule": item["schedule"], "time_us": 0.0, "ok": True})
        total["time_us"] += item["time_us"]
        total["ok"] = total["ok"] and bool(item["ok"])
    best: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for (key, _), total in totals.items():
        counts[key] = counts.get(key, 0) + 1
        if total["schedule"] is None or not total["ok"]:
            continue  # wrong results, or a baseline that has no schedule to hand back
        if key not in best or total["time_us"] < best[key]["time_us"]:
            best[key] = {"schedule": total["schedule"], "time_us": total["time_us"]}
    for key, entry in best.items():
        entry["candidates"] = counts[key]
    return best


def write_database(gpu_name: str, measurements: list[dict], measured_on: str,
                   directory: Path | None = None) -> Path:
    """Merge the best of `measurements` into the GPU's database (new results replace old
    ones for the same key) and return its path."""
    database = load_database(gpu_name, directory) or {"gpu": gpu_name, "entries": {}}
    for key, entry in best_per_key(measurements).items():
        database["entries"][key] = {**entry, "measured": measured_on}
    database["entries"] = dict(sorted(database["entries"].items()))
    path = database_path(gpu_name, directory)
    path.write_text(json.dumps(database, indent=1) + "\n")
    return path
