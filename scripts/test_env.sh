# Sourced by scripts/test and .ci/run from the repository root: installs what the test suite
# needs and is missing, and exports the environment the tests read. What it installs:
#   - Debian packages: OpenMPI and libclang (the `mpi` feature), Mesa's software Vulkan adapter
#     (lavapipe, for the GPU tests), Slurm and munge (the one-node Slurm test);
#   - a Python virtual environment with the reference implementations the tests compare against
#     (PyTorch, NumPy, nibabel, medpy, ONNX Runtime...: tests/reference/requirements.txt), kept
#     in $CTSEG_VENV (default ~/.cache/ctseg/venv) so later runs reuse it;
#   - Mesa 26's lavapipe, which has cooperative matrices (bookworm's Mesa 22 has none), unpacked
#     with its own C library into $CTSEG_COOP_LAVAPIPE (default ~/.cache/ctseg/lavapipe-coop) by
#     scripts/lavapipe_coop.sh: the cooperative-matrix kernels' tests run on it.
# Reference tests then run and must pass (CTSEG_REQUIRE_REFERENCES=1); so must the GPU tests
# (CTSEG_REQUIRE_GPU=1).

say() { printf '[scripts/test] %s\n' "$*" >&2; }

# 1. Debian packages (as root, or through sudo).
pkgs=(build-essential pkg-config libclang-dev openmpi-bin libopenmpi-dev mesa-vulkan-drivers
  libvulkan1 debian-archive-keyring python3-venv slurmctld slurmd slurm-client munge libpmix-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  SUDO=()
  [ "$(id -u)" -ne 0 ] && SUDO=(sudo)
  # Package installation must not start the packages' own daemons (munge, slurmd): the Slurm
  # test starts its own cluster (scripts/slurm/cluster.sh).
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod +x "$policy"
    made_policy=1
  fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  [ "$made_policy" = 1 ] && "${SUDO[@]}" rm -f "$policy"
fi

# 2. The reference packages, in a virtual environment outside the clone.
venv="${CTSEG_VENV:-$HOME/.cache/ctseg/venv}"
req=tests/reference/requirements.txt
stamp="$venv/.ctseg-requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$stamp"; then
  say "preparing the Python references in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # PyTorch's Linux wheels on PyPI bring NVIDIA's CUDA libraries (about 5 GB in all); `import
  # torch` needs them even on a CPU, so they stay. The venv is kept for later runs.
  "$venv/bin/pip" install -q -r "$req"
  cp "$req" "$stamp"
fi

# 3. A lavapipe with cooperative matrices, outside the clone.
CTSEG_COOP_LAVAPIPE=$(scripts/lavapipe_coop.sh)
export CTSEG_COOP_LAVAPIPE

# 4. The environment the tests read.
export CTSEG_PYTHON="$venv/bin/python"
export CTSEG_REQUIRE_REFERENCES=1
export CTSEG_REQUIRE_GPU=1
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# mpirun refuses to run as root without these (CI runs as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
