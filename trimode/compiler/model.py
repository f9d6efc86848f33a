"""NLD in Relax (tvm.relax.frontend.nn): one module, four compiled entries over one KV cache.

Entries (docs/DESIGN.md): prefill, decode (causal, write K/V), verify (causal, all rows),
draft (bidirectional, cache untouched); on a GPU also top_candidates (each row's largest
logits of an entry's output) and chunk_mass (each row's softmax mass by chunks at a given
temperature), for the host's sampler. Every kernel comes from a `Kernels`
table chosen per target (kernels.py), so this file holds only the network's math, top to
bottom.

Per-step values live in device tensors that the runtime writes before each call: the
position `pos` (int32 [1]) and, for decode/verify/draft, the tokens (int32 [MAX_BLOCK], the
first T used). Those, the cache and the rope tables are the entries' *static* arguments (the
same tensors at every call of a sequence), listed after `num_input`; with the weights they let
RewriteCUDAGraph capture each entry's kernels into one CUDA graph (pipeline.py).
"""
from __future__ import annotations

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op, spec

from trimode.compiler.kernel_table import MAX_BLOCK, Kernels
from trimode.compiler.kernels.q8_matmul import int8_activation_specs
from trimode.model.config import ModelConfig
from trimode.runtime.forward import TOP_CANDIDATES, mass_chunks


