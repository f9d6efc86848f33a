"""The three decode loops (MODEL.md section 5) as one-cycle functions over a Forward.

Shared state between cycles is `history`: prompt + every generated token. Its last token is
the "next token": already chosen and emitted, not yet in the KV cache, so at the start of
every cycle forward.length == len(history) - 1. A cycle returns its new tokens in order; the
last of them is the next cycle's next token. The caller clamps each cycle's size to the room
left (max_tokens, context), so a cycle never writes past the cache or emits past the limit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from trimode.runtime.chunked_row import ChunkedRow
from trimode.runtime.forward import MAX_BLOCK, Forward, StepResult
from trimode.runtime.sampling import Distribution, Sampler

MODES = ("ar", "diffusion", "spec")
# Masked slots per self-speculation cycle. With a per-slot acceptance rate a, a cycle yields
# (1 - a^(K+1)) / (1 - a) tokens; NVIDIA's 6.8 tokens/cycle at K = 31 means a ~ 0.855, so
# K = 15 keeps ~92% of K = 31's tokens/cycle (K = 4, the fork's: ~55%) with half the rows per
# pass, and a 16-row pass of a 14B model is still weight-read bound on a GPU. To be confirmed
# by GPU measurement (tokens/s against K).
DEFAULT_DRAFT_LENGTH = 15
# On a CPU a pass's matmuls are compute bound past a few rows (2 x params x rows flops), so
# its cost grows with K; and the CPU matmul multiplies a block's 4 rows per converted weight
# vector (q8_matmul.py ROW_TILE), a fifth row running alone at about a decode step's cost. So K = 3: the
# block and next token are one tile (the default model: ~1.3x the decode speed of the fork's
# K = 4, the same tokens; BENCHMARKS.md).
CPU_DRAFT_LENGTH = 3


def draft_params(target: str, given: int | None) -> dict:
    """DecodeParams' draft fields on `target` ('cuda' or 'llvm') for a draft length the user
    gave, or None: the target's default, where the pace starts (spec_pace.py)."""
    if given is None:
        return {"draft_length": CPU_DRAFT_LENGTH if target == "llvm" else DEFAULT_DRAFT_LENGTH,
                "adaptive": True}
    return {"draft_length": given, "adaptive": False}


DEFAULT_BLOCK_LENGTH = 32
DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class DecodeParams:
    """mode: 'ar' | 'diffusion' | 'spec'. draft_length: masked slots per self-speculation
    cycle (the block is the next token plus that many masks); adaptive: that is only where
    it starts, each cycle's length then chosen from what the cycles measured (spec_pace.py;
    the same output). block_length and threshold: block diffusion's block (next token
    included) and its reveal confidence."""
    mode: str = "spec"
    draft_length: int = DEFAULT_DRAFT_LENGTH
    adaptive: bool = False
    block_length: int = DEFAULT_BLOCK_LENGTH
    threshold: float = DEFAULT_THRESHOLD

    def problem(self) -> str | None:
        if self.mode not in MODES:
            return f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"
        if not 0 <= self.draft_length < MAX_BLOCK:
            return f"draft_length must be in [0, {MAX_BLOCK - 1}], got {self.draft_length}"
        if not 1 <= self.block_length <= MAX_BLOCK:
            return f"block_length must be in [1, {MAX_BLOCK}], got {self.block_length}"
        if not 0 <= self.threshold <= 1:
            return f"threshold must be in [0, 1], got {self.threshold}"
        return None


@dataclass
class Cycle:
    tokens: list[int]
    forwards: int
    drafted: int = 0   # draft tokens proposed (spec)
    accepted: int = 0  # of those, accepted by the verify pass
    # a causal pass whose row i is the AR distribution tokens[i] came from (for logprobs);
    # None where the cycle ran none over its tokens (a diffusion block ended by EOS)
    causal: StepResult | None = None


