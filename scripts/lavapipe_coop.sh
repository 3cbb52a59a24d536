#!/usr/bin/env bash
# A lavapipe with cooperative matrices, for the tests of ctseg's cooperative-matrix kernels on a
# machine without a GPU: Mesa 26's software Vulkan driver (Debian trixie-backports; bookworm's
# Mesa 22 and 25.0 have no VK_KHR_cooperative_matrix) with the libraries it needs, down to its C
# library, unpacked into one directory without installing anything. apt resolves the packages
# and verifies them against Debian's archive keyring, in a private state directory.
#
# Usage: scripts/lavapipe_coop.sh [DIR]   (default: $CTSEG_COOP_LAVAPIPE or
#        ~/.cache/ctseg/lavapipe-coop). Prints DIR. A complete DIR is kept; DIR is only ever
#        replaced when it is this script's (it has the stamp file) or absent.
# Environment: CTSEG_DEBIAN_MIRROR (default http://deb.debian.org/debian).
# DIR then holds root/ (the unpacked packages), icd.json (the Vulkan driver manifest), run (a
# wrapper: `DIR/run PROGRAM ARGS...` runs PROGRAM with that C library and that driver, on
# Vulkan only) and stamp. tests/common/mod.rs (`cooperative_matrices_here`) re-runs the
# cooperative-matrix tests through `run` when the machine's own adapter has none.
set -euo pipefail

dir="${1:-${CTSEG_COOP_LAVAPIPE:-$HOME/.cache/ctseg/lavapipe-coop}}"
mirror="${CTSEG_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=trixie
packages=(mesa-vulkan-drivers libvulkan1)
stamp="$suite-backports ${packages[*]} v2"
say() { printf '[lavapipe_coop] %s\n' "$*" >&2; }

if [ -f "$dir/stamp" ] && [ "$(cat "$dir/stamp")" = "$stamp" ] && [ -x "$dir/run" ]; then
  echo "$dir"
  exit 0
fi
if [ -e "$dir" ] && [ ! -f "$dir/stamp" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
  say "$dir exists and is not this script's (no stamp file): choose another directory"
  exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [ ! -f "$keyring" ]; then
  say "$keyring is missing (apt install debian-archive-keyring)"
  exit 1
fi

# Built beside DIR and moved into place, so an interrupted run leaves DIR as it was.
mkdir -p "$(dirname "$dir")"
work=$(mktemp -d "$dir.new.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "fetching Mesa's lavapipe from Debian $suite-backports ($mirror) for $dir"
apt="$work/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/preferences.d"
touch "$apt/status"
cat >"$apt/sources.list" <<SOURCES
deb [signed-by=$keyring] $mirror $suite main
deb [signed-by=$keyring] $mirror $suite-backports main
SOURCES
apt_opts=(
  -o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$apt/preferences.d"
  -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
  -o "Dir::Cache=$apt/cache" -o APT::Architecture=amd64 -o APT::Architectures::=amd64
  -o Debug::NoLocking=1 -q
)
# As root, apt would hand downloads to its '_apt' user, who cannot write under a home directory.
[ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update >/dev/null
# An empty package status: apt downloads the whole dependency closure, C library included.
apt-get "${apt_opts[@]}" -y --download-only install -t "$suite-backports" "${packages[@]}" >/dev/null
version=$(dpkg-deb -f "$apt"/cache/archives/mesa-vulkan-drivers_*.deb Version)
for deb in "$apt"/cache/archives/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done
rm -rf "$apt"

# The paths written below are DIR's, where the files will be after the move.
lib="$dir/root/usr/lib/x86_64-linux-gnu"
if [ ! -f "$work/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" ] ||
  [ ! -x "$work/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ]; then
  say "the packages did not provide lavapipe and a C library under usr/lib/x86_64-linux-gnu"
  exit 1
fi
cat >"$work/icd.json" <<ICD
{ "file_format_version": "1.0.0",
  "ICD": { "library_path": "$lib/libvulkan_lvp.so", "api_version": "1.4.0" } }
ICD
# The program runs under the unpacked C library's loader; libraries it lacks (OpenMPI) come
# from this machine's directories after it. Vulkan only: a hardware GL adapter must not be
# chosen over this lavapipe.
cat >"$work/run" <<RUN
#!/bin/sh
export VK_ICD_FILENAMES='$dir/icd.json' WGPU_BACKEND=vulkan
exec '$lib/ld-linux-x86-64.so.2' --library-path '$lib:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu' "\$@"
RUN
chmod +x "$work/run"
echo "$stamp" >"$work/stamp"
rm -rf "$dir"
mv "$work" "$dir"
trap - EXIT
say "ready: Mesa $version"
echo "$dir"
