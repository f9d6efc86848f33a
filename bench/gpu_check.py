"""The GPU check: correctness of the compiled CUDA model, then timings of every entry at a
full geometry, in one run (issue 7). Runs with the TVM runtime libraries only.

    python bench/gpu_check.py --tiny-artifact DIR --bench-artifact DIR --geometry 14b

Also runs on the CPU (--target llvm) so the script itself is tested where there is no GPU.
Prints a short table last; --json-out writes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trimode.model.config import GEOMETRIES, ModelConfig  # noqa: E402
from trimode.model.random_weights import random_weights  # noqa: E402
from trimode.model.reference import ReferenceForward, ReferenceModel  # noqa: E402
from trimode.model.weights import LayerWeights, ModelWeights, Q8Matrix  # noqa: E402
from trimode.runtime.engine import Engine  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- correctness: the tiny model's every entry against the float64 reference ---------------

def check_tiny(target: str, artifact: str | None, tol: float) -> list[tuple[str, float, bool]]:
    cfg = GEOMETRIES["tiny"]
    weights = random_weights(cfg, seed=3)
    engine = Engine(cfg, weights, target, artifact=artifact, log=log)
    ref_model = ReferenceModel(cfg, weights)
    rng = np.random.default_rng(0)
    results = []
    for n_prompt in (1, 5, 70):
        fwd, ref = engine.new_sequence(256), ReferenceForward(ref_model, 256)
        p = rng.integers(0, cfg.vocab, n_prompt).tolist()
        checks = [
            (f"prefill T={n_prompt}", lambda: fwd.causal(p, last_only=True).logits()[-1],
             lambda: ref.causal(p).logits()[-1]),
            ("decode", lambda: fwd.causal([7]).logits(), lambda: ref.causal([7]).logits()),
            ("draft T=7", lambda: fwd.bidirectional([cfg.mask_token_id] * 6 + [3]).logits(),
             lambda: ref.bidirectional([cfg.mask_token_id] * 6 + [3]).logits()),
            ("verify T=9", lambda: fwd.causal(list(range(40, 49))).logits(),
             lambda: ref.causal(list(range(40, 49))).logits()),
        ]
        for name, got, want in checks:
            err = rel_err(got(), want())
            results.append((f"{name} @fill {n_prompt}", err, err < tol))
    # Greedy AR through the compiled decode entry == the reference's greedy tokens.
    fwd, ref = engine.new_sequence(256), ReferenceForward(ref_model, 256)
    tok_a = int(fwd.causal([1, 2, 3], last_only=True).argmax[-1])
    tok_b = int(ref.causal([1, 2, 3]).argmax[-1])
    same = tok_a == tok_b
    for _ in range(24):
        tok_a, tok_b = int(fwd.causal([tok_a]).argmax[0]), int(ref.causal([tok_b]).argmax[0])
        same &= tok_a == tok_b
    results.append(("greedy AR 25 tokens == reference", 0.0, bool(same)))
    return results


# --- speed: random Q8_0 weights of a full geometry, made fast (shared host blocks) ----------

def tiled_weights(cfg: ModelConfig, seed: int = 0) -> ModelWeights:
    """Every layer reuses the same host arrays (upload still gives each its own device
    buffer); values are random int8 with scales that keep activations O(1)."""
    rng = np.random.default_rng(seed)

    def q8(n: int, k: int) -> Q8Matrix:
        q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        scale = np.full((n, k // 32), 1.0 / (73.0 * np.sqrt(k)), np.float16)
        return Q8Matrix(q=q, scale=scale)

    mats = {"wq": q8(cfg.q_dim, cfg.hidden), "wk": q8(cfg.kv_dim, cfg.hidden),
            "wv": q8(cfg.kv_dim, cfg.hidden), "wo": q8(cfg.hidden, cfg.q_dim),
            "w_gate": q8(cfg.ffn, cfg.hidden), "w_up": q8(cfg.ffn, cfg.hidden),
            "w_down": q8(cfg.hidden, cfg.ffn)}
    norm = np.ones(cfg.hidden, np.float32)
    layers = [LayerWeights(attn_norm=norm, ffn_norm=norm, **mats) for _ in range(cfg.n_layers)]
    return ModelWeights(embed=q8(cfg.vocab, cfg.hidden), layers=layers, output_norm=norm,
                        output=q8(cfg.vocab, cfg.hidden))


def gpu_memory_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])
    except Exception:  # noqa: BLE001 (no nvidia-smi on the CPU)
        return None


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy, bytes read + written per second (the roofline's denominator)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (2 << 30) / float(np.median(times)) / 1e9


def time_call(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()  # each call downloads argmax/prob: synchronous, so the wall time is the step
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def bench(cfg: ModelConfig, target: str, artifact: str | None, ctx: int, block: int,
          prefill_len: int, fills: list[int], repeat: int) -> dict:
    started = time.time()
    weights = tiled_weights(cfg)
    log(f"host weights made in {time.time() - started:.1f}s")
    mem_before = gpu_memory_used_mib()
    engine = Engine(cfg, weights, target, artifact=artifact, log=log)
    del weights
    fwd = engine.new_sequence(ctx)
    mem_after = gpu_memory_used_mib()
    result = {"load_seconds": engine.load_seconds, "gpu_mem_mib": mem_after,
              "gpu_mem_model_mib": None if mem_before is None or mem_after is None else mem_after - mem_before}
    rng = np.random.default_rng(1)
    ids = lambda n: rng.integers(1000, cfg.vocab, n).tolist()  # noqa: E731
    act_bytes = 2 if engine.dtype == "float16" else 4
    weight_bytes = cfg.weight_elements_per_token() * 34 / 32
    rows = []

    def run_at(fill: int, entry, n: int):
        if fwd.length < fill:  # positions up to fill must hold K/V before timing from there
            fwd.truncate(0)
            fwd.causal(ids(fill), last_only=True)

        def step():
            fwd.truncate(fill)
            entry(ids(n))
        return time_call(step, repeat)

    for fill in fills:
        kv_read = cfg.kv_bytes_per_token(act_bytes) * fill
        for name, entry, n in (("decode", fwd.causal, 1),
                               (f"verify T={block}", fwd.causal, block),
                               (f"draft T={block}", fwd.bidirectional, block)):
            seconds = run_at(fill, entry, n)
            rows.append({"entry": name, "fill": fill, "seconds": seconds,
                         "bytes": weight_bytes + kv_read})
    seconds = run_at(0, lambda t: fwd.causal(t, last_only=True), prefill_len)
    rows.append({"entry": f"prefill T={prefill_len}", "fill": 0, "seconds": seconds,
                 "bytes": weight_bytes, "tok_per_s": prefill_len / seconds})

    # AR: a decode loop feeding back argmax (host logic included).
    fwd.truncate(0)
    tok = int(fwd.causal(ids(fills[0]), last_only=True).argmax[-1])
    n_steps = 64
    t0 = time.perf_counter()
    for _ in range(n_steps):
        tok = int(fwd.causal([tok]).argmax[0])
    result["ar_tok_per_s"] = n_steps / (time.perf_counter() - t0)

    # One self-speculation cycle's passes: draft + verify over the same block + truncate.
    mask = cfg.mask_token_id

    def cycle():
        fwd.truncate(fills[0])
        drafted = fwd.bidirectional([tok] + [mask] * (block - 1)).argmax
        fwd.causal([tok] + drafted[1:].tolist())
    result["spec_cycle_seconds"] = time_call(cycle, repeat)
    result["rows"] = rows
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--tiny-artifact", default=None)
    ap.add_argument("--bench-artifact", default=None)
    ap.add_argument("--geometry", default="14b")
    ap.add_argument("--ctx", type=int, default=4096 + 128)
    ap.add_argument("--fills", default="512,4096")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    report = {"target": args.target, "geometry": args.geometry}
    tol = 1e-2 if args.target == "cuda" else 1e-3

    if not args.skip_tiny:
        checks = check_tiny(args.target, args.tiny_artifact, tol)
        report["checks"] = [{"name": n, "rel_err": e, "ok": ok} for n, e, ok in checks]
        for name, err, ok in checks:
            log(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e}")

    bandwidth = copy_bandwidth_gbs()
    report["copy_gbs"] = bandwidth
    cfg = GEOMETRIES[args.geometry]
    fills = [int(f) for f in args.fills.split(",")]
    report["bench"] = bench(cfg, args.target, args.bench_artifact, args.ctx, args.block,
                            args.prefill, fills, args.repeat)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))

    b = report["bench"]
    decode0 = next(r["seconds"] for r in b["rows"] if r["entry"] == "decode")
    print(f"\n== {args.geometry} on {args.target}; copy bandwidth "
          f"{bandwidth and f'{bandwidth:.0f} GB/s' or 'n/a'}; load {b['load_seconds']:.1f}s; "
          f"GPU mem {b['gpu_mem_mib']} MiB (model+KV {b['gpu_mem_model_mib']} MiB)")
    if "checks" in report:
        bad = [c for c in report["checks"] if not c["ok"]]
        worst = max(c["rel_err"] for c in report["checks"])
        print(f"correctness (tiny vs float64): {len(report['checks']) - len(bad)}/"
              f"{len(report['checks'])} ok, worst rel err {worst:.2e}")
    print(f"{'entry':<16}{'fill':>6}{'ms':>9}{'GB/s':>8}{'%roof':>7}{'x decode':>9}")
    for r in b["rows"]:
        gbs = r["bytes"] / r["seconds"] / 1e9
        roof = f"{100 * gbs / bandwidth:.0f}" if bandwidth else "-"
        print(f"{r['entry']:<16}{r['fill']:>6}{1e3 * r['seconds']:>9.2f}{gbs:>8.0f}{roof:>7}"
              f"{r['seconds'] / decode0:>9.2f}")
    print(f"AR decode {b['ar_tok_per_s']:.1f} tok/s; spec cycle (draft+verify T={args.block}) "
          f"{1e3 * b['spec_cycle_seconds']:.2f} ms = {b['spec_cycle_seconds'] / decode0:.2f}x decode")
    for r in b["rows"]:
        if "tok_per_s" in r:
            print(f"{r['entry']}: {r['tok_per_s']:.0f} tok/s")
    if "checks" in report and not all(c["ok"] for c in report["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
