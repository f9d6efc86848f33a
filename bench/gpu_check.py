"""The GPU check: correctness of the compiled CUDA model, then the whole bench at a full
geometry, in one run (issue 7). Runs with the TVM runtime libraries only.

    python bench/gpu_check.py --tiny-artifact DIR --bench-artifact DIR --geometry 14b

The bench itself is trimode/runtime/bench.py (`trimode bench`); this script adds the tiny
model's checks against the float64 reference. Also runs on the CPU (--target llvm), so the
script is tested where there is no GPU. Prints the bench table last; --json-out writes every
number. Exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.random_weights import random_weights  # noqa: E402
from trimode.model.reference import (ReferenceForward, ReferenceModel, chunk_masses,  # noqa: E402
                                     top_candidates)
from trimode.runtime.bench import BenchPlan, bench_loader, render_table, run_bench  # noqa: E402
from trimode.runtime.engine import Engine  # noqa: E402
from trimode.runtime.generation import DecodeParams, GenerationRequest, generate  # noqa: E402

CHAIN_PROMPT, CHAIN_TOKENS = [1, 2, 3], 25


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- correctness: the tiny model's every entry against the float64 reference ---------------

def check_entries(engine: Engine, ref_model: ReferenceModel, tol: float) -> list[dict]:
    cfg = engine.config
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
            results.append({"name": f"{name} @fill {n_prompt}", "rel_err": err, "ok": err < tol})
    return results


def check_top_candidates(engine: Engine) -> list[dict]:
    """The sampler's entries (GPU builds): each row's largest logits and their ids, falling,
    ties by the smaller id, exactly as numpy orders the same logits; each row's chunk masses."""
    if "top_candidates" not in engine.manifest["entries"]:
        return []
    fwd, results = engine.new_sequence(256), []
    fwd.causal([1, 2, 3, 4], last_only=True)
    for name, step in (("decode", fwd.causal([7])), ("verify T=9", fwd.causal(list(range(40, 49))))):
        (values, ids), (want_values, want_ids) = step.top(), top_candidates(step.logits())
        wrong = float(np.mean(ids != want_ids))
        results.append({"name": f"top candidates of {name}: ids as numpy orders them", "rel_err": wrong,
                        "ok": wrong == 0 and np.array_equal(values, want_values)})
        # chunk masses at T 0.7 and one chunk span, against numpy on the same logits
        (top, total), (want_top, want_total) = step.masses(1 / 0.7), chunk_masses(step.logits(), 1 / 0.7)
        err = float(np.abs(total / want_total - 1).max())
        span_ok = np.array_equal(step.span(len(step.argmax) - 1, 1024, 2048), step.logits()[-1, 1024:2048])
        results.append({"name": f"chunk masses of {name} (T 0.7) and a chunk span", "rel_err": err,
                        "ok": err < 1e-5 and np.array_equal(top, want_top.astype(np.float32)) and span_ok})
    return results


def check_greedy_chain(engine: Engine, ref_model: ReferenceModel, tol: float) -> list[dict]:
    """The compiled greedy chain, teacher-forced through the reference.

    Demanding the reference's own greedy tokens fails on near-ties: two logits closer than
    the fp16 error may swap. Instead the reference is run on the compiled chain's tokens,
    and each chosen token's reference logit must lie within 2 * tol * max|logit| of its row's
    maximum. Why that bound: the logits checks allow every compiled logit an error of
    tol * max|logit|, and a compiled argmax c beats the reference's argmax m in the compiled
    logits, so ref[m] - ref[c] <= 2 * tol * max|logit| whenever the logits pass. A real fault
    (wrong position, wrong cache row, wrong mask) moves the chosen logit by the spread of the
    row, far past the bound. Also reported: how many tokens equal the exact argmax."""
    fwd = engine.new_sequence(256)
    step = fwd.causal(CHAIN_PROMPT, last_only=True)
    chain, rows = [int(step.argmax[-1])], [step.logits()[-1]]
    while len(chain) < CHAIN_TOKENS:
        step = fwd.causal([chain[-1]])
        chain.append(int(step.argmax[0]))
        rows.append(step.logits()[0])
    ref = ReferenceForward(ref_model, 256).causal(CHAIN_PROMPT + chain[:-1]).logits()
    ref = ref[len(CHAIN_PROMPT) - 1:]  # row i predicts chain[i]
    chosen = ref[np.arange(CHAIN_TOKENS), chain]
    margins = (ref.max(axis=1) - chosen) / np.abs(ref).max(axis=1)  # in units of max|logit|
    exact = int((ref.argmax(axis=1) == np.array(chain)).sum())
    logits_err = rel_err(np.stack(rows), ref)
    return [
        {"name": f"greedy chain {CHAIN_TOKENS} tokens: logits", "rel_err": logits_err,
         "ok": logits_err < tol},
        {"name": f"greedy chain {CHAIN_TOKENS} tokens: chosen within 2*tol of the reference max "
                 f"({exact}/{CHAIN_TOKENS} exact argmax)",
         "rel_err": float(margins.max()), "ok": bool(margins.max() <= 2 * tol),
         "exact_argmax": exact},
    ]


