"""Measure a candidate bundle on the GPU of this machine, with the TVM runtime libraries only.

Needs tvm_ffi, numpy, libtvm_runtime.so + libtvm_runtime_cuda.so (from the apache-tvm wheel's
tvm/lib, or a folder they were copied to), libcudart.so.13 and the driver. Never imports `tvm`.

Each kernel is checked first: fresh random inputs, the output poisoned with NaN beforehand,
every element must be written and ||out - ref|| / ||ref|| < 1e-2 against a float64 numpy
reference (on a sample of output columns, to keep the host work small at 131072 columns).
Then it is timed with CUDA events around a batch of calls queued behind a long device copy
(so the host's launch cost stays out of the figure), rotating among weight copies that
together exceed the L2 cache; the median over batches is reported.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
from pathlib import Path

import numpy as np

from trimode.schedules.measure_attention import format_attention_table, measure_attention

TOLERANCE = 1e-2
NOMINAL_GBPS = 3000.0        # what the percentages are of (H100 copy bandwidth)
ROTATION_BYTES = 256 << 20   # weights cycled per shape: five times a 50 MB L2
MAX_COPIES = 16              # tiny shapes: their timings mean little, their uploads add up
SAMPLE_COLUMNS = 256
BATCH_CALLS = 20
BATCHES = 15
COPY_HEAD_START_BYTES = 256 << 20  # a device copy the calls queue behind (~0.2 ms)
_DEVICE_TO_DEVICE = 3
# What a result keeps of its manifest entry (attention entries have a key and heads, Q8_0
# ones a shape).
RESULT_KEYS = ("kernel", "key", "shape_name", "shape", "heads", "m", "fill", "schedule", "name", "default")


def default_lib_dir() -> Path:
    spec = importlib.util.find_spec("tvm")  # finds the wheel without importing the compiler
    if spec is None or spec.origin is None:
        raise RuntimeError("no TVM runtime libraries: pass the folder holding libtvm_runtime.so")
    return Path(spec.origin).parent / "lib"


class Cuda:
    """The few CUDA runtime calls timing needs, through ctypes."""

    def __init__(self):
        self.rt = ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)

    def check(self, code, what):
        if code != 0:
            self.rt.cudaGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what} failed: {self.rt.cudaGetErrorString(code).decode()}")

    def event(self):
        handle = ctypes.c_void_p()
        self.check(self.rt.cudaEventCreate(ctypes.byref(handle)), "cudaEventCreate")
        return handle

    def record(self, event):
        self.check(self.rt.cudaEventRecord(event, None), "cudaEventRecord")

    def elapsed_ms(self, start, stop) -> float:
        self.check(self.rt.cudaEventSynchronize(stop), "cudaEventSynchronize")
        ms = ctypes.c_float()
        self.check(self.rt.cudaEventElapsedTime(ctypes.byref(ms), start, stop), "cudaEventElapsedTime")
        return ms.value

    def malloc(self, nbytes):
        pointer = ctypes.c_void_p()
        self.check(self.rt.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return pointer

    def copy(self, dst, src, nbytes):
        self.check(self.rt.cudaMemcpyAsync(dst, src, ctypes.c_size_t(nbytes), _DEVICE_TO_DEVICE, None),
                   "cudaMemcpyAsync")

    def synchronize(self):
        self.check(self.rt.cudaDeviceSynchronize(), "a kernel")

    def device_name(self) -> str:
        # cudaDeviceProp starts with char name[256]; the struct is far smaller than 64 KB
        props = ctypes.create_string_buffer(1 << 16)
        self.check(self.rt.cudaGetDeviceProperties(props, 0), "cudaGetDeviceProperties")
        return props.raw[:256].split(b"\0", 1)[0].decode()


class Runtime:
    def __init__(self, lib_dir: Path | None = None):
        import tvm_ffi  # loads libtvm_ffi.so, which libtvm_runtime links against

        lib_dir = Path(lib_dir or default_lib_dir())
        ctypes.CDLL(str(lib_dir / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(lib_dir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)
        self.ffi = tvm_ffi
        self.device = tvm_ffi.device("cuda", 0)
        self.cuda = Cuda()
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy_from = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
        self._copy_to = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        tensor = self._alloc(self.ffi.Shape(list(array.shape)), self.ffi.dtype(str(array.dtype)),
                             self.device, None)
        self._copy_from(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)
        return tensor

    def download(self, tensor, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._copy_to(tensor, ctypes.c_void_p(out.ctypes.data), out.nbytes)
        return out

    def copy_bandwidth_gbps(self, nbytes=1 << 30) -> float:
        """Device-to-device copy, bytes read plus bytes written, median of 10."""
        src, dst = self.cuda.malloc(nbytes), self.cuda.malloc(nbytes)
        start, stop = self.cuda.event(), self.cuda.event()
        times = []
        for _ in range(11):
            self.cuda.record(start)
            self.cuda.copy(dst, src, nbytes)
            self.cuda.record(stop)
            times.append(self.cuda.elapsed_ms(start, stop))
        self.cuda.rt.cudaFree(src)
        self.cuda.rt.cudaFree(dst)
        return 2 * nbytes / (float(np.median(times[1:])) * 1e-3) / 1e9


def q8_bytes(n, k, m) -> int:
    """The fewest bytes one call moves: weights + scales once, x read, y written."""
    return n * k + (n * k // 32) * 2 + m * k * 2 + m * n * 2


def random_weights(rng, n, k):
    q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    scale = rng.uniform(0.002, 0.02, size=(n, k // 32)).astype(np.float16)
    return q, scale


def q8_reference(x, q, scale, columns) -> np.ndarray:
    """float64 y[:, columns] of the Q8_0 matmul."""
    w = q[columns].astype(np.float64) * np.repeat(scale[columns].astype(np.float64), 32, axis=1)
    return x.astype(np.float64) @ w.T


class _ShapeData:
    """Device copies of random weights for one shape: enough copies to defeat the L2."""

    def __init__(self, runtime, rng, n, k):
        per_copy = n * k + n * k // 16
        copies = min(MAX_COPIES, max(1, -(-ROTATION_BYTES // per_copy)))
        self.host = [random_weights(rng, n, k) for _ in range(copies)]
        self.device = [(runtime.upload(q), runtime.upload(s)) for q, s in self.host]


def shape_names(bundle_dir: Path) -> list[str]:
    """The bundle's shape names, in build order."""
    kernels = json.loads((Path(bundle_dir) / "manifest.json").read_text())["kernels"]
    return list(dict.fromkeys(entry["shape_name"] for entry in kernels))


