#!/usr/bin/env bash
# Builds what bench/gpu_check.sh needs on the GPU box, here (no GPU needed): the CUDA
# artifacts of the tiny and 14B geometries (the 14B also without CUDA graphs, and without
# dependent launch), the TVM runtime libraries, the tvm_ffi wheel and
# the gguf wheel (pure Python; FROM_DISK=1 writes and reads a 14B file there).
# KERNELS=1 also builds the per-kernel bundles that KERNEL_BENCHES=1 measures there: every
# Q8_0 matmul tuning candidate at the 14B shapes (.carry/q8, for `trimode tune --results`)
# and the attention kernels, tensor-core and CUDA-core side by side (.carry/attention).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
ARCH=${ARCH:-sm_90a}
mkdir -p .carry/artifacts .carry/tvmlib .whl
lib=$($PY -c "from trimode.runtime.tvm_runtime import tvm_lib_dir; print(tvm_lib_dir())")
cp "$lib/libtvm_runtime.so" "$lib/libtvm_runtime_cuda.so" .carry/tvmlib/
ls .whl/apache_tvm_ffi-0.1.14.post1-cp312-*.whl >/dev/null 2>&1 || $PY -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  -d .whl apache-tvm-ffi==0.1.14.post1
gguf_version=$($PY -c "from importlib.metadata import version; print(version('gguf'))")
ls .whl/gguf-"$gguf_version"-*.whl >/dev/null 2>&1 || $PY -m pip download -q --no-deps -d .whl "gguf==$gguf_version"
for geometry in tiny 14b; do
  dir=$($PY -m trimode.cli compile --geometry $geometry --target cuda --arch "$ARCH" | tail -1)
  rm -rf ".carry/artifacts/$geometry" && cp -r "$dir" ".carry/artifacts/$geometry"
done
# the 14B without CUDA graphs: gpu_check.sh times it beside the graph build (what the graphs save)
dir=$(TRIMODE_CUDA_GRAPHS=0 $PY -m trimode.cli compile --geometry 14b --target cuda --arch "$ARCH" | tail -1)
rm -rf .carry/artifacts/14b-eager && cp -r "$dir" .carry/artifacts/14b-eager
# and with graphs but plain launches: what programmatic dependent launch saves (the tiny one
# too: its float64 check beside the default build's tells a launch-order race from the rest)
for geometry in tiny 14b; do
  dir=$(TRIMODE_PDL=0 $PY -m trimode.cli compile --geometry $geometry --target cuda --arch "$ARCH" | tail -1)
  rm -rf ".carry/artifacts/$geometry-plain" && cp -r "$dir" ".carry/artifacts/$geometry-plain"
done
if [ "${KERNELS:-0}" = 1 ]; then
  # both read the runtime libraries from .carry/tvmlib, as the model does
  $PY bench/build_gpu_kernels.py --arch "$ARCH" --out .carry/q8
  $PY bench/build_gpu_attention.py .carry/attention
fi
du -sh .carry/* .whl
du -sch .carry .whl | tail -1
