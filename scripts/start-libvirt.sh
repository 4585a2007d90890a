#!/usr/bin/env bash
# Starts virtlogd and libvirtd unless they already run (there is no systemd as PID 1 here),
# then waits until qemu:///system answers.
set -euo pipefail
# libvirt writes each network's dnsmasq config, hosts file and leases here but does not create
# the directory itself; on a fresh host it can be missing and then no network starts.
install -d -m 0755 /var/lib/libvirt/dnsmasq
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then
    exit 0
  fi
  sleep 0.2
done
echo "libvirtd did not come up" >&2
exit 1
