"""The same network as plain PyTorch code, the way a user would write it: the baseline
`trimode bench` measures us against (issue 7).

Embedding, then per layer rmsnorm, q/k/v/o matmuls with rotary, SDPA over a preallocated
KV cache, SwiGLU MLP; norm and head. Weights in one float dtype (bf16 for timing), no fused
kernels, no CUDA graphs, no quantization. torch is imported only here and only when asked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trimode.model.config import ModelConfig
from trimode.model.weights import LAYER_MATRICES, ModelWeights, as_float

if TYPE_CHECKING:
    import torch



def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


@dataclass
class TorchModel:
    config: ModelConfig
    embed: "torch.Tensor"          # [V, H]
    layers: list[dict]             # attn_norm, ffn_norm [H]; LAYER_MATRICES [out, in]
    output_norm: "torch.Tensor"    # [H]
    head: "torch.Tensor"           # [V, H]
    n_ctx: int

    def __post_init__(self):
        import torch

        cfg, like = self.config, self.embed
        # The KV cache, preallocated once: [layers, kv_heads, ctx, d] for K and for V.
        shape = (cfg.n_layers, cfg.n_kv_heads, self.n_ctx, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v_cache = torch.zeros_like(self.k_cache)
        cos, sin = cfg.rope_tables(self.n_ctx)  # the same float64 tables the engine uploads
        self.cos = torch.tensor(cos, dtype=like.dtype, device=like.device)
        self.sin = torch.tensor(sin, dtype=like.dtype, device=like.device)
        self.q_scale = torch.tensor(cfg.q_scale(np.arange(self.n_ctx)), dtype=like.dtype,
                                    device=like.device)

    @classmethod
    def random(cls, cfg: ModelConfig, n_ctx: int, device: str, dtype_name: str = "bfloat16",
               seed: int = 0) -> "TorchModel":
        """Gaussian weights made on the device (values do not change the speed)."""
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = getattr(torch, dtype_name)

        def matrix(n: int, k: int):
            return torch.randn(n, k, generator=gen, device=device, dtype=dtype) / np.sqrt(k)

        ones = torch.ones(cfg.hidden, device=device, dtype=dtype)
        layers = [{"attn_norm": ones, "ffn_norm": ones,
                   **{name: matrix(*shape) for name, shape in cfg.layer_matrix_shapes().items()}}
                  for _ in range(cfg.n_layers)]
        return cls(cfg, embed=matrix(cfg.vocab, cfg.hidden) * np.sqrt(cfg.hidden), layers=layers,
                   output_norm=ones, head=matrix(cfg.vocab, cfg.hidden), n_ctx=n_ctx)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: ModelWeights, n_ctx: int, device: str = "cpu",
                     dtype_name: str = "float64") -> "TorchModel":
        """A model's own weights, dequantized (to check this code against the reference)."""
        import torch

        dtype = getattr(torch, dtype_name)

        def tensor(w):
            return torch.tensor(as_float(w), dtype=dtype, device=device)

        layers = [{name: tensor(getattr(layer, name))
                   for name in ("attn_norm", "ffn_norm", *LAYER_MATRICES)}
                  for layer in weights.layers]
        return cls(cfg, embed=tensor(weights.embed), layers=layers,
                   output_norm=tensor(weights.output_norm), head=tensor(weights.output), n_ctx=n_ctx)

    def forward(self, tokens: "torch.Tensor", pos: int, causal: bool = True,
                last_only: bool = False) -> "torch.Tensor":
        """tokens [T] at positions pos..pos+T-1; writes their K/V into the cache there (a
        bidirectional block's rows are simply overwritten later). Returns logits [T or 1, V]."""
        import torch
        import torch.nn.functional as F

        cfg = self.config
        n, end = tokens.shape[0], pos + tokens.shape[0]
        cos, sin = self.cos[pos:end, None, :], self.sin[pos:end, None, :]  # [T, 1, d/2]
        q_scale = self.q_scale[pos:end, None, None]
        mask = None
        if causal and n > 1:  # query t sees the history and block keys j <= t
            mask = torch.ones(n, end, dtype=torch.bool, device=tokens.device).tril(pos)

        def rope(x):  # rotate-half pairing i <-> i + d/2; x [T, heads, d]
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

        x = self.embed[tokens]  # [T, H]
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (cfg.hidden,), w["attn_norm"], cfg.rms_eps)
            q = rope(F.linear(h, w["wq"]).view(n, cfg.n_heads, cfg.head_dim)) * q_scale
            k = rope(F.linear(h, w["wk"]).view(n, cfg.n_kv_heads, cfg.head_dim))
            v = F.linear(h, w["wv"]).view(n, cfg.n_kv_heads, cfg.head_dim)
            self.k_cache[i, :, pos:end] = k.transpose(0, 1)
            self.v_cache[i, :, pos:end] = v.transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], self.k_cache[None, i, :, :end],
                self.v_cache[None, i, :, :end], attn_mask=mask, enable_gqa=True)  # [1, heads, T, d]
            x = x + F.linear(attn[0].transpose(0, 1).reshape(n, cfg.q_dim), w["wo"])
            h = F.rms_norm(x, (cfg.hidden,), w["ffn_norm"], cfg.rms_eps)
            x = x + F.linear(F.silu(F.linear(h, w["w_gate"])) * F.linear(h, w["w_up"]), w["w_down"])
        if last_only:
            x = x[-1:]
        return F.linear(F.rms_norm(x, (cfg.hidden,), self.output_norm, cfg.rms_eps), self.head)