def measure_bundle(bundle_dir: Path, lib_dir: Path | None = None, seed: int = 0,
                   log=print, only: str | None = None, defaults_only: bool = False) -> dict:
    """Check and time every kernel in the bundle (those of shape `only`, if given; the
    default schedules and the dlight baselines alone, if `defaults_only`).
    Returns {"gpu", "copy_gbps", "results"}."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if only is not None:
        manifest["kernels"] = [e for e in manifest["kernels"] if e["shape_name"] == only]
    if defaults_only:
        manifest["kernels"] = [e for e in manifest["kernels"] if e["default"] or e["name"] == "dlight"]
    runtime = Runtime(lib_dir)
    gpu = runtime.cuda.device_name()
    copy_gbps = runtime.copy_bandwidth_gbps()
    log(f"GPU {gpu}; device copy {copy_gbps:.0f} GB/s (read + write)")
    modules = {name: runtime.ffi.load_module(str((bundle_dir / name).resolve()))
               for name in sorted({entry["library"] for entry in manifest["kernels"]})}
    timer = Timer(runtime)
    rng = np.random.default_rng(seed)
    data: dict[tuple, _ShapeData] = {}
    results = []
    for entry in manifest["kernels"]:
        func = modules[entry["library"]][entry["symbol"]]
        if entry["kernel"].startswith("attention"):
            measure = lambda rows: measure_attention(runtime, func, entry, rng, timer)  # noqa: E731
            label = entry["key"]
        else:
            n, k = entry["shape"]
            if (n, k) not in data:
                data.clear()  # one shape's weights on the device at a time
                data[(n, k)] = _ShapeData(runtime, rng, n, k)
            measure = lambda rows: _measure_q8(runtime, func, data[(n, k)], rng, n, k, rows, timer)  # noqa: E731
            label = f"{entry['shape_name']} m={entry['m']}"
        for rows in entry["rows"]:
            result = {key: entry[key] for key in RESULT_KEYS if key in entry}
            result["rows"] = rows
            try:
                result.update(measure(rows))
            except Exception as err:  # one broken candidate must not end the run
                result.update(ok=False, rel_err=float("nan"), time_us=float("nan"), gbps=float("nan"),
                              error=str(err).splitlines()[0])
            results.append(result)
            log(f"  {label:20s} x{rows:<4d} {entry['name']:24s} {result['time_us']:9.2f} us  "
                f"err {result['rel_err']:.1e}{'' if result['ok'] else '  FAIL'}")
    return {"gpu": gpu, "copy_gbps": copy_gbps, "results": results}


def _check(runtime, func, weights, rng, n, k, rows) -> float:
    q, scale = weights.host[0]
    q_dev, s_dev = weights.device[0]
    x = rng.standard_normal((rows, k)).astype(np.float16)
    y = runtime.upload(np.full((rows, n), np.nan, dtype=np.float16))  # poison: unwritten stays NaN
    func(runtime.upload(x), q_dev, s_dev, y)
    runtime.cuda.synchronize()
    out = runtime.download(y, (rows, n), np.float16).astype(np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    columns = np.unique(np.concatenate([rng.choice(n, min(n, SAMPLE_COLUMNS), replace=False), [n - 1]]))
    ref = q8_reference(x, q, scale, columns)
    return float(np.linalg.norm(out[:, columns] - ref) / np.linalg.norm(ref))


def _measure_q8(runtime, func, weights, rng, n, k, rows, timer) -> dict:
    rel_err = _check(runtime, func, weights, rng, n, k, rows)
    xs = [runtime.upload(rng.standard_normal((rows, k)).astype(np.float16)) for _ in range(2)]
    ys = [runtime.upload(np.zeros((rows, n), dtype=np.float16)) for _ in range(2)]
    copies = len(weights.device)
    time_us = timer(lambda i: func(xs[i % 2], *weights.device[i % copies], ys[i % 2]))
    return {"rel_err": rel_err, "ok": bool(rel_err < TOLERANCE), "time_us": time_us,
            "gbps": q8_bytes(n, k, rows) / (time_us * 1e-6) / 1e9}


class Timer:
    """us per call of call(i) (i = 0, 1, ...: the call picks its inputs by it): warm-up, then
    the median over batches of calls queued behind a long device copy, between two events."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.head_start = (runtime.cuda.malloc(COPY_HEAD_START_BYTES), runtime.cuda.malloc(COPY_HEAD_START_BYTES))
        self.start, self.stop = runtime.cuda.event(), runtime.cuda.event()

    def __call__(self, call) -> float:
        cuda = self.runtime.cuda
        for i in range(3):  # warm-up: module load, first-launch costs
            call(i)
        cuda.synchronize()
        per_call = []
        for _ in range(BATCHES):
            cuda.copy(self.head_start[1], self.head_start[0], COPY_HEAD_START_BYTES)
            cuda.record(self.start)
            for i in range(BATCH_CALLS):
                call(i)
            cuda.record(self.stop)
            per_call.append(cuda.elapsed_ms(self.start, self.stop) * 1e3 / BATCH_CALLS)
        cuda.synchronize()
        return float(np.median(per_call))