class _NoText:
    """A detokenizer for a model without a tokenizer: generate() streams no text."""
    def incremental_decoder(self, skip: bytes = b""):
        return self

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def check_logprobs(engine: Engine, ref_model: ReferenceModel, tol: float) -> list[dict]:
    """generate() with logprobs in self-speculation (verify rows; from the top candidates and
    chunk masses on a GPU build), teacher-forced through the reference: each token's and each
    alternative's logprob within 2 * tol * max|logit| of the reference's log-softmax (the
    logits' bound, once for the logit and once for the log of the row's sum)."""
    request = GenerationRequest(prompt_ids=tuple(CHAIN_PROMPT), max_tokens=CHAIN_TOKENS, logprobs=5,
                                loop_detection=False, decode=DecodeParams(mode="spec", draft_length=4))
    events = list(generate(engine.new_sequence(256), _NoText(), request))
    scored = [s for e in events[:-1] for s in e.logprobs]
    tokens = [s.token for s in scored]
    ref = ReferenceForward(ref_model, 256).causal(CHAIN_PROMPT + tokens[:-1]).logits()
    ref = ref[len(CHAIN_PROMPT) - 1:]
    peak = ref.max(axis=1, keepdims=True)
    want = ref - peak - np.log(np.exp(ref - peak).sum(axis=1, keepdims=True))
    scale = np.abs(ref).max(axis=1)
    err = max(max(abs(s.logprob - row[s.token]), *(abs(lp - row[i]) for i, lp in s.top)) / m
              for s, row, m in zip(scored, want, scale))
    return [{"name": f"logprobs of {len(tokens)} spec tokens and 5 alternatives each",
             "rel_err": float(err), "ok": bool(len(tokens) == CHAIN_TOKENS and err <= 2 * tol)}]


def check_tiny(target: str, artifact: str | None, tol: float) -> list[dict]:
    cfg = GEOMETRIES["tiny"]
    weights = random_weights(cfg, seed=3)
    engine = Engine(cfg, weights, target, artifact=artifact, log=log)
    ref_model = ReferenceModel(cfg, weights, int8_activations=engine.int8_activations)
    return (check_entries(engine, ref_model, tol) + check_greedy_chain(engine, ref_model, tol)
            + check_top_candidates(engine) + check_logprobs(engine, ref_model, tol))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="cuda", choices=["cuda", "llvm"])
    ap.add_argument("--tiny-artifact", default=None, help="compiled tiny model (default: cache)")
    ap.add_argument("--bench-artifact", default=None, help="compiled bench geometry (default: cache)")
    ap.add_argument("--geometry", default="14b", choices=sorted(GEOMETRIES))
    ap.add_argument("--model", default=None, help="bench this GGUF file's weights, its load from "
                    "disk timed (default: random weights of --geometry made in host memory)")
    ap.add_argument("--ctx", type=int, default=None, help="KV cache size (default: what the bench needs)")
    ap.add_argument("--fills", default="512,4096")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    # A --model file needs the gguf wheel on the GPU box.
    cfg, load = bench_loader(args.model, GEOMETRIES[args.geometry], args.target,
                             args.bench_artifact, log)
    try:
        fills = tuple(int(f) for f in args.fills.split(","))
    except ValueError:
        ap.error("--fills: give comma-separated cache lengths, e.g. 512,4096")
    plan = BenchPlan(fills=fills, block=args.block, prefill=args.prefill, repeat=args.repeat,
                     ctx=args.ctx)
    if plan.problem(cfg):
        ap.error(plan.problem(cfg))
    tol = 1e-2 if args.target == "cuda" else 1e-3  # fp16 on the GPU, float32 on the CPU

    try:
        checks = [] if args.skip_tiny else check_tiny(args.target, args.tiny_artifact, tol)
    except Exception as err:  # say, a graph capture the driver refuses: the bench still runs
        checks = [{"name": "tiny model", "rel_err": float("inf"), "ok": False,
                   "error": f"{type(err).__name__}: {err}"}]
    for c in checks:
        log(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: rel err {c['rel_err']:.2e}")

    def write(report: dict) -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({**report, "checks": checks}, indent=1))

    def ours_measured(partial: dict) -> None:  # kept in --json-out should torch be cut short
        write(partial)
        log("our entries measured (in --json-out); the PyTorch baseline next")

    report = run_bench(cfg, plan, args.target, load, with_torch=not args.no_torch,
                       checkpoint=ours_measured)
    report["checks"] = checks
    write(report)

    if checks:
        bad = [c for c in checks if not c["ok"]]
        print(f"\ncorrectness (tiny vs float64, tolerance {tol:g}): {len(checks) - len(bad)}/"
              f"{len(checks)} ok, worst rel err {max(c['rel_err'] for c in checks):.2e}")
        for c in bad:
            print(f"FAIL {c['name']}: {c.get('error') or format(c['rel_err'], '.2e')}")
        chain = next((c for c in checks if "exact_argmax" in c), None)
        if chain:
            print(f"greedy chain: {chain['exact_argmax']}/{CHAIN_TOKENS} tokens equal the float64 argmax")
    print(render_table(report))
    if not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
