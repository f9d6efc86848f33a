"""What int8 activations (the CPU build on x86 processors with AVX2) do to a model's outputs,
on the float64 reference: the same weights with and without every Q8_0 matmul's input
quantized per 32 (ReferenceModel(int8_activations=True)).

    python bench/int8_activation_quality.py [MODEL.gguf] [--prompts 10] [--tokens 48]

Prompts: train/measure.py's samples and held-out code. Prints, teacher-forced over each
prompt, the logits' largest gap (relative to the largest logit), the top-1 agreement and the
mean negative log-likelihood of the prompt's next tokens; then greedy AR continuations (how
many are identical, where the first differs) and self-speculation's tokens per cycle.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "train")]

import measure  # noqa: E402
from trimode.model.default_model import DEFAULT_MODEL  # noqa: E402
from trimode.model.gguf_file import load_model  # noqa: E402
from trimode.model.reference import ReferenceModel  # noqa: E402
from trimode.runtime.generation import DecodeParams  # noqa: E402


def teacher_forced(loaded: measure.Loaded, ids: list[int]) -> np.ndarray:
    cfg = loaded.model.config
    empty = [np.zeros((0, cfg.n_kv_heads, cfg.head_dim))] * cfg.n_layers
    return loaded.model.forward(ids, empty, list(empty), causal=True)[0]


def nll(logits: np.ndarray, ids: list[int]) -> float:
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    plain = measure.load(args.model)
    gg = load_model(args.model)
    int8 = measure.Loaded(ReferenceModel(gg.config, gg.weights, int8_activations=True), plain.tokenizer, plain.n_ctx)
    prompts = (list(measure.SAMPLE_PROMPTS) + measure.held_out_prompts(args.prompts))[:args.prompts]

    gaps, agree, nll_plain, nll_int8 = [], [], [], []
    for prompt in prompts:
        ids = plain.tokenizer.encode(prompt, add_bos=True)
        a, b = teacher_forced(plain, ids), teacher_forced(int8, ids)
        gaps.append(np.abs(a - b).max() / np.abs(a).max())
        agree.append(np.mean(a.argmax(-1) == b.argmax(-1)))
        nll_plain.append(nll(a, ids))
        nll_int8.append(nll(b, ids))
    print(f"teacher-forced, {len(prompts)} prompts: logits' gap max {max(gaps):.2e} (median "
          f"{np.median(gaps):.2e}); top-1 agreement {np.mean(agree):.4f}; NLL {np.mean(nll_plain):.4f} "
          f"(fp32 activations) vs {np.mean(nll_int8):.4f} (int8) nats/token")
    same, first = 0, []
    for prompt in prompts:
        a, b = (measure.run(m, prompt, args.tokens, DecodeParams(mode="ar")).tokens for m in (plain, int8))
        same += a == b
        first.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
    print(f"greedy AR, {args.tokens} tokens: identical on {same} of {len(prompts)} prompts; first "
          f"difference at {first}")
    for k in (3, 15):
        got = [measure.acceptance(m, prompts, k, args.tokens)["tokens_per_cycle"] for m in (plain, int8)]
        print(f"spec, draft {k}: {got[0]:.3f} (fp32) vs {got[1]:.3f} (int8) tokens a cycle")


if __name__ == "__main__":
    main()
