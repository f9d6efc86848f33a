"""Hand-written CUDA C++ device functions, run on the CPU (cuda_emulator.h) for tests.

The kernels' own source is compiled with g++ against the emulator header into a small
program that reads its arguments from a file, runs the grid and writes every buffer back;
each launch is its own process, so a kernel that faults fails its test, not the test run.
Buffers carry 64 guard bytes on each side: a write outside its buffer is an error.
"""
from __future__ import annotations

import hashlib
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().with_name("cuda_emulator.h")
GUARD = 64
GUARD_BYTE = 0xA5
_BUILD_DIR = Path(tempfile.gettempdir()) / "trimode-cuda-emulator"

_MAIN = r"""
#include <vector>
namespace {
struct Buffer { std::vector<unsigned char> bytes; size_t size; unsigned char* data() { return bytes.data() + %(guard)d; } };
bool read_exact(FILE* f, void* p, size_t n) { return std::fread(p, 1, n, f) == n; }
}
int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  unsigned dims[10];
  unsigned count;
  if (!in || !read_exact(in, dims, sizeof dims) || !read_exact(in, &count, 4)) return 2;
  std::vector<Buffer> buffers(count);
  std::vector<long long> scalars(count);
  std::vector<unsigned> kinds(count);
  for (unsigned i = 0; i < count; ++i) {
    unsigned long long size;
    if (!read_exact(in, &kinds[i], 4) || !read_exact(in, &size, 8)) return 2;
    if (kinds[i] != 1) {
      buffers[i].size = size;
      buffers[i].bytes.assign(size + 2 * %(guard)d, %(guard_byte)d);
      if (!read_exact(in, buffers[i].data(), size)) return 2;
    } else if (!read_exact(in, &scalars[i], 8)) {
      return 2;
    }
  }
  std::fclose(in);
  auto ptr = [&](int i) { return static_cast<void*>(buffers[i].data()); };
  auto scalar = [&](int i) { return scalars[i]; };
  emu::early_copies = dims[7] != 0;
  std::vector<Buffer> initial = buffers;
  const bool pending = std::count(kinds.begin(), kinds.end(), 2u) > 0;
  // kind 2: written by the previous kernel, poison until this one's griddepcontrol.wait
  emu::previous_kernel_done = [&] {
    for (unsigned i = 0; i < count; ++i)
      if (kinds[i] == 2) std::memcpy(buffers[i].data(), initial[i].data(), buffers[i].size);
  };
  for (unsigned launch = 0; launch < dims[9]; ++launch) {  // module-scope state carries over, as on a GPU
    buffers = initial;
    for (unsigned i = 0; i < count; ++i)
      if (kinds[i] == 2) std::memset(buffers[i].data(), 0xFF, buffers[i].size);
    emu::waited_for_previous = false;
    emu::argument_buffers.clear();
    for (unsigned i = 0; i < count; ++i)
      if (kinds[i] != 1) emu::argument_buffers.push_back({buffers[i].data(), buffers[i].size});
    if (emu::launch(dim3{dims[0], dims[1], dims[2]}, dim3{dims[3], dims[4], dims[5]}, dims[6] != 0,
                    dims[8] != 0, [&] { %(call)s; })) {
      std::fprintf(stderr, "cuda emulator: %%s\n", emu::error);
      return 3;
    }
    if (pending && !emu::waited_for_previous) {
      std::fprintf(stderr, "cuda emulator: the kernel never waited for the previous kernel (griddepcontrol.wait)\n");
      return 5;
    }
  }
  for (unsigned i = 0; i < count; ++i) {
    if (kinds[i] == 1) continue;
    for (size_t j = 0; j < %(guard)d; ++j)
      if (buffers[i].bytes[j] != %(guard_byte)d || buffers[i].bytes[%(guard)d + buffers[i].size + j] != %(guard_byte)d) {
        std::fprintf(stderr, "cuda emulator: a write outside argument %%u\n", i);
        return 4;
      }
  }
  FILE* out = std::fopen(argv[2], "wb");
  for (unsigned i = 0; i < count; ++i)
    if (kinds[i] != 1) std::fwrite(buffers[i].data(), 1, buffers[i].size, out);
  std::fclose(out);
  return 0;
}
"""


