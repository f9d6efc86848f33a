"""Host time of sampling one row of logits (issue 7: host work per step <= 5%).

Sampling runs on the host between two GPU steps, once per row: an AR token is one row, a
self-speculation cycle ~2K rows (the draft's K distributions, then the verify rows up to the
first rejection). This times `Sampler.choose` over rows of a 14B-sized vocabulary at common
settings (llama-server's defaults; OpenAI's temperature 1; top-p alone), on two kinds of row:
"peaked" (a few tokens hold most of the mass, as a trained model's usually do) and "flat"
(standard-normal logits: mass spread over tens of thousands of tokens).

    python bench/sampling_host.py [--vocab 131072] [--rows 16] [--from-top] [--baseline REV]

--from-top also times each row drawn from what a GPU build hands over beside the rows: its
64 largest logits (top-k < 64; top-p or min-p alone where they hold the tokens those keep,
top-p's share of the row from the chunk masses) or its chunk masses (temperature alone),
numpy computing them here, untimed; other rows take the row anyway.
Each call samples all --rows rows at once (a spec cycle's draft); --rows 1 is an AR token.
A second table times whole self-speculation cycles at llama-server's defaults, at top-p 0.9
alone and at temperature 0.7 alone (with --from-top: from the top candidates, and from chunk
masses) over
passes that cost nothing (each returns fixed logits): the host work a sampled cycle adds to
its two GPU passes, and the copies to the host a GPU build would make for it (rows, top
candidates, chunk masses, 4 KB chunks: each one synchronous copy there). --baseline REV
times that revision's sampling.py, decode.py and chunked_row.py (git show) beside this tree's
in the same run, for side by side ratios. --logprobs N adds a table of the same cycles with
each emitted token's logprob and N alternatives (runtime/logprobs.py), against without.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

from trimode.model.reference import chunk_masses, top_candidates
from trimode.runtime.forward import StepResult
from trimode.runtime import decode, sampling
from trimode.runtime.logprobs import token_logprobs

DEFAULTS = "llama-server defaults (T 0.8, top-k 40, top-p 0.95, min-p 0.05)"
TOP_P = "top-p 0.9 (T 0.7)"
SETTINGS = {
    DEFAULTS:
        dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "OpenAI default (T 1)": dict(temperature=1.0),
    TOP_P: dict(temperature=0.7, top_p=0.9),
    # greedy reads each row's argmax; the penalty's window decides whether a row is fetched
    "greedy": dict(temperature=0.0),
    "greedy, repeat penalty 1.1 (last 64)": dict(temperature=0.0, repetition_penalty=1.1, penalty_last_n=64),
}
# what precedes every timed row (only a penalty reads it): a prompt's worth of ids
HISTORY = list(range(1000, 1256))
TEMPERATURE_ONLY = dict(temperature=0.7)  # the model card's request (chunk masses at its T)


def rows(kind: str, n: int, vocab: int, rng) -> np.ndarray:
    logits = rng.standard_normal((n, vocab)).astype(np.float32)
    if kind == "peaked":
        logits *= 2
        for r in range(n):
            logits[r, rng.choice(vocab, 8, replace=False)] += rng.uniform(8, 16, 8).astype(np.float32)
    return logits


def ms_per_row(module, params: dict, logits: np.ndarray, repeat: int, top=None) -> float:
    """With `top` (the rows' top candidates), the step also has chunk masses, as a GPU
    build's steps do (numpy computes them in the untimed warm-up; the step keeps them)."""
    step = StepResult(argmax=logits.argmax(axis=1), prob=np.zeros(len(logits), np.float32),
                      fetch_rows=lambda start, stop: logits[start:stop],
                      fetch_top=None if top is None else lambda: top,
                      fetch_mass=None if top is None else lambda inv_t: tuple(
                          a.astype(np.float32) for a in chunk_masses(logits, inv_t)),
                      fetch_span=lambda row, start, stop: logits[row, start:stop])
    sampler = module.Sampler(module.SamplingParams(seed=0, **params))
    sampler.choose(step, range(1), [HISTORY])  # warm-up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        sampler.choose(step, range(len(logits)), [HISTORY] * len(logits))
        best = min(best, time.perf_counter() - started)
    return best / len(logits) * 1e3


def load_revision(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """sampling.py and decode.py as they were at `rev`, importing chunked_row.py as it was
    there too (where it existed)."""
    modules = {}
    for name in ("chunked_row", "sampling", "decode"):
        path = f"trimode/runtime/{name}.py"
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], text=True, capture_output=True,
                               cwd=Path(__file__).parent)
        if shown.returncode != 0 and name == "chunked_row":
            continue  # before chunk masses
        shown.check_returncode()
        module = types.ModuleType(f"baseline_{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up there
        current = {n: sys.modules[f"trimode.runtime.{n}"] for n in modules}
        sys.modules.update({f"trimode.runtime.{n}": m for n, m in modules.items()})
        try:
            exec(compile(shown.stdout, f"{rev}:{path}", "exec"), module.__dict__)
        finally:
            sys.modules.update({f"trimode.runtime.{n}": m for n, m in current.items()})
        modules[name] = module
    return modules["sampling"], modules["decode"]


class FreePasses:
    """A Forward whose passes cost nothing: the draft pass returns `draft`'s logits and every
    causal pass `verify`'s, each a fresh StepResult (with top candidates when given)."""

    def __init__(self, draft: np.ndarray, verify: np.ndarray, tops: dict | None,
                 masses: dict | None = None):
        self.rows = {"draft": draft, "verify": verify}
        self.argmax = {name: logits.argmax(axis=1) for name, logits in self.rows.items()}
        self.tops, self.masses = tops, masses
        self.length = 1000
        self.copies = 0  # what a GPU build copies to the host beside argmax/prob

    def _copied(self, value):
        self.copies += 1
        return value

    def _step(self, name: str) -> StepResult:
        logits = self.rows[name]
        top = self.tops[name] if self.tops else None
        mass = self.masses[name] if self.masses else None  # inverse temperature -> masses
        return StepResult(argmax=self.argmax[name], prob=np.zeros(len(logits), np.float32),
                          fetch_rows=lambda start, stop: self._copied(logits[start:stop]),
                          fetch_top=None if top is None else lambda: self._copied(top),
                          fetch_mass=None if mass is None else lambda inv_t: self._copied(mass[inv_t]),
                          fetch_span=lambda row, start, stop: self._copied(logits[row, start:stop]))

    def bidirectional(self, tokens):
        return self._step("draft")

    def causal(self, tokens, last_only=False):
        return self._step("verify")

    def truncate(self, n: int) -> None:
        pass


def cycle_ms(modules, params: dict, fwd: FreePasses, k: int, cycles: int,
             logprobs: int | None = None) -> tuple[float, float, float]:
    """Mean host ms of a sampled spec cycle (with its tokens' logprobs, given a count),
    tokens per cycle and copies per cycle."""
    sampling_module, decode_module = modules
    sampler = sampling_module.Sampler(sampling_module.SamplingParams(seed=0, **params))

    def cycle():
        made = decode_module.spec_cycle(fwd, sampler, [1, 2, 3], k, 0, False)
        if logprobs is not None:
            token_logprobs(made.causal, made.tokens, logprobs)
        return made
    cycle()  # warm-up
    tokens, fwd.copies = 0, 0
    started = time.perf_counter()
    for _ in range(cycles):
        tokens += len(cycle().tokens)
    return (time.perf_counter() - started) / cycles * 1e3, tokens / cycles, fwd.copies / cycles


def cycle_rows(args, rng) -> tuple[np.ndarray, np.ndarray]:
    """The draft's k rows predict what the verify rows (a little noise on the same rows)
    then judge, so most drafts are kept, as with a trained model."""
    k = args.draft_length
    draft = rows("peaked", k + 1, args.vocab, rng)
    verify = draft.copy()
    verify[:k] = draft[1:] + 0.3 * rng.standard_normal((k, args.vocab)).astype(np.float32)
    return draft, verify


def all_masses(draft: np.ndarray, verify: np.ndarray) -> dict:
    """Both passes' chunk masses at the temperatures the tables use (1: logprobs')."""
    return {name: {inv_t: tuple(a.astype(np.float32) for a in chunk_masses(logits, inv_t))
                   for inv_t in (1 / TEMPERATURE_ONLY["temperature"], 1.0)}
            for name, logits in (("draft", draft), ("verify", verify))}


def logprob_table(args, draft: np.ndarray, verify: np.ndarray) -> None:
    tops = {"draft": top_candidates(draft), "verify": top_candidates(verify)}
    masses = all_masses(draft, verify)
    print(f"\nlogprobs ({args.logprobs} alternatives): the same cycles with and without; mean of {args.cycles}")
    print("| setting | rows from | host ms, without | with | added | copies without | with |")
    print("|---|---|---|---|---|---|---|")
    for setting, params in (("greedy", SETTINGS["greedy"]), ("llama-server defaults", SETTINGS[DEFAULTS])):
        for label, with_tops, with_masses in (("logit rows", None, None),
                                              ("top candidates + chunk masses", tops, masses)):
            without, with_ = (cycle_ms((sampling, decode), params, FreePasses(draft, verify, with_tops, with_masses),
                                       args.draft_length, args.cycles, n) for n in (None, args.logprobs))
            print(f"| {setting} | {label} | {without[0]:.3f} | {with_[0]:.3f} | "
                  f"{with_[0] - without[0]:.3f} | {without[2]:.1f} | {with_[2]:.1f} |")


def cycle_table(args, baseline, draft: np.ndarray, verify: np.ndarray) -> None:
    """Whole sampled cycles over cycle_rows()."""
    k = args.draft_length
    sources = [("this", (sampling, decode))] + ([("baseline", baseline)] if baseline else [])
    masses = all_masses(draft, verify)
    tops = {"draft": top_candidates(draft), "verify": top_candidates(verify)}
    print(f"\nself-speculation cycles, k = {k}, passes free; mean of {args.cycles}")
    print("| setting | rows from | code | host ms per cycle | tokens per cycle | copies per cycle |")
    print("|---|---|---|---|---|---|")
    cases = [("llama-server defaults", SETTINGS[DEFAULTS], "logit rows", None, None),
             (TOP_P, SETTINGS[TOP_P], "logit rows", None, None),
             ("T 0.7 alone", TEMPERATURE_ONLY, "logit rows", None, None)]
    if args.from_top:
        cases += [("llama-server defaults", SETTINGS[DEFAULTS], "top candidates", tops, None),
                  (TOP_P, SETTINGS[TOP_P], "top candidates + chunk masses", tops, masses),
                  ("T 0.7 alone", TEMPERATURE_ONLY, "chunk masses", None, masses)]
    for setting, params, label, with_tops, with_masses in cases:
        for name, modules in sources:
            fwd = FreePasses(draft, verify, with_tops, with_masses)
            ms, tokens, copies = cycle_ms(modules, params, fwd, k, args.cycles)
            print(f"| {setting} | {label} | {name} | {ms:.3f} | {tokens:.2f} | {copies:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", metavar="REV", help="a git revision to time beside this tree")
    ap.add_argument("--draft-length", type=int, default=15, help="k of the spec cycles")
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--from-top", action="store_true",
                    help="also time draws from the top candidates or chunk masses")
    ap.add_argument("--logprobs", type=int, metavar="N", help="also time cycles with logprobs")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = {kind: rows(kind, args.rows, args.vocab, rng) for kind in ("peaked", "flat")}
    baseline = load_revision(args.baseline) if args.baseline else None
    print(f"vocab {args.vocab}, {args.rows} rows, best of {args.repeat}; ms per row")
    tops = {kind: top_candidates(logits) for kind, logits in data.items()} if args.from_top else {}
    sources = [("this", None)] + ([("this from GPU", "top")] if tops else [])
    if baseline:
        sources += [("baseline", None)] + ([("baseline from GPU", "top")] if tops else [])
    head = "| setting | row |" + "".join(f" {name} ms |" for name, _ in sources)
    if baseline:
        head += "".join(f" {name} / {name.replace('baseline', 'this')} |"
                        for name, _ in sources if name.startswith("baseline"))
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, params in SETTINGS.items():
        for kind, logits in data.items():
            times = {}
            for source, with_top in sources:
                module = baseline[0] if source.startswith("baseline") else sampling
                times[source] = ms_per_row(module, params, logits, args.repeat,
                                           tops[kind] if with_top else None)
            line = f"| {name} | {kind} |" + "".join(f" {t:.4f} |" for t in times.values())
            for source, t in times.items():
                if source.startswith("baseline"):
                    line += f" {t / times[source.replace('baseline', 'this')]:.1f} |"
            print(line)
    draft, verify = cycle_rows(args, rng)
    cycle_table(args, baseline, draft, verify)
    if args.logprobs is not None:
        logprob_table(args, draft, verify)


if __name__ == "__main__":
    main()
