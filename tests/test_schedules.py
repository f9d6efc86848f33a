"""Schedule databases: what tune writes is what compile looks up; unknown GPUs fall back."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from trimode import schedules
from trimode.schedules.measure import format_table, q8_bytes, q8_reference, random_weights

GPU = "NVIDIA H100 80GB HBM3"
MMA_FAST = {"kind": "mma", "n_tiles": 2, "k_warps": 4}
MMA_SLOW = {"kind": "mma", "n_tiles": 1, "k_warps": 2}
GEMV = {"kind": "gemv", "rows_per_warp": 2, "k_warps": 4}


def _result(shape, m, schedule, time_us, ok=True, name=None):
    return {"kernel": "q8_matmul", "shape_name": "qkv", "shape": list(shape), "m": m,
            "schedule": schedule, "name": name or str(schedule), "default": False,
            "rows": 512 if m == "dynamic" else m, "time_us": time_us, "ok": ok,
            "rel_err": 1e-3 if ok else 1.0, "gbps": q8_bytes(*shape, 1) / time_us / 1e3}


MEASURED = {"gpu": GPU, "copy_gbps": 3021.0, "results": [
    _result((6144, 5120), 1, GEMV, 13.0),
    _result((6144, 5120), 1, MMA_SLOW, 20.0),
    _result((6144, 5120), 32, MMA_SLOW, 14.0),
    _result((6144, 5120), 32, MMA_FAST, 12.0),
    _result((6144, 5120), 32, {"kind": "mma", "n_tiles": 4, "k_warps": 2}, 9.0, ok=False),  # wrong: never kept
    _result((6144, 5120), 32, None, 5.0, name="dlight"),  # baseline: never filed
    _result((6144, 5120), "dynamic", MMA_FAST, 300.0),
]}


def test_gpu_key_is_a_file_name():
    assert schedules.gpu_key(GPU) == "nvidia-h100-80gb-hbm3"
    assert schedules.gpu_key("NVIDIA H200") == "nvidia-h200"


def test_lookup_returns_the_fastest_correct_schedule(tmp_path):
    path = schedules.write_database(GPU, MEASURED["results"], "2026-11-27", tmp_path)
    assert path == tmp_path / "nvidia-h100-80gb-hbm3.json"
    assert schedules.lookup(GPU, "q8_matmul", (6144, 5120), 1, tmp_path) == GEMV
    assert schedules.lookup(GPU, "q8_matmul", (6144, 5120), 32, tmp_path) == MMA_FAST
    assert schedules.lookup(GPU, "q8_matmul", (6144, 5120), "dynamic", tmp_path) == MMA_FAST
    entry = json.loads(path.read_text())["entries"]["q8_matmul/6144x5120/m32"]
    assert entry["time_us"] == 12.0 and entry["candidates"] == 4 and entry["measured"] == "2026-11-27"


def test_unknown_gpu_or_shape_falls_back(tmp_path):
    schedules.write_database(GPU, MEASURED["results"], "2026-11-27", tmp_path)
    assert schedules.lookup("NVIDIA A100-SXM4-80GB", "q8_matmul", (6144, 5120), 1, tmp_path) is None
    assert schedules.lookup(GPU, "q8_matmul", (5120, 4096), 1, tmp_path) is None
    assert schedules.lookup(GPU, "q8_matmul", (6144, 5120), 16, tmp_path) is None


def test_new_measurements_replace_old_ones(tmp_path):
    schedules.write_database(GPU, MEASURED["results"], "2026-11-27", tmp_path)
    schedules.write_database(GPU, [_result((6144, 5120), 32, MMA_SLOW, 8.0),
                                   _result((5120, 4096), 1, GEMV, 9.0)], "2026-11-28", tmp_path)
    assert schedules.lookup(GPU, "q8_matmul", (6144, 5120), 32, tmp_path) == MMA_SLOW
    assert schedules.lookup(GPU, "q8_matmul", (5120, 4096), 1, tmp_path) == GEMV
    assert schedules.lookup(GPU, "q8_matmul", (6144, 5120), 1, tmp_path) == GEMV  # kept


def test_tune_files_results_measured_elsewhere(tmp_path):
    from trimode.cli.tune import tune

    results = tmp_path / "q8_results.json"
    results.write_text(json.dumps(MEASURED))
    out = CliRunner().invoke(tune, ["--results", str(results), "--database-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "6/7 candidates correct" in out.output
    assert schedules.lookup(GPU, "q8_matmul", (6144, 5120), 32, tmp_path) == MMA_FAST


def test_tune_refuses_a_file_that_is_not_results(tmp_path):
    from trimode.cli.tune import tune

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = CliRunner().invoke(tune, ["--results", str(bad), "--database-dir", str(tmp_path)])
    assert out.exit_code != 0 and "lacks 'gpu'" in out.output


def test_table_reports_ratio_to_decode_and_failures():
    measured = {**MEASURED, "results": [r for r in MEASURED["results"] if r["name"] != "dlight"]}
    table = format_table(measured)
    row32 = next(line for line in table.splitlines() if line.startswith("qkv") and " 32 " in line)
    assert f"{12.0 / 13.0:6.2f}" in row32  # best m=32 over best m=1
    assert "1 failed the check" in table


def test_reference_matches_dequantized_matmul():
    rng = np.random.default_rng(1)
    q, scale = random_weights(rng, 40, 64)
    x = rng.standard_normal((3, 64)).astype(np.float16)
    w = np.array([[float(q[j, c]) * float(scale[j, c // 32]) for c in range(64)] for j in range(40)])
    columns = np.array([0, 7, 39])
    expected = np.array([[sum(float(x[r, c]) * w[j, c] for c in range(64)) for j in columns]
                         for r in range(3)])
    np.testing.assert_allclose(q8_reference(x, q, scale, columns), expected, rtol=1e-12)


def test_compile_uses_the_tuned_database_of_the_named_gpu(tmp_path, monkeypatch):
    """database_for feeds the kernel table: a tuned entry replaces the default schedule of its
    shape, an unknown GPU gets the defaults, and the database's content is part of the key."""
    import tvm_ffi

    from trimode.compiler.kernel_table import Kernels
    from trimode.compiler.kernels import q8_matmul_cuda
    from trimode.model.config import GEOMETRIES

    cfg = GEOMETRIES["tiny"]
    n, k = cfg.matmul_shapes()["qkv"]
    default = q8_matmul_cuda.default_schedule(n, k, 1)
    tuned = next(c for c in q8_matmul_cuda.schedule_candidates(n, k, 1) if c != default)
    monkeypatch.setattr(schedules, "DATABASE_DIR", tmp_path)
    assert schedules.database_for("NVIDIA Unknown 1GB") == ({}, "none")
    schedules.write_database("NVIDIA Test GPU", [_result((n, k), 1, tuned, 5.0)], "2026-11-27")
    table, first_id = schedules.database_for("NVIDIA Test GPU")
    assert table == {schedules.entry_key("q8_matmul", (n, k), 1): tuned}
    assert first_id.startswith("nvidia-test-gpu-")

    chosen = Kernels(cfg, "cuda", table).q8_matmul(n, k, "one")
    fallback = Kernels(cfg, "cuda", {}).q8_matmul(n, k, "one")
    expect = q8_matmul_cuda.q8_matmul(n, k, 1, "float16", schedule=tuned)
    assert tvm_ffi.structural_equal(chosen.without_attr("op_pattern"), expect)
    assert not tvm_ffi.structural_equal(chosen, fallback)

    schedules.write_database("NVIDIA Test GPU", [_result((n, k), 1, default, 4.0)], "2026-11-28")
    assert schedules.database_for("NVIDIA Test GPU")[1] != first_id


