"""`trimode info`: what a model file holds, without loading its weights."""
from __future__ import annotations

import collections
import dataclasses
import json

import click

# Tokens the engine and the chat template rely on, looked up by their text.
NAMED_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


@click.command("info")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info(model: str | None, as_json: bool):
    """Describe the NLD GGUF file MODEL (default: the embedded model): geometry, tensor types,
    sizes, tokenizer, chat template."""
    from trimode.model.default_model import model_or_default
    from trimode.model.gguf_file import load_model

    summary = describe(load_model(model_or_default(model)))
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


def describe(model) -> dict:
    """Everything `info` shows, as plain values (the --json output)."""
    from trimode.model.config import GEOMETRIES

    config, meta = model.config, model.metadata
    tokens = meta.get("tokenizer.ggml.tokens") or []
    index = {text: i for i, text in enumerate(tokens) if text in NAMED_SPECIAL_TOKENS}
    template = meta.get("tokenizer.chat_template")
    preset = next((name for name, preset in GEOMETRIES.items()
                   if preset.geometry_key() == config.geometry_key()), None)
    return {
        "path": str(model.path),
        "name": meta.get("general.name"),
        "architecture": meta.get("general.architecture"),
        "geometry": preset or "custom",
        "config": dataclasses.asdict(config),
        "tensor_types": dict(collections.Counter(model.tensor_types.values()).most_common()),
        "tensors": len(model.tensor_types),
        "parameters": model.parameter_count(),
        "weight_bytes": model.weight_bytes(),
        "weight_bytes_per_token": model.weight_bytes_per_token(),
        "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "tokens": len(tokens),
            "merges": len(meta.get("tokenizer.ggml.merges") or []),
            "bos_id": config.bos_token_id,
            "eos_id": config.eos_token_id,
            "mask_id": config.mask_token_id,
            "special_ids": {text: index.get(text) for text in NAMED_SPECIAL_TOKENS},
        },
        "chat_template": {
            "present": template is not None,
            "length": len(template) if template else 0,
            "first_line": template.splitlines()[0] if template else None,
        },
    }


def render(s: dict) -> str:
    c, tok, chat = s["config"], s["tokenizer"], s["chat_template"]
    rope = (f"theta {c['rope_theta']:g}, {c['rope_scaling']}"
            + (f" x{c['yarn_factor']:g} from {c['yarn_orig_ctx']} (beta {c['yarn_beta_fast']:g}/"
               f"{c['yarn_beta_slow']:g})" if c["rope_scaling"] == "yarn" else ""))
    types = ", ".join(f"{n} {t}" for t, n in s["tensor_types"].items())
    specials = ", ".join(f"{t}={i}" for t, i in tok["special_ids"].items() if i is not None)
    template = (f"{chat['length']} chars, first line: {chat['first_line'][:80]!r}"
                if chat["present"] else "absent (ChatML fallback)")
    lines = [
        f"{s['path']}: {s['architecture']} \"{s['name']}\", geometry {s['geometry']}",
        f"  layers {c['n_layers']}, hidden {c['hidden']}, ffn {c['ffn']}, heads {c['n_heads']}/"
        f"{c['n_kv_heads']} of {c['head_dim']}, vocab {c['vocab']}, context {c['context_length']}",
        f"  rope {rope}; rms eps {c['rms_eps']:g}; shift_logits {c['shift_logits']}",
        f"  tensors {s['tensors']}: {types}",
        f"  parameters {s['parameters']:,} ({_si(s['parameters'])}); weights {_si(s['weight_bytes'])}B, "
        f"read per decoded token {_si(s['weight_bytes_per_token'])}B",
        f"  tokenizer {tok['model']} (pre {tok['pre']}), {tok['tokens']} tokens, {tok['merges']} merges; "
        f"bos {tok['bos_id']}, eos {tok['eos_id']}, mask {tok['mask_id']}; {specials}",
        f"  chat template: {template}",
    ]
    return "\n".join(lines)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} "
