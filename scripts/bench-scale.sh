#!/usr/bin/env bash
# bench-scale.sh: recursive runs over many datasets, on a bed of its own
# (scripts/testbed.sh), resync against syncoid 2.3.0 (../shared/anchors).
#
#   bench-scale.sh            as root; CARGO_TARGET_DIR as for cargo
#
# Phases (BENCH_SCALE_PHASES, comma-separated; default all three):
#   tree40   N small datasets (BENCH_SCALE_TREE, 40), replicated once by each
#            tool, then a small change in each and an incremental `-r` run
#            with sync snapshots, timed: resync vs syncoid, ratio.
#   noop     M datasets (BENCH_SCALE_NOOP, 500) already on the target
#            (copied with a local zfs send -R), `-r --no-sync-snap`: nothing
#            to send; the whole run is timed.
#   snaps    one dataset with S snapshots (BENCH_SCALE_SNAPS, 5000): resync's
#            first run (full + one -I step) and a second run with nothing to
#            send (listing and planning), each timed with its peak RSS.
# Every resync run is made with --debug, whose last line counts the commands
# each host ran ("commands run: HOST N, ..."); the sums are printed.
# BENCH_SCALE_ARGS: extra resync arguments (e.g. --jobs=1).
# BENCH_SCALE_KEEP=DIR: copy every run's output (with --debug) there.
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export LC_ALL=C

log() { printf 'bench-scale: %s\n' "$*" >&2; }
die() {
	printf 'bench-scale: FAILED: %s\n' "$*" >&2
	exit 1
}
cd "$(dirname "$0")/.."
TREE=${BENCH_SCALE_TREE:-40}
NOOP=${BENCH_SCALE_NOOP:-500}
SNAPS=${BENCH_SCALE_SNAPS:-5000}
PHASES=,${BENCH_SCALE_PHASES:-tree40,noop,snaps},
read -r -a EXTRA <<<"${BENCH_SCALE_ARGS:-}"
for n in "$TREE" "$NOOP" "$SNAPS"; do
	[[ $n =~ ^[1-9][0-9]{0,4}$ ]] || die "dataset and snapshot counts must be 1 to 99999, not $n"
done
phase() { [[ $PHASES == *,$1,* ]]; }
SYNCOID=${BENCH_SYNCOID:-$PWD/../shared/anchors/syncoid}
[[ -r $SYNCOID ]] || SYNCOID=/work/shared/anchors/syncoid
[[ $(id -u) == 0 ]] || die "run as root (it starts zfs-fuse and network namespaces)"

bash scripts/testbed.sh deps
missing=()
for pkg in libcapture-tiny-perl libconfig-inifiles-perl lzop mbuffer pv time; do
	dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