def mask_rows(slots: Sequence[int], shift: bool) -> list[int]:
    """Row of a bidirectional pass that predicts each block slot: the slot's own row, or the
    row before it when the model's logits are shifted (diffusion.shift_logits, Dream-style)."""
    return [s - 1 if shift else s for s in slots]


def prefill(fwd: Forward, prompt: Sequence[int], sampler: Sampler,
            allowed: Sequence[int] = ()) -> Cycle:
    """Run the uncached part of the prompt causally; the cycle's one token is the first
    generated, one of `allowed` when that is given (token healing)."""
    if fwd.length >= len(prompt):
        fwd.truncate(len(prompt) - 1)  # keep one token to produce the row we sample from
    step = fwd.causal(list(prompt[fwd.length:]), last_only=True)
    chosen = restricted(step, allowed) if len(allowed) else step
    return Cycle(sampler.choose(chosen, [0], [sampler.context(prompt)])[0], forwards=1, causal=step)


def restricted(step: StepResult, allowed: Sequence[int]) -> StepResult:
    """`step` with every id outside `allowed` at -inf logit."""
    logits = step.logits()
    kept = np.full_like(logits, -np.inf)
    kept[:, allowed] = logits[:, allowed]
    return StepResult.from_logits(kept)


def ar_cycle(fwd: Forward, sampler: Sampler, history: list[int]) -> Cycle:
    step = fwd.causal([history[-1]], last_only=True)
    return Cycle(sampler.choose(step, [0], [sampler.context(history)])[0], forwards=1, causal=step)


def spec_cycle(fwd: Forward, sampler: Sampler, history: list[int], k: int,
               mask_id: int, shift: bool) -> Cycle:
    """Draft k masked slots bidirectionally, verify [next] + drafts causally (2 forwards).

    Verify row i is the AR distribution p_i of the token after block[i]. Accept drafts while
    they match (greedy) or pass rejection sampling, then one more token from the verify row
    where acceptance stopped (the bonus): m accepted drafts give m + 1 tokens, and the cache
    keeps next + the m accepted drafts (P + m + 1); the bonus is the next cycle's next token."""
    if k == 0:
        return ar_cycle(fwd, sampler, history)
    start = fwd.length
    seen = sampler.context(history)
    block = [history[-1]] + [mask_id] * k
    draft = fwd.bidirectional(block)
    rows = mask_rows(range(1, k + 1), shift)
    if sampler.greedy:
        drafts, _ = sampler.choose(draft, rows, [seen] * k)
    else:
        q = sampler.distributions(draft, rows, [seen] * k)
        drafts, _ = sampler.draw_each(q)
    block[1:] = drafts
    verify = fwd.causal(block)
    histories = [sampler.context(seen, drafts[:i]) for i in range(k + 1)]
    if sampler.greedy:
        target, _ = sampler.choose(verify, range(k + 1), histories)
        m = 0
        while m < k and drafts[m] == target[m]:
            m += 1
        tokens = drafts[:m] + [target[m]]
    else:
        tokens = _rejection_sample(sampler, verify, histories, drafts, q)
        m = len(tokens) - 1
    fwd.truncate(start + m + 1)
    return Cycle(tokens, forwards=2, drafted=k, accepted=m, causal=verify)


def _rejection_sample(sampler: Sampler, verify: StepResult, histories: list[list[int]],
                      drafts: list[int], q: list[Distribution]) -> list[int]:
    """Speculative sampling (Leviathan et al.; Chen et al.): draft d_j ~ q_j is kept with
    probability min(1, p_j(d_j) / q_j(d_j)); the first rejected slot instead draws from
    normalize(max(0, p_j - q_j)); if all are kept the bonus is drawn from p_k. Each emitted
    token is then distributed exactly as AR sampling from p would give it. Verify rows are
    fetched one at a time, up to the first rejection, where a GPU build's top candidates or
    chunk masses do not suffice."""
    known = sampler.distributions_known(verify, range(len(drafts) + 1), histories)

    def target(j: int) -> Distribution | ChunkedRow:
        return known[j] or sampler.distributions(verify, [j], [histories[j]])[0]
    tokens = []
    for j, d in enumerate(drafts):
        p = target(j)
        if sampler.rng.random() * q[j].prob(d) < p.prob(d):  # u < p/q without dividing by q
            tokens.append(d)
            continue
        return tokens + [_draw_residual(sampler, p, q[j])]
    return tokens + [sampler.draw(target(len(drafts)))]


