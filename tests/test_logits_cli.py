"""`trimode logits` and `trimode compile` against the float64 reference and the artifact cache."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from trimode.cli import cli
from trimode.model.reference import ReferenceForward, ReferenceModel


def test_logits_rows_are_causal_prompt_then_bidirectional_block(tiny_gguf, tiny_model, tmp_path):
    out = tmp_path / "logits.npy"
    prompt, block = [1, 500, 7, 42, 9], [100, 100, 77, 100]
    result = CliRunner().invoke(cli, ["logits", str(tiny_gguf), "--prompt-ids", ",".join(map(str, prompt)),
                                      "--block-ids", ",".join(map(str, block)), "-o", str(out),
                                      "--target", "llvm"])
    assert result.exit_code == 0, result.output
    got = np.load(out)
    ref = ReferenceForward(ReferenceModel(tiny_model.config, tiny_model.weights), 64)
    want = np.concatenate([ref.causal(prompt).logits(), ref.bidirectional(block).logits()])
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3


def test_logits_refuses_ids_outside_the_vocabulary(tiny_gguf, tmp_path):
    result = CliRunner().invoke(cli, ["logits", str(tiny_gguf), "--prompt-ids", "1,999999",
                                      "-o", str(tmp_path / "x.npy"), "--target", "llvm"])
    assert result.exit_code != 0
    assert "outside the vocabulary" in result.output
    assert not (tmp_path / "x.npy").exists()


def test_second_compile_reuses_the_artifact(tiny_gguf):
    first = CliRunner().invoke(cli, ["compile", str(tiny_gguf), "--target", "llvm"])
    assert first.exit_code == 0, first.output
    folder = first.output.strip().splitlines()[-1]
    second = CliRunner().invoke(cli, ["compile", str(tiny_gguf), "--target", "llvm"])
    assert second.output.strip().splitlines()[-1] == folder
    assert "compiling" not in second.output
