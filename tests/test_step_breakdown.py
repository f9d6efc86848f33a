"""bench/step_breakdown.py: a step's time against the sum of its Q8_0 matmuls timed alone,
on results shaped as bench/gpu_check.sh writes them."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_breakdown.py"
spec = importlib.util.spec_from_file_location("step_breakdown", SCRIPT)
step_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_breakdown)


def q8_result(shape, m, rows, us, default=True, ok=True):
    return {"kernel": "q8_matmul", "shape_name": shape, "m": m, "rows": rows, "time_us": us,
            "default": default, "ok": ok}


Q8 = {"results": [
    *[q8_result(s, 1, 1, us) for s, us in (("qkv", 10), ("o", 8), ("gate_up", 50), ("down", 25), ("head", 200))],
    *[q8_result(s, "block", 32, us) for s, us in (("qkv", 12), ("o", 9), ("gate_up", 60), ("down", 30), ("head", 240))],
    q8_result("qkv", 1, 1, 5, default=False),          # a faster candidate the artifact does not use
    q8_result("o", "block", 16, 1, ok=False),          # a failed one: no figure at 16 rows
    q8_result("qkv", "dynamic", 512, 900),             # prefill: not a step here
]}
STEPS = {"rows": [
    {"entry": "decode", "name": "decode", "tokens": 1, "fill": 512, "seconds": 4.5e-3},
    {"entry": "verify", "name": "verify T=32", "tokens": 32, "fill": 512, "seconds": 5.0e-3},
    {"entry": "draft", "name": "draft T=16", "tokens": 16, "fill": 512, "seconds": 4.9e-3},
    {"entry": "prefill", "name": "prefill T=2048", "tokens": 2048, "fill": 0, "seconds": 0.2},
]}
EAGER = {"rows": [{"entry": "decode", "name": "decode", "tokens": 1, "fill": 512, "seconds": 5.5e-3}]}


def test_the_rest_is_the_step_less_its_default_matmuls():
    rows = {r["name"]: r for r in step_breakdown.breakdown(STEPS, Q8, n_layers=2, eager_report=EAGER)}
    assert set(rows) == {"decode", "verify T=32", "draft T=16"}   # prefill is not a step here
    decode = rows["decode"]
    assert decode["matmul_ms"] == pytest.approx((2 * (10 + 8 + 50 + 25) + 200) * 1e-3)
    assert decode["rest_ms"] == pytest.approx(4.5 - decode["matmul_ms"])
    assert decode["eager_ms"] == pytest.approx(5.5)
    assert rows["verify T=32"]["matmul_ms"] == pytest.approx((2 * (12 + 9 + 60 + 30) + 240) * 1e-3)
    assert rows["verify T=32"]["eager_ms"] is None
    assert rows["draft T=16"]["matmul_ms"] is None and rows["draft T=16"]["rest_ms"] is None


def test_the_script_prints_the_table_from_an_output_folder(tmp_path):
    (tmp_path / "q8_results.json").write_text(json.dumps(Q8))
    (tmp_path / "gpu_check.json").write_text(json.dumps(STEPS))
    (tmp_path / "gpu_check_eager.json").write_text(json.dumps(EAGER))
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--geometry", "tiny"],
                         capture_output=True, text=True, check=True).stdout
    assert "| decode | 512 | 4.50 |" in out and "| 5.50 |" in out
    assert "prefill" not in out
