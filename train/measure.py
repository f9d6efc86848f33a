"""Figures for BENCHMARKS.md from the shipped GGUF, run on the float64 reference:
greedy sample completions, self-speculation tokens per cycle per draft length on held-out
prompts (and that greedy spec reproduces greedy AR), and torch-vs-reference logits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

import corpus
from trimode.model.gguf_file import load_model
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.model.tokenizer import Tokenizer
from trimode.runtime.generation import (DecodeParams, DoneEvent, GenerationRequest, TokenEvent,
                                        generate)
from trimode.runtime.healing import heal

SAMPLE_PROMPTS = ("def fibonacci(n):", "class Stack:\n    def __init__(self):",
                  "import os\n\ndef list_files(path):", "    def __repr__(self):")
DEF_LINE = re.compile(r"^\s*def \w+\(.*\):\s*$")


@dataclass
class Loaded:
    model: ReferenceModel
    tokenizer: Tokenizer
    n_ctx: int

    def forward(self) -> ReferenceForward:
        return ReferenceForward(self.model, self.n_ctx)


def load(path, n_ctx: int = 512) -> Loaded:
    gg = load_model(path)
    return Loaded(ReferenceModel(gg.config, gg.weights), Tokenizer.from_metadata(gg.metadata), n_ctx)


def held_out_prompts(n: int, context_lines: int = 8, per_file: int = 2) -> list[str]:
    """Up to `per_file` single-line `def` headers per held-out file, each with the lines before it."""
    prompts = []
    for f in corpus.split(corpus.stdlib_files())[1]:
        lines = f.text.splitlines()
        found = 0
        for i, line in enumerate(lines):
            if DEF_LINE.match(line) and i >= context_lines and found < per_file:
                prompts.append("\n".join(lines[i - context_lines:i + 1]) + "\n")
                found += 1
        if len(prompts) >= n:
            break
    return prompts[:n]


def run(loaded: Loaded, prompt: str, max_tokens: int, decode: DecodeParams) -> DoneEvent:
    ids = tuple(loaded.tokenizer.encode(prompt, add_bos=True))
    request = GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, decode=decode,
                                loop_detection=False)
    *_, done = generate(loaded.forward(), loaded.tokenizer, request)
    return done


def complete(loaded: Loaded, prompt: str, max_tokens: int, decode: DecodeParams) -> str:
    """The text that follows `prompt`, its last token healed as `trimode generate` does."""
    ids = tuple(loaded.tokenizer.encode(prompt, add_bos=True))
    request = heal(loaded.tokenizer, GenerationRequest(prompt_ids=ids, max_tokens=max_tokens,
                                                       decode=decode, loop_detection=False))
    return "".join(e.text for e in generate(loaded.forward(), loaded.tokenizer, request)
                   if isinstance(e, TokenEvent))


def acceptance(loaded: Loaded, prompts: list[str], draft_length: int, max_tokens: int) -> dict:
    """Mean tokens emitted per greedy self-speculation cycle (accepted drafts + the bonus)."""
    cycles = accepted = 0
    for prompt in prompts:
        done = run(loaded, prompt, max_tokens, DecodeParams(mode="spec", draft_length=draft_length))
        cycles += done.stats.cycles
        accepted += done.stats.accepted_tokens
    return {"draft_length": draft_length, "cycles": cycles,
            "tokens_per_cycle": (accepted + cycles) / cycles}


def logits_gap(loaded: Loaded, torch_model, ids: list[int]) -> float:
    """Largest |torch - reference| over causal logits, relative to the logits' spread."""
    import torch
    ref = loaded.forward().causal(ids).logits()
    n = len(ids)
    with torch.no_grad():
        visible = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        got = torch_model(torch.tensor([ids]), torch.arange(n)[None], visible)[0].numpy()
    return float(np.abs(got - ref).max() / ref.std())