# Proposals a residual draw from chunk masses tries before it takes the whole rows.
_RESIDUAL_PROPOSALS = 64


def _draw_residual(sampler: Sampler, p: Distribution | ChunkedRow, q: Distribution | ChunkedRow) -> int:
    """A draw from normalize(max(0, p - q)). Known by their chunk masses, neither row is
    fetched whole: a token t ~ p is kept with probability max(0, p_t - q_t) / p_t, which
    keeps t with probability max(0, p_t - q_t) in all, the residual exactly; the expected
    number of proposals is 1 / sum(max(0, p - q)), the inverse of the probability that the
    slot was rejected at all, so one per verified slot on average. Past _RESIDUAL_PROPOSALS
    (rare, and exact too: the residual is the same whichever way it is drawn), the rows."""
    if isinstance(p, ChunkedRow):
        for _ in range(_RESIDUAL_PROPOSALS):
            (token,), (p_token,) = sampler.draw_each([p])
            if sampler.rng.random() * p_token < p_token - q.prob(token):
                return token
        dense = p.dense()
        p = Distribution(np.arange(len(dense)), dense)
    # max(0, p - q) is zero wherever p is zero: p's tokens hold all of it
    residual = np.maximum(p.probs - q.of(p.ids), 0.0)
    # residual is all zero only when p == q, where rejection has probability zero.
    if residual.sum() > 0:
        p = Distribution(p.ids, residual / residual.sum())
    return sampler.draw(p)


@dataclass
class _Block:
    tokens: list[int]
    masked: set[int] = field(default_factory=set)

    def eos_end(self, eos_id: int) -> int | None:
        """Slot of the first EOS with no mask before it, if any."""
        for slot, token in enumerate(self.tokens):
            if slot in self.masked:
                return None
            if token == eos_id:
                return slot
        return None


def diffusion_cycle(fwd: Forward, sampler: Sampler, history: list[int], b: int,
                    threshold: float, mask_id: int, eos_id: int, shift: bool) -> Cycle:
    """Block diffusion: [next] + (b - 1) masks. Each bidirectional pass reveals the most
    confident masked slot plus every slot at or over `threshold`, until no mask is left or an
    EOS stands with no mask before it. A causal pass over the finished block commits its K/V
    and chooses the token after it (the next block's seed)."""
    if b == 1:
        return ar_cycle(fwd, sampler, history)
    seen = sampler.context(history)
    block = _Block([history[-1]] + [mask_id] * (b - 1), set(range(1, b)))
    forwards = 0
    while block.masked:
        step = fwd.bidirectional(block.tokens)
        forwards += 1
        slots = sorted(block.masked)
        ids, conf = sampler.choose(step, mask_rows(slots, shift), [seen] * len(slots))
        best = int(np.argmax(conf))
        for i, slot in enumerate(slots):
            if i == best or conf[i] >= threshold:
                block.tokens[slot] = ids[i]
                block.masked.discard(slot)
        end = block.eos_end(eos_id)
        if end is not None:  # the rest of the block would be discarded: no commit pass
            return Cycle(block.tokens[1:end + 1], forwards)
    commit = fwd.causal(block.tokens)
    seed, _ = sampler.choose(commit, [b - 1], [sampler.context(seen, block.tokens[1:])])
    return Cycle(block.tokens[1:] + seed, forwards + 1, causal=commit)
