"""`trimode logits`: dump float32 logits for debugging numerics (like llama.cpp's logit dumps)."""
from __future__ import annotations

import click
import numpy as np

from trimode.cli import INT_LIST, kv_cache_of, kv_cache_options


@click.command("logits")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt-ids", required=True, type=INT_LIST,
              help="Comma-separated ids, run under the causal mask.")
@click.option("--block-ids", default=None, type=INT_LIST,
              help="Comma-separated ids run as one bidirectional block after the prompt.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .npy")
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default=None)
@kv_cache_options
def logits(model, prompt_ids, block_ids, output, target, cache_type_k, cache_type_v):
    """Write float32 logits [prompt rows + block rows, vocab] to OUTPUT: the prompt's rows under
    the causal mask, then the block's rows under the bidirectional mask over the prompt."""
    from trimode.runtime.engine import load_engine

    prompt, block = prompt_ids, block_ids or []
    engine = load_engine(model, target, kv_cache=kv_cache_of(cache_type_k, cache_type_v))
    vocab = engine.config.vocab
    bad = [i for i in prompt + block if not 0 <= i < vocab]
    if bad:
        raise click.BadParameter(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    fwd = engine.new_sequence(len(prompt) + len(block))
    rows = [fwd.causal(prompt).logits()]
    if block:
        rows.append(fwd.bidirectional(block).logits())
    out = np.concatenate(rows).astype(np.float32)
    np.save(output, out)
    click.echo(f"wrote {out.shape[0]} x {out.shape[1]} float32 logits to {output}", err=True)
