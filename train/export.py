"""Trained torch weights -> trimode ModelWeights (Q8_0 for every matrix, float32 norms)."""
from __future__ import annotations

import numpy as np

from nld_torch import NLDModel
from trimode.model.weights import LayerWeights, ModelWeights, Q8Matrix


def model_weights(model: NLDModel, quantized: bool = True) -> ModelWeights:
    def matrix(p):
        w = p.detach().float().numpy()
        return Q8Matrix.quantize(w) if quantized else w.copy()

    def norm(p):
        return p.detach().float().numpy().astype(np.float32)

    layers = [LayerWeights(attn_norm=norm(b.attn_norm.weight), wq=matrix(b.wq.weight),
                           wk=matrix(b.wk.weight), wv=matrix(b.wv.weight), wo=matrix(b.wo.weight),
                           ffn_norm=norm(b.ffn_norm.weight), w_gate=matrix(b.w_gate.weight),
                           w_up=matrix(b.w_up.weight), w_down=matrix(b.w_down.weight))
              for b in model.layers]
    return ModelWeights(embed=matrix(model.embed.weight), layers=layers,
                        output_norm=norm(model.output_norm.weight), output=matrix(model.output.weight))