((${#missing[@]} == 0)) || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
log "building the release binary"
cargo build --release --quiet
built=${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/resync
[[ -x $built ]] || built=${CARGO_TARGET_DIR:-$PWD/target}/release/resync
# A copy: a target directory shared with other worktrees may be rebuilt
# under us while the bench runs.
BIN_DIR=$(mktemp -d)
BIN=$BIN_DIR/resync
cp "$built" "$BIN"

# One bed at a time on this machine (as scripts/test.sh): hold the lock.
TB_ROOT=${TB_ROOT:-/var/tmp/resync-testbed}
mkdir -p "$TB_ROOT"
# (bench.sh's scale phase runs this holding the lock already.)
if [[ ${TB_LOCK_HELD:-} != 1 ]]; then
	exec 9>"$TB_ROOT/lock"
	flock -w 1800 9 || die "timed out waiting for $TB_ROOT/lock"
	export TB_LOCK_HELD=1
fi
STATE=${BENCH_STATE:-/var/tmp/resync-bench-scale}
cleanup() {
	local rc=$?
	set +e
	if [[ -n ${BENCH_SCALE_KEEP:-} && -d ${WORK:-} ]]; then
		mkdir -p "$BENCH_SCALE_KEEP" && cp "$WORK"/*.out "$BENCH_SCALE_KEEP"/ 2>/dev/null
	fi
	bash scripts/testbed.sh down "$STATE" >/dev/null 2>&1 || log "WARNING: testbed.sh down $STATE failed"
	rm -rf "$BIN_DIR"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
TB_VDEV_SIZE=3G bash scripts/testbed.sh up "$STATE" >/dev/null
# shellcheck disable=SC1090
. "$STATE/env"
WORK=$TB_DIR/bench-scale
mkdir -p "$WORK"
TARGET=root@$TB_HOST_B

# resync_run KEY ARGS...: times one run into SECS[KEY], its peak RSS (KiB)
# into RSS[KEY] and its commands into CMDS[KEY].
declare -A SECS RSS CMDS
resync_run() {
	local key=$1 start end
	shift
	start=$(date +%s.%N)
	HOME=$TB_HOME /usr/bin/time -f '%M' -o "$WORK/$key.rss" \
		"$BIN" --debug "${EXTRA[@]}" "$@" >"$WORK/$key.out" 2>&1 ||
		{
			tail -n 20 "$WORK/$key.out" >&2
			die "resync $* failed (see $WORK/$key.out)"
		}
	end=$(date +%s.%N)
	SECS[$key]=$(echo "$end - $start" | bc -l)
	RSS[$key]=$(tail -n 1 "$WORK/$key.rss")
	CMDS[$key]=$(grep -o 'commands run: .*' "$WORK/$key.out" | tail -n 1 |
		grep -oE ' [0-9]+(,|$)' | tr -d ', ' | paste -sd+ | bc)
}
syncoid_run() { # KEY ARGS...
	local key=$1 start end
	shift
	start=$(date +%s.%N)
	HOME=$TB_HOME perl "$SYNCOID" --quiet --compress=none --no-privilege-elevation \
		--sshkey="$TB_KEY" --sshoption=UserKnownHostsFile="$TB_KNOWN_HOSTS" "$@" >"$WORK/$key.out" 2>&1 ||
		{
			tail -n 20 "$WORK/$key.out" >&2
			die "syncoid $* failed (see $WORK/$key.out)"
		}
	end=$(date +%s.%N)
	SECS[$key]=$(echo "$end - $start" | bc -l)
}
ratio() { echo "scale=1; $1 / $2" | bc -l; }
secs() { printf '%.2f' "$1"; }

# make_tree ROOT N: ROOT and N children, each with a small file.
make_tree() {
	local root=$1 n=$2 i mp
	zfs create -o compression=off "$root"
	for ((i = 1; i <= n; i++)); do
		zfs create "$(printf '%s/d%05d' "$root" "$i")"
	done
}
# touch_tree ROOT: a small change in every dataset of ROOT.
touch_tree() {
	local ds mp
	for ds in $(zfs list -H -o name -r "$1"); do
		mp=$(zfs get -H -o value mountpoint "$ds")
		head -c 65536 /dev/urandom >"$mp/f.$RANDOM"
	done
	sync
}
# check_tree SRC DST: every dataset under DST has its newest snapshot on
# SRC's counterpart with the same GUID.
check_tree() {
	local src=$1 dst=$2 n=0 ds rel snap sg dg
	for ds in $(zfs list -H -o name -r "$src"); do
		rel=${ds#"$src"}
		snap=$(zfs list -H -o name -t snapshot -r -d 1 "$dst$rel" 2>/dev/null | tail -n 1)
		[[ -n $snap ]] || die "$dst$rel has no snapshot"
		sg=$(zfs get -Hp -o value guid "$ds@${snap#*@}")
		dg=$(zfs get -Hp -o value guid "$snap")
		[[ $sg == "$dg" ]] || die "$snap: GUID $dg, source has $sg"
		n=$((n + 1))
	done
	log "checked $n datasets of $dst by GUID"
}

out() { printf "$@"; }
if phase tree40; then
	log "tree: $TREE datasets"
	make_tree "$TB_POOL_A/t" "$TREE"
	touch_tree "$TB_POOL_A/t"
	resync_run t-first -r "$TB_POOL_A/t" "$TARGET:$TB_POOL_B/rt"
	syncoid_run y-first -r "$TB_POOL_A/t" "$TARGET:$TB_POOL_B/yt"
	sleep 1
	touch_tree "$TB_POOL_A/t"
	resync_run t-incr -r "$TB_POOL_A/t" "$TARGET:$TB_POOL_B/rt"
	syncoid_run y-incr -r "$TB_POOL_A/t" "$TARGET:$TB_POOL_B/yt"
	check_tree "$TB_POOL_A/t" "$TB_POOL_B/rt"
	check_tree "$TB_POOL_A/t" "$TB_POOL_B/yt"
	r_first=$(secs "${SECS[t-first]}")
	y_first=$(secs "${SECS[y-first]}")
	r_incr=$(secs "${SECS[t-incr]}")
	y_incr=$(secs "${SECS[y-incr]}")
	x_incr=$(ratio "${SECS[y-incr]}" "${SECS[t-incr]}")
	out '%s+1 datasets, first run: resync %s s (%s commands), syncoid %s s\n' \
		"$TREE" "$r_first" "${CMDS[t-first]}" "$y_first"
	out '%s+1 datasets, small change each, incremental -r: resync %s s (%s commands), syncoid %s s: %sx\n' \
		"$TREE" "$r_incr" "${CMDS[t-incr]}" "$y_incr" "$x_incr"
fi
if phase noop; then
	log "no-op: $NOOP datasets"
	# Unmounted (mountpoint=none, which send -R carries over): zfs-fuse
	# fails to mount many hundreds more file systems on this bed.
	zfs create -o mountpoint=none "$TB_POOL_A/n"
	for ((i = 1; i <= NOOP; i++)); do
		zfs create "$(printf '%s/n/d%05d' "$TB_POOL_A" "$i")"
	done
	zfs snapshot -r "$TB_POOL_A/n@base"
	zfs send -R "$TB_POOL_A/n@base" | zfs receive "$TB_POOL_B/rn"
	resync_run n-noop -r --no-sync-snap "$TB_POOL_A/n" "$TARGET:$TB_POOL_B/rn"
	grep -q 'up to date' "$WORK/n-noop.out" || die "the no-op run did not say up to date"
	out '%s+1 datasets, nothing to send (-r --no-sync-snap): resync %s s (%s commands)\n' \
		"$NOOP" "$(secs "${SECS[n-noop]}")" "${CMDS[n-noop]}"
fi
if phase snaps; then
	log "snapshots: one dataset with $SNAPS snapshots"
	zfs create "$TB_POOL_A/s"
	for ((i = 1; i <= SNAPS; i++)); do
		zfs snapshot "$(printf '%s@s%05d' "$TB_POOL_A/s" "$i")"
	done
	resync_run s-first --no-sync-snap "$TB_POOL_A/s" "$TARGET:$TB_POOL_B/rs"
	resync_run s-noop --no-sync-snap "$TB_POOL_A/s" "$TARGET:$TB_POOL_B/rs"
	# What of that is zfs-fuse listing the snapshots (each side lists once).
	start=$(date +%s.%N)
	zfs get -Hp -r -o name,property,value guid,createtxg "$TB_POOL_A/s" >/dev/null
	SECS[s-list]=$(echo "$(date +%s.%N) - $start" | bc -l)
	got=$(zfs list -H -t snapshot -r -d 1 -o name "$TB_POOL_B/rs" | wc -l)
	((got == SNAPS)) || die "the target has $got snapshots, not $SNAPS"
	out '%s snapshots, first run (full + one -I): %s s, peak RSS %s MiB (%s commands)\n' "$SNAPS" \
		"$(secs "${SECS[s-first]}")" "$((RSS[s-first] / 1024))" "${CMDS[s-first]}"
	out '%s snapshots, nothing to send (listing + planning): %s s, peak RSS %s MiB (%s commands); one side'"'"'s zfs get -r alone: %s s\n' "$SNAPS" \
		"$(secs "${SECS[s-noop]}")" "$((RSS[s-noop] / 1024))" "${CMDS[s-noop]}" "$(secs "${SECS[s-list]}")"
fi