class EmulationError(RuntimeError):
    pass


class EmulatedFunction:
    """One device function `name(params...)` of `source`, callable on numpy arrays and ints.

    params: the C type of each parameter, e.g. ["const half*", "half*", "int"]; a pointer
    takes a C-contiguous array (float16 arrays are IEEE halves, as on the GPU), anything else
    an int.
    """

    def __init__(self, source: str, name: str, params: list[str]):
        self.params = params
        call = f"{name}(" + ", ".join(
            f"({c_type})ptr({i})" if c_type.rstrip().endswith("*") else f"({c_type})scalar({i})"
            for i, c_type in enumerate(params)) + ")"
        program = (f'#include "{HEADER}"\n{source}\n'
                   + _MAIN % {"guard": GUARD, "guard_byte": GUARD_BYTE, "call": call})
        digest = hashlib.sha256((program + HEADER.read_text()).encode()).hexdigest()[:16]
        _BUILD_DIR.mkdir(parents=True, exist_ok=True)
        self.binary = _BUILD_DIR / f"kernel-{digest}"
        if not self.binary.exists():
            cpp = _BUILD_DIR / f"kernel-{digest}.cpp"
            cpp.write_text(program)
            built = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-o", f"{self.binary}.tmp", str(cpp)],
                                   capture_output=True, text=True)
            if built.returncode:
                raise EmulationError(f"g++ failed on {name}:\n{built.stderr[-4000:]}")
            Path(f"{self.binary}.tmp").rename(self.binary)

    def __call__(self, grid, block, *args, reverse: bool = False, greedy: bool = False,
                 early_copies: bool = False, launches: int = 1, written_before: tuple = ()) -> None:
        """Runs the grid; arrays are updated in place with what the kernel left in them.
        reverse: blocks and threads in descending order; greedy: the first runnable thread
        runs ahead of the rest; early_copies: cp.async copies land when issued instead of at
        the wait (cuda_emulator.h); launches: run the grid this many times in one process, each
        time on the arguments as given (the kernel's __device__ variables keep their values
        between launches, as on a GPU); written_before: indices of the array arguments the
        previous kernel in the stream writes, poison until this kernel's griddepcontrol.wait
        (programmatic dependent launch: a read before it sees NaN or -1, a write is lost, and
        a kernel that never waits fails)."""
        if len(args) != len(self.params):
            raise TypeError(f"{len(self.params)} arguments expected, got {len(args)}")
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        with tempfile.TemporaryDirectory() as work:
            arg_file, out_file = Path(work) / "args", Path(work) / "out"
            parts = [struct.pack("<10I", *grid, *block, int(reverse), int(early_copies), int(greedy), launches), struct.pack("<I", len(args))]
            for index, value in enumerate(args):
                if isinstance(value, np.ndarray):
                    if not value.flags.c_contiguous:
                        raise ValueError("array arguments must be C-contiguous")
                    kind = 2 if index in written_before else 0
                    parts += [struct.pack("<IQ", kind, value.nbytes), value.tobytes()]
                else:
                    parts += [struct.pack("<IQq", 1, 8, int(value))]
            arg_file.write_bytes(b"".join(parts))
            run = subprocess.run([str(self.binary), str(arg_file), str(out_file)],
                                 capture_output=True, text=True)
            if run.returncode:
                raise EmulationError(f"emulated kernel failed (exit {run.returncode}): {run.stderr.strip()}")
            data, offset = out_file.read_bytes(), 0
            for value in args:
                if isinstance(value, np.ndarray):
                    value.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8, value.nbytes, offset)
                    offset += value.nbytes
