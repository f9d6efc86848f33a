"""The CUDA build's graph regions (issue 7), checked on the lowered Relax of the tiny model,
no GPU and no code generation needed: decode, verify and draft must each run as one CUDA
graph holding every layer's kernels, with only the kernels that write the returned tensors
(the fp32 logits cast and argmax/prob) left eager; the eager build has no graphs."""
from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from trimode.artifacts import resolve_target  # noqa: E402
from trimode.compiler.kernel_table import Kernels  # noqa: E402
from trimode.compiler.model import NLDModel, mark_static_arguments  # noqa: E402
from trimode.compiler.pipeline import relax_passes  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402

CFG = GEOMETRIES["tiny"]
RUN_OR_CAPTURE = "vm.builtin.cuda_graph.run_or_capture"


def lowered(cuda_graphs: bool) -> tvm.IRModule:
    model = NLDModel(CFG, {"embed": True, "layers": True, "output": True}, Kernels(CFG, "cuda"))
    mod, _ = model.export_tvm(spec=model.entry_specs())
    target = tvm.target.Target(resolve_target("cuda"), host="llvm")
    with target, tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": cuda_graphs}):
        return tvm.transform.Sequential(relax_passes(target))(mark_static_arguments(mod))


@pytest.fixture(scope="module")
def graph_mod():
    return lowered(True)


def calls(mod: tvm.IRModule, name: str) -> tuple[list[str], list]:
    """Kernels (PrimFunc names) called directly by function `name`, and its graph launches."""
    kernels, launches = [], []
    for block in mod[name].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            if isinstance(value.op, tvm.ir.GlobalVar) and isinstance(mod[value.op], tvm.tirx.PrimFunc):
                if not value.op.name_hint.startswith("shape_func"):  # host-side shape arithmetic
                    kernels.append(value.op.name_hint)
            elif isinstance(value.op, relax.ExternFunc) and value.op.global_symbol == RUN_OR_CAPTURE:
                launches.append(value.args[1])
            elif value.op.same_as(tvm.ir.Op.get("relax.call_builtin_with_ctx")) and \
                    value.args[0].global_symbol == RUN_OR_CAPTURE:
                launches.append(value.args[1][0])
    return kernels, launches


@pytest.mark.parametrize("entry", ["decode", "verify", "draft"])
def test_each_block_entry_is_one_graph(graph_mod, entry):
    eager, launches = calls(graph_mod, entry)
    assert len(launches) == 1
    assert all(k.startswith(("cast", "argmax_prob")) for k in eager), eager
    captured, _ = calls(graph_mod, launches[0].name_hint)
    attention = [k for k in captured if k.startswith("attention_")]
    assert len(attention) == CFG.n_layers
    assert "embedding" in captured and any(k.startswith("q8_matmul_head") for k in captured)
    if entry != "draft":  # causal passes write the cache inside the graph
        assert sum(k.startswith("rope_split_append") for k in captured) == CFG.n_layers


def test_prefill_stays_eager_but_its_head_is_captured(graph_mod):
    eager, launches = calls(graph_mod, "prefill")
    assert eager.count("attention_causal") == CFG.n_layers  # any T: no graph
    assert len(launches) == 1  # the last row's norm + head have static shapes


def test_eager_build_has_no_graphs():
    mod = lowered(False)
    assert not [gv for gv in mod.functions if "cuda_graph" in gv.name_hint]
    for entry in ("decode", "verify", "draft", "prefill"):
        assert calls(mod, entry)[1] == []


def test_a_decode_layer_is_eight_kernel_calls(graph_mod):
    # each graph node costs its launch latency on the GPU: the residual adds run inside the
    # norms, rope/split/append is one kernel, silu(gate) * up is gate_up's epilogue
    _, launches = calls(graph_mod, "decode")
    captured, _ = calls(graph_mod, launches[0].name_hint)
    layer = [name.rstrip("0123456789") for name in captured[2:10]]
    assert layer == ["q8_matmul_qkv", "rope_split_append", "attention_causal", "q8_matmul_o",
                     "add_rms_norm", "q8_matmul_gate_up", "q8_matmul_down", "add_rms_norm"]
    assert captured[:2] == ["embedding", "rms_norm"]
    assert len(captured) == 2 + 8 * CFG.n_layers + 1  # + the head
