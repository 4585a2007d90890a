#!/usr/bin/env bash
# Installs every system package vmhost, its image recipe and its tests need (Debian 12, as root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  dnsmasq-base iptables nftables genisoimage mmdebstrap e2fsprogs cpio busybox-static
  iproute2 openssh-client curl jq chromium mtools dosfstools python3 openssl
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  # qemu-utils goes in the same command every time: installing qemu-system-x86 alone can
  # remove a newer preinstalled qemu-utils and leave no qemu-img.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" qemu-utils
fi
if ! command -v qemu-img >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends qemu-utils
fi

# Browser assets (noVNC, xterm.js) and the browser test driver, pinned by web/package-lock.json.
cd "$(dirname "$0")/../web"
npm ci --no-audit --no-fund --loglevel=error
