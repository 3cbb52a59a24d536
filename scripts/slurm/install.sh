#!/usr/bin/env bash
# Installs what scripts/slurm/cluster.sh needs for a one-node Slurm test cluster, from Debian 12's
# own packages, non-interactively, and only the packages that are missing (a second run does
# nothing and needs no network).
#
#   scripts/slurm/install.sh            # as root (CI runs as root)
#
# Packages: slurmctld, slurmd, slurm-client (pull in slurm-wlm-basic-plugins, which holds
# mpi_pmix / mpi_pmix_v4 / mpi_pmi2), munge, libpmix-dev (Slurm's mpi_pmix_v4.so dlopens
# /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so, the unversioned link that only the -dev
# package ships, and no Slurm package depends on it), and the MPI stack the tests use
# (openmpi-bin, libopenmpi-dev; Debian's OpenMPI 4.1.4 talks PMIx to srun: `srun --mpi=pmix`).
# The daemons are NOT started by the packages: a temporary /usr/sbin/policy-rc.d (exit 101) stops
# the maintainer scripts from starting the system munged/slurmd with /etc's configuration; the
# test cluster runs its own daemons with everything under a state directory.
# Extra packages can be added with SLURM_EXTRA_PACKAGES="shellcheck ..." in the environment.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin libopenmpi-dev)
# shellcheck disable=SC2206  # word splitting of the optional list is intended
[ -n "${SLURM_EXTRA_PACKAGES:-}" ] && packages+=(${SLURM_EXTRA_PACKAGES})

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install.sh: all present: ${packages[*]}"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: missing ${missing[*]}; run as root to install them" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# temporary, from ctseg scripts/slurm/install.sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  made_policy=1
fi

echo "install.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
}
# Try without refreshing the package lists first (fast, offline when the .debs are cached);
# refresh and retry if that fails (a fresh machine has empty or stale lists).
if ! apt_install >/tmp/ctseg-slurm-install.log 2>&1; then
  apt-get update -q >>/tmp/ctseg-slurm-install.log 2>&1
  if ! apt_install >>/tmp/ctseg-slurm-install.log 2>&1; then
    tail -30 /tmp/ctseg-slurm-install.log >&2
    echo "install.sh: apt-get install failed (log: /tmp/ctseg-slurm-install.log)" >&2
    exit 1
  fi
fi
echo "install.sh: installed ${missing[*]}"
