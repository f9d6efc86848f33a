#!/usr/bin/env bash
# The one prepared GPU check (issue 7). Built here, run on the GPU box in a single call:
#   here:  bash bench/prepare_gpu_check.sh            (builds .carry/ and .whl/; KERNELS=1: also
#                                                      the per-kernel bundles)
#   there: bash bench/gpu_check.sh                    (device tool, carry [".carry", ".whl"];
#                                                      KERNEL_BENCHES=1: also every kernel
#                                                      candidate and the attention kernels)
#          EAGER=0 skips the 14B without CUDA graphs (timed at fill 512 beside the graph build),
#          PLAIN=0 the 14B with graphs but without programmatic dependent launch (likewise),
#          BLOCK16=0 the T = 16 block at fills 512 and 32768; BUDGET=560 (s): the parts after
#          the first are cut or skipped to end within it (most valuable first)
#          FROM_DISK=1 bash bench/gpu_check.sh        (also: write a 14B GGUF there and load
#                                                      the bench's weights from it, timed)
# It checks the CUDA build against the float64 reference on a tiny model (fp16 tolerance
# 1e-2; the greedy chain teacher-forced through the reference) and runs `trimode bench`'s
# measurements (trimode/runtime/bench.py) at the 14B geometry with random Q8_0 weights,
# then the same geometry as plain PyTorch bf16 (the box's torch), printing the table last.
# Only the TVM runtime libraries travel: no compiler on the GPU box.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRIMODE_TVM_LIB_DIR=$PWD/.carry/tvmlib
cudart=$(find /usr/local /opt /usr/lib -name 'libcudart.so.13*' 2>/dev/null | head -1)
[ -n "$cudart" ] && export LD_LIBRARY_PATH=$(dirname "$cudart"):${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader

model=()
if [ "${FROM_DISK:-0}" = 1 ]; then  # the 14B file on this box's disk; then try to drop it from the page cache
  file=${MODEL_DIR:-/tmp}/14b.gguf
  [ -f "$file" ] || timeout 240 python3 -m trimode.cli make-model --geometry 14b "$file" || exit 1
  sync && echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo "page cache dropped: the load reads the disk" \
    || echo "page cache kept (no permission): the load may read memory, not the disk"
  model=(--model "$file")
fi
timeout 330 python3 bench/gpu_check.py --tiny-artifact .carry/artifacts/tiny \
  --bench-artifact .carry/artifacts/14b --geometry 14b --json-out "$OUT/gpu_check.json" "${model[@]}" "$@" \
  2>&1 | tee "$OUT/gpu_check.log" | grep -v "^  ok"
status=${PIPESTATUS[0]}
stage() { echo "[gpu_check] $1 done at ${SECONDS}s"; }  # what each part costs of the device call
stage "correctness + bench"
# The later parts, most valuable first, each cut to what is left of BUDGET seconds (under the
# device call's 600 s limit, so the table below is printed and $OUT comes back whole).
BUDGET=${BUDGET:-560}
left() {  # seconds part $1 may take: its own limit $2, or what the budget has left
  local rest=$((BUDGET - SECONDS - 15))
  if [ "$rest" -lt 30 ]; then echo "[gpu_check] skipped $1: ${rest}s of the budget left" >&2; return 1; fi
  echo $(( $2 < rest ? $2 : rest ))
}
# the default draft block (draft length 15 + 1) beside the T = 32 above, at 512 and at a 32k
# cache (issue 7: attention at 32k must not become the bottleneck)
block16() {
  [ "${BLOCK16:-1}" = 1 ] && t=$(left "T = 16" 180) || return 0
  timeout "$t" python3 bench/gpu_check.py --skip-tiny --no-torch --bench-artifact .carry/artifacts/14b \
    --geometry 14b --block 16 --prefill 16 --fills 512,32768 --json-out "$OUT/gpu_check_block16.json" 2>&1 | tail -17
  stage "T = 16, fills 512 and 32768"
}
# the per-kernel benches of bench/NOTES-*.md (KERNELS=1 prepare): the Q8_0 candidates'
# times are what `trimode tune --results $OUT/q8_results.json` files here
kernels() {
  [ "${KERNEL_BENCHES:-0}" = 1 ] || return 0
  if t=$(left "Q8_0 kernels" 300); then
    timeout "$t" python3 bench/gpu_kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -22
    stage "Q8_0 kernels"
  fi
  if t=$(left "attention kernels" 120); then
    timeout "$t" python3 bench/gpu_attention.py .carry/attention "$OUT" 2>&1 | tee "$OUT/attention.log" | tail -18
    stage "attention kernels"
  fi
}
plain() {  # CUDA graphs, plain launches: tells a dependent-launch fault from the rest
  [ "${PLAIN:-1}" = 1 ] && [ -d .carry/artifacts/14b-plain ] && t=$(left "without dependent launch" 150) || return 0
  timeout "$t" python3 bench/gpu_check.py --tiny-artifact .carry/artifacts/tiny-plain --no-torch \
    --bench-artifact .carry/artifacts/14b-plain --geometry 14b --fills 512 --prefill 16 --repeat 5 \
    --json-out "$OUT/gpu_check_plain.json" 2>&1 | grep -v "^  ok" | tail -20
  stage "without dependent launch"
}
eager() {  # the same steps without CUDA graphs
  [ "${EAGER:-1}" = 1 ] && [ -d .carry/artifacts/14b-eager ] && t=$(left "without CUDA graphs" 120) || return 0
  timeout "$t" python3 bench/gpu_check.py --skip-tiny --no-torch --bench-artifact .carry/artifacts/14b-eager \
    --geometry 14b --fills 512 --prefill 16 --repeat 5 --json-out "$OUT/gpu_check_eager.json" 2>&1 | tail -16
  stage "without CUDA graphs"
}
if [ "$status" = 0 ]; then
  block16; kernels; plain; eager
else  # the default build failed: the builds without dependent launch, then without graphs, say why
  echo "[gpu_check] the default build's check failed (status $status): plain launches and eager next"
  plain; eager; block16; kernels
fi
if [ -f "$OUT/q8_results.json" ]; then  # each step against its matmuls timed alone (KERNEL_BENCHES=1)
  python3 bench/step_breakdown.py "$OUT" 2>&1 | tee "$OUT/step_breakdown.md"
fi
exit "$status"
