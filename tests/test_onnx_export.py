"""`trimode export-onnx`: both graphs run in onnxruntime (CPU) and match the TVM llvm build and
the float64 reference, over a prompt and then blocks over the prompt's K/V."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from trimode.cli import cli, main  # noqa: E402
from trimode.compiler.onnx_export import GRAPH_FILES, empty_past, export_onnx, graph_inputs  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.gguf_file import load_model  # noqa: E402
from trimode.model.random_weights import random_weights  # noqa: E402
from trimode.model.reference import ReferenceModel  # noqa: E402
from trimode.model.weights import Q8Matrix  # noqa: E402
from trimode.runtime.engine import Engine  # noqa: E402

TOL = 1e-3
CTX = 128


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


class OnnxModel:
    """Both exported graphs in onnxruntime sessions, with the K/V kept on the host."""

    def __init__(self, cfg, out_dir):
        self.cfg = cfg
        self.sessions = {mode: ort.InferenceSession(str(out_dir / name), providers=["CPUExecutionProvider"])
                         for mode, name in GRAPH_FILES.items()}
        self.keys, self.values = empty_past(cfg), empty_past(cfg)

    def causal(self, tokens) -> np.ndarray:
        logits, keys, values = self.sessions["causal"].run(
            None, graph_inputs(self.cfg, tokens, self.keys, self.values))
        self.keys = np.concatenate([self.keys, keys], axis=1)
        self.values = np.concatenate([self.values, values], axis=1)
        return logits

    def bidirectional(self, tokens) -> np.ndarray:
        (logits,) = self.sessions["bidirectional"].run(
            None, graph_inputs(self.cfg, tokens, self.keys, self.values))
        return logits


class ReferenceCache:
    """The float64 reference with its per-layer K/V, to compare the graphs' K/V too."""

    def __init__(self, model: ReferenceModel):
        cfg = model.config
        self.model = model
        empty = np.zeros((0, cfg.n_kv_heads, cfg.head_dim))
        self.keys, self.values = [empty] * cfg.n_layers, [empty] * cfg.n_layers

    def causal(self, tokens) -> np.ndarray:
        logits, k, v = self.model.forward(tokens, self.keys, self.values, causal=True)
        self.keys = [np.concatenate(pair) for pair in zip(self.keys, k)]
        self.values = [np.concatenate(pair) for pair in zip(self.values, v)]
        return logits

    def bidirectional(self, tokens) -> np.ndarray:
        return self.model.forward(tokens, self.keys, self.values, causal=False)[0]


@pytest.fixture(scope="module")
def exported(tiny_gguf, tmp_path_factory):
    """The tiny model file exported through the command."""
    out = tmp_path_factory.mktemp("onnx")
    result = CliRunner().invoke(cli, ["export-onnx", str(tiny_gguf), str(out)])
    assert result.exit_code == 0, result.output
    return load_model(tiny_gguf), out


def prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_prompt_then_blocks_match_tvm_and_reference(exported):
    model, out = exported
    cfg = model.config
    graphs, ref = OnnxModel(cfg, out), ReferenceCache(ReferenceModel(cfg, model.weights))
    tvm = Engine(cfg, model.weights, "llvm").new_sequence(CTX)
    mask = cfg.mask_token_id

    # 70 tokens: past the 64 positions of tiny's YaRN original context (the query scale steps).
    tokens = prompt(cfg.vocab, 70)
    got, want, compiled = graphs.causal(tokens), ref.causal(tokens), tvm.causal(tokens).logits()
    assert got.shape == (70, cfg.vocab)
    assert rel_err(got, want) < TOL
    assert rel_err(got, compiled) < TOL
    assert rel_err(graphs.keys, np.stack(ref.keys)) < TOL
    assert rel_err(graphs.values, np.stack(ref.values)) < TOL

    block = [mask] * 5 + [3, mask, 9]
    got, want, compiled = graphs.bidirectional(block), ref.bidirectional(block), tvm.bidirectional(block).logits()
    bidirectional_rows = want
    assert rel_err(got, want) < TOL
    assert rel_err(got, compiled) < TOL
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert graphs.keys.shape[1] == 70  # the bidirectional graph returns no K/V to keep

    got, want, compiled = graphs.causal(block), ref.causal(block), tvm.causal(block).logits()
    assert rel_err(got, want) < TOL
    assert rel_err(got, compiled) < TOL
    # The two graphs really apply different masks to the same block.
    assert rel_err(got, bidirectional_rows) > 0.01
    assert rel_err(graphs.keys, np.stack(ref.keys)) < TOL
    assert graphs.keys.shape[1] == 78


