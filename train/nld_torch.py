"""The NLD network in PyTorch, for training only (MODEL.md section 1; same math as
trimode/model/reference.py): RMSNorm, no biases, SwiGLU, GQA, rotate-half rope with the
config's YaRN frequencies, the long-context query scale, untied head.

`forward` takes explicit positions and a boolean visibility mask so one pass can hold a clean
causal stream and its noisy copies (see objective.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimode.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    """x [B, heads, T, d]; cos/sin [B, 1, T, d/2]; pairs i <-> i + d/2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.wq = nn.Linear(cfg.hidden, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.hidden, bias=False)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.w_gate = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w_up = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w_down = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, q_scale, visible):
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)     # [B, hq, T, d]
        k = self.wk(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, hkv, T, d]
        v = self.wv(h).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q = rope(q, cos, sin) * q_scale
        k = rope(k, cos, sin)
        # GQA: query head j reads kv head j // group_size.
        k = k.repeat_interleave(cfg.group_size, dim=1)
        v = v.repeat_interleave(cfg.group_size, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # scale 1/sqrt(d)
        x = x + self.wo(a.transpose(1, 2).reshape(b, t, cfg.q_dim))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class NLDModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.output = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.register_buffer("inv_freq", torch.tensor(cfg.inv_freq(), dtype=torch.float64),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        depth = (2 * self.cfg.n_layers) ** -0.5
        for name, p in self.named_parameters():
            if p.dim() == 2:
                gain = depth if name.endswith(("wo.weight", "w_down.weight")) else 1.0
                nn.init.normal_(p, std=0.02 * gain)

    def forward(self, tokens, positions, visible):
        """tokens, positions int64 [B, T]; visible bool [B or 1, 1, T, T] (True = may attend).
        Returns logits [B, T, V]."""
        angle = positions.to(torch.float64)[..., None] * self.inv_freq  # [B, T, d/2], float64 like the host tables
        cos = angle.cos().float()[:, None]
        sin = angle.sin().float()[:, None]
        q_scale = torch.tensor(self.cfg.q_scale(positions.cpu().numpy()), dtype=torch.float32,
                               device=tokens.device)[:, None, :, None]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, q_scale, visible)
        return self.output(self.output_norm(x))
