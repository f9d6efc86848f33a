#!/usr/bin/env bash
# Builds what bench/gpu_check.sh needs on the GPU box, here (no GPU needed): the CUDA
# artifacts of the tiny and 14B geometries, the TVM runtime libraries, the tvm_ffi wheel and
# the gguf wheel (pure Python; FROM_DISK=1 writes and reads a 14B file there).
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
du -sh .carry .whl
