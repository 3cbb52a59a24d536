#!/usr/bin/env bash
# One prepared run on a machine with a real GPU (the "device" machine of the development
# workplace), as stages in order of what issue 12 needs most, so a run cut short by its deadline
# has measured the figures that matter first:
#   adapters            `ctseg adapters`: the paths and precisions each adapter gets;
#   step-f32-WxB        `bench step --backend gpu` at width W, batch B, 240², beside the PyTorch
#                       peer in f32 (TF32 convolutions, PyTorch's default) and AMP, then the
#                       step's phase and kernel profile (profile-wW-bB.json); on burn's
#                       convolution kernels (--gpu-conv burn: the baseline step-wgsl compares
#                       with; `quick` runs the default --gpu-conv auto and records its choice);
#   step-mixed-WxB      the same in mixed precision (f16 operands on ctseg's WGSL kernels, on
#                       cooperative matrices where `adapters` lists them; profile-mixed-…);
#   spirv-{mixed,f32}-WxB  the same with the `spirv` build (kernels compiled to SPIR-V; mixed
#                       precision on cubek's cooperative-matrix convolutions, start-up check
#                       included; profile-spirv-…): the route decision of issue 12 item 4;
#   step-wgsl-WxB       f32 on ctseg's own 3×3 convolution kernels (--gpu-conv wgsl; the
#                       portable f32 path; profile-wgsl-…);
#   quick               the quick config trained on the GPU, twice: on a new machine's caches,
#                       then on what the first kept (start-up time in each summary);
#   parity              the GPU parity tests on the NVIDIA driver (GPU_TESTS: name filters);
#   kernels             `ctseg bench kernels`: one convolution's and one batch normalisation's
#                       forward and forward + backward per livermask layer, burn's kernels
#                       against ctseg's (kernels.jsonl; BENCH_REPS, BENCH_CASES: the first N);
#   kernels-spirv       the same with the `spirv` build: burn's f32 convolution against cubek's
#                       on cooperative matrices, the other route's layer times (kernels-spirv.jsonl).
# STAGES overrides the list. Every stage's timeout is cut to what is left of DEADLINE seconds,
# a stage with under 20 s left (or whose binary was not carried) is skipped, and the skipped
# ones are written to $OUT/stages-left.txt: a second run with STAGES="$(cat stages-left.txt)"
# measures the rest.
# Expects what scripts/device_prepare.sh builds on the build machine and the device tool
# carries: .devbin/ctseg and .devbin/gpu-tests (the default build without mpi, with the test
# hooks, and its GPU tests), optionally .devbin/ctseg-spirv (`--features
# spirv`), each possibly xz-compressed; .gl/*.deb (the Vulkan loader); python3 with torch.
# For a trial on lavapipe: SIZE (default 240) and PEER_DEVICE (default cuda) shrink the work.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
DEADLINE=${DEADLINE:-450}
STAGES=${STAGES:-adapters step-f32-64x30 step-mixed-64x30 spirv-mixed-64x30 step-f32-64x4 \
step-f32-32x4 step-wgsl-64x30 kernels kernels-spirv quick parity spirv-f32-64x30 step-wgsl-64x4 step-wgsl-32x4}
SIZE=${SIZE:-240}
PEER_DEVICE=${PEER_DEVICE:-cuda}
left=()
# The seconds a stage may take: at most $1, cut to the deadline; a failure under 20 s.
budget() {
  local rest=$((DEADLINE - SECONDS))
  [ "$rest" -ge 20 ] && echo $(($1 < rest ? $1 : rest))
}
# Stage $1 did not run: noted for a second run.
skipped() {
  log "skipped (deadline): $1"
  left+=("$1")
}
# Whether binary $1 of stage $stage was carried (and unpacked); if not, the stage is noted for
# a second run that carries it.
carried() {
  if [ -f "$1" ]; then
    chmod +x "$1"
    return 0
  fi
  log "$stage: $1 was not carried"
  left+=("$stage")
  return 1
}
# `timeout $1` of the remaining command, its output kept in the log; a timeout or a failure is
# logged under stage $stage's name.
timed() {
  local t=$1 rc
  shift
  timeout "$t" "$@" 2>&1 | grep -vE "XDG|^$" | tee -a "$OUT/log.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then
    log "$stage: timed out after $t s"
  elif [ "$rc" != 0 ]; then
    log "$stage: exit status $rc"
  fi
}

# Stage $1: one `bench step` with binary $2 at width $3, batch $4, at most $6 seconds, with the
# profile in profile-$5.json and the remaining arguments added.
step() {
  local stage=$1 bin=$2 w=$3 b=$4 name=$5 limit=$6 t
  shift 6
  t=$(budget "$limit") || { skipped "$stage"; return 0; }
  timed "$t" "$bin" bench step --config configs/livermask.toml --backend gpu --width "$w" \
    --batch-size "$b" --size "$SIZE" --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" \
    --profile "${PROFILE_STEPS:-3}" --profile-top 12 --profile-json "$OUT/profile-$name.json" \
    "$@"
}

