#!/usr/bin/env bash
# The Arm CPU build checked on an x86 Debian machine (bench/arm_check.py): installs qemu-user
# and the aarch64 cross g++ (apt, as root), unpacks an aarch64 Python 3.11 and the runtime's
# wheels into $ARM_ROOT (the runtime libraries from the aarch64 apache-tvm wheel, no compiler),
# builds here and runs the checks under qemu. Run from the repository root, its venv active.
#   bash bench/arm_check.sh            # ~2 min once set up; prints one line a check
set -euo pipefail
ARM_ROOT=${ARM_ROOT:-/tmp/trimode-arm}
OUT=${OUT:-$ARM_ROOT/check}
SYSROOT=$ARM_ROOT/sysroot SITE=$ARM_ROOT/site TVMLIB=$ARM_ROOT/tvmlib

if ! command -v qemu-aarch64-static > /dev/null || ! command -v aarch64-linux-gnu-g++ > /dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static g++-aarch64-linux-gnu > /dev/null
fi
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
    dpkg --add-architecture arm64 && apt-get update -qq
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download -qq $(printf '%s:arm64 ' libc6 libgcc-s1 libstdc++6 libgomp1 \
        python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libexpat1 zlib1g libffi8 \
        libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 \
        libcrypt1 libnsl2 libtirpc3 libdb5.3))
    mkdir -p "$SYSROOT" && for deb in "$debs"/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
fi
version() { pip show "$1" | sed -n 's/^Version: //p'; }  # the aarch64 wheels of what is installed here
if [ ! -f "$TVMLIB/libtvm_runtime.so" ]; then
    pip install -q --target "$SITE" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
        --python-version 3.11 --implementation cp --only-binary :all: \
        "numpy==$(version numpy)" "apache-tvm-ffi==$(version apache-tvm-ffi)" "gguf==$(version gguf)" \
        "tokenizers==$(version tokenizers)" jinja2 click regex pyyaml tqdm
    wheels=$(mktemp -d)
    pip download -q --no-deps --platform manylinux_2_28_aarch64 --only-binary :all: -d "$wheels" \
        "apache-tvm==$(version apache-tvm)"
    mkdir -p "$TVMLIB" && python - "$wheels"/apache_tvm-*.whl "$TVMLIB" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("tvm/lib/libtvm_runtime"):
            open(f"{out}/{name.rsplit('/', 1)[1]}", "wb").write(z.read(name))
EOF
fi

python bench/arm_check.py build "$OUT"
TRIMODE_TVM_LIB_DIR=$TVMLIB PYTHONPATH=$SITE:$PWD \
    qemu-aarch64-static -cpu max -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" bench/arm_check.py run "$OUT"