def test_a_tuned_gemm_plan_reaches_the_prefill_kernel(tmp_path, monkeypatch):
    from trimode.compiler.kernel_table import Kernels
    from trimode.compiler.kernels import q8_matmul_cuda
    from trimode.model.config import GEOMETRIES

    cfg = GEOMETRIES["tiny"]
    n, k = cfg.matmul_shapes()["down"]
    candidates = [c for c in q8_matmul_cuda.schedule_candidates(n, k, "dynamic") if c["kind"] == "gemm"]
    tuned = {"kind": "gemm", "tile_m": 64, "stages": 3, "k_stage": 64}
    assert tuned in candidates and tuned != q8_matmul_cuda.default_schedule(n, k, "dynamic")
    monkeypatch.setattr(schedules, "DATABASE_DIR", tmp_path)
    schedules.write_database("NVIDIA Test GPU", [_result((n, k), "dynamic", tuned, 50.0)], "2026-12-02")
    table, _ = schedules.database_for("NVIDIA Test GPU")
    script = Kernels(cfg, "cuda", table).q8_matmul(n, k, "many").script()
    assert f"trimode_q8_gemm_n{n}_k{k}_t64_s3_k64" in script
    assert f"({q8_matmul_cuda.GemmPlan(64, 3, 64).shared_bytes()},)" in script  # its dynamic shared memory


