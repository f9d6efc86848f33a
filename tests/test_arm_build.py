"""The Arm CPU build, without an Arm machine: which dot product an Arm processor's /proc/cpuinfo
gives, and the int8 build compiled for aarch64 (LLVM's code, not linked) using sdot. Its
numerics run under qemu-user in bench/arm_check.sh (every kernel against float64, the tiny
model's entries against the reference, greedy spec == AR), not here: CI has no qemu."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from trimode import artifacts

# bench/compile_for_cpu.py builds for another processor; its building_for is used as it is
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compile_for_cpu.py"
spec = importlib.util.spec_from_file_location("compile_for_cpu", SCRIPT)
compile_for_cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compile_for_cpu)

NEOVERSE_N1 = ["processor\t: 0", "BogoMIPS\t: 50.00",
               "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
               "asimdrdm lrcpc dcpop asimddp ssbs",
               "CPU implementer\t: 0x41", "CPU architecture: 8", "CPU part\t: 0xd0c"]
CORTEX_A72 = ["processor\t: 0", "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid",
              "CPU implementer\t: 0x41", "CPU part\t: 0xd08"]
SKYLAKE = ["processor\t: 0", "model name\t: Intel(R) Core(TM) i7-6700 CPU @ 3.40GHz",
           "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2 bmi2"]


@pytest.mark.parametrize("cpuinfo,dots", [(NEOVERSE_N1, ["sdot"]), (CORTEX_A72, []), (SKYLAKE, ["avx2"])])
def test_the_dot_products_a_processor_reports(monkeypatch, cpuinfo, dots):
    monkeypatch.setattr(artifacts, "first_cpu_info", lambda: cpuinfo)
    assert artifacts.cpu_int8_dots() == dots
    monkeypatch.setenv("TRIMODE_INT8", "1")
    assert artifacts.int8_activations_enabled(artifacts.resolve_target("llvm")) == (dots[0] if dots else None)


def test_arm_processors_get_their_own_build_key(monkeypatch):
    """Arm's cpuinfo has no model name and no flags line: its Features and part tell cores apart."""
    prints = []
    for cpuinfo in (NEOVERSE_N1, CORTEX_A72):
        monkeypatch.setattr(artifacts, "first_cpu_info", lambda: cpuinfo)
        prints.append(artifacts.cpu_fingerprint())
    assert prints[0] != prints[1]


def aarch64_asm(tmp_path, cfg, quantized, int8: str | None) -> str:
    """The assembly of the whole CPU build for an Arm Neoverse N1, as compile_model makes it
    there, short of linking (no aarch64 linker here)."""
    from trimode.compiler import build

    exported = []
    with compile_for_cpu.building_for("neoverse-n1", int8, "aarch64-linux-gnu",
                                      export=lambda exe, path, **kw: exported.append(exe)):
        build.compile_model(cfg, quantized, "llvm", root=tmp_path, log=lambda msg: None)
    (exe,) = exported
    return "\n".join(lib.inspect_source("s") for lib in exe.mod.imports if lib.kind == "llvm")


def test_the_int8_build_for_arm_multiplies_with_sdot(tmp_path, tiny_model):
    from trimode.model.weights import quantized_parts

    quantized = quantized_parts(tiny_model.weights)
    ops = {}
    for int8 in ("sdot", None):
        asm = aarch64_asm(tmp_path / str(int8), tiny_model.config, quantized, int8)
        ops[int8] = [line.split()[0] for line in asm.splitlines() if line.startswith("\t")]
    assert ops["sdot"].count("sdot") >= 32 and "sdot" not in ops[None]
    # the fp32 kernels convert every weight to float; the int8 ones only the block sums
    assert ops[None].count("scvtf") > 4 * ops["sdot"].count("scvtf")


def test_the_arm_dot_is_what_the_build_targets():
    from trimode.compiler.kernels.q8_matmul import INT8_DOTS

    dot = INT8_DOTS["sdot"]
    assert "+dotprod" in dot.mattr and not dot.offset and dot.lanes * 4 * 4 == 64  # four a 64-byte pack
    assert set(artifacts.INT8_DOT_FLAGS) == set(INT8_DOTS)
