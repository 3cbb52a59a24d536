#!/usr/bin/env bash
# The GPU reference of the scaling study on a machine with a real GPU (run from the repo root):
# `ctseg bench scaling --backends gpu` on configs/scaling.toml (the CPU series' config), then
# `bench step` beside the PyTorch peer on CUDA at the livermask shapes (width 32 and 64, batch 4,
# 240²). The run directory lands in $OUT/gpu-scaling for `ctseg report`.
# Expects .devbin/ctseg(.xz) (an x86-64 build without the mpi feature), .gl/*.deb (Vulkan loader,
# see the device tool's notes) and python3 with torch for the peer.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
ldconfig
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export XDG_RUNTIME_DIR=$(mktemp -d)
[ -f .devbin/ctseg.xz ] && xz -d -k -f .devbin/ctseg.xz
chmod +x .devbin/ctseg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
log "bench scaling, gpu, configs/scaling.toml"
timeout "${SCALING_TIMEOUT:-240}" ./.devbin/ctseg bench scaling --config configs/scaling.toml --backends gpu \
  --launcher '' --out "$OUT/gpu-scaling" 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
rm -f "$OUT"/gpu-scaling/*/checkpoint.ctck
for w in ${WIDTHS:-32 64}; do
  log "bench step width $w batch 4 240x240 (ctseg wgpu vs pytorch cuda)"
  timeout 200 ./.devbin/ctseg bench step --config configs/livermask.toml --backend gpu --width "$w" --batch-size 4 \
    --warmup 3 --steps "${STEPS:-10}" --peer tests/reference/livermask_torch.py --peer-device cuda 2>&1 | grep -v XDG | tee -a "$OUT/log.txt"
done
