"""NLD's joint objective in one forward pass: AR next-token loss + masked-diffusion loss on blocks.

The pass runs over [noisy copy ; clean sequence] (2L tokens, both halves at positions 0..L-1):
  - a clean token sees the clean tokens up to itself (causal): its logit row predicts the NEXT
    token, which gives the AR loss;
  - a noisy token of block b sees all of noisy block b (bidirectional) and the clean tokens of
    blocks < b, exactly what a draft/denoise pass sees at inference (the KV cache only holds
    clean causal K/V); its logit row at a masked slot predicts the token AT that slot.

Masking (per block of BLOCK tokens; slot 0 always stays clean because both diffusion and
self-speculation seed it with the AR token):
  - half of the blocks: t ~ U(0, 1), each other slot masked with probability t (at least one);
  - a quarter: every slot after slot 0 masked (the self-speculation draft [next] + [MASK]*K);
  - a quarter: a clean prefix of random length 1..BLOCK-1, the rest masked.
The diffusion loss is the plain mean cross-entropy over masked slots (the stable variant,
without the 1/t weighting of masked-diffusion LMs, whose high-variance small-t terms hurt
a run this short).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32
AR_WEIGHT = 1.0
DIFFUSION_WEIGHT = 0.3


def visibility(length: int) -> torch.Tensor:
    """bool [1, 1, 2L, 2L]: rows/cols 0..L-1 noisy, L..2L-1 clean."""
    idx = torch.arange(length)
    blk = idx // BLOCK
    clean_clean = idx[None, :] <= idx[:, None]
    noisy_noisy = blk[None, :] == blk[:, None]
    noisy_clean = blk[None, :] < blk[:, None]
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


def block_masks(n_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """bool [n_blocks, BLOCK], True = masked; slot 0 never masked."""
    kind = torch.rand(n_blocks, generator=generator)
    slot = torch.arange(BLOCK)[None, :]
    t = torch.rand(n_blocks, 1, generator=generator)
    random_rate = torch.rand(n_blocks, BLOCK, generator=generator) < t
    forced = 1 + torch.randint(0, BLOCK - 1, (n_blocks, 1), generator=generator)
    random_rate |= slot == forced  # at least one masked slot
    prefix = 1 + torch.randint(0, BLOCK - 1, (n_blocks, 1), generator=generator)
    prefix = torch.where(kind[:, None] < 0.75, torch.ones_like(prefix), prefix)
    masks = torch.where(kind[:, None] < 0.5, random_rate, slot >= prefix)
    masks[:, 0] = False
    return masks


def joint_loss(model, clean: torch.Tensor, mask_token: int, generator: torch.Generator,
               visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """clean int64 [B, L] (L a multiple of BLOCK). Returns (ar_loss, diffusion_loss)."""
    batch, length = clean.shape
    masked = block_masks(batch * length // BLOCK, generator).view(batch, length).to(clean.device)
    noisy = torch.where(masked, torch.full_like(clean, mask_token), clean)
    positions = torch.arange(length, device=clean.device).repeat(2)[None].expand(batch, -1)
    if visible is None:
        visible = visibility(length).to(clean.device)
    logits = model(torch.cat([noisy, clean], dim=1), positions, visible)
    noisy_logits, clean_logits = logits[:, :length], logits[:, length:]
    ar = F.cross_entropy(clean_logits[:, :-1].reshape(-1, logits.shape[-1]), clean[:, 1:].reshape(-1))
    diffusion = F.cross_entropy(noisy_logits[masked], clean[masked])
    return ar, diffusion
