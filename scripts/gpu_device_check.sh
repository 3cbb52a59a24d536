#!/usr/bin/env bash
# One prepared run on a machine with a real GPU (the "device" machine of the development
# workplace): the GPU parity tests on the NVIDIA Vulkan driver, `bench step --backend gpu` beside
# the PyTorch peer on CUDA in f32 (TF32 convolutions, PyTorch's default) and AMP at width 32 and
# 64, batch 4 and 30, 240², with the step's phase and kernel profile (profile-w*-b*.json); the
# same steps on ctseg's own 3×3 convolution kernels (--gpu-conv wgsl, profile-wgsl-w*-b*.json)
# and at 64x30 in mixed precision (profile-mixed-w64-b30.json; on cooperative matrices where
# `ctseg adapters` lists them, which the cooperative-matrix parity tests then check in-process);
# one convolution's and one batch normalisation's forward and forward + backward on both
# kernels; and a short GPU training run. With .devbin/ctseg-spirv (`cargo build --release
# --features spirv`, copied away before the default build overwrites it), the SPIR-V route at
# 64x30 in mixed precision and f32 (profile-spirv-{mixed,f32}-w64-b30.json), after the tests.
# Expects: .devbin/ctseg and .devbin/gpu-tests (x86-64 builds from the build machine without
# the mpi feature, possibly xz-compressed: `cargo build --release`, and the binary that
# `cargo test --release --test gpu --no-run` names) and .devbin/gpu-kernels-bench (the binary that
# `cargo bench --bench gpu_kernels --no-run` names), .gl/*.deb (Vulkan loader, see the device
# tool's notes), python3 with torch.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
# Every stage's timeout is cut to what is left of DEADLINE seconds (default 450: the device
# session's 8 minutes less start-up and transfers); a stage with under 20 s left is skipped and
# says so, so the files written so far always come back.
DEADLINE=${DEADLINE:-450}
budget() {
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then log "skipped (deadline): $2" >&2; return 1; fi
  echo $(($1 < left ? $1 : left))
}
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export XDG_RUNTIME_DIR=$(mktemp -d)
for b in .devbin/*.xz; do [ -f "$b" ] && xz -d -k -f "$b"; done
chmod +x .devbin/ctseg .devbin/gpu-tests .devbin/gpu-kernels-bench
# The test binary's own ctseg path is the build machine's; its binary tests run the carried one.
export CTSEG_BIN="$PWD/.devbin/ctseg"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
log adapters
./.devbin/ctseg adapters 2>&1 | tee -a "$OUT/log.txt"
log "gpu parity tests"
# GPU_TESTS: optional test-name filters (all tests by default); the per-tensor tables are kept.
t=$(budget 180 "gpu parity tests") && CTSEG_REQUIRE_GPU=1 timeout "$t" ./.devbin/gpu-tests --test-threads 1 --nocapture ${GPU_TESTS:-} 2>&1 | grep -vE "XDG|^$" | tee -a "$OUT/log.txt"
# The SPIR-V route (issue 12 item 4), when .devbin/ctseg-spirv was carried: mixed precision on
# cubek's cooperative-matrix convolutions with its start-up check (which compares them with the
# CPU on f16 operands), and f32 on burn's kernels compiled to SPIR-V.
if [ -f .devbin/ctseg-spirv ]; then
  chmod +x .devbin/ctseg-spirv
  log "spirv build: adapters"
  ./.devbin/ctseg-spirv adapters 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
  for p in mixed f32; do
    log "spirv build: bench step width 64 batch 30 240x240 in $p (mixed: cubek's cooperative-matrix convolutions, start-up check included), then its profile"
    skip=(); [ "$p" = f32 ] && skip=(--skip-gpu-check)
    t=$(budget 150 "spirv bench step 64x30 $p") && timeout "$t" ./.devbin/ctseg-spirv bench step --config configs/livermask.toml --backend gpu \
      --precision $p "${skip[@]}" --width 64 --batch-size 30 --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --profile "${PROFILE_STEPS:-3}" \
      --profile-top 12 --profile-json "$OUT/profile-spirv-$p-w64-b30.json" 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
  done
fi
log "3x3 convolution, forward and forward+backward: burn's kernels against ctseg's WGSL kernels (and, with cooperative matrices, mixed precision in registers against on them); batch normalisation: tensor operations against ctseg's kernels"
t=$(budget 120 "kernel bench") && CTSEG_BENCH_REPS=10 timeout "$t" ./.devbin/gpu-kernels-bench 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
# Width/batch pairs: issue 12's target rows (batch 30 is the study's batch).
for wb in ${SHAPES:-64x4 64x30 32x4}; do
  w=${wb%x*}; b=${wb#*x}
  log "bench step width $w batch $b 240x240 (ctseg wgpu vs pytorch cuda f32 and amp), then its phase/kernel profile"
  t=$(budget 240 "bench step $wb") && timeout "$t" ./.devbin/ctseg bench step --config configs/livermask.toml --backend gpu --width $w --batch-size $b \
    --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --peer tests/reference/livermask_torch.py --peer-device cuda \
    --peer-precision f32,amp --profile "${PROFILE_STEPS:-3}" --profile-top 12 \
    --profile-json "$OUT/profile-w$w-b$b.json" 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
  log "bench step width $w batch $b 240x240 on ctseg's convolution kernels (--gpu-conv wgsl), then its profile"
  t=$(budget 150 "bench step $wb wgsl") && timeout "$t" ./.devbin/ctseg bench step --config configs/livermask.toml --backend gpu --gpu-conv wgsl \
    --width $w --batch-size $b --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --profile "${PROFILE_STEPS:-3}" \
    --profile-top 12 --profile-json "$OUT/profile-wgsl-w$w-b$b.json" 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
done
# Issue 12's mixed-precision row: ctseg mixed against the AMP peer measured above at 64x30.
# --skip-gpu-check: its correctness is the parity tests' (above, with the cooperative matrices'
# difference from the register kernels printed); a start-up refusal must not cost the timing.
log "bench step width 64 batch 30 240x240 in mixed precision (f16 operands on ctseg's kernels, on cooperative matrices where the adapter has them), then its profile"
t=$(budget 150 "bench step 64x30 mixed") && timeout "$t" ./.devbin/ctseg bench step --config configs/livermask.toml --backend gpu \
  --precision mixed --skip-gpu-check --width 64 --batch-size 30 --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --profile "${PROFILE_STEPS:-3}" \
  --profile-top 12 --profile-json "$OUT/profile-mixed-w64-b30.json" 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
[ "${QUICK:-1}" = 1 ] || exit 0
log "quick config on the GPU"
t=$(budget 200 "quick config") && timeout "$t" ./.devbin/ctseg train --backend gpu --out "$OUT/gpu-quick" --quiet 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
cp "$OUT/gpu-quick/summary.json" "$OUT/gpu-quick-summary.json" 2>/dev/null
rm -rf "$OUT/gpu-quick"
