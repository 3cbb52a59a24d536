#!/usr/bin/env bash
# A lavapipe with cooperative matrices, for the tests of ctseg's cooperative-matrix kernels on a
# machine without a GPU: Mesa 26's software Vulkan driver (Debian trixie-backports; bookworm's
# Mesa 22 has no VK_KHR_cooperative_matrix) with the libraries it needs, down to its C library,
# unpacked into one directory without installing anything. apt resolves and verifies the
# packages against Debian's archive keyring, in a private state directory.
#
# Usage: scripts/lavapipe_coop.sh [DIR]   (default: $CTSEG_COOP_LAVAPIPE or
#        ~/.cache/ctseg/lavapipe-coop). Prints DIR. Idempotent: a complete DIR is kept.
# DIR then holds root/ (the unpacked packages), icd.json (the Vulkan driver manifest), run (a
# wrapper: `DIR/run PROGRAM ARGS...` runs PROGRAM with that C library and driver) and stamp.
# tests/common/mod.rs (`coop_adapter`) re-runs the cooperative-matrix tests through `run`.
set -euo pipefail

dir="${1:-${CTSEG_COOP_LAVAPIPE:-$HOME/.cache/ctseg/lavapipe-coop}}"
suite=trixie
packages=(mesa-vulkan-drivers libvulkan1)
stamp="$suite-backports ${packages[*]} v1"
if [ -f "$dir/stamp" ] && [ "$(cat "$dir/stamp")" = "$stamp" ] && [ -x "$dir/run" ]; then
  echo "$dir"
  exit 0
fi

say() { printf '[lavapipe_coop] %s\n' "$*" >&2; }
say "fetching Mesa's lavapipe from Debian $suite-backports into $dir"
rm -rf "$dir"
mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial" "$dir/apt/preferences.d"
touch "$dir/apt/status"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$dir/apt/sources.list" <<SOURCES
deb [signed-by=$keyring] http://deb.debian.org/debian $suite main
deb [signed-by=$keyring] http://deb.debian.org/debian $suite-backports main
SOURCES
apt_opts=(
  -o "Dir::Etc::SourceList=$dir/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$dir/apt/preferences.d"
  -o "Dir::State::Lists=$dir/apt/lists" -o "Dir::State::status=$dir/apt/status"
  -o "Dir::Cache=$dir/apt/cache" -o APT::Architecture=amd64 -o APT::Architectures::=amd64
  -o Debug::NoLocking=1 -q
)
# As root, apt would hand downloads to its '_apt' user, who cannot write under a home directory.
[ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" update >/dev/null
# An empty package status: apt downloads the whole dependency closure, C library included.
apt-get "${apt_opts[@]}" -y --download-only install -t "$suite-backports" "${packages[@]}" >/dev/null
version=$(dpkg-deb -f "$dir"/apt/cache/archives/mesa-vulkan-drivers_*.deb Version)
mkdir -p "$dir/root"
for deb in "$dir"/apt/cache/archives/*.deb; do
  dpkg-deb -x "$deb" "$dir/root"
done
rm -rf "$dir/apt"

lib="$dir/root/usr/lib/x86_64-linux-gnu"
if [ ! -f "$lib/libvulkan_lvp.so" ] || [ ! -x "$lib/ld-linux-x86-64.so.2" ]; then
  say "the packages did not provide lavapipe and a C library under $lib"
  exit 1
fi
cat >"$dir/icd.json" <<ICD
{ "file_format_version": "1.0.0",
  "ICD": { "library_path": "$lib/libvulkan_lvp.so", "api_version": "1.4.0" } }
ICD
# The program runs under the unpacked C library's loader; libraries it lacks (OpenMPI) come
# from this machine's directories after it.
cat >"$dir/run" <<RUN
#!/bin/sh
export VK_ICD_FILENAMES="$dir/icd.json"
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu" "\$@"
RUN
chmod +x "$dir/run"
echo "$stamp" >"$dir/stamp"
say "ready: Mesa $version"
echo "$dir"
