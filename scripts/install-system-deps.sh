#!/usr/bin/env bash
# Installs the Debian packages framebus needs, only those that are missing.
# Debian 12 (GStreamer 1.22) and Debian 13 (GStreamer 1.26) use the same names.
set -euo pipefail
pkgs=(
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
  gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
  python3-gi python3-gst-1.0 gstreamer1.0-python3-plugin-loader python3-venv
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "framebus setup: missing Debian packages: ${missing[*]}" >&2
  echo "  fix: run 'sudo make setup', or install them with apt-get yourself" >&2
  exit 1
fi
echo "framebus setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
