#!/usr/bin/env bash
# bench.sh: resync's throughput as ratios against baselines measured in the
# same run, on the real test bed (zfs-fuse pools, sshd in a network
# namespace). Nothing here is a pass/fail test; it prints a table.
#
#   bash scripts/bench.sh            # 1024 MiB stream
#   BENCH_MB=256 bash scripts/bench.sh
#
# Rows, each pushing the same `zfs send` stream of BENCH_MB MiB of random
# (incompressible) data from pool A to host B:
#   raw ssh       zfs send | ssh host 'cat > /dev/null'   (OpenSSH; the baseline)
#   local recv    zfs send | zfs receive on this machine   (zfs-fuse's own ceiling)
#   resync        resync --no-sync-snap SRC root@B:DST     (default mode, release build)
#   resync chunk  the same with --chunked (64 MiB chunks, window 4)
#   syncoid       syncoid --no-sync-snap --compress=none   (Debian's sanoid package)
# For resync also its peak RSS (GNU time).
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
cd "$(dirname "$0")/.."

MB=${BENCH_MB:-1024}
STATE=${BENCH_STATE:-/var/tmp/resync-bench}

[[ $(id -u) == 0 ]] || { echo "bench.sh: run as root (it starts zfs-fuse and network namespaces)" >&2; exit 2; }
bash scripts/testbed.sh deps
command -v syncoid >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sanoid >/dev/null
command -v /usr/bin/time >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null

echo "bench: building the release binary" >&2
cargo build --release --quiet
BIN=$PWD/target/x86_64-unknown-linux-gnu/release/resync

TB_VDEV_SIZE=$((MB * 4 + 512))M bash scripts/testbed.sh up "$STATE" >/dev/null
trap 'bash scripts/testbed.sh down "$STATE" >/dev/null 2>&1 || true' EXIT
# shellcheck disable=SC1091
. "$STATE/env"

src=$TB_POOL_A/bench
zfs create -o compression=off "$src"
sleep 1
mp=$(zfs get -H -o value mountpoint "$src")
echo "bench: writing $MB MiB of random data" >&2
head -c "$((MB * 1024 * 1024))" /dev/urandom >"$mp/data"
sync
zfs snapshot "$src@b1"
bytes=$(zfs send "$src@b1" | wc -c)

now() { date +%s.%N; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }
declare -A SECS

time_it() { # NAME COMMAND...
	local name=$1 t0 t1
	shift
	t0=$(now)
	"$@"
	t1=$(now)
	SECS[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
	echo "bench: $name took ${SECS[$name]} s" >&2
}

raw() { zfs send "$src@b1" | "$TB_SSH" "root@$TB_HOST_B" 'cat > /dev/null'; }
local_recv() { zfs send "$src@b1" | zfs receive "$TB_POOL_A/bench-local"; }
resync_push() {
	HOME=$TB_HOME /usr/bin/time -f '%M' -o "$STATE/resync.rss" \
		"$BIN" --quiet --no-sync-snap "$src" "root@$TB_HOST_B:$TB_POOL_B/bench-resync"
}
chunked_push() {
	HOME=$TB_HOME /usr/bin/time -f '%M' -o "$STATE/chunked.rss" \
		"$BIN" --quiet --no-sync-snap --chunked --tmpdir=/var/tmp "$src" "root@$TB_HOST_B:$TB_POOL_B/bench-chunked"
}
syncoid_push() {
	HOME=$TB_HOME syncoid --quiet --no-sync-snap --compress=none --no-privilege-elevation \
		--sshkey="$TB_KEY" --sshoption=UserKnownHostsFile="$TB_KNOWN_HOSTS" \
		"$src" "root@$TB_HOST_B:$TB_POOL_B/bench-syncoid"
}

time_it "raw ssh" raw
time_it "local recv" local_recv
time_it "resync" resync_push
time_it "resync chunk" chunked_push
time_it "syncoid" syncoid_push

# The replicas must be real: same GUID as the source snapshot.
guid=$(zfs get -H -o value guid "$src@b1")
for d in bench-resync bench-chunked bench-syncoid; do
	got=$(zfs get -H -o value guid "$TB_POOL_B/$d@b1")
	[[ $got == "$guid" ]] || { echo "bench: $d@b1 has GUID $got, expected $guid" >&2; exit 1; }
done

base=${SECS["raw ssh"]}
printf '\nstream: %s bytes (%s MiB of random data), host B over veth, %s\n' "$bytes" "$MB" "$(date -u +%F)"
printf '%-12s %8s %10s %12s\n' method seconds MB/s "vs raw ssh"
for name in "raw ssh" "local recv" "resync" "resync chunk" "syncoid"; do
	s=${SECS[$name]}
	printf '%-12s %8s %10s %11sx\n' "$name" "$s" "$(rate "$bytes" "$s")" \
		"$(awk -v a="$base" -v b="$s" 'BEGIN { printf "%.2f", a / b }')"
done
printf 'peak RSS of the orchestrator: resync %s KiB, resync --chunked %s KiB\n' \
	"$(cat "$STATE/resync.rss")" "$(cat "$STATE/chunked.rss")"