def test_one_token_steps_equal_one_prompt(exported):
    model, out = exported
    cfg = model.config
    a, b = prompt(cfg.vocab, 9), prompt(cfg.vocab, 4, seed=1)
    whole = OnnxModel(cfg, out).causal(a + b)
    split = OnnxModel(cfg, out)
    split.causal(a)
    rows = np.concatenate([split.causal([tok]) for tok in b])
    assert rel_err(rows, whole[len(a):]) < TOL


def test_float_weights_export_matches_reference(tmp_path):
    cfg = GEOMETRIES["tiny"]
    weights = random_weights(cfg, seed=5, quantized=False)
    export_onnx(cfg, weights, tmp_path)
    graphs, ref = OnnxModel(cfg, tmp_path), ReferenceCache(ReferenceModel(cfg, weights))
    tokens = prompt(cfg.vocab, 12)
    assert rel_err(graphs.causal(tokens), ref.causal(tokens)) < TOL
    block = [cfg.mask_token_id] * 6
    assert rel_err(graphs.bidirectional(block), ref.bidirectional(block)) < TOL
    kinds = {node.op_type for node in onnx.load(tmp_path / "causal.onnx", load_external_data=False).graph.node}
    assert "DequantizeLinear" not in kinds


def test_graphs_are_opset_21_with_8bit_weights_stored_once(exported):
    model, out = exported
    weights = model.weights
    matrices = [weights.embed, weights.output] + [
        getattr(layer, name) for layer in weights.layers
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    assert all(isinstance(m, Q8Matrix) for m in matrices)
    q8_bytes = sum(m.q.nbytes + m.scale.nbytes for m in matrices)
    # Both graphs share one weights file holding the Q8_0 bytes, not float copies of them.
    assert (out / "weights.bin").stat().st_size < 1.2 * q8_bytes
    for mode, name in GRAPH_FILES.items():
        onnx.checker.check_model(str(out / name), full_check=True)
        graph = onnx.load(out / name, load_external_data=False)
        assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [21]
        initializers = {t.name: t for t in graph.graph.initializer}
        dequantize = [node for node in graph.graph.node if node.op_type == "DequantizeLinear"]
        # 7 per layer, the head and the embedding.
        assert len(dequantize) == 7 * model.config.n_layers + 2
        for node in dequantize:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs == {"axis": 1, "block_size": 32}
        int8 = [t for t in initializers.values() if t.data_type == onnx.TensorProto.INT8]
        assert len(int8) == 7 * model.config.n_layers + 2
        assert {e.value for t in int8 for e in t.external_data if e.key == "location"} == {"weights.bin"}


def test_inputs_json_names_every_graph_port(exported):
    model, out = exported
    described = json.loads((out / "inputs.json").read_text())
    assert described["opset"] == 21
    for mode, name in GRAPH_FILES.items():
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        assert [i["name"] for i in described["inputs"]] == [i.name for i in session.get_inputs()]
        assert [o["name"] for o in described["graphs"][mode]["outputs"]] == \
            [o.name for o in session.get_outputs()]
    shapes = {i["name"]: i["shape"] for i in described["inputs"]}
    cfg = model.config
    assert shapes["past_keys"] == [cfg.n_layers, "P", cfg.n_kv_heads, cfg.head_dim]
    assert shapes["rope_cos"] == ["T", cfg.head_dim // 2]


def test_bad_model_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a model")
    monkeypatch.setattr(sys, "argv", ["trimode", "export-onnx", str(path), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_a_clear_error(tiny_gguf, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["export-onnx", str(tiny_gguf), str(blocker / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: cannot write {blocker / 'out'}: Not a directory"


def test_missing_onnx_package_is_a_clear_error(tiny_gguf, tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import onnx` fail as if it were not installed.
    for name in [m for m in sys.modules if m == "onnx" or m.startswith(("onnx.", "trimode.compiler.onnx_export"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnx", None)
    result = CliRunner().invoke(cli, ["export-onnx", str(tiny_gguf), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: export-onnx needs the onnx package: pip install 'onnx>=1.16'"
