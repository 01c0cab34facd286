#!/usr/bin/env bash
# openzfs-guest.sh: a real OpenZFS test host for resync — a Debian bookworm
# QEMU guest (TCG) running OpenZFS from Debian's own packages. No mocks.
#
#   openzfs-guest.sh build               build (or find) the cached guest image
#   openzfs-guest.sh up     [STATE_DIR]  boot one guest, wait for SSH, write
#                                        STATE_DIR/env
#   openzfs-guest.sh down   [STATE_DIR]  stop that guest, remove STATE_DIR;
#                                        idempotent
#   openzfs-guest.sh status [STATE_DIR]  show the cache and the guest
#   openzfs-guest.sh ssh    [CMD...]     run CMD (or a shell) in the guest of
#                                        $OZG_STATE (default STATE_DIR)
#   openzfs-guest.sh mirrors             print the Debian mirrors a build uses
#
# The host kernel has no ZFS and must not load modules: OpenZFS runs only in
# the guest. KVM does not work on these machines, so the guest runs under TCG
# (`-accel tcg -cpu max`); boot to SSH takes 20-50 s, so boot one guest per
# test run and share it.
#
# Cache (outside the repo), $OZG_CACHE, default /var/tmp/resync-openzfs-guest:
#   rootfs/                 the debootstrapped tree (kept to rebuild the image)
#   vmlinuz, initrd.img     the guest kernel and its small initrd
#   rootfs.img              ext4 image of rootfs/, never written by a guest
#                           (each guest boots a qcow2 overlay on top of it)
#   id_ed25519{,.pub}       root's key pair for the guest
#   ssh_host_ed25519_key{,.pub}  the guest's only host key
#   zfs-version             `zfs version` of the image
#   stamps/                 one file per finished build stage
#
# STATE_DIR of one guest (default $OZG_CACHE/run):
#   root.qcow2              overlay on rootfs.img
#   disk0.img ...           blank sparse pool disks, serials ozgdisk0...,
#                           seen in the guest as /dev/disk/by-id/virtio-ozgdisk0
#   known_hosts, console.log, qemu.pid
#   env                     shell-sourceable KEY=VALUE lines:
#     GUEST_HOST GUEST_SSH_PORT GUEST_USER GUEST_KEY GUEST_KNOWN_HOSTS
#     GUEST_DISKS (space-separated by-id paths) GUEST_QEMU_PID GUEST_STATE_DIR
#     GUEST_ZFS_VERSION
#
# scripts/guest/smoke.sh exercises what resync relies on inside a guest:
#   openzfs-guest.sh ssh bash -s -- DISK_A DISK_B < scripts/guest/smoke.sh
#
# Tunables: OZG_DISKS (3), OZG_DISK_SIZE (2G), OZG_MEM (2048 MiB), OZG_SMP (2),
# OZG_BOOT_TIMEOUT (120 s), OZG_ARC_MAX (268435456 bytes; build time),
# OZG_MIRROR and OZG_SECURITY_MIRROR (the Debian archive and its security
# archive; default: the first of each in this host's own apt sources,
# $OZG_APT_DIR/sources.list.d/*.sources `URIs:`, then sources.list and
# sources.list.d/*.list, so a machine behind a local mirror uses it; no
# mirror is built in). A security archive that is nowhere to be found is
# left out of the guest's sources, with a warning.
set -euo pipefail

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive

CACHE=${OZG_CACHE:-/var/tmp/resync-openzfs-guest}
APT_DIR=${OZG_APT_DIR:-/etc/apt}
MIRROR= SECURITY_MIRROR=
SUITE=bookworm
NDISKS=${OZG_DISKS:-3}
DISK_SIZE=${OZG_DISK_SIZE:-2G}
MEM=${OZG_MEM:-2048}
SMP=${OZG_SMP:-2}
BOOT_TIMEOUT=${OZG_BOOT_TIMEOUT:-120}
ARC_MAX=${OZG_ARC_MAX:-268435456}
# Bump when a recipe changes: a cache stage built by another recipe is redone.
# PKG_RECIPE covers debootstrap and packages (slow), CONFIG_RECIPE the guest's
# configuration and the image (seconds).
PKG_RECIPE=1
CONFIG_RECIPE=2

