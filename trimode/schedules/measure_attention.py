"""Check and time one attention candidate of a bundle on the GPU (runtime libraries only).

The kernel's contract is attention_cuda's: (q [T, Hq, D], kv [L, 2, Hkv, C, D], layer,
pos int32 [1], k_new, v_new [T, Hkv, D], out [T, Hq, D], part_out [R, Hq, D], part_lse
[R, Hq]). Inputs are fresh random fp16, the output is poisoned with NaN, sampled query rows
are compared with float64; timing rotates over enough layers of cache that one call's keys
and values are not in L2 from the call before (a real step reads another layer's).
"""
from __future__ import annotations

import numpy as np

TOLERANCE = 1e-2
ROTATION_BYTES = 256 << 20
SAMPLED_ROWS = 6


def reference_rows(q, kv, layer, pos, k_new, v_new, rows, causal: bool = True) -> np.ndarray:
    """float64 attention output of query rows `rows`: row t sees cache[0:pos] and block keys
    0..t (causal) or all of them."""
    n_t, n_heads, d = q.shape
    n_kv_heads = k_new.shape[1]
    group = n_heads // n_kv_heads
    out = np.zeros((len(rows), n_heads, d))
    for g in range(n_kv_heads):
        keys = np.concatenate([kv[layer, 0, g, :pos], k_new[:, g]]).astype(np.float64)
        values = np.concatenate([kv[layer, 1, g, :pos], v_new[:, g]]).astype(np.float64)
        for r, t in enumerate(rows):
            seen = pos + (t + 1 if causal else n_t)
            for h in range(g * group, (g + 1) * group):
                scores = keys[:seen] @ q[t, h].astype(np.float64) / np.sqrt(d)
                weights = np.exp(scores - scores.max())
                out[r, h] = weights @ values[:seen] / weights.sum()
    return out


def measure_attention(runtime, func, entry: dict, rng, time_calls) -> dict:
    """{"rel_err", "ok", "time_us", "gbps"} of one candidate; time_calls(call) -> us per call."""
    n_heads, n_kv_heads, d = entry["heads"]
    n_t, pos = entry["rows"][0], entry["fill"]
    ctx = pos + n_t
    layer_bytes = 2 * n_kv_heads * ctx * d * 2
    layers = max(1, min(16, -(-ROTATION_BYTES // layer_bytes)))
    half = np.float16
    kv = rng.standard_normal((layers, 2, n_kv_heads, ctx, d), np.float32).astype(half)
    q = rng.standard_normal((n_t, n_heads, d), np.float32).astype(half)
    k_new = rng.standard_normal((n_t, n_kv_heads, d), np.float32).astype(half)
    v_new = rng.standard_normal((n_t, n_kv_heads, d), np.float32).astype(half)
    scratch_rows = entry["schedule"]["max_splits"] * n_t  # at least splits * T, whatever the plan
    out = runtime.upload(np.full(q.shape, np.nan, half))
    args = [runtime.upload(q), runtime.upload(kv), 0, runtime.upload(np.array([pos], np.int32)),
            runtime.upload(k_new), runtime.upload(v_new), out,
            runtime.upload(np.zeros((scratch_rows, n_heads, d), np.float32)),
            runtime.upload(np.zeros((scratch_rows, n_heads), np.float32))]
    func(*args)
    runtime.cuda.synchronize()
    got = runtime.download(out, q.shape, half).astype(np.float64)
    rows = sorted({0, n_t - 1, *rng.integers(0, n_t, SAMPLED_ROWS).tolist()})
    want = reference_rows(q, kv, 0, pos, k_new, v_new, rows)
    rel_err = float("inf") if not np.isfinite(got).all() else \
        float(np.linalg.norm(got[rows] - want) / np.linalg.norm(want))

    def call(i):
        args[2] = i % layers
        func(*args)

    time_us = time_calls(call)
    return {"rel_err": rel_err, "ok": bool(rel_err < TOLERANCE), "time_us": time_us,
            "gbps": layer_bytes / (time_us * 1e-6) / 1e9}


def format_attention_table(results: list[dict]) -> str:
    """Best plan per attention row class, with the default plan's time."""
    lines = [f"{'attention':16s} {'T':>5s} {'fill':>5s} {'plan':24s} {'us':>9s} {'KV GB/s':>8s} {'dflt us':>8s}"]
    for key in dict.fromkeys(r["key"] for r in results):
        mine = [r for r in results if r["key"] == key]
        ok = [r for r in mine if r["ok"]]
        default = next((r for r in mine if r["default"]), None)
        if not ok:
            lines.append(f"{key:16s} no candidate passed the check")
            continue
        best = min(ok, key=lambda r: r["time_us"])
        lines.append(f"{key:16s} {best['rows']:5d} {best['fill']:5d} {best['name']:24s} {best['time_us']:9.2f} "
                     f"{best['gbps']:8.0f} {default['time_us'] if default else float('nan'):8.2f}")
    return "\n".join(lines)