def format_table(measured: dict) -> str:
    """Q8_0 matmuls: shape, m, rows, schedule, time, GB/s, % of 3000 GB/s, ratio to the best
    m=1 time; then the best plan of each attention kernel."""
    attention = [r for r in measured["results"] if r["kernel"].startswith("attention")]
    results = [r for r in measured["results"] if not r["kernel"].startswith("attention")]
    best_m1 = {}
    for r in results:
        if r["m"] == 1 and r["ok"]:
            best_m1[r["shape_name"]] = min(best_m1.get(r["shape_name"], float("inf")), r["time_us"])
    best = {}
    for r in results:
        key = (r["shape_name"], r["m"], r["rows"])
        if r["ok"] and (key not in best or r["time_us"] < best[key]["time_us"]):
            best[key] = r

    def same(x, key):
        return (x["shape_name"], x["m"], x["rows"]) == key

    lines = [f"GPU {measured['gpu']}, device copy {measured['copy_gbps']:.0f} GB/s",
             f"{'shape':9s} {'n x k':>13s} {'m':>7s} {'rows':>5s} {'schedule':24s} {'us':>9s} {'GB/s':>7s} "
             f"{'%3000':>6s} {'x m=1':>6s} {'dflt us':>8s} {'dlight':>8s}"]
    for key, r in best.items():
        default = next((x for x in results if same(x, key) and x["default"]), None)
        dlight = next((x for x in results if same(x, key) and x["name"] == "dlight"), None)
        ratio = r["time_us"] / best_m1[key[0]] if key[0] in best_m1 else float("nan")
        n, k = r["shape"]
        lines.append(
            f"{key[0]:9s} {f'{n}x{k}':>13s} {str(key[1]):>7s} {key[2]:5d} {r['name']:24s} {r['time_us']:9.2f} "
            f"{r['gbps']:7.0f} {100 * r['gbps'] / NOMINAL_GBPS:5.0f}% {ratio:6.2f} "
            f"{default['time_us'] if default else float('nan'):8.2f} "
            f"{dlight['time_us'] if dlight and dlight['ok'] else float('nan'):8.2f}")
    if attention:
        lines.append(format_attention_table(attention))
    failed = [r for r in results + attention if not r["ok"]]
    lines.append(f"{len(results) + len(attention)} measurements, {len(failed)} failed the check"
                 + "".join(f"\n  FAIL {r['shape_name']} m={r['m']} x{r['rows']} {r['name']} err={r['rel_err']:.2e}"
                           f" {r.get('error', '')}" for r in failed[:12]))
    return "\n".join(lines)
