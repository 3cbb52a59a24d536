#!/usr/bin/env bash
# Emulates K hosts on one machine and runs one mpirun across them.
#
#   scripts/emulate_hosts.sh [-k HOSTS] [-n RANKS_PER_HOST] [-r RATE] [-b BURST] -- PROGRAM ARGS...
#
# Makes K network namespaces (ctseg-h0 … ctseg-h{K-1}) joined by a bridge through veth pairs,
# shapes every link in both directions with `tc … tbf rate RATE` (e.g. 1gbit, 2500mbit; "none"
# leaves the links unshaped), and launches `mpirun` from host 0 with an rsh agent that enters a
# host's namespace (`ip netns exec`), TCP transport only and `--bind-to none`. Traffic stays on
# the bridge: it has no address and no route out. Everything is removed on exit, also on error
# or Ctrl-C. Needs root (or CAP_NET_ADMIN) and iproute2. PROGRAM runs once per rank; mpirun's
# exit status is this script's.
set -euo pipefail

hosts=2
per_host=1
rate=1gbit
burst=512kb
while getopts "k:n:r:b:h" opt; do
  case $opt in
    k) hosts=$OPTARG ;;
    n) per_host=$OPTARG ;;
    r) rate=$OPTARG ;;
    b) burst=$OPTARG ;;
    *) sed -n '2,14p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "emulate_hosts.sh: no program given (see -h)" >&2; exit 2; }
[ "$hosts" -ge 1 ] && [ "$hosts" -le 32 ] || { echo "emulate_hosts.sh: -k must be 1..32" >&2; exit 2; }

tag="ctseg$$"
bridge="br$tag"
subnet=10.77.$(( $$ % 200 + 20 ))
work=$(mktemp -d)

cleanup() {
  set +e
  for i in $(seq 0 $((hosts - 1))); do
    ip netns pids "$tag-h$i" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$tag-h$i" 2>/dev/null
  done
  ip link del "$bridge" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

ip link add "$bridge" type bridge
ip link set "$bridge" up
: > "$work/hostfile"
for i in $(seq 0 $((hosts - 1))); do
  ns="$tag-h$i"
  ip netns add "$ns"
  ip link add "v${tag}b$i" type veth peer name "v${tag}h$i"
  ip link set "v${tag}h$i" netns "$ns"
  ip link set "v${tag}b$i" master "$bridge" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip addr add "$subnet.$((i + 1))/24" dev "v${tag}h$i"
  ip netns exec "$ns" ip link set "v${tag}h$i" up
  if [ "$rate" != "none" ]; then
    # Host → bridge and bridge → host: each direction of the link is limited to RATE.
    ip netns exec "$ns" tc qdisc add dev "v${tag}h$i" root tbf rate "$rate" burst "$burst" latency 100ms
    tc qdisc add dev "v${tag}b$i" root tbf rate "$rate" burst "$burst" latency 100ms
  fi
  echo "$ns slots=$per_host" >> "$work/hostfile"
done

# The rsh agent: "agent HOST COMMAND..." runs COMMAND inside HOST's namespace.
cat > "$work/agent" <<'AGENT'
#!/usr/bin/env bash
host=$1; shift
exec ip netns exec "$host" /bin/sh -c "$*"
AGENT
chmod +x "$work/agent"

# Pass on the variables ctseg and its tests use, where set.
exports=()
for v in PATH LD_LIBRARY_PATH RAYON_NUM_THREADS CTSEG_FAULT_INJECT XDG_RUNTIME_DIR; do
  [ -n "${!v:-}" ] && exports+=(-x "$v")
done

echo "emulate_hosts: $hosts host(s) x $per_host rank(s), links shaped to $rate, subnet $subnet.0/24" >&2
set +e
ip netns exec "$tag-h0" env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
  mpirun --hostfile "$work/hostfile" -np $((hosts * per_host)) \
  --mca plm_rsh_agent "$work/agent" \
  --mca btl tcp,self --mca btl_tcp_if_include "$subnet.0/24" --mca oob_tcp_if_include "$subnet.0/24" \
  --mca pml ob1 --bind-to none --oversubscribe \
  "${exports[@]}" \
  "$@"
status=$?
exit $status
