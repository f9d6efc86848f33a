"""Two compiled artifacts of one model, timed side by side in one process, rounds alternating:

    python bench/artifact_ab.py MODEL ARTIFACT_A ARTIFACT_B [--rounds 12] [--calls 50]
        [--block 4] [--prefill 128] [--fill 64] [--target llvm] [--random-fill] [--a-on-4k-pages]

MODEL is a GGUF file or a geometry name (`3b`, `14b`: random Q8_0 weights, as `trimode bench
--geometry`).

Each round times every entry (decode, verify T, draft T, prefill T) of A, then of B, as the
median of `calls` calls (runtime.bench.median_seconds, after its warm-up calls) from a cache
holding `fill` tokens; the table gives the median over rounds and B / A. Alternating in
short rounds is what keeps a shared, noisy machine's drift out of the ratio (a `trimode bench`
per artifact, minutes apart, moved 1.3x on its own here). Both engines load the same
weights (A's and B's manifests say how they are laid out). --random-fill writes random K/V
into the cache instead of prefilling it: an entry's time depends on the cache's length, not
on what it holds, and at the 3B an 8k-token prefill on a CPU takes minutes. (Written, not
just declared long: a cache never written reads the kernel's shared zero page, from cache.)
--a-on-4k-pages uploads A's weights as TVM allocates them, on 4 KB pages, B's on huge pages as
the runtime does (tvm_runtime.HUGE_PAGE): with one artifact as both, what huge pages give.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.gguf_file import load_model  # noqa: E402
from trimode.model.kv_cache import q8_0_rows  # noqa: E402
from trimode.runtime import tvm_runtime  # noqa: E402
from trimode.runtime.bench import fill_cache, median_seconds, tiled_weights  # noqa: E402
from trimode.runtime.engine import Engine  # noqa: E402


def entries(fwd, args, tokens):
    """name -> one call of the entry from a cache holding args.fill tokens."""
    def at_fill(call):
        def run():
            if fwd.length < args.fill:  # at the start, and after a prefill
                if args.random_fill:
                    fwd._length = args.fill  # noqa: SLF001 (a bench-only shortcut, see above)
                else:
                    fill_cache(fwd, tokens[:args.fill])
            fwd.truncate(args.fill)
            call()
        return run
    block = tokens[:args.block]
    return {"decode": at_fill(lambda: fwd.causal(tokens[:1])),
            f"verify T={args.block}": at_fill(lambda: fwd.causal(block)),
            f"draft T={args.block}": at_fill(lambda: fwd.bidirectional(block)),
            f"prefill T={args.prefill}": lambda: (fwd.truncate(0),
                                                  fwd.causal(tokens[:args.prefill], last_only=True))}


def random_cache(engine, shape: tuple) -> np.ndarray:
    """Random K/V rows as the engine's cache type keeps them (a q8_0 row's scale bytes must be
    real scales, not random bytes), the same 1024 positions over and over (a 32k cache's
    fp32 randoms would take 7 GB at the 3B)."""
    layers, two, heads, ctx, _ = shape
    base = np.random.default_rng(0).standard_normal((layers, two, heads, min(ctx, 1024),
                                                     engine.config.head_dim), np.float32)
    rows = q8_0_rows(base) if engine.kv_cache == "q8_0" else base.astype(engine.kv_dtype)
    return np.take(rows, np.arange(ctx) % rows.shape[3], axis=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--fill", type=int, default=64)
    parser.add_argument("--target", default="llvm")
    parser.add_argument("--random-fill", action="store_true")
    parser.add_argument("--a-on-4k-pages", action="store_true")
    args = parser.parse_args()

    if args.model in GEOMETRIES:
        cfg = GEOMETRIES[args.model]
        weights, metadata = tiled_weights(cfg), None
    else:
        model = load_model(args.model)
        cfg, weights, metadata = model.config, model.weights, model.metadata
    n_ctx = max(args.fill + args.block, args.prefill) + 8
    # random ids, as `trimode bench` fills: a periodic fill kept the attention flat and hid
    # what peaked scores cost (denormal softmax products, 4-8x at fill 3968 on the CPU)
    tokens = np.random.default_rng(1).integers(min(1000, cfg.vocab // 2), cfg.vocab,
                                               max(args.fill, args.prefill, args.block)).tolist()
    sides, huge_page = {}, tvm_runtime.HUGE_PAGE
    for name, artifact in (("A", args.a), ("B", args.b)):
        tvm_runtime.HUGE_PAGE = 1 << 62 if name == "A" and args.a_on_4k_pages else huge_page
        engine = Engine(cfg, weights, args.target, metadata, artifact=artifact)
        fwd = engine.new_sequence(n_ctx)
        if args.random_fill:
            engine.device.write(fwd.kv, random_cache(engine, tuple(fwd.kv.shape)))
        sides[name] = (engine, entries(fwd, args, tokens))
    times = {(side, entry): [] for side in sides for entry in sides["A"][1]}
    for _ in range(args.rounds):
        for side, (_, calls) in sides.items():
            for entry, call in calls.items():
                times[side, entry].append(1e3 * median_seconds(call, args.calls))
    pages = " (weights on 4 KB pages)" if args.a_on_4k_pages else ""
    print(f"A = {args.a}{pages}\nB = {args.b}\n{args.rounds} rounds x {args.calls} calls, fill {args.fill}")
    print(f"{'entry':<16}{'A ms':>9}{'B ms':>9}{'B / A':>8}   B / A per round (min-max)")
    for entry in sides["A"][1]:
        a, b = (statistics.median(times[side, entry]) for side in "AB")
        ratios = [y / x for x, y in zip(times["A", entry], times["B", entry])]
        print(f"{entry:<16}{a:>9.3f}{b:>9.3f}{b / a:>8.3f}   {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
