#!/usr/bin/env bash
# testbed.sh: a real test bed for resync — real ZFS (zfs-fuse), real sshd,
# real network namespaces. No mocks.
#
#   testbed.sh up     [STATE_DIR]   bring a bed up (cleans stale beds first)
#   testbed.sh down   [STATE_DIR]   tear a bed down (all registered beds if no
#                                   STATE_DIR); idempotent
#   testbed.sh status [STATE_DIR]   print the env and check that the bed works
#   testbed.sh deps                 install missing Debian packages only
#
# Layout of one bed (RUNID = 6 hex digits, unique per `up`):
#   pools     rsa$RUNID, rsb$RUNID on sparse file vdevs in STATE_DIR/vdev,
#             mounted under STATE_DIR/mnt
#   bridge    rsbr$RUNID in the root namespace, 10.213.0.1/24
#   hosts     netns rstb${RUNID}a (10.213.0.2) and rstb${RUNID}b (10.213.0.3),
#             joined to the bridge by veth pairs whose root-side ends are
#             rsv${RUNID}a / rsv${RUNID}b (cut a host off with
#             `ip link set rsv${RUNID}a down`); each host runs its own sshd
#             (own host key, key-only root login) in its own mount namespace
#             with a private 1 GiB tmpfs on /tmp and root's ~/.bashrc hidden
#   users     besides root, every host takes the bed's key for rsbackup (sudo
#             without a password for zfs and zpool only), rspasswd (sudo, but
#             with a password) and rsnosudo (no sudo rights): machine-wide
#             accounts and /etc/sudoers.d/resync-testbed, made if missing and
#             left in place
#   client    STATE_DIR/home is a fake HOME: .ssh/id_ed25519, .ssh/known_hosts,
#             .ssh/config (alias backup-alias -> 10.213.0.3)
#   env       STATE_DIR/env, shell-sourceable KEY=VALUE lines (see write_env)
#
# Only one bed is meant to be up at a time: `up` tears down every earlier bed
# it finds (registered under $TB_ROOT/beds, or named by the scheme above)
# before it builds a new one. `up`/`down` serialise on $TB_ROOT/lock; a caller
# that holds that lock itself (scripts/test.sh) sets TB_LOCK_HELD=1.
#
# zfs-fuse is one daemon for the whole machine. `up` starts it only if none is
# running, and `down` stops it only if `up` started it and no pool is left.
set -euo pipefail

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export LC_ALL=C

TB_ROOT=${TB_ROOT:-/var/tmp/resync-testbed}
NET=10.213.0
ROOT_ADDR=$NET.1
HOST_A_ADDR=$NET.2
HOST_B_ADDR=$NET.3
UNUSED_ADDR=$NET.9
VDEV_SIZE=${TB_VDEV_SIZE:-2G}
LOCK_WAIT=${TB_LOCK_WAIT:-1800}

# Names of the scheme, used to find stale leftovers of dead runs.
RE_RUNID='[0-9a-f]{6}'
RE_POOL="^rs[ab]${RE_RUNID}\$"
RE_NETNS="^rstb${RE_RUNID}[ab]\$"
RE_LINK="^rs(br${RE_RUNID}|v${RE_RUNID}[ab]|h${RE_RUNID}[ab])\$"

log() { printf 'testbed: %s\n' "$*" >&2; }
die() {
	printf 'testbed: FAILED: %s\n' "$*" >&2
	exit 1
}

require_root() {
	[[ $(id -u) -eq 0 ]] || die "must run as root (needs ip netns, zfs-fuse, mounts)"
}

# ---------------------------------------------------------------------------
# Packages

# command:package pairs; a missing command pulls in its package.
NEEDED=(
	zfs-fuse:zfs-fuse zfs:zfs-fuse zpool:zfs-fuse
	sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client
	ip:iproute2 tc:iproute2 iptables:iptables
	unshare:util-linux flock:util-linux findmnt:util-linux nsenter:util-linux mount:mount
	pgrep:procps chroot:coreutils sha256sum:coreutils truncate:coreutils
	sudo:sudo visudo:sudo useradd:passwd
)

