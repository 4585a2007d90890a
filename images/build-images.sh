#!/usr/bin/env bash
# Builds vmhost's base images from Debian packages only (no other downloads).
#
#   images/build-images.sh [OUTDIR]
#
# OUTDIR defaults to ${VMHOST_IMAGE_DIR:-/var/lib/vmhost/images}. Produces:
#   OUTDIR/debian12-cloud/{disk.qcow2,vmlinuz,initrd.img}  Debian 12 + cloud-init (NoCloud), root=/dev/vda
#   OUTDIR/busybox-tiny/{vmlinuz,initrd.img}               busybox initramfs, no disk
#
# Layout: every build goes into an immutable versioned directory OUTDIR/<image>@<recipe-sha12>/ and
# OUTDIR/<image> is a symlink that is swapped atomically once the build is complete. An interrupted
# build never leaves a half image, and a rebuild never changes a file that existing qcow2 overlays may
# use as their backing file (create overlays against the canonical path to pin a version).
# Older versions are kept; delete them once no overlay references them.
#
# Rerunning with an unchanged recipe (sha256 of this file) does nothing. VMHOST_IMAGE_FORCE=1 rebuilds.
# Needs root (mmdebstrap root mode, mknod) and the packages from scripts/install-deps.sh.
# Optional: VMHOST_DEBIAN_MIRROR / VMHOST_DEBIAN_SECURITY_MIRROR override the mirrors found in
# /etc/apt/sources.list{,.d}.
set -euo pipefail

RECIPE=$(readlink -f "${BASH_SOURCE[0]}")
OUTDIR=${1:-${VMHOST_IMAGE_DIR:-/var/lib/vmhost/images}}
SUITE=bookworm
DISK_SIZE=2G # raw ext4 size (sparse); overlays may be larger, cloud-init grows the filesystem
IMAGES=(debian12-cloud busybox-tiny)
PACKAGES=(
  linux-image-cloud-amd64 systemd-sysv udev dbus
  cloud-init openssh-server openssh-sftp-server sudo qemu-guest-agent
  ifupdown isc-dhcp-client resolvconf netbase iproute2 e2fsprogs
  net-tools # cloud-init 22.4's ifupdown renderer writes v2 `routes:` as `post-up route add ...`
)
# Kernel modules the busybox image loads at boot (with their dependencies): power button and
# evdev for acpid, virtio so disks, NICs and consoles show up.
TINY_MODULES=(button evdev virtio_pci virtio_blk virtio_net virtio_console)

START=$SECONDS
log() { printf '%s build-images: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap root mode, mknod)"
for c in mmdebstrap mkfs.ext4 qemu-img cpio gzip busybox modprobe sha256sum flock; do
  command -v "$c" >/dev/null || die "missing $c: run scripts/install-deps.sh"
done

RECIPE_SHA=$(sha256sum "$RECIPE" | cut -d' ' -f1)
VERSION=${RECIPE_SHA:0:12}

mkdir -p "$OUTDIR"
chmod 0755 "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")
exec 9>"$OUTDIR/.build.lock"
flock 9 # one build at a time per OUTDIR

# True if OUTDIR/<image> is complete and was built by this recipe.
up_to_date() {
  local dir="$OUTDIR/$1" f
  [[ -f $dir/.recipe-sha256 && $(<"$dir/.recipe-sha256") == "$RECIPE_SHA" ]] || return 1
  for f in vmlinuz initrd.img; do [[ -s $dir/$f ]] || return 1; done
  [[ $1 != debian12-cloud || -s $dir/disk.qcow2 ]]
}

# Point OUTDIR/<image> at OUTDIR/<versioned dir> atomically (rename of a fresh symlink).
publish() { # IMAGE VERSIONED-DIR-NAME
  local name=$1 target=$2 link="$OUTDIR/$1"
  if [[ -e $link && ! -L $link ]]; then # a plain directory from an older layout
    mv "$link" "$OUTDIR/$name@legacy-$(date -u +%Y%m%dT%H%M%SZ)"
  fi
  ln -sfn "$target" "$OUTDIR/.$name.link.tmp"
  mv -T "$OUTDIR/.$name.link.tmp" "$link"
}