def _attention_result(key, plan, time_us, ok=True, default=False):
    return {"kernel": key.split("/")[0], "key": key, "shape_name": f"attention_{key.split('/')[1]}",
            "heads": [4, 1, 32], "m": key.split("/")[1], "rows": 32, "fill": 4096, "schedule": plan,
            "name": str(plan["rows_per_cta"]), "default": default, "time_us": time_us, "ok": ok,
            "rel_err": 1e-3 if ok else 1.0, "gbps": 1000.0}


def test_attention_plans_are_filed_and_reach_the_kernel_table(tmp_path, monkeypatch):
    import dataclasses

    from trimode.compiler.kernel_table import Kernels
    from trimode.compiler.kernels import attention_mma
    from trimode.model.config import GEOMETRIES

    cfg = GEOMETRIES["tiny"]
    default, *others = attention_mma.plan_candidates(cfg.n_heads, cfg.n_kv_heads, "block", cfg.head_dim)
    wide = next(p for p in others if p.rows_per_cta == 128)
    measured = [_attention_result("attention_mma/block", dataclasses.asdict(default), 9.0, default=True),
                _attention_result("attention_mma/block", dataclasses.asdict(wide), 7.0),
                _attention_result("attention_mma/block", dataclasses.asdict(others[0]), 1.0, ok=False)]
    table_text = format_table({"gpu": GPU, "copy_gbps": 3000.0, "results": measured})
    assert "attention_mma/block" in table_text and "1 failed the check" in table_text
    monkeypatch.setattr(schedules, "DATABASE_DIR", tmp_path)
    schedules.write_database(GPU, measured, "2026-12-01")
    table, _ = schedules.database_for(GPU)
    assert table == {"attention_mma/block": dataclasses.asdict(wide)}
    # the tuned plan sizes the split scratch of verify/draft; decode and prefill keep theirs
    tuned, plain = Kernels(cfg, "cuda", table), Kernels(cfg, "cuda", {})
    assert tuned.attention_scratch("block", 64) != plain.attention_scratch("block", 64)
    assert tuned.attention_scratch("one", 1) == plain.attention_scratch("one", 1)


def test_attention_candidates_cover_every_row_class_with_its_kernel():
    from trimode.schedules.bundle import attention_specs

    specs = attention_specs(32, 8, 128, "all")
    keys = {spec["key"] for spec in specs}
    assert keys == {"attention/one", "attention_mma/block", "attention_mma/many"}
    for key in keys:
        mine = [spec for spec in specs if spec["key"] == key]
        assert sum(spec["default"] for spec in mine) == 1 and len(mine) > 1
        assert len({spec["name"] for spec in mine}) == len(mine)  # names tell them apart
    # a head_dim the tensor-core kernel cannot take is tuned on the CUDA-core kernel
    assert {spec["key"] for spec in attention_specs(4, 1, 40, "default")} == {
        "attention/one", "attention/block", "attention/many"}


