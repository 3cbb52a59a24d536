#!/usr/bin/env bash
# The scaling study from a clean clone (the study's exhibits, docs/scaling.md), in one command:
#
#   scripts/scaling_study.sh [OUT]            (default OUT: results/scaling)
#
# 1. a CPU rank-count series (1, 2, 4 ranks under mpirun) and a GPU reference run of
#    configs/scaling.toml (`ctseg bench scaling`);
# 2. the report of those runs: speedup (Fig. 2), loss and Dice against time (Figs. 3-4),
#    time to target (Table 1), in OUT/report/index.html (`ctseg report`);
# 3. the performance model's predictions for 1 … 1024 ranks from the 1-rank run, and
#    time-to-target with the large-batch study's steps-to-target (docs/large-batch.md)
#    (`ctseg bench model`);
# 4. the model checked against 2 and 4 ranks over emulated hosts at 1 and 2.5 Gbit/s
#    (configs/comm-heavy.toml; needs root for the network namespaces; skipped otherwise).
#
# Environment: CTSEG (the binary; default target/release/ctseg, built with --features mpi),
# RANKS (default 1,2,4), GPU_ARGS (extra `train` arguments for the GPU run; default
# `--max-steps 30` on a software Vulkan adapter, none on a real GPU), LINK_GBPS (the model's
# link for step 3; default 10), SKIP_EMULATION=1 to skip step 4.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/scaling}
CTSEG=${CTSEG:-target/release/ctseg}
RANKS=${RANKS:-1,2,4}
export OMPI_MCA_rmaps_base_oversubscribe=1
mkdir -p "$OUT"
[ -x "$CTSEG" ] || cargo build --release --features mpi

echo "== 1. CPU series ($RANKS ranks) and GPU reference, configs/scaling.toml"
# The PyTorch peer in the same table when python3 has torch.
peer=()
python3 -c "import torch" 2>/dev/null && peer=(--peer tests/reference/livermask_torch.py)
"$CTSEG" bench scaling --config configs/scaling.toml --ranks "$RANKS" --backends cpu "${peer[@]}" \
  --launcher "timeout 1800 mpirun -np {n} --oversubscribe --bind-to none" --out "$OUT/cpu"
if [ -z "${GPU_ARGS+x}" ]; then
  # Only software adapters (lavapipe): a short run; any hardware adapter: the whole config.
  if "$CTSEG" adapters 2>/dev/null | grep '\[' | grep -vqi "llvmpipe\|lavapipe"; then GPU_ARGS=""; else GPU_ARGS="--max-steps 30"; fi
fi
# shellcheck disable=SC2086
"$CTSEG" bench scaling --config configs/scaling.toml --backends gpu --launcher '' \
  --out "$OUT/gpu" -- $GPU_ARGS || echo "(no GPU run: no usable adapter)"

echo "== 2. report"
runs=("$OUT/cpu")
[ -f "$OUT/gpu/scaling.json" ] && runs+=("$OUT/gpu")
"$CTSEG" report "${runs[@]}" --out "$OUT/report" --title "ctseg scaling study (configs/scaling.toml)" \
  --loss-targets=-0.6,-0.65 --dice-target 0.9

echo "== 3. performance model: the series' config from its 1-rank run; time to target for the study's model"
"$CTSEG" bench model --run "$OUT/cpu/cpu-n1" --link-gbps "${LINK_GBPS:-10}" --out "$OUT/model"
# Steps to a training loss of -0.65 per global batch, from the large-batch study's runs
# (docs/large-batch.md), fastest run per batch; timed with the study's batch-30 run.
steps=$(python3 docs/large-batch/summarize.py docs/large-batch/runs/* --loss=-0.65 \
  | sed -n 's/^steps-to-target (loss <= -0.65): //p')
"$CTSEG" bench model --run docs/large-batch/runs/b30-adadelta --link-gbps "${LINK_GBPS:-10}" \
  --max-ranks 64 --steps-to-target "$steps" --out "$OUT/model-time-to-target"

if [ "${SKIP_EMULATION:-0}" = 1 ] || [ "$(id -u)" != 0 ]; then
  echo "== 4. skipped (needs root for scripts/emulate_hosts.sh, or SKIP_EMULATION=1)"
  exit 0
fi
echo "== 4. model against 2 and 4 emulated hosts, configs/comm-heavy.toml"
"$CTSEG" bench scaling --config configs/comm-heavy.toml --ranks 1 --launcher '' \
  --out "$OUT/comm-heavy-1" -- --threads 1
for rate in 1 2.5; do
  tc_rate=$(awk -v r="$rate" 'BEGIN { printf "%dmbit", r * 1000 }')
  "$CTSEG" bench scaling --config configs/comm-heavy.toml --ranks 2,4 \
    --launcher "timeout 900 scripts/emulate_hosts.sh -k {n} -r $tc_rate --" \
    --out "$OUT/emulated-${rate}gbit" -- --threads 1
  "$CTSEG" bench model --run "$OUT/comm-heavy-1/cpu-n1" --link-gbps "$rate" --max-ranks 1024 \
    --validate "$OUT/emulated-${rate}gbit/cpu-n2" "$OUT/emulated-${rate}gbit/cpu-n4" \
    --out "$OUT/model-check-${rate}gbit"
done
echo "report: $OUT/report/index.html; model: $OUT/model/model.md, $OUT/model-check-*/model.md"
