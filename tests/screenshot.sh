#!/usr/bin/env bash
# Runs the real spdlab window under Xvfb with Mesa's software Vulkan and saves a screenshot.
# Usage: tests/screenshot.sh OUT.png [seconds-before-capture] [spdlab args...]
# Needs: xvfb xauth mesa-vulkan-drivers libvulkan1 libxcursor1 libxi6 libxkbcommon-x11-0 imagemagick
set -euo pipefail
out=${1:-spdlab.png}
wait_s=${2:-8}
shift $(( $# > 2 ? 2 : $# ))
bin=${SPDLAB_BIN:-target/release/spdlab}
display=:$(( 90 + RANDOM % 100 ))
Xvfb "$display" -screen 0 1400x900x24 >/dev/null 2>&1 &
xvfb=$!
trap 'kill $xvfb 2>/dev/null || true' EXIT
sleep 1
# A private settings folder so stored window geometry does not leak into the picture.
export XDG_DATA_HOME=$(mktemp -d) XDG_RUNTIME_DIR=$(mktemp -d) WGPU_BACKEND=vulkan
DISPLAY=$display "$bin" --exit-after $((wait_s + 4)) "$@" &
app=$!
sleep "$wait_s"
DISPLAY=$display import -window root "$out"
wait $app
echo "saved $out"