ROOTFS=$CACHE/rootfs
STAMPS=$CACHE/stamps
DEFAULT_STATE=$CACHE/run
MARKER=.openzfs-guest-state

log() { printf '[openzfs-guest %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- build ----

# The Debian mirrors in an apt configuration directory (default $APT_DIR), as
# "main URI" and "security URI" lines: for every enabled `deb` source, its
# first URI, "security" for a -security suite and "main" for any other.
# deb822 files (sources.list.d/*.sources) come first, then one-line ones
# (sources.list, sources.list.d/*.list), each in name order.
apt_mirrors() {
  local dir=${1:-$APT_DIR} f
  local deb822=() oneline=()
  for f in "$dir"/sources.list.d/*.sources; do [[ -f $f ]] && deb822+=("$f"); done
  [[ -f $dir/sources.list ]] && oneline+=("$dir/sources.list")
  for f in "$dir"/sources.list.d/*.list; do [[ -f $f ]] && oneline+=("$f"); done
  if ((${#deb822[@]})); then
    awk '
      function flush(   i, n, s) {
        if (deb && uri != "" && enabled) {
          n = split(suites, s, /[ \t]+/)
          for (i = 1; i <= n; i++) if (s[i] != "") print (s[i] ~ /-security$/ ? "security" : "main"), uri
        }
        deb = 0; uri = ""; suites = ""; enabled = 1
      }
      BEGIN { enabled = 1 }
      FNR == 1 { flush() }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "suites:" { suites = ""; for (i = 2; i <= NF; i++) suites = suites " " $i }
      tolower($1) == "enabled:" { enabled = (tolower($2) != "no") }
      END { flush() }
    ' "${deb822[@]}"
  fi
  if ((${#oneline[@]})); then
    awk '
      $1 != "deb" { next }
      {
        line = $0
        sub(/^[ \t]*deb[ \t]+/, "", line)
        if (line ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", line)
        split(line, w, /[ \t]+/)
        if (w[1] != "" && w[2] != "") print (w[2] ~ /-security$/ ? "security" : "main"), w[1]
      }
    ' "${oneline[@]}"
  fi
}

# Sets MIRROR and SECURITY_MIRROR: the OZG_ variables, else the host's own.
resolve_mirrors() {
  local found
  found=$(apt_mirrors "$APT_DIR")
  MIRROR=${OZG_MIRROR:-$(awk '$1 == "main" { print $2; exit }' <<<"$found")}
  SECURITY_MIRROR=${OZG_SECURITY_MIRROR:-$(awk '$1 == "security" { print $2; exit }' <<<"$found")}
  MIRROR=${MIRROR%/} SECURITY_MIRROR=${SECURITY_MIRROR%/}
  [[ -n $MIRROR ]] ||
    die "no Debian mirror in $APT_DIR's sources (sources.list.d/*.sources, sources.list); set OZG_MIRROR"
  [[ -n $SECURITY_MIRROR ]] ||
    log "WARNING: no -security source in $APT_DIR; the guest gets no security archive (set OZG_SECURITY_MIRROR)"
}

cmd_mirrors() {
  resolve_mirrors
  echo "main $MIRROR"
  if [[ -n $SECURITY_MIRROR ]]; then echo "security $SECURITY_MIRROR"; fi
}

# Host packages: debootstrap and QEMU. qemu-system-x86 must match qemu-utils:
# when the host's qemu-utils came from bookworm-backports, take QEMU from there
# too, or apt resolves the conflict by removing qemu-utils.
host_deps() {
  local need=()
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
  command -v ssh-keygen >/dev/null || need+=(openssh-client)
  command -v ss >/dev/null || need+=(iproute2)
  command -v flock >/dev/null || need+=(util-linux)
  local qemu_target=()
  if ! command -v qemu-system-x86_64 >/dev/null; then
    need+=(qemu-system-x86)
    command -v qemu-img >/dev/null || need+=(qemu-utils)
    if dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null | grep -q 'bpo12'; then
      enable_host_backports
      qemu_target=(-t "$SUITE-backports")
    fi
  fi
  ((${#need[@]})) || return 0
  log "installing host packages: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${qemu_target[@]}" "${need[@]}" >/dev/null
}

enable_host_backports() {
  if ! grep -rqs "$SUITE-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding $SUITE-backports to the host's apt sources"
    cat >/etc/apt/sources.list.d/resync-backports.sources <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
}

stage_recipe() { if [[ $1 == image ]]; then echo "$CONFIG_RECIPE"; else echo "$PKG_RECIPE"; fi; }
stage_done() { [[ -f $STAMPS/$1 ]] && [[ $(cat "$STAMPS/$1") == "$(stage_recipe "$1")" ]]; }
stage_mark() { mkdir -p "$STAMPS"; stage_recipe "$1" >"$STAMPS/$1"; }

CHROOT_MOUNTED=0
chroot_mount() {
  mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
  mountpoint -q "$ROOTFS/sys" || mount -t sysfs sysfs "$ROOTFS/sys"
  mountpoint -q "$ROOTFS/dev" || mount --bind /dev "$ROOTFS/dev"
  mountpoint -q "$ROOTFS/dev/pts" || mount -t devpts devpts "$ROOTFS/dev/pts" -o newinstance,ptmxmode=0666
  CHROOT_MOUNTED=1
}
chroot_umount() {
  ((CHROOT_MOUNTED)) || return 0
  local m
  for m in dev/pts dev sys proc; do
    mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m"
  done
  CHROOT_MOUNTED=0
}
in_chroot() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  LC_ALL=C DEBIAN_FRONTEND=noninteractive HOME=/root "$@"; }
chroot_apt() { in_chroot apt-get -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "$@"; }

# No service starts inside the chroot, and `modprobe` is a no-op there:
# zfsutils-linux's install runs `modprobe zfs`, which would act on the host.
chroot_guard() {
  printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
  chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
  if ! in_chroot dpkg-divert --list /sbin/modprobe | grep -q .; then
    in_chroot dpkg-divert --local --rename --divert /sbin/modprobe.real --add /sbin/modprobe
  fi
  printf '#!/bin/sh\n# guarded by openzfs-guest.sh during the image build\nexit 0\n' \
    >"$ROOTFS/sbin/modprobe"
  chmod 755 "$ROOTFS/sbin/modprobe"
}
# Undo the guard before the initrd is built: mkinitramfs copies /sbin/modprobe
# into the initrd, and a no-op one there breaks the boot.
chroot_unguard() {
  if in_chroot dpkg-divert --list /sbin/modprobe | grep -q .; then
    rm -f "$ROOTFS/sbin/modprobe"
    in_chroot dpkg-divert --local --rename --divert /sbin/modprobe.real --remove /sbin/modprobe
  fi
  rm -f "$ROOTFS/usr/sbin/policy-rc.d"
  [[ -L $ROOTFS/sbin/modprobe || -x $ROOTFS/sbin/modprobe ]] || die "chroot has no /sbin/modprobe after unguarding"
  ! grep -q 'guarded by openzfs-guest' "$ROOTFS/sbin/modprobe" 2>/dev/null || die "chroot modprobe is still the guard"
}

build_keys() {
  [[ -f $CACHE/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C resync-openzfs-guest -f "$CACHE/id_ed25519"
  [[ -f $CACHE/ssh_host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N '' -C openzfs-guest -f "$CACHE/ssh_host_ed25519_key"
  chmod 600 "$CACHE/id_ed25519" "$CACHE/ssh_host_ed25519_key"
}

build_debootstrap() {
  stage_done debootstrap && return 0
  log "debootstrap $SUITE (minbase, main+contrib)"
  chroot_umount
  rm -rf "$ROOTFS"
  debootstrap --variant=minbase --components=main,contrib \
    --include=systemd-sysv,udev,kmod,iproute2,openssh-server,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  stage_mark debootstrap
}

write_apt_config() {
  cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main contrib
deb $MIRROR $SUITE-updates main contrib
deb $MIRROR $SUITE-backports main contrib
EOF
  if [[ -n $SECURITY_MIRROR ]]; then
    echo "deb $SECURITY_MIRROR $SUITE-security main contrib" >>"$ROOTFS/etc/apt/sources.list"
  fi
  # OpenZFS 2.3.x from backports (src:zfs-linux only); everything else stays
  # bookworm's.
  cat >"$ROOTFS/etc/apt/preferences.d/zfs-backports" <<EOF
Package: src:zfs-linux
Pin: release n=$SUITE-backports
Pin-Priority: 990
EOF
  cat >"$ROOTFS/etc/apt/apt.conf.d/90resync" <<EOF
APT::Install-Recommends "false";
Acquire::Languages "none";
EOF
}

build_packages() {
  stage_done packages && return 0
  log "installing kernel, headers and OpenZFS in the chroot"
  write_apt_config
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  chroot_mount
  chroot_guard
  # An interrupted earlier run may have left dpkg half-way.
  in_chroot dpkg --configure -a >"$CACHE/packages.log" 2>&1 || true
  chroot_apt update >>"$CACHE/packages.log" 2>&1 || die "apt-get update in chroot failed (log: $CACHE/packages.log)"
  chroot_apt install linux-image-amd64 linux-headers-amd64 >>"$CACHE/packages.log" 2>&1 ||
    { tail -20 "$CACHE/packages.log" >&2; die "kernel install failed"; }
  log "installing zfs-dkms zfsutils-linux (DKMS builds the module: a few minutes)"
  chroot_apt install zfs-dkms zfsutils-linux >>"$CACHE/packages.log" 2>&1 ||
    { tail -30 "$CACHE/packages.log" >&2; die "zfs install failed (log: $CACHE/packages.log)"; }
  local kver zver
  kver=$(guest_kver)
  # shellcheck disable=SC2016 # dpkg's format, not the shell's
  zver=$(in_chroot dpkg-query -W -f '${Version}' zfs-dkms | sed 's/-.*//')
  if ! compgen -G "$ROOTFS/lib/modules/$kver/updates/dkms/zfs.ko*" >/dev/null; then
    log "zfs module missing for $kver: dkms install zfs/$zver"
    in_chroot dkms install "zfs/$zver" -k "$kver" >>"$CACHE/packages.log" 2>&1 ||
      { tail -30 "$CACHE/packages.log" >&2; die "dkms install failed"; }
  fi
  compgen -G "$ROOTFS/lib/modules/$kver/updates/dkms/zfs.ko*" >/dev/null || die "no zfs.ko for $kver after DKMS"
  chroot_apt clean >/dev/null
  stage_mark packages
}

guest_kver() {
  local k
  k=$(find "$ROOTFS/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -1)
  [[ -n $k ]] || die "no kernel in the chroot"
  echo "$k"
}

# Everything about the guest that is not a package: cheap, idempotent, rerun
# whenever the image is rebuilt.
build_config() {
  log "configuring the guest"
  chroot_mount
  chroot_unguard
  local kver
  kver=$(guest_kver)

  echo openzfs-guest >"$ROOTFS/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 openzfs-guest\n' >"$ROOTFS/etc/hosts"
  echo 'nameserver 10.0.2.3' >"$ROOTFS/etc/resolv.conf"
  echo 'LABEL=openzfs-root / ext4 rw,errors=remount-ro 0 1' >"$ROOTFS/etc/fstab"

  mkdir -p "$ROOTFS/etc/systemd/network"
  cat >"$ROOTFS/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
EOF
  in_chroot systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1
  # Units that only slow a TCG boot.
  local u
  for u in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
    in_chroot systemctl mask "$u" >/dev/null 2>&1 || true
  done

  # Cap the ARC: the guest has ~2 GiB.
  echo "options zfs zfs_arc_max=$ARC_MAX" >"$ROOTFS/etc/modprobe.d/zfs.conf"
  in_chroot zgenhostid -f >/dev/null

  # SSH: key-only root login, one fixed host key.
  install -d -m 700 "$ROOTFS/root/.ssh"
  install -m 600 "$CACHE/id_ed25519.pub" "$ROOTFS/root/.ssh/authorized_keys"
  rm -f "$ROOTFS"/etc/ssh/ssh_host_*
  install -m 600 "$CACHE/ssh_host_ed25519_key" "$ROOTFS/etc/ssh/ssh_host_ed25519_key"
  install -m 644 "$CACHE/ssh_host_ed25519_key.pub" "$ROOTFS/etc/ssh/ssh_host_ed25519_key.pub"
  cat >"$ROOTFS/etc/ssh/sshd_config.d/resync.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
MaxSessions 64
MaxStartups 64:30:128
EOF

  # A small initrd: only what mounts a virtio ext4 root.
  sed -i 's/^MODULES=.*/MODULES=list/' "$ROOTFS/etc/initramfs-tools/initramfs.conf"
  printf '%s\n' virtio_pci virtio_blk virtio_net ext4 crc32c_generic >"$ROOTFS/etc/initramfs-tools/modules"
  in_chroot update-initramfs -u -k "$kver" >"$CACHE/initramfs.log" 2>&1 ||
    { tail -20 "$CACHE/initramfs.log" >&2; die "update-initramfs failed"; }
  chroot_umount

  install -m 644 "$ROOTFS/boot/vmlinuz-$kver" "$CACHE/vmlinuz"
  install -m 644 "$ROOTFS/boot/initrd.img-$kver" "$CACHE/initrd.img"
  # shellcheck disable=SC2016 # dpkg's format, not the shell's
  chroot "$ROOTFS" dpkg-query -W -f '${Version}' zfsutils-linux >"$CACHE/zfs-version"
}

build_image() {
  log "making the ext4 root image"
  local mb
  mb=$(du -sm -x "$ROOTFS" | cut -f1)
  rm -f "$CACHE/rootfs.img.tmp"
  truncate -s "$((mb + 1024))M" "$CACHE/rootfs.img.tmp"
  mkfs.ext4 -q -F -L openzfs-root -d "$ROOTFS" "$CACHE/rootfs.img.tmp" ||
    die "mkfs.ext4 -d failed"
  mv -f "$CACHE/rootfs.img.tmp" "$CACHE/rootfs.img"
  stage_mark image
}

build_complete() {
  local f
  stage_done image || return 1
  for f in vmlinuz initrd.img rootfs.img id_ed25519 id_ed25519.pub \
    ssh_host_ed25519_key ssh_host_ed25519_key.pub zfs-version; do
    [[ -s $CACHE/$f ]] || return 1
  done
}

cmd_build() {
  mkdir -p "$CACHE"
  exec 8>"$CACHE/build.lock"
  flock 8
  if build_complete && command -v qemu-system-x86_64 >/dev/null; then
    log "guest image up to date in $CACHE (OpenZFS $(cat "$CACHE/zfs-version"))"
    return 0
  fi
  # The chroot's mounts live in a private mount namespace: they never
  # propagate to the host (whose / may be shared) and vanish with the build.
  if [[ -z ${OZG_BUILD_NS:-} ]]; then
    exec 8>&-
    exec unshare --mount --propagation private env OZG_BUILD_NS=1 bash "$0" build
  fi
  # A cache build is heavy and nobody waits on it interactively: keep it off
  # the other jobs' backs.
  renice -n 10 -p $$ >/dev/null 2>&1 || true
  ionice -c3 -p $$ >/dev/null 2>&1 || true
  local t0=$SECONDS
  trap 'chroot_umount' EXIT
  resolve_mirrors
  host_deps
  build_keys
  rm -f "$STAMPS/image"
  build_debootstrap
  build_packages
  build_config
  build_image
  trap - EXIT
  log "guest image built in $((SECONDS - t0)) s: $CACHE (OpenZFS $(cat "$CACHE/zfs-version"))"
}

# ------------------------------------------------------------- up / down ----

state_dir() { local d=${1:-${OZG_STATE:-$DEFAULT_STATE}}; echo "${d%/}"; }

free_port() {
  local p i
  for i in $(seq 1 50); do
    p=$((20000 + RANDOM % 20000))
    ss -Hltn "sport = :$p" | grep -q . || { echo "$p"; return 0; }
  done
  die "no free TCP port found"
}

guest_ssh_opts() { # STATE_DIR PORT
  printf '%s\n' -o BatchMode=yes -o ConnectTimeout=5 -o LogLevel=ERROR \
    -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$1/known_hosts" \
    -o ControlMaster=no -o ControlPath=none -o IdentitiesOnly=yes \
    -o ServerAliveInterval=5 -o ServerAliveCountMax=6 \
    -i "$CACHE/id_ed25519" -p "$2"
}

qemu_alive() { # PID STATE_DIR
  [[ -n $1 && -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "$2/root.qcow2"
}

# KEY="VALUE": sourceable by sh, and readable by a parser that strips quotes
# (tests/integration/bed.rs). Values never need escaping here; refuse any that
# would.
env_line() {
  [[ $2 != *[\"\$\`\\]* && $2 != *$'\n'* ]] || die "cannot write $1=$2 to env"
  printf '%s="%s"\n' "$1" "$2"
}

cmd_up() {
  local state
  state=$(state_dir "${1:-}")
  build_complete || die "no guest image in $CACHE: run '$0 build' first"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run '$0 build'"
  if [[ -f $state/qemu.pid ]] && qemu_alive "$(cat "$state/qemu.pid")" "$state"; then
    die "a guest is already up for $state (pid $(cat "$state/qemu.pid")); '$0 down $state' first"
  fi
  [[ ! -e $state || -f $state/$MARKER || -z $(ls -A "$state") ]] ||
    die "$state exists and is not a guest state dir"
  rm -rf "$state"
  mkdir -p "$state"
  touch "$state/$MARKER"
  local t0=$SECONDS

  qemu-img create -q -f qcow2 -F raw -b "$CACHE/rootfs.img" "$state/root.qcow2"
  # Explicit devices, root first: PCI slots follow this order, so the root
  # disk is /dev/vda (an if=virtio drive would be placed after them).
  # shellcheck disable=SC2054 # commas belong to QEMU's option syntax
  local drives=(-drive "file=$state/root.qcow2,if=none,id=root,format=qcow2,cache=unsafe"
    -device virtio-blk-pci,drive=root,serial=ozgroot)
  local disks=() i serial
  for ((i = 0; i < NDISKS; i++)); do
    serial=ozgdisk$i
    truncate -s "$DISK_SIZE" "$state/disk$i.img"
    drives+=(-drive "file=$state/disk$i.img,if=none,id=d$i,format=raw,cache=unsafe"
      -device "virtio-blk-pci,drive=d$i,serial=$serial")
    disks+=("/dev/disk/by-id/virtio-$serial")
  done

  local port attempt pid=
  for attempt in 1 2 3; do
    port=$(free_port)
    rm -f "$state/qemu.pid"
    if qemu-system-x86_64 -name "openzfs-guest,process=ozg-$port" \
      -accel tcg -cpu max -smp "$SMP" -m "$MEM" \
      -nodefaults -display none -no-reboot -daemonize \
      -pidfile "$state/qemu.pid" -serial "file:$state/console.log" \
      -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initrd.img" \
      -append "root=LABEL=openzfs-root rw console=ttyS0 panic=-1 quiet" \
      "${drives[@]}" \
      -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" \
      -device virtio-net-pci,netdev=n0 \
      2>"$state/qemu.err"; then
      pid=$(cat "$state/qemu.pid")
      break
    fi
    log "qemu failed to start on port $port (attempt $attempt): $(tr '\n' ' ' <"$state/qemu.err")"
  done
  [[ -n $pid ]] || die "could not start qemu (see $state/qemu.err)"
  # Whatever goes wrong from here on (a failed check, an interrupt), no guest
  # is left running; the state dir stays for its console log until `down`.
  trap 'kill "$pid" 2>/dev/null || true' EXIT

  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$CACHE/ssh_host_ed25519_key.pub")" >"$state/known_hosts"
  local opts
  mapfile -t opts < <(guest_ssh_opts "$state" "$port")
  log "guest booting (pid $pid, ssh port $port), waiting for SSH up to ${BOOT_TIMEOUT}s"
  local ready=0
  while ((SECONDS - t0 < BOOT_TIMEOUT)); do
    if ! qemu_alive "$pid" "$state"; then
      tail -30 "$state/console.log" >&2 || true
      die "qemu (pid $pid) died while booting; console: $state/console.log"
    fi
    if timeout 15 ssh "${opts[@]}" root@127.0.0.1 true </dev/null 2>/dev/null; then
      ready=1
      break
    fi
    sleep 2
  done
  if ((!ready)); then
    tail -30 "$state/console.log" >&2 || true
    die "guest gave no SSH within ${BOOT_TIMEOUT}s; console: $state/console.log"
  fi
  local t_ssh=$((SECONDS - t0))
  # ZFS ready too: load the module (slow under TCG) and wait for the disks.
  local zv
  zv=$(timeout 90 ssh "${opts[@]}" root@127.0.0.1 "modprobe zfs && udevadm settle &&
    for d in ${disks[*]}; do test -b \$d || { echo missing \$d >&2; exit 1; }; done &&
    zfs version | head -1" </dev/null) ||
    die "guest booted but ZFS or its disks are not ready; console: $state/console.log"

  {
    echo "# OpenZFS guest: written by scripts/openzfs-guest.sh up; source it."
    env_line GUEST_HOST 127.0.0.1
    env_line GUEST_SSH_PORT "$port"
    env_line GUEST_USER root
    env_line GUEST_KEY "$CACHE/id_ed25519"
    env_line GUEST_KNOWN_HOSTS "$state/known_hosts"
    env_line GUEST_DISKS "${disks[*]}"
    env_line GUEST_QEMU_PID "$pid"
    env_line GUEST_STATE_DIR "$state"
    env_line GUEST_ZFS_VERSION "$zv"
  } >"$state/env.tmp"
  mv "$state/env.tmp" "$state/env"
  trap - EXIT
  log "guest up: ssh after ${t_ssh}s, ZFS ready after $((SECONDS - t0))s ($zv); env: $state/env"
}

cmd_down() {
  local state pid i
  state=$(state_dir "${1:-}")
  [[ -e $state ]] || { log "no guest state at $state"; return 0; }
  [[ -f $state/$MARKER ]] || die "$state is not a guest state dir; not touching it"
  if [[ -f $state/qemu.pid ]]; then
    pid=$(cat "$state/qemu.pid")
    if qemu_alive "$pid" "$state"; then
      kill "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do qemu_alive "$pid" "$state" || break; sleep 0.2; done
      if qemu_alive "$pid" "$state"; then kill -9 "$pid" 2>/dev/null || true; fi
      log "stopped guest pid $pid"
    else
      # It died on its own (a guest kernel panic ends QEMU: panic=-1,
      # -no-reboot): its console says why.
      log "the guest (qemu pid $pid) had already exited; its console's last lines:"
      tail -40 "$state/console.log" >&2 2>/dev/null || true
    fi
  fi
  rm -rf "$state"
  log "removed $state"
}

cmd_status() {
  local state
  state=$(state_dir "${1:-}")
  if build_complete; then
    echo "image: $CACHE (OpenZFS $(cat "$CACHE/zfs-version"), $(du -sh "$CACHE" 2>/dev/null | cut -f1))"
  else
    echo "image: not built ($CACHE)"
  fi
  if [[ -f $state/env ]]; then
    # shellcheck disable=SC1091
    source "$state/env"
    if qemu_alive "$GUEST_QEMU_PID" "$state"; then
      echo "guest: up, pid $GUEST_QEMU_PID, ssh port $GUEST_SSH_PORT, state $state"
      cat "$state/env"
      return 0
    fi
    echo "guest: state at $state but qemu pid $GUEST_QEMU_PID is gone"
    return 1
  fi
  echo "guest: down ($state)"
  return 1
}

cmd_ssh() {
  local state=${OZG_STATE:-$DEFAULT_STATE}
  [[ -f $state/env ]] || die "no guest up at $state (set OZG_STATE)"
  # shellcheck disable=SC1091
  source "$state/env"
  local opts
  mapfile -t opts < <(guest_ssh_opts "$state" "$GUEST_SSH_PORT")
  if (($#)); then
    exec ssh "${opts[@]}" root@127.0.0.1 "$@"
  fi
  exec ssh -t "${opts[@]/BatchMode=yes/BatchMode=no}" root@127.0.0.1
}

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

if [[ ${1:-} == mirrors ]]; then
  cmd_mirrors
  exit
fi
[[ $EUID -eq 0 ]] || die "run as root"
case ${1:-} in
  build) shift; cmd_build "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  ssh) shift; cmd_ssh "$@" ;;
  *) usage ;;
esac