show() {
  local i
  for i in "${IMAGES[@]}"; do
    log "$i: $OUTDIR/$i -> $(readlink -f "$OUTDIR/$i")"
    (cd "$OUTDIR/$i" && ls -ls --block-size=K vmlinuz initrd.img disk.qcow2 2>/dev/null | sed 's/^/    /' >&2) || true
  done
}

FORCE=${VMHOST_IMAGE_FORCE:-0}
todo=()
for img in "${IMAGES[@]}"; do
  if [[ $FORCE != 1 ]]; then
    up_to_date "$img" && continue
    # Built by this recipe but not published (interrupted right before the symlink swap)?
    if [[ -f $OUTDIR/$img@$VERSION/.recipe-sha256 ]]; then
      publish "$img" "$img@$VERSION"
      up_to_date "$img" && continue
    fi
  fi
  todo+=("$img")
done
if [[ ${#todo[@]} -eq 0 ]]; then
  log "images are up to date (recipe sha256 $RECIPE_SHA), nothing to do"
  show
  exit 0
fi
log "building ${todo[*]} into $OUTDIR (recipe sha256 $RECIPE_SHA)"

# rm -rf that first detaches mounts a killed mmdebstrap may have left in its chroot (/proc, /sys,
# /dev) and never crosses into another filesystem.
remove_tree() {
  local d=$1 m
  [[ -e $d ]] || return 0
  findmnt -rn -o TARGET | awk -v p="$d/" 'index($0, p) == 1' | sort -r |
    while read -r m; do umount -l "$m" || true; done
  rm -rf --one-file-system "$d"
}
# Leftovers of an interrupted earlier run (safe: we hold the lock).
for stale in "$OUTDIR"/.build-*; do
  if [[ -e $stale ]]; then log "removing stale $stale"; remove_tree "$stale"; fi
done
WORK=$(mktemp -d "$OUTDIR/.build-XXXXXX")
chmod 0755 "$WORK"
cleanup() { remove_tree "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------------
# Debian mirrors: the ones the host's apt already uses (only the Debian archive and security entries).
apt_uris() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    sed -nE 's/^[[:space:]]*URIs:[[:space:]]*//Ip' "$f" | tr ' \t' '\n\n'
  done
}
URIS=$(apt_uris | sed -E 's#/+$##' | awk 'NF && !seen[$0]++')
MIRROR=${VMHOST_DEBIAN_MIRROR:-$(grep -E '/debian$' <<<"$URIS" | head -n1 || true)}
SECURITY=${VMHOST_DEBIAN_SECURITY_MIRROR:-$(grep -E '/debian-security$' <<<"$URIS" | head -n1 || true)}
if [[ -z $MIRROR ]]; then
  MIRROR=http://deb.debian.org/debian
  log "WARNING: no Debian mirror found in /etc/apt/sources.list{,.d}, using $MIRROR"
fi
SOURCES=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
if [[ -n $SECURITY ]]; then
  SOURCES+=("deb $SECURITY $SUITE-security main")
else
  log "WARNING: no debian-security mirror found, building without security updates"
fi
APTOPTS=()
HOST_PROXY=
eval "$(apt-config shell HOST_PROXY Acquire::http::Proxy 2>/dev/null || true)"
[[ -n $HOST_PROXY ]] && APTOPTS+=("--aptopt=Acquire::http::Proxy \"$HOST_PROXY\"")

# ---------------------------------------------------------------------------------------------------
# 1. Shared rootfs (also the source of the kernel and modules for busybox-tiny).
ROOT="$WORK/rootfs"
t=$SECONDS
log "mmdebstrap $SUITE from $MIRROR ${SECURITY:+(+ $SECURITY)}"
mmdebstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  "${APTOPTS[@]}" "$SUITE" "$ROOT" "${SOURCES[@]}" 2>&1 | sed 's/^/    mmdebstrap: /' >&2
T_DEBOOTSTRAP=$((SECONDS - t))
log "rootfs done in ${T_DEBOOTSTRAP}s ($(du -sh --one-file-system "$ROOT" | cut -f1))"

kernels=("$ROOT"/boot/vmlinuz-*)
[[ ${#kernels[@]} -eq 1 && -f ${kernels[0]} ]] || die "expected exactly one kernel in rootfs/boot"
KVER=${kernels[0]##*/vmlinuz-}
[[ -f $ROOT/boot/initrd.img-$KVER ]] || die "no initrd.img-$KVER in rootfs/boot"
log "kernel $KVER"

build_info() { # IMAGE-DIR extra-lines...
  local d=$1; shift
  {
    echo "recipe_sha256=$RECIPE_SHA"
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "suite=$SUITE"
    echo "mirrors=${SOURCES[*]}"
    echo "kernel=$KVER"
    printf '%s\n' "$@"
  } >"$d/build-info.txt"
}

# ---------------------------------------------------------------------------------------------------
# 2. debian12-cloud
build_debian() {
  local out="$WORK/out-debian12-cloud" t=$SECONDS
  mkdir -p "$out"
  # Package list first (dpkg status), before anything is removed.
  dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f='${Package} ${Version}\n' | sort >"$out/packages.txt"

  # Identity: every VM gets its own machine-id, ssh host keys, hostname (from cloud-init).
  rm -f "$ROOT"/etc/ssh/ssh_host_*
  : >"$ROOT/etc/machine-id"
  rm -f "$ROOT/var/lib/dbus/machine-id"
  echo debian >"$ROOT/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' \
    >"$ROOT/etc/hosts"
  # mmdebstrap copies the host's resolv.conf (and resolvconf saved it as "original");
  # in the guest resolvconf owns it, fed by ifupdown dns-nameservers or dhclient.
  rm -f "$ROOT/etc/resolvconf/resolv.conf.d/original"
  if [[ ! -L $ROOT/etc/resolv.conf ]]; then
    rm -f "$ROOT/etc/resolv.conf"
    ln -s ../run/resolvconf/resolv.conf "$ROOT/etc/resolv.conf"
  fi
  rm -rf "$ROOT/var/lib/cloud" "$ROOT"/var/log/*.log "$ROOT"/tmp/* "$ROOT"/var/tmp/*

  echo '/dev/vda / ext4 defaults 0 1' >"$ROOT/etc/fstab"
  # C.UTF-8 needs no locale-gen (cloud-init's locale module would otherwise generate en_US.UTF-8).
  echo 'LANG=C.UTF-8' >"$ROOT/etc/default/locale"
  # A NIC that never comes up must not hold cloud-config/final (After=network-online.target) for 300 s.
  echo 'WAIT_ONLINE_TIMEOUT=60' >>"$ROOT/etc/default/networking"
  # Job VMs are short-lived: no unattended apt traffic or CPU (apt-get still works on demand).
  rm -f "$ROOT"/etc/systemd/system/timers.target.wants/apt-daily{,-upgrade}.timer

  cat >"$ROOT/etc/cloud/cloud.cfg.d/90_vmhost.cfg" <<'EOF'
# vmhost: seeds come from a NoCloud disk (label cidata/CIDATA, vfat or iso9660).
datasource_list: [ NoCloud, None ]
manage_etc_hosts: true
locale: C.UTF-8
# No DSA (sshd 9.2 ignores it); RSA-3072 generation is already ~12 s under TCG.
ssh_genkeytypes: [ rsa, ecdsa, ed25519 ]
# No grub in this image (direct kernel boot); the module would only cost ~2.5 s under TCG.
grub_dpkg:
  enabled: false
system_info:
  default_user:
    name: debian
EOF
  # The serial getty comes from systemd-getty-generator because the cmdline has console=ttyS0.

  log "debian12-cloud: mkfs.ext4 -d ($DISK_SIZE)"
  truncate -s "$DISK_SIZE" "$WORK/disk.raw"
  mkfs.ext4 -q -F -L vmhost-root -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$ROOT" "$WORK/disk.raw"
  log "debian12-cloud: qemu-img convert -O qcow2"
  qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$out/disk.qcow2"
  rm -f "$WORK/disk.raw"
  cp "$ROOT/boot/vmlinuz-$KVER" "$out/vmlinuz"
  cp "$ROOT/boot/initrd.img-$KVER" "$out/initrd.img"
  build_info "$out" "disk_virtual_size=$DISK_SIZE" "root=/dev/vda (ext4, no partition table, label vmhost-root)" \
    "cmdline=console=ttyS0 root=/dev/vda rw" "login_user=debian"
  log "debian12-cloud: done in $((SECONDS - t))s"
}

# ---------------------------------------------------------------------------------------------------
# 3. busybox-tiny
build_tiny() {
  local out="$WORK/out-busybox-tiny" t=$SECONDS ir="$WORK/tiny" p m
  mkdir -p "$out" "$ir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,var/log,etc/acpi/PWRF}
  cp /bin/busybox "$ir/bin/busybox"
  for p in $(busybox --list-full); do
    [[ $p == bin/busybox ]] || ln -sf /bin/busybox "$ir/$p"
  done
  mknod -m 600 "$ir/dev/console" c 5 1
  mknod -m 666 "$ir/dev/null" c 1 3

  # Modules in load order (dependencies first), from the rootfs' kernel.
  : >"$ir/etc/modules.load"
  for m in "${TINY_MODULES[@]}"; do
    modprobe -d "$ROOT" -S "$KVER" --show-depends "$m" | while read -r kind path _; do
      [[ $kind == insmod ]] || continue
      rel=${path#"$ROOT"}
      if [[ ! -f $ir$rel ]]; then
        mkdir -p "$(dirname "$ir$rel")"
        cp "$path" "$ir$rel"
        echo "$rel" >>"$ir/etc/modules.load"
      fi
    done
  done

  cat >"$ir/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# busybox acpid maps the ACPI power button (evdev KEY_POWER) to /etc/acpi/PWRF/00000080.
echo "vmhost-tiny: power button, powering off" >/dev/console
poweroff -f
EOF
  chmod 0755 "$ir/etc/acpi/PWRF/00000080"
  echo "PS1='vmhost-tiny# '" >"$ir/etc/profile"
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ir/etc/passwd"
  printf 'root:x:0:\n' >"$ir/etc/group"

  cat >"$ir/init" <<'EOF'
#!/bin/sh
# PID 1 of vmhost's busybox-tiny image.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
while read -r m; do insmod "$m" 2>/dev/null; done </etc/modules.load
hostname vmhost-tiny
ip link set lo up
acpid -l /run/acpid.log
# Printed only once acpid runs: after this line the ACPI power button powers the VM off.
echo "vmhost-tiny: booted (uptime $(cut -d' ' -f1 /proc/uptime)s)"
echo "vmhost-tiny: cmdline: $(cat /proc/cmdline)"
while :; do
  setsid cttyhack sh -l
  sleep 1
done
EOF
  chmod 0755 "$ir/init"
  (cd "$ir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -9n >"$out/initrd.img"
  cp "$ROOT/boot/vmlinuz-$KVER" "$out/vmlinuz"
  build_info "$out" "busybox-static=$(dpkg-query -W -f='${Version}' busybox-static)" "modules=$(tr '\n' ' ' <"$ir/etc/modules.load")" \
    "banner=vmhost-tiny: booted"
  log "busybox-tiny: done in $((SECONDS - t))s"
}

for img in "${todo[@]}"; do
  case $img in
    debian12-cloud) build_debian ;;
    busybox-tiny) build_tiny ;;
  esac
done

# ---------------------------------------------------------------------------------------------------
# 4. Publish: stamp, make readable for the qemu user, move into place, swap the symlink.
for img in "${todo[@]}"; do
  d="$WORK/out-$img"
  chmod 0755 "$d"
  find "$d" -type f -exec chmod 0644 {} +
  echo "$RECIPE_SHA" >"$d/.recipe-sha256"
  sync
  # Never reuse a name that exists: overlays may be backed by the files in it.
  name="$img@$VERSION"
  [[ -e $OUTDIR/$name ]] && name="$img@$VERSION-$(date -u +%Y%m%dT%H%M%SZ)"
  mv -T "$d" "$OUTDIR/$name"
  publish "$img" "$name"
  log "$img: published $OUTDIR/$img -> $name"
done
for img in "${IMAGES[@]}"; do
  current=$(readlink "$OUTDIR/$img")
  for old in "$OUTDIR/$img"@*; do
    [[ -d $old && ${old##*/} != "$current" ]] && log "older version kept (overlays may use it): $old"
  done
done
log "done in $((SECONDS - START))s"
show