run_stage() {
  local stage=$1 wb w b t
  wb=${stage##*-}
  w=${wb%x*}
  b=${wb#*x}
  case $stage in
  adapters)
    log "adapters"
    timed 60 ./.devbin/ctseg adapters
    ;;
  step-f32-*)
    log "$stage: bench step width $w batch $b ${SIZE}² (ctseg wgpu against PyTorch f32 and AMP on $PEER_DEVICE), then its phase/kernel profile"
    step "$stage" ./.devbin/ctseg "$w" "$b" "w$w-b$b" 240 --gpu-conv burn --peer tests/reference/livermask_torch.py \
      --peer-device "$PEER_DEVICE" --python "${PYTHON:-python3}" --peer-precision f32,amp
    ;;
  step-mixed-*)
    # --skip-gpu-check: its correctness is the parity tests' (with the cooperative matrices'
    # difference from the register kernels printed); a start-up refusal must not cost the timing.
    log "$stage: bench step width $w batch $b in mixed precision (f16 operands on ctseg's kernels, on cooperative matrices where the adapter has them), then its profile; the AMP peer is step-f32-$wb's"
    step "$stage" ./.devbin/ctseg "$w" "$b" "mixed-w$w-b$b" 150 --precision mixed --skip-gpu-check
    ;;
  step-wgsl-*)
    log "$stage: bench step width $w batch $b on ctseg's convolution kernels (--gpu-conv wgsl), then its profile"
    step "$stage" ./.devbin/ctseg "$w" "$b" "wgsl-w$w-b$b" 150 --gpu-conv wgsl
    ;;
  spirv-*)
    local p=${stage#spirv-}
    p=${p%%-*}
    carried .devbin/ctseg-spirv || return 0
    log "$stage: the spirv build's adapters, then bench step width $w batch $b in $p (mixed: cubek's cooperative-matrix convolutions, start-up check included), then its profile"
    timed 60 ./.devbin/ctseg-spirv adapters
    local skip=()
    [ "$p" = f32 ] && skip=(--skip-gpu-check)
    step "$stage" ./.devbin/ctseg-spirv "$w" "$b" "spirv-$p-w$w-b$b" 150 --precision "$p" "${skip[@]}"
    ;;
  quick)
    # Twice: the first run pays what a new machine pays (kernel compilation, autotuning and
    # --gpu-conv auto's timing, as far as the stages before left none in the cache); the
    # second starts as a user's next run does, with all of it kept (gpu-quick-warm-…).
    local name
    for name in gpu-quick gpu-quick-warm; do
      log "quick config on the GPU ($name)"
      t=$(budget 200) || { skipped "$stage"; return 0; }
      timed "$t" ./.devbin/ctseg train --backend gpu --out "$OUT/$name" --quiet
      cp "$OUT/$name/summary.json" "$OUT/$name-summary.json" 2>/dev/null
      rm -rf "$OUT/$name"
    done
    ;;
  parity)
    log "gpu parity tests"
    carried .devbin/gpu-tests || return 0
    t=$(budget 180) || { skipped "$stage"; return 0; }
    # The per-tensor tables are kept.
    CTSEG_REQUIRE_GPU=1 timed "$t" ./.devbin/gpu-tests --test-threads 1 --nocapture ${GPU_TESTS:-}
    ;;
  kernels | kernels-spirv)
    local bin=./.devbin/ctseg
    if [ "$stage" = kernels-spirv ]; then
      bin=./.devbin/ctseg-spirv
      carried "$bin" || return 0
      log "$stage: per livermask layer, mixed precision's 3x3 convolution, burn's f32 kernels against cubek's on cooperative matrices (the spirv build), forward and forward+backward"
    else
      log "$stage: per livermask layer, 3x3 convolution, forward and forward+backward: burn's kernels against ctseg's WGSL kernels (and, with cooperative matrices, mixed precision in registers against on them); batch normalisation: tensor operations against ctseg's kernels"
    fi
    t=$(budget 120) || { skipped "$stage"; return 0; }
    # One JSON line per comparison, in the log and in $stage.jsonl.
    timed "$t" "$bin" bench kernels --json --reps "${BENCH_REPS:-10}" \
      ${BENCH_CASES:+--first "$BENCH_CASES"} | grep '^{' >"$OUT/$stage.jsonl"
    ;;
  *)
    log "unknown stage $stage"
    ;;
  esac
}

# 1. The machine: Vulkan loader, NVIDIA's driver, the carried binaries.
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig 2>/dev/null
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export XDG_RUNTIME_DIR=$(mktemp -d)
for x in .devbin/*.xz; do [ -f "$x" ] && xz -d -k -f "$x"; done
chmod +x .devbin/ctseg
# The test binary's own ctseg path is the build machine's; its binary tests run the carried one.
export CTSEG_BIN="$PWD/.devbin/ctseg"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/log.txt"

# 2. The stages, in order; what the deadline cut is written down for a second run.
for stage in $STAGES; do
  run_stage "$stage"
done
printf '%s\n' "${left[*]:-}" >"$OUT/stages-left.txt"
log "stages left for a second run: ${left[*]:-none}"
