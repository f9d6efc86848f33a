"""`trimode bench` on the tiny geometry (llvm): every figure of the report is present and
consistent with the others (no timing thresholds); the PyTorch baseline computes the
network the float64 reference does; bench/gpu_check.py's CPU run passes its own checks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trimode.cli import cli
from trimode.model.config import GEOMETRIES
from trimode.model.random_weights import random_weights
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.runtime.bench import SAMPLED, BenchPlan, tiled_weights, weight_bytes_per_step

REPO = Path(__file__).resolve().parent.parent
TINY = GEOMETRIES["tiny"]
FILLS, BLOCK, PREFILL = (40, 90), 8, 48


def invoke(*args: str):
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def report():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # two shared cores: OpenMP threads would only wait on each other
    result = invoke("--geometry", "tiny", "--target", "llvm", "--json", "--repeat", "2",
                    "--fills", ",".join(map(str, FILLS)), "--block", str(BLOCK),
                    "--prefill", str(PREFILL))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_entry_is_timed_at_every_fill(report):
    rows = [(r["entry"], r["fill"], r["tokens"]) for r in report["rows"]]
    expected = [(e, f, n) for f in FILLS for e, n in (("decode", 1), ("verify", BLOCK), ("draft", BLOCK))]
    assert rows == expected + [("prefill", 0, PREFILL)]
    assert report["n_ctx"] == BenchPlan(FILLS, BLOCK, PREFILL).n_ctx
    assert report["plan"]["repeat"] == 2


def test_rates_follow_from_times_and_bytes(report):
    kv_per_token = TINY.kv_bytes_per_token(4)  # float32 activations on llvm
    assert report["dtype"] == "float32"
    weights = weight_bytes_per_step(TINY, {"layers": True, "output": True}, 4)
    assert report["weight_bytes_per_step"] == pytest.approx(weights)
    # Q8_0: 34 bytes per 32 weights of every matmul but the (gathered) embedding.
    assert weights == pytest.approx(TINY.weight_elements_per_token() * 34 / 32)
    decode = {r["fill"]: r["seconds"] for r in report["rows"] if r["entry"] == "decode"}
    for r in report["rows"]:
        assert r["seconds"] > 0
        assert r["bytes"] == pytest.approx(weights + kv_per_token * r["fill"])
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert r["roofline_pct"] == pytest.approx(100 * r["gb_per_s"] / report["copy_gb_per_s"])
        assert r["tok_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["x_decode"] == pytest.approx(r["seconds"] / decode.get(r["fill"], decode[FILLS[0]]))
    prefill = report["rows"][-1]
    assert report["prefill_tok_per_s"] == pytest.approx(PREFILL / prefill["seconds"])


def test_loops_load_and_memory(report):
    ar = report["ar"]
    assert ar["tokens"] == 64 and ar["seconds"] > 0
    assert ar["tok_per_s"] == pytest.approx(ar["tokens"] / ar["seconds"])
    assert report["spec_cycle_seconds"] > 0
    assert report["spec_cycle_x_decode"] == pytest.approx(
        report["spec_cycle_seconds"] / report["rows"][0]["seconds"])
    # the same loops at llama-server's sampling defaults, temperature alone and top-p alone
    assert [loops["setting"] for loops in report["sampled"]] == list(SAMPLED)
    for sampled in report["sampled"]:
        assert sampled["ar"]["tokens"] == 64 and sampled["ar"]["seconds"] > 0
        assert sampled["spec_cycle_x_decode"] == pytest.approx(
            sampled["spec_cycle_seconds"] / report["rows"][0]["seconds"])
    host = report["decode_host"]
    assert 0 < host["enqueue_seconds"] <= host["synced_seconds"]
    assert report["cuda_graphs"] == {"entries": [], "passes": 0, "used": False}  # llvm: eager
    assert report["dependent_launch"] is False  # a CUDA-only launch mode
    assert report["load_seconds"] >= 0 and report["load_source"] == "host memory"
    assert report["copy_gb_per_s"] > 0 and "numpy" in report["copy_measured_by"]
    # No GPU: no GPU memory figures, but the host's peak is known.
    assert report["gpu_mem_peak_mib"] is None and report["gpu_mem_engine_mib"] is None
    assert report["host_peak_rss_mib"] > 0
    assert 0 <= report["host_huge_pages_mib"] <= report["host_peak_rss_mib"]  # Linux says
    assert report["target"] == "llvm" and report["geometry"] == TINY.geometry_key()


def test_torch_baseline_rows_and_ratios(report):
    torch = report["torch"]
    assert torch["available"] and torch["device"] == "cpu" and torch["dtype"] == "float32"
    theirs = {(r["entry"], r["fill"]): r["seconds"] for r in torch["rows"]}
    assert set(theirs) == {(r["entry"], r["fill"]) for r in report["rows"]}
    for r in report["rows"]:
        assert r["torch_seconds"] == theirs[(r["entry"], r["fill"])] > 0
        assert r["ours_over_torch"] == pytest.approx(r["seconds"] / r["torch_seconds"])


def test_table_names_every_figure(tmp_path):
    result = invoke("--geometry", "tiny", "--target", "llvm", "--repeat", "1", "--fills", "20",
                    "--block", "4", "--prefill", "8", "--no-torch")
    assert result.exit_code == 0, result.output
    table = result.stdout
    for line in ("decode", "verify T=4", "draft T=4", "prefill T=8", "AR decode", "spec cycle",
                 "sampled (T 0.8, top-k 40", "sampled (T 0.7 alone)", "sampled (T 0.7, top-p 0.9)", "host enqueue", "model load", "peak GPU memory n/a", "copy bandwidth",
                 "torch baseline: n/a (not asked for)", "MiB on huge pages"):
        assert line in table


@pytest.mark.parametrize("args, message", [
    (("--fills", "2000"), "need a 2065-token cache; the model's context is 2048 tokens"),
    (("--block", "65"), "block must be in [2, 64]"),
    (("--prefill", "1"), "prefill must be at least 2 tokens"),
    (("--fills", "a,b"), "comma-separated integers"),
])
def test_bad_settings_are_one_line_errors(args, message):
    result = CliRunner().invoke(cli, ["bench", "--geometry", "tiny", "--target", "llvm", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_cuda_without_a_gpu_is_a_one_line_error():
    from trimode.runtime.tvm_runtime import cuda_device_count

    if cuda_device_count():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(cli, ["bench", "--geometry", "tiny", "--target", "cuda"])
    assert result.exit_code == 2 and "reports no CUDA GPU" in result.output


@pytest.mark.parametrize("command, model, message", [
    ("bench", ["-m"], "give -m MODEL or --geometry (one of them)"),
    ("compile", [], "give a MODEL file or --geometry (one of them)")])
def test_model_or_geometry_required(command, model, message, tiny_gguf):
    for args in ([], [*model, str(tiny_gguf), "--geometry", "tiny"]):  # neither, both
        result = CliRunner().invoke(cli, [command, "--target", "llvm", *args])
        assert result.exit_code == 2 and message in result.output


def test_bench_from_a_model_file_times_its_load(tiny_gguf):
    result = invoke("-m", str(tiny_gguf), "--target", "llvm", "--json", "--repeat", "1",
                    "--fills", "16", "--block", "4", "--prefill", "8", "--no-torch")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["load_source"] == "file" and out["load_seconds"] > 0
    assert not out["torch"]["available"]
    assert all(r["torch_seconds"] is None and r["ours_over_torch"] is None for r in out["rows"])


def test_tiled_weights_have_the_geometry_and_unit_scale_activations():
    weights = tiled_weights(TINY)
    assert weights.embed.q.shape == (TINY.vocab, TINY.hidden)
    assert len(weights.layers) == TINY.n_layers
    dense = weights.layers[0].wq.dequantize(np.float64)
    # rows of std ~1/sqrt(K): a unit-variance input keeps unit scale through the matmul
    assert dense.shape == (TINY.q_dim, TINY.hidden)
    assert 0.8 < dense.std() * np.sqrt(TINY.hidden) < 1.2


def test_torch_baseline_computes_the_reference_network():
    torch = pytest.importorskip("torch")
    from trimode.runtime.torch_baseline import TorchModel

    weights = random_weights(TINY, seed=4)
    ref = ReferenceForward(ReferenceModel(TINY, weights), 256)
    model = TorchModel.from_weights(TINY, weights, 256)  # float64

    def rel_err(got, want):
        return np.abs(got - want).max() / np.abs(want).max()

    prompt = list(range(300, 370))  # crosses the tiny model's YaRN query-scale step at 64
    assert rel_err(model.forward(torch.tensor(prompt), 0).numpy(), ref.causal(prompt).logits()) < 1e-6
    block = [TINY.mask_token_id] * 6 + [5]
    assert rel_err(model.forward(torch.tensor(block), 70, causal=False).numpy(),
                   ref.bidirectional(block).logits()) < 1e-6
    # after a bidirectional block, a causal pass at the same positions overwrites its K/V
    tail = [9, 10, 11]
    assert rel_err(model.forward(torch.tensor(tail), 70).numpy(), ref.causal(tail).logits()) < 1e-6
    last = model.forward(torch.tensor([12, 13]), 73, last_only=True).numpy()
    assert last.shape == (1, TINY.vocab)
    assert rel_err(last, ref.causal([12, 13]).logits()[-1:]) < 1e-6


def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--target", "llvm", "--geometry", "tiny",
         "--fills", "20,60", "--block", "8", "--prefill", "16", "--repeat", "1", "--no-torch",
         "--json-out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    chain = next(c for c in report["checks"] if "exact_argmax" in c)
    assert chain["exact_argmax"] == 25  # float32 on the CPU: no near-tie flips
    assert "decode host enqueue" in done.stdout and "correctness (tiny vs float64" in done.stdout


def test_gpu_check_benches_a_file_with_its_load_timed(tmp_path, tiny_gguf):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--target", "llvm", "--model", str(tiny_gguf),
         "--fills", "20", "--block", "8", "--prefill", "16", "--repeat", "1", "--no-torch",
         "--skip-tiny", "--json-out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["load_source"] == "file" and report["load_seconds"] > 0
    assert "(from file)" in done.stdout


def test_long_fills_are_prefilled_in_chunks(monkeypatch):
    """A cache is filled by prefills of at most FILL_CHUNK tokens (a 32k fill in one call
    would hold gigabytes of activations), together the whole fill, ending where it was asked."""
    from trimode.model.random_weights import random_weights
    from trimode.runtime import bench
    from trimode.runtime.engine import Engine

    fwd = Engine(TINY, random_weights(TINY, seed=2), "llvm").new_sequence(128)
    calls = []
    causal = fwd.causal

    def recording(tokens, last_only=False):
        calls.append((len(tokens), last_only))
        return causal(tokens, last_only)

    monkeypatch.setattr(bench, "FILL_CHUNK", 16)
    monkeypatch.setattr(fwd, "causal", recording)
    fwd.causal([5] * 9)
    bench.fill_cache(fwd, list(range(40, 90)))
    assert calls[1:] == [(16, True), (16, True), (16, True), (2, True)] and fwd.length == 50


def test_every_entry_is_warmed_up_before_the_first_timed_row(monkeypatch):
    """Each entry runs (more than the per-figure warm-up calls) at the first fill before any
    row is timed: the first row was otherwise timed on a cold machine."""
    from trimode.runtime import bench
    from trimode.runtime.engine import Engine

    fwd = Engine(TINY, random_weights(TINY, seed=2), "llvm").new_sequence(64)
    calls = []
    for name in ("causal", "bidirectional"):
        entry = getattr(fwd, name)
        monkeypatch.setattr(fwd, name, lambda tokens, last_only=False, _e=entry, _n=name:
                            calls.append((_n, len(tokens), fwd.length)) or
                            (_e(tokens, last_only) if _n == "causal" else _e(tokens)))
    monkeypatch.setattr(bench, "WARMUP_SECONDS", 0.0)
    monkeypatch.setattr(bench, "median_seconds", lambda fn, repeat: calls.append("timed") or 1.0)
    bench.time_entries(fwd, BenchPlan(fills=(20,), block=4, prefill=8, repeat=1), bench._Tokens(TINY.vocab))
    warm = calls[:calls.index("timed")]
    for entry in (("causal", 1), ("causal", 4), ("bidirectional", 4)):
        runs = [c for c in warm if c[:2] == entry]
        assert len(runs) > bench.WARMUP_CALLS and all(length == 20 for *_, length in runs), entry


def test_our_figures_survive_a_failing_torch_baseline(monkeypatch):
    """The checkpoint gets our entries before torch runs; a torch that raises (say, out of
    memory on the GPU) is reported in the report, which keeps every one of our rows."""
    from trimode.runtime import bench

    def out_of_memory(*_):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(bench, "bench_torch", out_of_memory)
    cfg, load = bench.bench_loader(None, TINY, "llvm", None, lambda _: None)
    plan = BenchPlan(fills=(20,), block=4, prefill=8, repeat=1)
    seen = []
    report = bench.run_bench(cfg, plan, "llvm", load, checkpoint=seen.append)
    assert report["torch"] == {"available": False, "why": "failed: RuntimeError: CUDA out of memory"}
    assert [r["entry"] for r in report["rows"]] == ["decode", "verify", "draft", "prefill"]
    assert len(seen) == 1 and seen[0]["torch"]["why"] == "not run yet"
    assert [r["seconds"] for r in seen[0]["rows"]] == [r["seconds"] for r in report["rows"]]
    assert all(r["gb_per_s"] > 0 for r in seen[0]["rows"])


def test_gpu_check_benches_even_when_the_tiny_check_raises(tmp_path):
    """A tiny model that cannot even run (here: an artifact that is not there; on a GPU, say,
    a refused graph capture) is a failed check, and the bench still runs and is written."""
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--target", "llvm", "--geometry", "tiny",
         "--tiny-artifact", str(tmp_path / "missing"), "--fills", "20", "--block", "4", "--prefill", "8",
         "--repeat", "1", "--no-torch", "--json-out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [c["ok"] for c in report["checks"]] == [False] and report["checks"][0]["error"]
    assert [r["entry"] for r in report["rows"]] == ["decode", "verify", "draft", "prefill"]
    assert "FAIL tiny model" in done.stdout and "decode host enqueue" in done.stdout
