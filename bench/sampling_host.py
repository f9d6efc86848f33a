"""Host time of sampling one row of logits (issue 7: host work per step <= 5%).

Sampling runs on the host between two GPU steps, once per row: an AR token is one row, a
self-speculation cycle ~2K rows (the draft's K distributions, then the verify rows up to the
first rejection). This times `Sampler.choose` over rows of a 14B-sized vocabulary at common
settings (llama-server's defaults; OpenAI's temperature 1; top-p alone), on two kinds of row:
"peaked" (a few tokens hold most of the mass, as a trained model's usually do) and "flat"
(standard-normal logits: mass spread over tens of thousands of tokens).

    python bench/sampling_host.py [--vocab 131072] [--rows 16] [--baseline OLD_sampling.py]

--baseline times another version of trimode/runtime/sampling.py in the same run, for a side
by side ratio (e.g. `git show REV:trimode/runtime/sampling.py > /tmp/old_sampling.py`).
--from-top also times each row drawn from its 64 largest logits, as a GPU build hands them
over (numpy computes them here, untimed; settings without top-k < 64 take the row anyway).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import numpy as np

from trimode.model.reference import top_candidates
from trimode.runtime.forward import StepResult
from trimode.runtime import sampling

SETTINGS = {
    "llama-server defaults (T 0.8, top-k 40, top-p 0.95, min-p 0.05)":
        dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "OpenAI default (T 1)": dict(temperature=1.0),
    "top-p 0.9 (T 0.7)": dict(temperature=0.7, top_p=0.9),
}


def rows(kind: str, n: int, vocab: int, rng) -> np.ndarray:
    logits = rng.standard_normal((n, vocab)).astype(np.float32)
    if kind == "peaked":
        logits *= 2
        for r in range(n):
            logits[r, rng.choice(vocab, 8, replace=False)] += rng.uniform(8, 16, 8).astype(np.float32)
    return logits


def ms_per_row(module, params: dict, logits: np.ndarray, repeat: int, top=None) -> float:
    step = StepResult(argmax=logits.argmax(axis=1), prob=np.zeros(len(logits), np.float32),
                      fetch_rows=lambda start, stop: logits[start:stop],
                      fetch_top=None if top is None else lambda: top)
    sampler = module.Sampler(module.SamplingParams(seed=0, **params))
    sampler.choose(step, range(1), [[]])  # warm-up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        sampler.choose(step, range(len(logits)), [[]] * len(logits))
        best = min(best, time.perf_counter() - started)
    return best / len(logits) * 1e3


def load(path: str):
    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="another sampling.py to time beside this one")
    ap.add_argument("--from-top", action="store_true", help="also time draws from the top candidates")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = {kind: rows(kind, args.rows, args.vocab, rng) for kind in ("peaked", "flat")}
    baseline = load(args.baseline) if args.baseline else None
    print(f"vocab {args.vocab}, {args.rows} rows, best of {args.repeat}; ms per row")
    tops = {kind: top_candidates(logits) for kind, logits in data.items()} if args.from_top else {}
    head = ("| setting | row | this ms |" + (" from top ms |" if tops else "")
            + (" baseline ms | baseline / this |" if baseline else ""))
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, params in SETTINGS.items():
        for kind, logits in data.items():
            this = ms_per_row(sampling, params, logits, args.repeat)
            line = f"| {name} | {kind} | {this:.3f} |"
            if tops:
                line += f" {ms_per_row(sampling, params, logits, args.repeat, tops[kind]):.3f} |"
            if baseline:
                old = ms_per_row(baseline, params, logits, args.repeat)
                line += f" {old:.3f} | {old / this:.1f} |"
            print(line)


if __name__ == "__main__":
    main()