def swiglu(y: Tensor) -> Tensor:
    """silu(gate) * up of a gated projection whose output columns alternate gate, up."""
    t, n = y.shape
    gate, up = op.split(op.reshape(y, [t, n // 2, 2]), 2, axis=2)
    return op.reshape(op.silu(gate) * up, [t, n // 2])


class Q8Linear(nn.Module):
    """y = x W^T with W held as Q8_0: int8 values + fp16 scale per 32, laid out as the
    target's kernel reads them (Kernels.q8_weight_shapes; engine.py follows the shapes).
    gated: W's rows alternate gate, up (engine.py lays gate_up out so) and y = silu(gate) * up
    [T, N/2], in the matmul kernel's epilogue (one launch and no [T, N] intermediate)."""

    def __init__(self, n: int, k: int, kernels: Kernels, role: str, gated: bool = False):
        q_shape, scale_shape, q_dtype = kernels.q8_weight_shapes(n, k)
        self.q = nn.Parameter(q_shape, q_dtype)
        self.scale = nn.Parameter(scale_shape, "float16")
        self.n, self.k, self.kernels, self.role, self.gated = n, k, kernels, role, gated

    def forward(self, x: Tensor, rows: str) -> Tensor:
        kernel = self.kernels.q8_matmul(self.n, self.k, rows, gated=self.gated)
        out = Tensor.placeholder([x.shape[0], self.n // 2 if self.gated else self.n], x.dtype)
        inputs = [x]
        if self.kernels.int8_activations:  # values, scales and offsets per 32 (quantize_rows)
            quantized = [Tensor.placeholder(shape, dtype)
                         for shape, dtype in int8_activation_specs(x.shape[0], self.k)]
            inputs = op.tensor_ir_op(self.kernels.quantize_rows(self.k, rows), f"quantize_{self.role}",
                                     [x], quantized)
        return op.tensor_ir_op(kernel, f"q8_matmul_{self.role}", [*inputs, self.q, self.scale], out)


class FloatLinear(nn.Module):
    """y = x W^T with W in the activation dtype (files whose matrices are F32/F16/BF16)."""

    def __init__(self, n: int, k: int, kernels: Kernels, role: str, gated: bool = False):
        self.weight = nn.Parameter((n, k), kernels.dtype)
        self.gated = gated

    def forward(self, x: Tensor, rows: str) -> Tensor:
        y = op.matmul(x, op.permute_dims(self.weight))
        return swiglu(y) if self.gated else y


class Q8Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, kernels: Kernels):
        self.q = nn.Parameter((vocab, hidden), "int8")
        self.scale = nn.Parameter((vocab, hidden // 32), "float16")
        self.kernel = kernels.q8_embedding(vocab, hidden)
        self.hidden, self.dtype = hidden, kernels.dtype

    def forward(self, tokens: Tensor, t) -> Tensor:
        out = Tensor.placeholder([t, self.hidden], self.dtype)
        return op.tensor_ir_op(self.kernel, "embedding", [tokens, self.q, self.scale], out)


class FloatEmbedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, kernels: Kernels):
        self.table = nn.Parameter((vocab, hidden), kernels.dtype)
        self.kernel = kernels.float_embedding(vocab, hidden)
        self.hidden, self.dtype = hidden, kernels.dtype

    def forward(self, tokens: Tensor, t) -> Tensor:
        out = Tensor.placeholder([t, self.hidden], self.dtype)
        return op.tensor_ir_op(self.kernel, "embedding", [tokens, self.table], out)


def linear(quantized: bool, n: int, k: int, kernels: Kernels, role: str, gated: bool = False) -> nn.Module:
    return (Q8Linear if quantized else FloatLinear)(n, k, kernels, role, gated)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, kernels: Kernels):
        self.weight = nn.Parameter((hidden,), "float32")
        self.kernel = kernels.rms_norm(hidden, eps)
        self.add_kernel = kernels.add_rms_norm(hidden, eps)

    def forward(self, x: Tensor, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(the residual stream, its norm). The stream is x + delta when a sublayer's output
        is pending: the add happens in the norm's kernel (one launch, not two)."""
        out = lambda: Tensor.placeholder(x.shape, x.dtype)  # noqa: E731
        if delta is None:
            return x, op.tensor_ir_op(self.kernel, "rms_norm", [x, self.weight], out())
        return op.tensor_ir_op(self.add_kernel, "add_rms_norm", [x, delta, self.weight], [out(), out()])


class RopeTables:
    """Host-computed YaRN cos/sin [ctx, d/2] and the long-context query scale [ctx]."""

    def __init__(self, cos: Tensor, sin: Tensor, q_scale: Tensor):
        self.cos, self.sin, self.q_scale = cos, sin, q_scale


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, quantized: bool, kernels: Kernels):
        self.cfg, self.index, self.kernels = cfg, index, kernels
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels)
        self.qkv = linear(quantized, cfg.q_dim + 2 * cfg.kv_dim, cfg.hidden, kernels, "qkv")
        self.o = linear(quantized, cfg.hidden, cfg.q_dim, kernels, "o")
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels)
        self.gate_up = linear(quantized, 2 * cfg.ffn, cfg.hidden, kernels, "gate_up", gated=True)
        self.down = linear(quantized, cfg.hidden, cfg.ffn, kernels, "down")

    def forward(self, x: Tensor, delta: Tensor | None, kv: Tensor, rope: RopeTables, pos: Tensor,
                causal: bool, rows: str) -> tuple[Tensor, Tensor, Tensor]:
        """x + delta is the residual stream coming in (delta: the previous layer's FFN output,
        None before the first layer); returns the stream and this layer's FFN output, which
        the next norm adds."""
        cfg, kernels = self.cfg, self.kernels
        t = x.shape[0]
        layer = tirx.IntImm("int64", self.index)
        x, h = self.attn_norm(x, delta)
        qkv = self.qkv(h, rows)                                      # [T, q_dim + 2 kv_dim]
        head_shape = lambda heads: Tensor.placeholder([t, heads, cfg.head_dim], x.dtype)  # noqa: E731
        kv_rows = lambda: Tensor.placeholder([t, cfg.n_kv_heads, kernels.kv_row], kernels.kv_dtype)  # noqa: E731
        qkv_heads = [head_shape(cfg.n_heads), kv_rows(), kv_rows()]
        rope_args = [qkv, rope.cos, rope.sin, rope.q_scale, pos]
        if causal:  # only causal passes keep their K/V: the cache holds committed tokens only
            kv, q, k, v = op.tensor_ir_inplace_op(
                kernels.rope_split_append(), "rope_split_append", rope_args + [kv, layer],
                [5, -1, -1, -1], [Tensor.placeholder(kv.shape, kv.dtype)] + qkv_heads)
        else:
            q, k, v = op.tensor_ir_op(kernels.rope_split(), "rope_split", rope_args, qkv_heads)
        scratch = [Tensor.placeholder(shape, "float32") for shape in kernels.attention_scratch(rows, t)]
        attn = op.tensor_ir_op(kernels.attention(causal, rows), "attention_causal" if causal
                               else "attention_bidirectional", [q, kv, layer, pos, k, v],
                               [head_shape(cfg.n_heads)] + scratch)
        attn = attn[0] if scratch else attn                         # [T, heads, d]
        x, h = self.ffn_norm(x, self.o(op.reshape(attn, [t, cfg.q_dim]), rows))
        return x, self.down(self.gate_up(h, rows), rows), kv


class NLDModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quantized: dict[str, bool], kernels: Kernels):
        self.cfg, self.kernels = cfg, kernels
        self.embed = (Q8Embedding if quantized["embed"] else FloatEmbedding)(cfg.vocab, cfg.hidden, kernels)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, quantized["layers"], kernels)
                                     for i in range(cfg.n_layers)])
        self.output_norm = RMSNorm(cfg.hidden, cfg.rms_eps, kernels)
        self.head = linear(quantized["output"], cfg.vocab, cfg.hidden, kernels, "head")

    def _forward(self, tokens: Tensor, t, pos: Tensor, kv: Tensor, cos: Tensor, sin: Tensor,
                 q_scale: Tensor, causal: bool, rows: str, last_only: bool):
        rope = RopeTables(cos, sin, q_scale)
        x, delta = self.embed(tokens, t), None                       # [T, H]
        for layer in self.layers:
            x, delta, kv = layer(x, delta, kv, rope, pos, causal, rows)
        _, h = self.output_norm(x, delta)
        if last_only:  # a prefill needs only its last row's logits
            h = op.tensor_ir_op(self.kernels.last_row(self.cfg.hidden), "last_row", [h],
                                Tensor.placeholder([1, self.cfg.hidden], h.dtype))
            rows = "one"
        logits = self.head(h, rows)                                  # [rows, V]
        if logits.dtype != "float32":
            logits = op.astype(logits, "float32")
        n_rows = logits.shape[0]
        argmax, prob = op.tensor_ir_op(
            self.kernels.argmax_prob(self.cfg.vocab), "argmax_prob", [logits],
            [Tensor.placeholder([n_rows], "int32"), Tensor.placeholder([n_rows], "float32")])
        return logits, argmax, prob, kv

    # Prefill takes its T tokens as a fresh tensor (any T: run eagerly); the others read the
    # first T of the sequence's token buffer [MAX_BLOCK], T given as a shape value.
    def prefill(self, tokens, pos, kv, cos, sin, q_scale):
        return self._forward(tokens, tokens.shape[0], pos, kv, cos, sin, q_scale, True, "many",
                             last_only=True)

    def decode(self, tokens, pos, kv, cos, sin, q_scale):
        return self._forward(tokens, 1, pos, kv, cos, sin, q_scale, True, "one", last_only=False)

    def verify(self, t, tokens, pos, kv, cos, sin, q_scale):
        return self._forward(tokens, t, pos, kv, cos, sin, q_scale, True, "block", last_only=False)

    def draft(self, t, tokens, pos, kv, cos, sin, q_scale):
        logits, argmax, prob, _ = self._forward(tokens, t, pos, kv, cos, sin, q_scale, False,
                                                "block", last_only=False)
        return logits, argmax, prob

    def top_candidates(self, logits):
        n_rows = logits.shape[0]
        return op.tensor_ir_op(
            self.kernels.top_candidates(self.cfg.vocab), "top_candidates", [logits],
            [Tensor.placeholder([n_rows, TOP_CANDIDATES], "float32"),
             Tensor.placeholder([n_rows, TOP_CANDIDATES], "int32")])

    def chunk_mass(self, logits, inv_temperature):
        n_rows, n_chunks = logits.shape[0], mass_chunks(self.cfg.vocab)
        return op.tensor_ir_op(
            self.kernels.chunk_mass(self.cfg.vocab), "chunk_mass", [logits, inv_temperature],
            [Tensor.placeholder([n_rows, n_chunks], "float32"),
             Tensor.placeholder([n_rows, n_chunks], "float32")])

    def entry_specs(self) -> dict:
        """The four entries' argument specs, from one helper (STYLE.md: no copies). Per-call
        inputs come first, the sequence's static tensors after them (ENTRY_INPUTS counts the
        former)."""
        cfg = self.cfg
        half = cfg.head_dim // 2

        def entry(inputs: dict, tokens_len):
            return {
                **inputs,
                "tokens": spec.Tensor([tokens_len], "int32"),
                "pos": spec.Tensor([1], "int32"),
                "kv": spec.Tensor([cfg.n_layers, 2, cfg.n_kv_heads, "ctx", self.kernels.kv_row],
                                  self.kernels.kv_dtype),
                "cos": spec.Tensor(["ctx", half], "float32"),
                "sin": spec.Tensor(["ctx", half], "float32"),
                "q_scale": spec.Tensor(["ctx"], "float32"),
                "$": {"param_mode": "packed", "effect_mode": "none"},
            }

        entries = {"prefill": entry({}, "t"), "decode": entry({}, MAX_BLOCK),
                   "verify": entry({"t": int}, MAX_BLOCK), "draft": entry({"t": int}, MAX_BLOCK)}
        if self.kernels.is_gpu:
            entries["top_candidates"] = {"logits": spec.Tensor(["t", cfg.vocab], "float32"),
                                         "$": {"param_mode": "none", "effect_mode": "none"}}
            entries["chunk_mass"] = {"logits": spec.Tensor(["t", cfg.vocab], "float32"),
                                     "inv_temperature": spec.Tensor([1], "float32"),
                                     "$": {"param_mode": "none", "effect_mode": "none"}}
        return entries


# Per-call arguments before each entry's static ones (prefill's tokens tensor; verify/draft's T).
ENTRY_INPUTS = {"prefill": 1, "decode": 0, "verify": 0, "draft": 0}
# Row-count bounds: buffers of bounded shape are planned statically, which graph capture needs.
ENTRY_ROW_BOUND = {"verify": MAX_BLOCK, "draft": MAX_BLOCK}


def mark_static_arguments(mod):
    """Tells the Relax passes which arguments stay the same between calls (those after
    num_input) and how many rows a block entry takes at most."""
    for gvar, func in list(mod.functions.items()):
        name = gvar.name_hint
        if name not in ENTRY_INPUTS:
            continue
        func = func.with_attr("num_input", ENTRY_INPUTS[name])
        if name in ENTRY_ROW_BOUND:
            func = func.with_attr("tir_var_upper_bound", {"t": ENTRY_ROW_BOUND[name]})
        mod[gvar] = func
    return mod
