#!/usr/bin/env bash
# A quick --chunked push benchmark on an existing (shared) test bed, unlike
# bench.sh, which builds its own bed: it never brings a bed up or down.
#   RESYNC_TESTBED=/var/tmp/resync-dev/env scripts/push-bench.sh BIN [MB] [resync options...]
# Writes MB MiB (default 200) of random data to a fresh dataset on host A,
# then times a raw `zfs send | ssh B 'cat > /dev/null'` and
# `BIN --chunked ... A-dataset root@B:dataset`, with the orchestrator's peak
# RSS, and a `top` sample of the busiest processes every 2 s during the run.
set -euo pipefail
BIN=${1:?usage: push-bench.sh BIN [MB] [options...]}
MB=${2:-200}
shift $(($# >= 2 ? 2 : 1))
# shellcheck disable=SC1090
. "${RESYNC_TESTBED:?set RESYNC_TESTBED to the env file of the bed}"
id=pb$$
src=$TB_POOL_A/$id
dst=$TB_POOL_B/$id
tmp=$(mktemp -d /var/tmp/push-bench.XXXXXX)
cleanup() {
	kill "${topper:-}" 2>/dev/null || true
	for d in "$src" "$dst"; do
		for _ in 1 2 3 4 5; do zfs destroy -r "$d" 2>/dev/null && break; sleep 2; done
	done
	rm -rf "$tmp"
}
trap cleanup EXIT
zfs create -o compression=off "$src"
sleep 1
mp=$(zfs get -H -o value mountpoint "$src")
head -c "$((MB * 1024 * 1024))" /dev/urandom >"$mp/data"
sync
zfs snapshot "$src@b1"
bytes=$(zfs send "$src@b1" | wc -c)
now() { date +%s.%N; }
t0=$(now)
zfs send "$src@b1" | "$TB_SSH" "root@$TB_HOST_B" 'cat > /dev/null'
t1=$(now)
raw=$(awk -v b="$bytes" -v a="$t0" -v c="$t1" 'BEGIN { printf "%.1f", b / (c - a) / 1e6 }')
# Deploy the binary first, so that its upload is not timed.
HOME=$TB_HOME "$BIN" --quiet --chunked --tmpdir="$tmp" --dry-run "$src" "root@$TB_HOST_B:$dst" >/dev/null 2>&1 || true
(while sleep 1; do top -b -d 0.5 -n 2 -w 200 | awk "/^top -/{n++} n==2" | sed -n "8,16p"; echo; done ) >"$tmp/top.log" 2>&1 &
topper=$!
# Peak RSS of the helpers and chunk servers (their command lines name $tmp).
(while [[ ! -e $tmp/stop ]] && sleep 0.3; do
	for p in /proc/[0-9]*; do
		c=$( (tr "\0" " " <"$p/cmdline") 2>/dev/null) || continue
		[[ $c == *__chunk-* && $c == *"$tmp"* ]] || continue
		h=$(awk '/^VmHWM/ { print $2 }' "$p/status" 2>/dev/null) || continue
		k=${c#*__chunk-}
		echo "${k%% *} $h"
	done
done | awk '{ if ($2 > m[$1]) m[$1] = $2 } END { for (k in m) print "__chunk-" k, m[k], "KiB" }' >"$tmp/helpers.rss") &
rsser=$!
t0=$(now)
HOME=$TB_HOME /usr/bin/time -f '%M' -o "$tmp/rss" \
	"$BIN" --no-sync-snap --chunked --tmpdir="$tmp" "$@" "$src" "root@$TB_HOST_B:$dst" 2>&1 | grep -E "MiB in|^chunked:" || true
t1=$(now)
kill "$topper" 2>/dev/null || true
touch "$tmp/stop"
wait "$rsser" 2>/dev/null || true
chunked=$(awk -v b="$bytes" -v a="$t0" -v c="$t1" 'BEGIN { printf "%.1f", b / (c - a) / 1e6 }')
ratio=$(awk -v a="$chunked" -v b="$raw" 'BEGIN { printf "%.2f", a / b }')
echo "stream $bytes bytes: raw ssh $raw MB/s, resync --chunked $chunked MB/s (${ratio}x raw), peak RSS $(cat "$tmp/rss") KiB"
echo "peak RSS of the helpers and chunk servers, by kind:"
cat "$tmp/helpers.rss"
echo "busiest processes during the run (top, every second):"
cat "$tmp/top.log"