install_deps() {
	local missing=() pair cmd pkg
	for pair in "${NEEDED[@]}"; do
		cmd=${pair%%:*} pkg=${pair#*:}
		command -v "$cmd" >/dev/null 2>&1 && continue
		[[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
	done
	# syncoid (../shared/anchors/syncoid, for the takeover test) needs two Perl modules.
	perl -MCapture::Tiny -MConfig::IniFiles -e1 2>/dev/null || missing+=(libcapture-tiny-perl libconfig-inifiles-perl)
	((${#missing[@]} == 0)) && return 0
	log "installing missing packages: ${missing[*]}"
	# Keep package scripts from starting system services (sshd on 0.0.0.0:22,
	# a zfs-fuse we would not own); Docker-style images already have this.
	local policy_added=0
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		policy_added=1
	fi
	local rc=0
	{
		apt-get update -q &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
	} </dev/null >&2 || rc=$?
	((policy_added)) && rm -f /usr/sbin/policy-rc.d
	((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
	for pair in "${NEEDED[@]}"; do
		command -v "${pair%%:*}" >/dev/null 2>&1 || die "still missing after install: ${pair%%:*}"
	done
}

# ---------------------------------------------------------------------------
# Locking and registry

take_lock() {
	[[ ${TB_LOCK_HELD:-} == 1 ]] && return 0
	mkdir -p "$TB_ROOT"
	exec 9>"$TB_ROOT/lock"
	if ! flock -n 9; then
		log "another test bed operation holds $TB_ROOT/lock; waiting up to ${LOCK_WAIT}s"
		flock -w "$LOCK_WAIT" 9 || die "timed out waiting for $TB_ROOT/lock"
	fi
}

# Every bed's state dir is registered as $TB_ROOT/beds/RUNID -> STATE_DIR.
registered_dirs() {
	local link
	for link in "$TB_ROOT"/beds/*; do
		[[ -L $link ]] || continue
		readlink "$link"
	done
}

# ---------------------------------------------------------------------------
# Helpers

# A pid is alive if it exists and is not a zombie (the init here reaps
# orphans late, so kill -0 would see dead daemons for seconds).
is_alive() {
	local st
	st=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
	[[ -n $st && $st != Z && $st != X ]]
}

# Local `zfs` processes with an argument naming POOL or a dataset in it.
zfs_pids_on() {
	local pool=$1 pid arg
	for pid in $(pgrep -x zfs); do
		while IFS= read -r -d '' arg; do
			if [[ $arg == "$pool" || $arg == "$pool"/* || $arg == "$pool"@* ]]; then
				echo "$pid"
				break
			fi
		done <"/proc/$pid/cmdline" 2>/dev/null
	done
}

# Kill pids politely (TB_KILL_SIG=KILL: at once), then for sure; waits
# until they are gone.
kill_pids() {
	local pids=("$@") pid i
	((${#pids[@]} == 0)) && return 0
	kill "-${TB_KILL_SIG:-TERM}" "${pids[@]}" 2>/dev/null || true
	for ((i = 0; i < 30; i++)); do
		local alive=0
		for pid in "${pids[@]}"; do is_alive "$pid" && alive=1; done
		((alive)) || return 0
		sleep 0.1
	done
	kill -KILL "${pids[@]}" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		local alive=0
		for pid in "${pids[@]}"; do is_alive "$pid" && alive=1; done
		((alive)) || return 0
		sleep 0.1
	done
	log "WARNING: processes still alive after SIGKILL: ${pids[*]}"
	return 1
}

netns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"; }
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }
pool_exists() { zpool list -H -o name 2>/dev/null | grep -qx -- "$1"; }

# Destroy a pool, retrying while it is busy (a process may still hold a mount).
destroy_pool() {
	local pool=$1 i
	pool_exists "$pool" || return 0
	for ((i = 0; i < 50; i++)); do
		zpool destroy -f "$pool" >/dev/null 2>&1 && return 0
		pool_exists "$pool" || return 0
		sleep 0.2
	done
	zpool destroy -f "$pool" || {
		log "WARNING: could not destroy pool $pool"
		return 1
	}
}

# The vdev paths of a pool (lines of `zpool status` that are absolute paths).
pool_vdevs() { zpool status "$1" 2>/dev/null | awk '$1 ~ /^\// {print $1}'; }

propagation_of_root() { findmnt -n -o PROPAGATION / | tr -d ' '; }

restore_propagation() {
	local orig=$1 flag
	[[ -n $orig ]] || return 0
	[[ $(propagation_of_root) == "$orig" ]] && return 0
	case $orig in
	private) flag=--make-private ;;
	shared) flag=--make-shared ;;
	slave | private,slave) flag=--make-slave ;;
	unbindable) flag=--make-unbindable ;;
	*)
		log "WARNING: unknown original propagation '$orig' of /; leaving it"
		return 0
		;;
	esac
	mount "$flag" / || log "WARNING: could not restore propagation of / to $orig"
}

# Is this pid a zfs-fuse daemon?
is_zfs_fuse() { [[ $(cat "/proc/$1/comm" 2>/dev/null) == zfs-fuse ]]; }

# ---------------------------------------------------------------------------
# Tear down

# Tear down one bed from whatever state it recorded (works on partial state).
down_dir() {
	local dir=$1 failed=0
	local RUNID="" POOL_A="" POOL_B="" NS_A="" NS_B="" LINK_A="" LINK_B="" BRIDGE=""
	local SSHD_PID_A="" SSHD_PID_B="" ZFS_FUSE_PID=""
	if [[ -f $dir/state ]]; then
		# shellcheck disable=SC1091
		source "$dir/state"
	elif [[ ! -e $dir ]]; then
		return 0
	fi
	log "tearing down ${RUNID:-?} ($dir)"

	# 1. Processes: everything in the hosts' network namespaces (sshd and the
	#    sessions it spawned), then recorded sshd pids that escaped somehow.
	local ns pids=() pid
	for ns in $NS_A $NS_B; do
		netns_exists "$ns" && mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null)
	done
	for pid in $SSHD_PID_A $SSHD_PID_B; do
		grep -qaF -- "$dir/" "/proc/$pid/cmdline" 2>/dev/null && pids+=("$pid")
	done
	# Local zfs commands on this bed's pools that a test left behind (a
	# resync killed mid-stream leaves its `zfs send`/`zfs receive`).
	local pool
	for pool in $POOL_A $POOL_B; do
		mapfile -t -O "${#pids[@]}" pids < <(zfs_pids_on "$pool")
	done
	# Nothing in a host needs a graceful stop (sshd takes ~1 s on TERM).
	TB_KILL_SIG=KILL kill_pids "${pids[@]}" || failed=1

	# 2. Pools (only the ones this bed created: checked by their vdev paths).
	for pool in $POOL_A $POOL_B; do
		pool_exists "$pool" || continue
		if pool_vdevs "$pool" | grep -qF -- "$dir/vdev/"; then
			destroy_pool "$pool" || failed=1
		else
			log "WARNING: pool $pool exists but is not on $dir/vdev; not touching it"
		fi
	done

	# 3. Network.
	for ns in $NS_A $NS_B; do
		netns_exists "$ns" && { ip netns delete "$ns" || failed=1; }
	done
	local l
	for l in $LINK_A $LINK_B $BRIDGE; do
		# Deleting a netns removes its veth peer asynchronously: a link that
		# vanished under us is gone, which is what we wanted.
		link_exists "$l" && { ip link delete "$l" 2>/dev/null || ! link_exists "$l" || failed=1; }
	done

	# 4. Mounts left under the state dir (only if zfs-fuse died under us).
	local m
	while read -r m; do
		[[ -n $m ]] && umount -l "$m" 2>/dev/null
	done < <(findmnt -rn -o TARGET | grep -F -- "$dir/" | sort -r)

	# 5. Mount propagation of /, once no other bed needs it shared.
	if [[ -z $(registered_dirs | grep -vxF -- "$dir") ]]; then
		restore_propagation "$(cat "$TB_ROOT/propagation.orig" 2>/dev/null)"
		rm -f "$TB_ROOT/propagation.orig"
	fi

	# 6. zfs-fuse, if this bed started it and nobody else has a pool on it.
	if [[ -n $ZFS_FUSE_PID ]] && is_zfs_fuse "$ZFS_FUSE_PID"; then
		if [[ -z $(zpool list -H -o name 2>/dev/null) ]]; then
			log "stopping zfs-fuse (pid $ZFS_FUSE_PID) that this bed started"
			kill_pids "$ZFS_FUSE_PID" || failed=1
		else
			log "leaving zfs-fuse (pid $ZFS_FUSE_PID) running: other pools use it"
		fi
	fi

	if ((failed)); then
		log "WARNING: $dir not fully torn down; keeping its state for the next down"
		return 1
	fi
	# 7. Files (vdevs, keys, logs) and the registry entry.
	[[ -n $RUNID ]] && rm -f "$TB_ROOT/beds/$RUNID"
	rm -rf -- "$dir"
	return 0
}

# Leftovers named by the scheme that no registered state dir accounts for.
sweep_scheme() {
	local failed=0 name pids=() ns
	while read -r ns; do
		[[ -n $ns ]] || continue
		log "stale netns $ns"
		mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
		TB_KILL_SIG=KILL kill_pids "${pids[@]}" || failed=1
	done < <(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$RE_NETNS")
	# sshds of beds under TB_ROOT whose netns is gone already.
	mapfile -t pids < <(pgrep -f "^(sshd: )?/usr/sbin/sshd .*-f $TB_ROOT/" || true)
	if ((${#pids[@]})); then
		log "stale sshd ${pids[*]}"
		TB_KILL_SIG=KILL kill_pids "${pids[@]}" || failed=1
	fi
	while read -r name; do
		[[ -n $name ]] || continue
		if pool_vdevs "$name" | grep -qF -- "$TB_ROOT/"; then
			log "stale pool $name"
			destroy_pool "$name" || failed=1
		fi
	done < <(zpool list -H -o name 2>/dev/null | grep -E "$RE_POOL")
	while read -r ns; do
		[[ -n $ns ]] && { ip netns delete "$ns" || failed=1; }
	done < <(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$RE_NETNS")
	while read -r name; do
		[[ -n $name ]] || continue
		log "stale link $name"
		link_exists "$name" && { ip link delete "$name" 2>/dev/null || failed=1; }
	done < <(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "$RE_LINK")
	# State dirs of the default layout that are no longer registered.
	local d
	for d in "$TB_ROOT"/*/; do
		d=${d%/}
		[[ -d $d && $(basename "$d") =~ ^${RE_RUNID}$ ]] || continue
		[[ -e $TB_ROOT/beds/$(basename "$d") ]] && continue
		down_dir "$d" || failed=1
	done
	return "$failed"
}

down_all() {
	local failed=0 d
	while read -r d; do
		[[ -n $d ]] && { down_dir "$d" || failed=1; }
	done < <(registered_dirs)
	# Dangling registry links (state dir removed by hand).
	local link
	for link in "$TB_ROOT"/beds/*; do
		[[ -L $link && ! -e $link ]] && rm -f "$link"
	done
	sweep_scheme || failed=1
	return "$failed"
}

# ---------------------------------------------------------------------------
# Bring up

state() { printf '%s=%s\n' "$1" "$2" >>"$STATE/state"; }

start_zfs_fuse() {
	[[ -c /dev/fuse ]] || die "/dev/fuse is missing: zfs-fuse cannot run here"
	# Only a live daemon counts: one that an earlier bed's teardown just
	# killed may linger as a zombie until its parent reaps it.
	local running=() p
	for p in $(pgrep -x zfs-fuse || true); do is_alive "$p" && running+=("$p"); done
	if ((${#running[@]})); then
		log "zfs-fuse already running (pid ${running[*]}); using it"
	else
		log "starting zfs-fuse"
		mkdir -p /var/run/zfs /var/lock/zfs
		# fd 9 is the bed lock: a daemon must not keep holding it.
		setsid zfs-fuse --no-daemon </dev/null >>"$STATE/zfs-fuse.log" 2>&1 9>&- &
		local pid=$!
		state ZFS_FUSE_PID "$pid"
	fi
	local i
	for ((i = 0; i < 100; i++)); do
		zpool list >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	die "zfs-fuse does not answer (zpool list fails); see $STATE/zfs-fuse.log"
}

create_pools() {
	mkdir -p "$STATE/vdev" "$STATE/mnt"
	local pool
	for pool in "$POOL_A" "$POOL_B"; do
		pool_exists "$pool" && die "pool $pool already exists"
		truncate -s "$VDEV_SIZE" "$STATE/vdev/$pool.img"
		zpool create -f -m "$STATE/mnt/$pool" "$pool" "$STATE/vdev/$pool.img" 2>"$STATE/zpool-create.err" ||
			die "zpool create $pool failed: $(cat "$STATE/zpool-create.err")"
		[[ $(zfs get -H -o value mounted "$pool") == yes ]] || die "pool $pool is not mounted"
		mount --make-shared "$STATE/mnt/$pool"
	done
}

make_network() {
	# Our subnet must be free: anything else routing it means an unknown bed.
	local other
	other=$(ip -4 -o addr show to "$NET.0/24" 2>/dev/null | awk '{print $2}' | sort -u | tr '\n' ' ')
	[[ -z $other ]] || die "10.213.0.0/24 is already in use in the root namespace by: $other"
	ip link add "$BRIDGE" type bridge
	ip link set "$BRIDGE" type bridge stp_state 0
	ip addr add "$ROOT_ADDR/24" dev "$BRIDGE"
	ip link set "$BRIDGE" up
	local x ns link peer addr
	for x in a b; do
		if [[ $x == a ]]; then ns=$NS_A link=$LINK_A addr=$HOST_A_ADDR; else ns=$NS_B link=$LINK_B addr=$HOST_B_ADDR; fi
		peer=rsh$RUNID$x
		ip netns add "$ns"
		ip link add "$link" type veth peer name "$peer"
		ip link set "$peer" netns "$ns"
		ip -n "$ns" link set "$peer" name eth0
		ip -n "$ns" addr add "$addr/24" dev eth0
		ip -n "$ns" link set lo up
		ip -n "$ns" link set eth0 up
		ip link set "$link" master "$BRIDGE"
		ip link set "$link" up
	done
}

make_keys() {
	mkdir -p "$TB_HOME/.ssh"
	chmod 700 "$TB_HOME" "$TB_HOME/.ssh"
	ssh-keygen -q -t ed25519 -N '' -C "resync-testbed-client-$RUNID" -f "$KEY" </dev/null
	cp "$KEY.pub" "$STATE/authorized_keys"
	# sshd reads it as the user who logs in (the non-root users too).
	chmod 644 "$STATE/authorized_keys"
	local x
	for x in a b; do
		mkdir -p "$STATE/host-$x"
		ssh-keygen -q -t ed25519 -N '' -C "resync-testbed-host-$x-$RUNID" \
			-f "$STATE/host-$x/ssh_host_ed25519_key" </dev/null
	done
	local kh=$TB_HOME/.ssh/known_hosts
	{
		printf '%s %s\n' "$HOST_A_ADDR" "$(cut -d' ' -f1,2 "$STATE/host-a/ssh_host_ed25519_key.pub")"
		printf '%s %s\n' "$HOST_B_ADDR" "$(cut -d' ' -f1,2 "$STATE/host-b/ssh_host_ed25519_key.pub")"
	} >"$kh"
	# Host B also gets a hashed entry, as `HashKnownHosts yes` would write it.
	local tmp=$STATE/kh-hash
	printf '%s %s\n' "$HOST_B_ADDR" "$(cut -d' ' -f1,2 "$STATE/host-b/ssh_host_ed25519_key.pub")" >"$tmp"
	ssh-keygen -q -H -f "$tmp" >/dev/null 2>&1 || die "ssh-keygen -H failed"
	cat "$tmp" >>"$kh"
	rm -f "$tmp" "$tmp.old"
	chmod 600 "$kh"
	cat >"$TB_HOME/.ssh/config" <<EOF
Host backup-alias
    HostName $HOST_B_ADDR
    User root
    IdentityFile $KEY
EOF
	chmod 600 "$TB_HOME/.ssh/config"
	# A wrapper for scripts and people: OpenSSH reads ~ from the password
	# database, not $HOME, so every path is given explicitly.
	mkdir -p "$STATE/bin"
	cat >"$STATE/bin/tbssh" <<EOF
#!/bin/sh
exec ssh -F '$TB_HOME/.ssh/config' -i '$KEY' -o IdentitiesOnly=yes -o BatchMode=yes \\
    -o UserKnownHostsFile='$TB_HOME/.ssh/known_hosts' -o GlobalKnownHostsFile=/dev/null \\
    -o StrictHostKeyChecking=yes -o ConnectTimeout=5 -o ServerAliveInterval=2 \\
    -o ServerAliveCountMax=3 "\$@"
EOF
	chmod 755 "$STATE/bin/tbssh"
}

# Non-root users for the sudo and delegation tests (see the layout above).
# The zfs the hosts run is the wrapper in /usr/local/sbin, first in sudo's
# secure_path; the Debian paths are there for a run outside the bed.
SUDO_USERS=(rsbackup rspasswd rsnosudo)
make_users() {
	local u
	for u in "${SUDO_USERS[@]}"; do
		id "$u" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$u" ||
			die "cannot create user $u"
		# No password, but not locked: sshd without PAM refuses a locked
		# account ("!" in shadow) even for a key.
		usermod -p '*' "$u" || die "cannot unlock user $u"
	done
	local zfs='/usr/local/sbin/zfs, /usr/local/sbin/zpool, /usr/sbin/zfs, /usr/sbin/zpool'
	local tmp=$STATE/sudoers
	{
		echo '# resync test bed (scripts/testbed.sh): zfs and zpool only.'
		echo "rsbackup ALL=(root) NOPASSWD: $zfs"
		echo "rspasswd ALL=(root) $zfs"
	} >"$tmp"
	visudo -c -q -f "$tmp" || die "the test bed's sudoers file is invalid"
	mkdir -p /etc/sudoers.d
	install -m 440 "$tmp" /etc/sudoers.d/resync-testbed
	rm -f "$tmp"
}

start_host() {
	local x=$1 ns=$2 addr=$3 hd=$STATE/host-$1
	cat >"$hd/sshd_config" <<EOF
ListenAddress $addr
Port 22
HostKey $hd/ssh_host_ed25519_key
PidFile $hd/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
LogLevel VERBOSE
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
	mkdir -p /run/sshd
	chmod 755 /run/sshd
	/usr/sbin/sshd -t -f "$hd/sshd_config" 2>"$hd/sshd-t.err" ||
		die "sshd config of host $x is invalid: $(cat "$hd/sshd-t.err")"
	# zfs and zpool inside a host run in zfs-fuse's own mount namespace.
	# zfs-fuse's client unmounts in the caller's namespace: from a host's
	# slave namespace that unmount never reaches the daemon's, and every
	# remote `zfs destroy` of a mounted dataset fails "dataset is busy". On
	# a real machine there is one namespace; this wrapper around the real
	# binaries restores that, and changes nothing else.
	mkdir -p "$hd/sbin"
	local tool
	for tool in zfs zpool; do
		cat >"$hd/sbin/$tool" <<EOF
#!/bin/sh
# A live daemon (a killed one may linger as a zombie for a while).
pid=
for p in \$(pgrep -x zfs-fuse); do
	case \$(sed -n 's/^State:[[:space:]]*\\([A-Z]\\).*/\\1/p' /proc/\$p/status 2>/dev/null) in
	Z | X | '') ;;
	*) pid=\$p; break ;;
	esac
done
[ -n "\$pid" ] || { echo "$tool: zfs-fuse is not running" >&2; exit 1; }
exec nsenter --mount=/proc/\$pid/ns/mnt -- /usr/sbin/$tool "\$@"
EOF
		chmod 755 "$hd/sbin/$tool"
	done
	# ip netns exec -> own mount namespace (slave of /), unshare -> another
	# slave one with a private tmpfs on /tmp, the zfs wrappers over
	# /usr/local/sbin (first in sshd's PATH for root) and its own hostname
	# (rs-host-a / rs-host-b, resolvable through a private /etc/hosts, as
	# on a real machine: sudo warns on every command otherwise), then sshd. Each step execs, so
	# $! is sshd's pid. setsid: not in the caller's process group.
	# The hosts are plain servers: root's ~/.bashrc (which bash sources for
	# every command sshd runs) is hidden under /dev/null, since this
	# machine's one runs `pyenv init`, about 90 ms per remote command.
	# /tmp holds 1 GiB (memory is only used as files fill it): room for
	# the default --chunked staging (8 x 32 MiB per side) plus a test's own.
	{
		cat /etc/hosts
		printf '127.0.1.1 rs-host-%s\n' "$x"
	} >"$hd/hosts"
	setsid ip netns exec "$ns" unshare --mount --propagation slave --uts \
		sh -c 'hostname "$0" && mount -t tmpfs -o mode=1777,size=1g tmpfs /tmp && mount --bind "$1" /usr/local/sbin && mount --bind "$1/../hosts" /etc/hosts && { [ ! -f "$2" ] || mount --bind /dev/null "$2"; } && shift 2 && exec "$@"' "rs-host-$x" "$hd/sbin" "$(getent passwd root | cut -d: -f6)/.bashrc" \
		/usr/sbin/sshd -D -f "$hd/sshd_config" -E "$hd/sshd.log" \
		</dev/null >>"$hd/sshd.out" 2>&1 9>&- &
	local pid=$!
	state "SSHD_PID_${x^^}" "$pid"
	local i
	for ((i = 0; i < 100; i++)); do
		if ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$addr/22" 2>/dev/null; then
			return 0
		fi
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	die "sshd of host $x ($addr) did not come up: $(tail -n 5 "$hd/sshd.log" "$hd/sshd.out" 2>/dev/null)"
}

write_env() {
	local tmp=$STATE/env.tmp
	cat >"$tmp" <<EOF
# resync test bed $RUNID: written by scripts/testbed.sh up; source it.
TB_RUNID=$RUNID
TB_DIR=$STATE
TB_HOME=$TB_HOME
TB_KEY=$KEY
TB_KNOWN_HOSTS=$TB_HOME/.ssh/known_hosts
TB_SSH_CONFIG=$TB_HOME/.ssh/config
TB_SSH=$STATE/bin/tbssh
TB_POOL_A=$POOL_A
TB_POOL_B=$POOL_B
TB_MNT=$STATE/mnt
TB_ROOT_ADDR=$ROOT_ADDR
TB_HOST_A=$HOST_A_ADDR
TB_HOST_B=$HOST_B_ADDR
TB_ALIAS=backup-alias
TB_ALIAS_HOST=$HOST_B_ADDR
TB_NS_A=$NS_A
TB_NS_B=$NS_B
TB_LINK_A=$LINK_A
TB_LINK_B=$LINK_B
TB_BRIDGE=$BRIDGE
TB_UNUSED_ADDR=$UNUSED_ADDR
TB_SUDO_USER=rsbackup
TB_PASSWD_USER=rspasswd
TB_NOSUDO_USER=rsnosudo
EOF
	mv "$tmp" "$STATE/env"
}

# Checks that prove the bed works; any failure is fatal.
verify() {
	local ssh=$STATE/bin/tbssh x addr out
	for x in a b; do
		[[ $x == a ]] && addr=$HOST_A_ADDR || addr=$HOST_B_ADDR
		out=$("$ssh" "root@$addr" 'zfs list -H -o name' 2>&1) ||
			die "ssh to host $x ($addr) failed: $out"
		grep -qx "$POOL_A" <<<"$out" && grep -qx "$POOL_B" <<<"$out" ||
			die "host $x does not see both pools over ssh; zfs list said: $out"
	done
	out=$("$ssh" backup-alias 'echo alias-ok' 2>&1) || die "ssh to backup-alias failed: $out"
	[[ $out == alias-ok ]] || die "ssh backup-alias: unexpected output: $out"
	out=$("$ssh" "rsbackup@$HOST_B_ADDR" 'sudo -n zfs list -H -o name' 2>&1) ||
		die "rsbackup on host b cannot run zfs through sudo: $out"
	[[ $out == *"$POOL_B"* && $out != *sudo:* ]] ||
		die "sudo zfs list as rsbackup on host b: unexpected output: $out"
	# A dataset mounted after the hosts started must be visible inside them.
	local probe=$POOL_A/tbprobe mp
	zfs create "$probe"
	mp=$(zfs get -H -o value mountpoint "$probe")
	echo "probe-$RUNID" >"$mp/probe"
	for x in a b; do
		[[ $x == a ]] && addr=$HOST_A_ADDR || addr=$HOST_B_ADDR
		out=$("$ssh" "root@$addr" "cat '$mp/probe'" 2>&1) || true
		[[ $out == "probe-$RUNID" ]] ||
			die "host $x cannot see a dataset mounted after it started (mount propagation): $out"
	done
	# zfs-fuse calls a freshly mounted dataset busy for a moment: retry.
	local i
	for ((i = 0; i < 50; i++)); do
		zfs destroy "$probe" 2>/dev/null && return 0
		sleep 0.1
	done
	zfs destroy "$probe" || die "cannot destroy probe dataset $probe"
}

up() {
	local want_dir=${1:-}
	take_lock
	install_deps
	log "cleaning up earlier beds"
	down_all || die "could not clean up an earlier test bed (see warnings above)"

	RUNID=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
	STATE=${want_dir:-$TB_ROOT/$RUNID}
	[[ $STATE == /* ]] || STATE=$PWD/$STATE
	[[ $STATE =~ ^[A-Za-z0-9._/-]+$ ]] || die "state dir must be a plain path: $STATE"
	[[ $STATE == /tmp/* || $STATE == /tmp ]] && die "state dir must not be under /tmp (hosts have a private /tmp): $STATE"
	if [[ -e $STATE ]]; then
		[[ -z $(ls -A "$STATE") ]] || die "state dir $STATE exists and is not empty"
	fi
	mkdir -p "$STATE" "$TB_ROOT/beds"
	ln -sfn "$STATE" "$TB_ROOT/beds/$RUNID"

	POOL_A=rsa$RUNID POOL_B=rsb$RUNID
	NS_A=rstb${RUNID}a NS_B=rstb${RUNID}b
	LINK_A=rsv${RUNID}a LINK_B=rsv${RUNID}b BRIDGE=rsbr$RUNID
	TB_HOME=$STATE/home KEY=$STATE/home/.ssh/id_ed25519
	# Recorded before each thing is made, so that a run killed half-way is
	# still torn down completely by the next up or down.
	: >"$STATE/state"
	state RUNID "$RUNID"
	state POOL_A "$POOL_A"
	state POOL_B "$POOL_B"
	state NS_A "$NS_A"
	state NS_B "$NS_B"
	state LINK_A "$LINK_A"
	state LINK_B "$LINK_B"
	state BRIDGE "$BRIDGE"
	# The propagation of / before any bed changed it; kept until the last
	# bed is down (a bed killed before it wrote its state still left it).
	[[ -s $TB_ROOT/propagation.orig ]] || propagation_of_root >"$TB_ROOT/propagation.orig"

	# From here on, a failure tears down what was built.
	trap 'rc=$?; if ((rc != 0)); then log "up failed; tearing down $STATE"; down_dir "$STATE" || true; fi' EXIT

	log "bed $RUNID in $STATE"
	start_zfs_fuse
	# Mounts that zfs-fuse makes later (zfs receive, zfs create) must reach
	# the hosts' mount namespaces: / shared here, slaves there. Before the
	# pools, so that their root mounts are shared too (a mount propagates
	# only if its parent mount is shared).
	mount --make-shared /
	create_pools
	make_network
	make_keys
	make_users
	start_host a "$NS_A" "$HOST_A_ADDR"
	start_host b "$NS_B" "$HOST_B_ADDR"
	write_env
	verify
	trap - EXIT
	log "up: $STATE/env"
	cat "$STATE/env"
}

down() {
	take_lock
	if [[ -n ${1:-} ]]; then
		local dir=$1
		[[ $dir == /* ]] || dir=$PWD/$dir
		down_dir "$dir" || die "tear down of $dir incomplete"
	else
		down_all || die "tear down incomplete"
	fi
	log "down"
}

status() {
	local dir=${1:-} env
	if [[ -z $dir ]]; then
		dir=$(registered_dirs | head -n 1)
		[[ -n $dir ]] || {
			log "no test bed is up"
			return 1
		}
	fi
	env=$dir/env
	[[ -f $env ]] || die "no env file at $env: bed not up"
	cat "$env"
	# shellcheck disable=SC1090
	source "$env"
	local bad=0 p h
	for p in "$TB_POOL_A" "$TB_POOL_B"; do
		pool_exists "$p" || {
			log "pool $p missing"
			bad=1
		}
	done
	for h in "$TB_HOST_A" "$TB_HOST_B"; do
		"$TB_SSH" "root@$h" true 2>/dev/null || {
			log "host $h does not answer over ssh"
			bad=1
		}
	done
	for p in "$TB_LINK_A" "$TB_LINK_B"; do
		[[ $(cat "/sys/class/net/$p/operstate" 2>/dev/null) == up ]] || log "link $p is not up"
	done
	((bad == 0)) && log "status: ok" || die "status: bed $dir is broken"
}

main() {
	local cmd=${1:-}
	shift || true
	case $cmd in
	up) require_root && up "$@" ;;
	down) require_root && down "$@" ;;
	status) require_root && status "$@" ;;
	deps) require_root && install_deps ;;
	*)
		echo "usage: $0 up|down|status [STATE_DIR] | deps" >&2
		exit 2
		;;
	esac
}

main "$@"
