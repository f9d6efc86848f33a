"""Generated models (trimode.model.make_model) and the `make-model` / `info` commands."""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import trimode.model.make_model as make_model_module
from trimode.cli import cli, main
from trimode.model.config import GEOMETRIES, ModelConfig, ModelError
from trimode.model.gguf_file import GLOBAL_TENSORS, load_model
from trimode.model.make_model import make_model, tiled_sources
from trimode.model.random_weights import random_weights

TINY = GEOMETRIES["tiny"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_models_are_the_seeded_random_weights(make_tiny_gguf):
    model = load_model(make_tiny_gguf(3))
    expected = random_weights(TINY, seed=3)
    assert model.config == TINY
    assert np.array_equal(model.weights.layers[1].wq.q, expected.layers[1].wq.q)
    assert np.array_equal(model.weights.embed.scale, expected.embed.scale)
    assert model.metadata["general.name"] == "trimode random tiny (seed 3)"


def test_same_seed_same_file_other_seed_other_weights(make_tiny_gguf, tmp_path):
    make_model(tmp_path / "again.gguf", "tiny", seed=0)
    assert digest(tmp_path / "again.gguf") == digest(make_tiny_gguf(0))
    other = load_model(make_tiny_gguf(1)).weights.layers[0].w_gate.q
    assert not np.array_equal(load_model(make_tiny_gguf(0)).weights.layers[0].w_gate.q, other)


def test_unknown_geometry_is_refused():
    with pytest.raises(ModelError, match="unknown geometry 'huge'; choose from tiny, 3b, 8b, 14b"):
        make_model("unused.gguf", "huge")


def test_tiled_model_has_real_layout_and_scales(tmp_path, monkeypatch):
    """The full-geometry path, on a geometry small enough to check every tensor."""
    monkeypatch.setattr(make_model_module, "TILE_ABOVE_ELEMENTS", 0)
    monkeypatch.setitem(GEOMETRIES, "tiny", TINY.replace(n_layers=3))
    path = tmp_path / "tiled.gguf"
    config = make_model(path, "tiny", seed=5)
    model = load_model(path)
    assert model.config == config
    w = model.weights
    assert set(model.tensor_types.values()) == {"Q8_0", "F32"}
    # Each matrix is drawn at random_weights' scale: entries ~ N(0, gain^2 / K).
    depth_gain = 1 / np.sqrt(2 * config.n_layers)
    for matrix, gain in [(w.layers[2].wq, 2.0), (w.layers[0].w_down, depth_gain),
                         (w.layers[1].w_up, 1.0), (w.embed, np.sqrt(config.hidden)), (w.output, 4.0)]:
        k = matrix.shape[1]
        assert matrix.dequantize().std() == pytest.approx(gain / np.sqrt(k), rel=0.1)
    assert abs(w.layers[1].ffn_norm.mean() - 1) < 0.05
    # Tensors differ from each other, and tile their pool of rows.
    assert not np.array_equal(w.layers[0].w_up.q, w.layers[0].w_gate.q)
    pool = make_model_module.POOL_ROWS
    assert np.array_equal(w.output.q[:pool], w.output.q[pool:2 * pool])
    make_model(tmp_path / "again.gguf", "tiny", seed=5)
    assert digest(tmp_path / "again.gguf") == digest(path)


def test_full_14b_sizes_without_writing_it():
    """What `trimode info` reports for a generated 14B file: 13.6 GB read per token."""
    config = GEOMETRIES["14b"]
    sources = tiled_sources(config, seed=0)  # lazy: nothing is drawn here
    per_token = sum(s.nbytes for name, s in sources.items() if name != GLOBAL_TENSORS["embed"])
    assert per_token == pytest.approx(13.64e9, rel=1e-3)
    q8 = [s for s in sources.values() if len(s.shape) == 2]
    assert sum(s.nbytes for s in q8) == config.weight_elements_per_token() // 32 * 34 \
        + config.vocab * config.hidden // 32 * 34
    assert sum(int(np.prod(s.shape)) for s in sources.values()) == 13_506_073_600


# CLI ---------------------------------------------------------------------------------------

def test_make_model_and_info_commands(tmp_path):
    path = tmp_path / "cli.gguf"
    made = CliRunner().invoke(cli, ["make-model", "--geometry", "tiny", "--seed", "7", str(path)])
    assert made.exit_code == 0, made.output
    assert "wrote" in made.output and "L2-H96-F192-q4-kv1-d32-V2048" in made.output
    assert np.array_equal(load_model(path).weights.output.q, random_weights(TINY, 7).output.q)

    shown = CliRunner().invoke(cli, ["info", "--json", str(path)])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["geometry"] == "tiny" and info["architecture"] == "dream"
    assert ModelConfig(**info["config"]) == TINY
    n_layers = TINY.n_layers
    assert info["tensor_types"] == {"Q8_0": 7 * n_layers + 2, "F32": 2 * n_layers + 1}
    assert info["parameters"] == load_model(path).parameter_count()
    assert info["weight_bytes_per_token"] == (TINY.weight_elements_per_token() // 32 * 34
                                              + 4 * TINY.hidden * (2 * n_layers + 1))
    assert info["tokenizer"] == {
        "model": "gpt2", "pre": "tekken", "tokens": 2048,
        "merges": len(load_model(path).metadata["tokenizer.ggml.merges"]),
        "bos_id": 1, "eos_id": 11, "mask_id": 100,
        "special_ids": {"<|im_start|>": 10, "<|im_end|>": 11, "<think>": 20, "</think>": 21}}
    template = load_model(path).metadata["tokenizer.chat_template"]
    assert info["chat_template"] == {"present": True, "length": len(template),
                                     "first_line": template.splitlines()[0]}

    text = CliRunner().invoke(cli, ["info", str(path)]).output
    assert "layers 2, hidden 96, ffn 192, heads 4/1 of 32, vocab 2048" in text
    assert "tensors 21: 16 Q8_0, 5 F32" in text
    assert "bos 1, eos 11, mask 100" in text


def test_info_without_a_model_describes_the_embedded_one():
    from trimode.model.default_model import DEFAULT_MODEL

    shown = CliRunner().invoke(cli, ["info", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["path"] == str(DEFAULT_MODEL)


def test_info_on_a_bad_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    monkeypatch.setattr(sys, "argv", ["trimode", "info", str(path)])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err == f"error: {path}: truncated: it has 6 bytes, its contents need at least 8\n"


def test_make_model_into_a_missing_folder_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["make-model", str(tmp_path / "absent" / "m.gguf")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: cannot write " + str(tmp_path / "absent" / "m.gguf") \
        + ": No such file or directory"
