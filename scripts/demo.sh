#!/usr/bin/env bash
# demo.sh: resync end to end on the real test bed, as root.
#   1. build the release binary, bring the test bed up (scripts/testbed.sh)
#   2. write sample data into POOL_A/demo, snapshot
#   3. push a full replication over SSH:   resync POOL_A/demo root@HOST_B:POOL_B/demo
#   4. write more data, snapshot, push again (incremental)
#   5. pull it back:                       resync root@HOST_B:POOL_B/demo POOL_A/demo-back
#   6. print snapshots with GUIDs and file checksums of all three sides,
#      check that they agree, tear the bed down (DEMO_KEEP=1 leaves it up).
# RESYNC=/path/to/binary runs that instead of the release build.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
TB_ROOT=${TB_ROOT:-/var/tmp/resync-testbed}
BIN=${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/resync

say() { printf '\n== %s\n' "$*"; }
die() {
	printf 'demo.sh: FAILED: %s\n' "$*" >&2
	exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
bash scripts/testbed.sh deps
cargo build --release || die "cargo build --release failed"
[[ -x $BIN ]] || die "no binary at $BIN"

mkdir -p "$TB_ROOT"
exec 9>"$TB_ROOT/lock"
flock -w 1800 9 || die "another test bed is in use ($TB_ROOT/lock)"
export TB_LOCK_HELD=1

state="$TB_ROOT/demo-$(date +%Y%m%d-%H%M%S)-$$"
finish() {
	local rc=$?
	trap - EXIT
	if [[ ${DEMO_KEEP:-} == 1 && -f $state/env ]]; then
		echo "demo.sh: test bed left up: source $state/env; scripts/testbed.sh down $state"
	else
		bash scripts/testbed.sh down "$state" || rc=1
	fi
	exit "$rc"
}
trap finish EXIT
bash scripts/testbed.sh up "$state" >/dev/null || die "the test bed did not come up"
# shellcheck disable=SC1091
source "$state/env"

SRC=$TB_POOL_A/demo
DST=$TB_POOL_B/demo
BACK=$TB_POOL_A/demo-back

# resync as a user would run it, with the bed's key and known_hosts in HOME.
run_resync() {
	printf '+ resync %s\n' "$*"
	local t0=$EPOCHREALTIME rc=0
	HOME=$TB_HOME env -u SSH_AUTH_SOCK "${RESYNC:-$BIN}" "$@" </dev/null || rc=$?
	printf '  (exit %s, %s s)\n' "$rc" "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')"
	((rc == 0)) || die "resync $* exited $rc"
}

write_data() {
	local mp=$1 tag=$2
	mkdir -p "$mp/docs" "$mp/blobs/deep"
	head -c 3M /dev/urandom >"$mp/blobs/big-$tag.bin"
	head -c 70000 /dev/urandom >"$mp/blobs/deep/mid-$tag.bin"
	printf 'written in round %s at %s\n' "$tag" "$(date -u +%FT%TZ)" >"$mp/docs/readme-$tag.txt"
	: >"$mp/docs/empty-$tag"
	ln -sfn "readme-$tag.txt" "$mp/docs/latest"
}

must_exist() {
	zfs list -H -o name "$1" >/dev/null 2>&1 || die "resync exited 0 but $1 does not exist"
}

mountpoint_of() {
	local ds=$1
	if [[ $(zfs get -H -o value mounted "$ds") != yes ]]; then zfs mount "$ds"; fi
	zfs get -H -o value mountpoint "$ds"
}

# sha256 of every file under a dataset's mountpoint; $1 = dataset, $2 = host
# (empty: local).
checksums() {
	local ds=$1 host=${2:-} mp cmd
	mp=$(mountpoint_of "$ds")
	cmd="cd '$mp' && find . -path ./.zfs -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum"
	if [[ -n $host ]]; then
		"$TB_SSH" "root@$host" "$cmd"
	else
		sh -c "$cmd"
	fi
}

guids() {
	local ds=$1 host=${2:-}
	if [[ -n $host ]]; then
		"$TB_SSH" "root@$host" "zfs get -Hp -d 1 -o name,value guid '$ds'"
	else
		zfs get -Hp -d 1 -o name,value guid "$ds"
	fi
}

# "snapshot-name guid" lines of a dataset's snapshots, for comparing sides.
snap_guids() { guids "$@" | awk -F'\t' 'index($1, "@") {sub(/.*@/, "", $1); print $1, $2}' | sort; }

say "sample data in $SRC"
zfs create "$SRC"
write_data "$(mountpoint_of "$SRC")" 1
zfs snapshot "$SRC@demo-1"

say "full push to host B ($TB_HOST_B)"
run_resync "$SRC" "root@$TB_HOST_B:$DST"

must_exist "$DST@demo-1"

say "more data, incremental push"
write_data "$(mountpoint_of "$SRC")" 2
rm -f "$(mountpoint_of "$SRC")/blobs/big-1.bin"
zfs snapshot "$SRC@demo-2"
run_resync "$SRC" "root@$TB_HOST_B:$DST"

must_exist "$DST@demo-2"

# --no-sync-snap: copy exactly what B holds. A pull with its own sync
# snapshot would, without a distinct --identifier, prune the push job's sync
# snapshot on B and break the next push (syncoid behaves the same).
say "pull back from host B"
run_resync --no-sync-snap "root@$TB_HOST_B:$DST" "$BACK"
must_exist "$BACK@demo-2"

say "snapshots and GUIDs: $SRC (local)"
guids "$SRC"
say "snapshots and GUIDs: $DST (on host B, over ssh)"
guids "$DST" "$TB_HOST_B"
say "snapshots and GUIDs: $BACK (local)"
guids "$BACK"

say "sha256: $SRC"
checksums "$SRC"
say "sha256: $DST (on host B)"
checksums "$DST" "$TB_HOST_B"
say "sha256: $BACK"
checksums "$BACK"

say "verdict"
ok=1
src_sums=$(checksums "$SRC")
[[ $src_sums == "$(checksums "$DST" "$TB_HOST_B")" ]] || {
	echo "files on host B differ from the source"
	ok=0
}
[[ $src_sums == "$(checksums "$BACK")" ]] || {
	echo "files pulled back differ from the source"
	ok=0
}
for s in demo-1 demo-2; do
	want=$(snap_guids "$SRC" | awk -v s="$s" '$1 == s {print $2}')
	for side in "$DST $TB_HOST_B" "$BACK"; do
		# shellcheck disable=SC2086
		got=$(snap_guids $side | awk -v s="$s" '$1 == s {print $2}')
		[[ -n $want && $got == "$want" ]] || {
			echo "snapshot $s: guid ${got:-missing} on ${side%% *}, source has $want"
			ok=0
		}
	done
done
((ok)) || die "replicas do not match the source"
echo "all three sides hold the same files; demo-1 and demo-2 have the same GUIDs everywhere"
