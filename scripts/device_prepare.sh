#!/usr/bin/env bash
# Builds, on this (build) machine, what scripts/gpu_device_check.sh runs on the device machine:
# .devbin/ctseg-spirv.xz (`--features spirv`), .devbin/ctseg.xz and .devbin/gpu-tests.xz (the
# default build's binary, with `bench kernels`, and its GPU tests), stripped and
# xz-compressed, and .gl/*.deb (the Vulkan loader the device machine lacks; the device tool's
# notes say why). Both directories stay out of git (.git/info/exclude), so they travel only
# when a `run` names them in `carry`.
#
# The device tool carries at most 64 MiB in all: the script ends by printing the carry and its
# size, and what to leave for a second run if it is over.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ctseg-target}"
release="$CARGO_TARGET_DIR/release"
say() { printf '[device_prepare] %s\n' "$*" >&2; }
for d in /.devbin/ /.gl/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done
mkdir -p .devbin .gl

# `name`.xz in .devbin from the binary at `path`, stripped.
pack() {
  rm -f ".devbin/$1" ".devbin/$1.xz"
  strip -o ".devbin/$1" "$2"
  xz -T0 -6 -f ".devbin/$1"
}
# The executable that `cargo $*` builds for its one test or bench target.
executable() {
  cargo "$@" --no-run --message-format=json | python3 -c '
import json, sys
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable")]
print(paths[-1])'
}

# 1. The spirv build first: both builds write target/release/ctseg.
say "cargo build --release --features spirv"
cargo build --release --features spirv
pack ctseg-spirv "$release/ctseg"

# 2. The default build (no mpi: the device machine has no MPI) and its GPU tests, with the
#    test hooks (src/faults.rs: inert unless CTSEG_FAULT_INJECT is set), so that the parity
#    stage also tries auto's fallback from ctseg's kernels on the real driver.
say "cargo build --release --features test-hooks"
cargo build --release --features test-hooks
pack ctseg "$release/ctseg"
pack gpu-tests "$(executable test --release --features test-hooks --test gpu)"

# 3. The Vulkan loader's packages for the device machine (amd64, Debian's).
if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
  say "downloading the Vulkan loader's packages into .gl"
  lists=$(mktemp -d)
  mkdir -p "$lists/partial"
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
  apt-get "${o[@]}" update -qq
  (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi

# 4. What to carry.
mib() { du -cm "$@" | tail -1 | cut -f1; }
carry=(.gl .devbin/ctseg.xz .devbin/ctseg-spirv.xz .devbin/gpu-tests.xz)
ls -l .devbin/*.xz .gl/*.deb >&2
say "carry ${carry[*]} ($(mib "${carry[@]}") MiB)"
if [ "$(mib "${carry[@]}")" -ge 64 ]; then
  say "that is over 64 MiB: carry .devbin/gpu-tests.xz in a second run (STAGES=parity)"
fi
