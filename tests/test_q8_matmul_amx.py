"""The int8 Q8_0 matmul of block and prefill passes on AMX tiles (compiler/kernels/q8_matmul_amx.py):
bit for bit the vpdpbusd kernel's result, wherever this processor has AMX; built (no AMX
needed) for Sapphire Rapids everywhere; and chosen only where a build may use it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from trimode import artifacts
from trimode.model.reference import int8_rows
from trimode.model.weights import Q8Matrix, packed, packed_for_int8_dot

AMX = artifacts.cpu_amx()
# 16-row tiles, their remainders on either side of the two 8-row accumulator arrays
ROW_COUNTS = [1, 2, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40]


@pytest.fixture(scope="module")
def spr():
    import tvm

    from trimode.compiler.kernels.q8_matmul import INT8_DOTS
    from trimode.compiler.kernels.q8_matmul_amx import MATTR

    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids",
                                "mattr": INT8_DOTS["avx512vnni"].mattr + MATTR})
    return tvm, target


def built(spr, func):
    tvm, target = spr
    return tvm.compile(func.with_attr("global_symbol", "f"), target=target)


def test_the_kernel_builds_to_tile_instructions(spr):
    from trimode.compiler.kernels.q8_matmul_amx import q8_matmul_amx

    exe = built(spr, q8_matmul_amx(48, 96, "many", gated=True))
    asm = "\n".join(lib.inspect_source("asm") for lib in [exe.mod, *exe.mod.imports] if lib.kind == "llvm")
    for instruction in ("ldtilecfg", "tilezero", "tileloadd", "tdpbsud", "tilestored", "tilerelease"):
        assert f"\t{instruction}" in asm, instruction


@pytest.mark.skipif(not AMX, reason="no AMX tiles here (or Linux does not grant them)")
@pytest.mark.parametrize("n,k,rows,gated", [(64, 64, "many", False), (48, 96, "many", True), (200, 96, "block", False),
                                            (300, 128, "many", False), (96, 64, "block", True)])
def test_amx_kernel_gives_the_vpdpbusd_kernels_result_bit_for_bit(spr, n, k, rows, gated):
    """Full packs and a partial last one (200, 300), gated and plain, an odd count of Q8_0
    blocks (96: 3), block and prefill row classes, every row count ROW_COUNTS lists (those
    under AMX_MIN_ROWS on the vector kernel); and both equal float64 of their quantized
    inputs, as test_int8_activations.py holds the vector kernels."""
    from trimode.compiler.kernels.q8_matmul import int8_activation_specs, q8_matmul_cpu, quantize_rows
    from trimode.compiler.kernels.q8_matmul_amx import q8_matmul_amx

    tvm, dev = spr[0], spr[0].cpu()
    amx, vnni = (built(spr, f)["f"] for f in (q8_matmul_amx(n, k, rows, gated),
                                               q8_matmul_cpu(n, k, rows, gated, int8="avx512vnni")))
    quantize = built(spr, quantize_rows(k, rows))["f"]
    rng = np.random.default_rng(n + k)
    w = Q8Matrix.quantize(rng.standard_normal((n, k)).astype(np.float32))
    weights = [tvm.runtime.tensor(a, dev) for a in (packed_for_int8_dot(w.q), packed(w.scale))]
    for m in ROW_COUNTS if rows == "many" else [m for m in ROW_COUNTS if m <= 32]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        inputs = [tvm.runtime.tensor(np.zeros(s, t), dev) for s, t in int8_activation_specs(m, k)]
        quantize(tvm.runtime.tensor(x, dev), *inputs)
        outs = []
        for mm in (amx, vnni):
            out = tvm.runtime.tensor(np.full((m, n // 2 if gated else n), np.nan, np.float32), dev)
            mm(*inputs, *weights, out)
            outs.append(out.numpy())
        np.testing.assert_array_equal(outs[0], outs[1], err_msg=f"m = {m}")
        want = int8_rows(x) @ w.dequantize(np.float64).T
        if gated:
            gate, up = want[:, 0::2], want[:, 1::2]
            want = gate / (1 + np.exp(-gate)) * up
        assert np.abs(outs[0] - want).max() <= 1e-5 * np.abs(want).max(), m


def test_block_and_prefill_matmuls_of_an_amx_build_take_the_tile_kernel(tiny_model):
    from trimode.compiler.kernel_table import Kernels

    calls = []
    kernels = Kernels(tiny_model.config, "llvm", int8_activations="avx512vnni", register_lanes=16, amx=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("trimode.compiler.kernels.q8_matmul_amx.q8_matmul_amx", lambda *a: calls.append(("amx", a)))
        mp.setattr("trimode.compiler.kernels.q8_matmul.q8_matmul_cpu", lambda *a: calls.append(("vector", a)))
        for rows in ("one", "block", "many"):
            kernels.q8_matmul(64, 128, rows, gated=True)
        Kernels(tiny_model.config, "llvm", int8_activations="avx512vnni").q8_matmul(64, 128, "many")
    assert calls == [("vector", (64, 128, "one", True, "avx512vnni")), ("amx", (64, 128, "block", True)),
                     ("amx", (64, 128, "many", True)), ("vector", (64, 128, "many", False, "avx512vnni"))]


def test_amx_is_used_only_with_the_flags_the_grant_and_int8_activations(monkeypatch):
    monkeypatch.setattr(artifacts, "cpu_flags", lambda: {"avx512_vnni", "avx512bw"})
    assert not artifacts.cpu_amx()
    monkeypatch.setattr(artifacts, "cpu_amx", lambda: True)
    monkeypatch.setattr(artifacts, "cpu_int8_dot", lambda: "avx512vnni")
    monkeypatch.setenv("TRIMODE_INT8", "1")  # (the suite's builds are fp32: conftest.py)
    assert artifacts.amx_enabled({"kind": "llvm"}) and not artifacts.amx_enabled({"kind": "cuda"})
    monkeypatch.setenv("TRIMODE_INT8", "0")
    assert not artifacts.amx_enabled({"kind": "llvm"})


def test_an_amx_artifact_is_refused_where_tiles_are_not_granted(tmp_path, tiny_model, monkeypatch):
    """Before its library loads (a tile instruction there would be SIGILL); on the command line,
    one line and no traceback."""
    from click.testing import CliRunner

    from trimode.artifacts import MANIFEST
    from trimode.cli import cli
    from trimode.model.config import ModelError
    from trimode.runtime.engine import Engine

    (tmp_path / MANIFEST).write_text(json.dumps({"dtype": "float32", "activations": "int8", "amx": True}))
    monkeypatch.setattr("trimode.runtime.engine.cpu_amx", lambda: False)
    with pytest.raises(ModelError, match="AMX tiles"):
        Engine(tiny_model.config, tiny_model.weights, "llvm", artifact=tmp_path)
    result = CliRunner().invoke(cli, ["bench", "--geometry", "tiny", "--target", "llvm", "--artifact", str(tmp_path),
                                      "--fills", "20", "--block", "4", "--prefill", "8", "--no-torch"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path} runs its block and prefill matmuls on AMX tiles, which this processor or its "
        "Linux does not let this process use; use a build compiled here"]