def test_measure_bundle_end_to_end_with_a_stand_in_gpu(tmp_path, monkeypatch):
    """measure_bundle runs on the GPU box only; here a stand-in runtime whose kernels are
    numpy runs it whole: Q8_0 and attention entries, several row counts, a broken candidate,
    the table and the database the results file into."""
    from types import SimpleNamespace

    from trimode.schedules import measure
    from trimode.schedules.measure_attention import reference_rows

    class Tensor:
        def __init__(self, array):
            self.array = np.array(array)

    def q8_kernel(x, q, s, y):
        w = q.array.astype(np.float64) * np.repeat(s.array.astype(np.float64), 32, axis=1)
        y.array[:] = (x.array.astype(np.float64) @ w.T).astype(np.float16)

    def attention_kernel(q, kv, layer, pos, k_new, v_new, out, part_out, part_lse):
        rows = list(range(q.array.shape[0]))
        out.array[:] = reference_rows(q.array, kv.array, layer, int(pos.array[0]), k_new.array,
                                      v_new.array, rows).astype(np.float16)

    cuda = SimpleNamespace(device_name=lambda: GPU, malloc=lambda n: None, copy=lambda *a: None,
                           event=lambda: None, record=lambda e: None, elapsed_ms=lambda a, b: 0.02,
                           synchronize=lambda: None)
    kernels = {"k0": q8_kernel, "k1": q8_kernel, "k2": lambda *args: None, "k3": attention_kernel}

    class StandIn:
        def __init__(self, lib_dir=None):
            self.cuda = cuda
            self.ffi = SimpleNamespace(load_module=lambda path: kernels)

        def upload(self, array):
            return Tensor(array)

        def download(self, tensor, shape, dtype):
            return tensor.array.astype(dtype).reshape(shape)

        def copy_bandwidth_gbps(self):
            return 4000.0

    monkeypatch.setattr(measure, "Runtime", StandIn)
    monkeypatch.setattr(measure, "ROTATION_BYTES", 1)  # one weight copy
    q8 = {"kernel": "q8_matmul", "shape_name": "odd", "shape": [40, 64], "library": "kernels0.so"}
    plan = {"rows_per_cta": 64, "keys_per_tile": 32, "threads": 128, "target_ctas": 8, "max_splits": 4,
            "min_tiles_per_split": 1, "vector": 8}
    manifest = {"arch": "sm_90a", "kernels": [
        {**q8, "m": 1, "rows": [1], "schedule": GEMV, "name": "gemv", "default": True, "symbol": "k0"},
        {**q8, "m": "block", "rows": [16, 32], "schedule": MMA_FAST, "name": "fast", "default": True,
         "symbol": "k1"},
        {**q8, "m": "block", "rows": [16, 32], "schedule": MMA_SLOW, "name": "unwritten", "default": False,
         "symbol": "k2"},
        {"kernel": "attention_mma", "key": "attention_mma/block", "shape_name": "attention_block",
         "heads": [4, 1, 32], "m": "block", "rows": [5], "fill": 20, "schedule": plan, "name": "r64",
         "default": True, "library": "kernels0.so", "symbol": "k3"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    measured = measure.measure_bundle(tmp_path, log=lambda *a: None)
    assert [(r["name"], r["rows"], r["ok"]) for r in measured["results"]] == [
        ("gemv", 1, True), ("fast", 16, True), ("fast", 32, True), ("unwritten", 16, False),
        ("unwritten", 32, False), ("r64", 5, True)]
    assert all(r["time_us"] == 1.0 for r in measured["results"])  # 0.02 ms over 20 calls
    table = format_table(measured)
    assert "attention_mma/block" in table and "2 failed the check" in table
    schedules.write_database(GPU, measured["results"], "2026-12-01", tmp_path)
    assert schedules.lookup(GPU, "q8_matmul", (40, 64), "block", tmp_path) == MMA_FAST
    assert schedules.database_for(GPU, tmp_path)[0]["attention_mma/block"] == plan
