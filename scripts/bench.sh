#!/usr/bin/env bash
# bench.sh: resync's throughput as ratios against baselines measured in the
# same run, on the real test bed (zfs-fuse pools, sshd in a network
# namespace). Nothing here is a pass/fail test; it prints Markdown tables
# ready for README (progress goes to stderr, the tables to stdout and to
# $BENCH_OUT, default /var/tmp/resync-bench.md).
#
#   bash scripts/bench.sh                    # 1 GiB stream, about 8 minutes
#   BENCH_SIZE=256M bash scripts/bench.sh    # a quick run
#
# It brings up its own bed (scripts/testbed.sh up, which tears down any
# other bed on this machine) and tears it down on any exit.
#
# Phases, each pushing a `zfs send` stream of random (incompressible) data
# from pool A to host B:
#   plain   over the plain veth link:
#             raw ssh       zfs send | ssh host 'cat > /dev/null' (OpenSSH; the baseline)
#             local recv    zfs send | zfs receive on this machine (zfs-fuse's ceiling)
#             resync        resync --no-sync-snap SRC root@B:DST (default mode, release build)
#             resync chunk  the same with --chunked (default 32 MiB chunks, window 8)
#             resync none   resync --compress=none (the cost of the default compression on
#                           random data: it should switch itself off)
#             syncoid       syncoid 2.3.0 (../shared/anchors/syncoid) --no-sync-snap with its
#                           default options (lzo, mbuffer, pv)
#           plus a no-op run's wall time (a second resync run with nothing to send)
#   delay   the same except local recv, with BENCH_DELAY_MS added to every
#           packet entering host B (scripts/netdelay.sh; the added RTT is
#           measured and printed), and resync --chunked against syncoid
#   cut     resync --chunked, then the default mode, each with host B's link
#           cut (`ip link set ... down`) for BENCH_CUT_SECS mid-transfer: the
#           bytes the link carried to B beyond the stream and beyond an uncut
#           run, and what resync's summary says it re-sent. A run that fails
#           is run again (at most 4 runs; zfs-fuse has no resume tokens).
# Peak RSS: the orchestrator's (GNU time) and, in chunked mode, the chunk
# helpers' (VmHWM from /proc, sampled every 0.2 s while they run).
# Every replica's snapshot GUID is checked against the source's.
#
# Environment:
#   BENCH_SIZE        stream size for plain and cut (NNN[M|G], default 1G;
#                     BENCH_MB=NNN still works)
#   BENCH_DELAY_SIZE  stream size for the delay phase (default: BENCH_SIZE)
#   BENCH_DELAY_MS    delay added to packets entering host B (default 50)
#   BENCH_CUT_SECS    length of the link cut (default 30)
#   BENCH_PHASES      comma-separated subset of plain,delay,cut,compress,scale
#                     (default plain,delay,cut,compress)
#   BENCH_COMPRESS_MB size of the compressible data set (default 300)
#   BENCH_SYNCOID     the syncoid script (default ../shared/anchors/syncoid)
#   BENCH_PLAIN_REPS  rounds of the plain phase, every method once per round
#                     in turn; each keeps its fastest (default 3: zfs-fuse's
#                     speed swings between runs, and a single round favours
#                     whoever runs last)
#   BENCH_STATE       state dir of the bed (default /var/tmp/resync-bench)
#   BENCH_ENV         use the bed of this env file instead of bringing one up
#                     (never a shared bed: the bench cuts and delays host B's
#                     link and creates and destroys datasets on both pools)
#
# The TB_* variables come from the bed's env file (SC2153); backticks in
# single quotes are Markdown (SC2016).
# shellcheck disable=SC2153,SC2016
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export LC_ALL=C
cd "$(dirname "$0")/.."

log() { printf 'bench: %s\n' "$*" >&2; }
die() {
	printf 'bench: FAILED: %s\n' "$*" >&2
	exit 1
}

mib() { # NNN, NNNM or NNNG -> MiB
	local v=$1 mul=1
	case $v in
	*[gG]) v=${v%?} mul=1024 ;;
	*[mM]) v=${v%?} ;;
	esac
	if ! [[ $v =~ ^[0-9]{1,6}$ ]] || ((10#$v == 0)); then
		die "bad size '$1' (want e.g. 256M or 1G)"
	fi
	echo $((10#$v * mul))
}

MB=$(mib "${BENCH_SIZE:-${BENCH_MB:-1024}}")
DELAY_MB=$(mib "${BENCH_DELAY_SIZE:-${MB}M}")
DELAY_MS=${BENCH_DELAY_MS:-50}
CUT_SECS=${BENCH_CUT_SECS:-30}
PLAIN_REPS=${BENCH_PLAIN_REPS:-3}
[[ $PLAIN_REPS =~ ^[1-9][0-9]?$ ]] || die "BENCH_PLAIN_REPS must be 1 to 99, not $PLAIN_REPS"
PHASES=,${BENCH_PHASES:-plain,delay,cut,compress},
COMPRESS_MB=${BENCH_COMPRESS_MB:-300}
[[ $COMPRESS_MB =~ ^[1-9][0-9]{0,4}$ ]] || die "BENCH_COMPRESS_MB must be a whole number of MiB"
SYNCOID=${BENCH_SYNCOID:-$(cd .. && pwd)/shared/anchors/syncoid}
STATE=${BENCH_STATE:-/var/tmp/resync-bench}
[[ $DELAY_MS =~ ^[0-9]+$ ]] || die "BENCH_DELAY_MS must be a whole number of ms"
[[ $CUT_SECS =~ ^[0-9]+$ ]] || die "BENCH_CUT_SECS must be a whole number of seconds"
phase() { [[ $PHASES == *,$1,* ]]; }

[[ $(id -u) == 0 ]] || die "run as root (it starts zfs-fuse and network namespaces)"
bash scripts/testbed.sh deps
[[ -r $SYNCOID ]] || die "no syncoid script at $SYNCOID (set BENCH_SYNCOID)"
# syncoid 2.3's perl modules and its default pipeline (lzop, mbuffer, pv).
missing=()
for pkg in libcapture-tiny-perl libconfig-inifiles-perl lzop mbuffer pv; do
	dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v /usr/bin/time >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
if phase delay; then
	bash scripts/netdelay.sh build >/dev/null
fi

log "building the release binary"
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/resync

# ---------------------------------------------------------------------------
# The bed, and cleanup on any exit

OWN_BED=0 BG_PIDS=() LINK_CUT=0 DELAY_ON=0 DATASETS=()
cleanup() {
	local rc=$? pid ds
	set +e
	for pid in "${BG_PIDS[@]}"; do
		kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
	done
	((LINK_CUT)) && ip link set "$TB_LINK_B" up
	((${SHAPED:-0})) && tc qdisc del dev "$TB_LINK_B" root
	((DELAY_ON)) && bash scripts/netdelay.sh off "$TB_NS_B"
	# Also stops any chunk helper still running (its folder vanishes).
	[[ -n ${CHUNK_TMP:-} ]] && rm -rf "$CHUNK_TMP"
	# On a bed of our own its pools go anyway; on another, our datasets.
	if ((!OWN_BED)) && [[ -n ${TB_POOL_B:-} ]]; then
		for ds in "${DATASETS[@]}" $(zfs list -H -o name -d 1 "$TB_POOL_B" 2>/dev/null | grep "^$TB_POOL_B/bench-"); do
			for _ in 1 2 3 4 5 6 7 8 9 10; do
				zfs destroy -r "$ds" 2>/dev/null && break
				zfs list -H -o name "$ds" >/dev/null 2>&1 || break
				sleep 0.3
			done
		done
	fi
	if ((OWN_BED)); then
		bash scripts/testbed.sh down "$STATE" >/dev/null 2>&1 || log "WARNING: testbed.sh down $STATE failed"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${BENCH_ENV:-} ]]; then
	ENV_FILE=$BENCH_ENV
	log "using the existing bed of $ENV_FILE"
else
	# Hold the bed lock for the whole run, as test.sh does: another
	# `testbed.sh up` tears down every bed, ours included, mid-bench.
	TB_ROOT=${TB_ROOT:-/var/tmp/resync-testbed}
	mkdir -p "$TB_ROOT"
	exec 9>"$TB_ROOT/lock"
	if ! flock -n 9; then
		log "another test bed is in use (lock $TB_ROOT/lock); waiting up to 30 min"
		flock -w 1800 9 || die "timed out waiting for $TB_ROOT/lock"
	fi
	export TB_LOCK_HELD=1
	OWN_BED=1
	# Pool B holds one replica at a time (each is checked and destroyed).
	TB_VDEV_SIZE=$((MB * 3 + DELAY_MB + COMPRESS_MB * 2 + 512))M bash scripts/testbed.sh up "$STATE" >/dev/null
	ENV_FILE=$STATE/env
fi
# shellcheck disable=SC1090
. "$ENV_FILE"
WORK=$TB_DIR/bench
mkdir -p "$WORK"
# Chunk helpers and session folders: /var/tmp is one file system for this
# machine and the hosts (their /tmp is a small private tmpfs), and our own
# folder there tells our helpers from any other.
CHUNK_TMP=/var/tmp/resync-bench-chunks
mkdir -p "$CHUNK_TMP"

# ---------------------------------------------------------------------------
# Data

make_source() { # NAME MIB: the snapshot into SNAP
	local ds=$TB_POOL_A/$1 mp
	zfs create -o compression=off "$ds"
	DATASETS+=("$ds")
	sleep 1
	mp=$(zfs get -H -o value mountpoint "$ds")
	log "writing $2 MiB of random data to $ds"
	head -c "$(($2 * 1024 * 1024))" /dev/urandom >"$mp/data"
	sync
	zfs snapshot "$ds@b1"
	SNAP=$ds@b1
}

make_source bench "$MB"
src=$SNAP
bytes=$(zfs send "$src" | wc -c)
guid=$(zfs get -Hp -o value guid "$src")
if ((DELAY_MB == MB)); then
	dsrc=$src dbytes=$bytes dguid=$guid
elif phase delay; then
	make_source bench-delay "$DELAY_MB"
	dsrc=$SNAP
	dbytes=$(zfs send "$dsrc" | wc -c)
	dguid=$(zfs get -Hp -o value guid "$dsrc")
fi

# Checks a replica's GUID, then destroys it (pool B holds one at a time).
check_replica() { # DATASET EXPECTED_GUID
	local got i
	got=$(zfs get -Hp -o value guid "$1@b1" 2>/dev/null) || got=missing
	[[ $got == "$2" ]] || die "$1@b1 has GUID $got, expected $2"
	for ((i = 0; i < 50; i++)); do
		zfs destroy -r "$1" 2>/dev/null && return 0
		sleep 0.2
	done
	zfs destroy -r "$1" || die "cannot destroy $1"
}

# ---------------------------------------------------------------------------
# Measuring

declare -A SECS RSS CPU
now() { echo "$EPOCHREALTIME"; }
busy() { # jiffies (USER_HZ) all cores spent on anything but idle and iowait
	awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat
}
hz=$(getconf CLK_TCK)
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
kib2mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
wire_tx() { cat "/sys/class/net/$TB_LINK_B/statistics/tx_bytes"; }

# Samples the peak RSS (VmHWM) of our chunk helpers into FILE until killed.
rss_watch() { # FILE
	local pid role hwm
	while :; do
		for pid in $(pgrep -f "__chunk-(send|recv) --dir $CHUNK_TMP/" || true); do
			role=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 2p) || continue
			hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
			[[ -n $hwm && $role == __chunk-* ]] && echo "$role $hwm"
		done
		sleep 0.2
	done >"$1"
}
forget() { # PID: no longer ours to kill on exit
	local keep=() p
	for p in "${BG_PIDS[@]}"; do
		[[ $p == "$1" ]] || keep+=("$p")
	done
	BG_PIDS=("${keep[@]}")
}
rss_start() { # FILE
	rss_watch "$1" &
	RSS_PID=$!
	BG_PIDS+=("$RSS_PID")
}
rss_stop() {
	{ kill "$RSS_PID" 2>/dev/null && wait "$RSS_PID" 2>/dev/null; } || true
	forget "$RSS_PID"
}
rss_peak() { # FILE ROLE -> KiB or empty
	awk -v r="$2" '$1 == r && $2 > m { m = $2 } END { if (m) print m }' "$1"
}

# time_it KEY COMMAND...: seconds into SECS[KEY], tx bytes to B into WIRE[KEY].
declare -A WIRE
# CPU[KEY]: busy core-seconds of the whole machine during the run.
time_it() {
	local key=$1 t0 t1 w0 c0 c1
	shift
	w0=$(wire_tx)
	c0=$(busy)
	t0=$(now)
	"$@"
	t1=$(now)
	c1=$(busy)
	local secs cpu
	secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
	cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$hz" 'BEGIN { printf "%.2f", (b - a) / hz }')
	WIRE[$key]=$(($(wire_tx) - w0))
	log "$key took $secs s, $cpu core-s"
	# Repeated runs (BENCH_PLAIN_REPS) keep the fastest.
	if [[ -z ${SECS[$key]:-} ]] || awk -v n="$secs" -v o="${SECS[$key]}" 'BEGIN { exit !(n < o) }'; then
		SECS[$key]=$secs
		CPU[$key]=$cpu
	fi
}
per_gib() { # CORE_SECONDS BYTES
	awk -v c="$1" -v b="$2" 'BEGIN { printf "%.1f", c * 1073741824 / b }'
}

raw() { # SNAPSHOT
	zfs send "$1" | "$TB_SSH" "root@$TB_HOST_B" 'cat > /dev/null'
}
pipeline() { # SNAPSHOT DST: what syncoid runs, without its extras
	zfs send "$1" | "$TB_SSH" "root@$TB_HOST_B" zfs receive "$TB_POOL_B/$2"
}
local_recv() { # SNAPSHOT DST
	zfs send "$1" | zfs receive "$TB_POOL_A/$2"
}
resync_push() { # KEY SNAPSHOT DST [ARGS...]: orchestrator's peak RSS into RSS[KEY]
	local key=$1 snap=$2 dst=$3
	shift 3
	HOME=$TB_HOME /usr/bin/time -f '%M' -o "$WORK/$key.rss" \
		"$BIN" --quiet --no-sync-snap --tmpdir="$CHUNK_TMP" "$@" "${snap%@*}" "root@$TB_HOST_B:$TB_POOL_B/$dst"
	local rss
	rss=$(tail -n 1 "$WORK/$key.rss")
	((${RSS[$key]:-0} >= rss)) || RSS[$key]=$rss
}
chunked_push() { # KEY SNAPSHOT DST: also the helpers' peaks into RSS[KEY/send], RSS[KEY/recv]
	local key=$1
	rss_start "$WORK/$key.helpers"
	resync_push "$@" --chunked
	rss_stop
	local role peak
	for role in send recv; do
		peak=$(rss_peak "$WORK/$key.helpers" "__chunk-$role")
		[[ -n $peak ]] || continue
		((${RSS[$key/$role]:-0} >= peak)) || RSS[$key/$role]=$peak
	done
	[[ -v RSS[$key/send] ]] || RSS[$key/send]=
	[[ -v RSS[$key/recv] ]] || RSS[$key/recv]=
}
syncoid_push() { # SNAPSHOT DST: syncoid 2.3.0 with its default options
	HOME=$TB_HOME perl "$SYNCOID" --quiet --no-sync-snap --no-privilege-elevation \
		--sshkey="$TB_KEY" --sshoption=UserKnownHostsFile="$TB_KNOWN_HOSTS" \
		"${1%@*}" "root@$TB_HOST_B:$TB_POOL_B/$2" >&2
}

rss_cell() { # KEY
	local k=$1 s
	[[ -n ${RSS[$k]:-} ]] || {
		echo ""
		return
	}
	s="$(kib2mib "${RSS[$k]}") MiB"
	if [[ -v RSS[$k/send] ]]; then
		s="orchestrator $s, sender helper $(kib2mib "${RSS[$k/send]:-0}") MiB, receiver helper $(kib2mib "${RSS[$k/recv]:-0}") MiB"
		[[ -n ${RSS[$k/send]} && -n ${RSS[$k/recv]} ]] || s="$s (a helper was not seen)"
	fi
	echo "$s"
}

OUT=$WORK/tables.md
: >"$OUT"
out() { # FORMAT ARGS...
	local fmt=$1
	shift
	# shellcheck disable=SC2059
	printf -- "$fmt" "$@" >>"$OUT"
}

table() { # TITLE STREAM_BYTES BASE_KEY KEY:LABEL...
	local title=$1 b=$2 base=${SECS[$3]} kv key label
	shift 3
	out '\n%s\n\n' "$title"
	out '| method | seconds | MB/s | CPU core-s/GiB | vs raw ssh | peak RSS |\n| --- | ---: | ---: | ---: | ---: | --- |\n'
	for kv in "$@"; do
		key=${kv%%:*} label=${kv#*:}
		out '| %s | %s | %s | %s | %sx | %s |\n' "$label" "${SECS[$key]}" "$(rate "$b" "${SECS[$key]}")" \
			"$(per_gib "${CPU[$key]}" "$b")" "$(ratio "$base" "${SECS[$key]}")" "$(rss_cell "$key")"
	done
}

L_RAW="\`zfs send \\| ssh host 'cat > /dev/null'\` (OpenSSH)"
L_PIPE="\`zfs send \\| ssh host zfs receive\` (OpenSSH pipeline)"
L_LOCAL="\`zfs send \\| zfs receive\` on one machine (zfs-fuse's ceiling)"
L_RESYNC="resync (default mode)"
L_CHUNKED="resync \`--chunked\` (32 MiB chunks, window 8)"
L_RESYNC_NONE="resync \`--compress=none\`"
L_SYNCOID="syncoid $(perl "$SYNCOID" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n 1) (its defaults: lzo, mbuffer)"

# A first chunked run uploads the helper binary to host B; a tiny warm-up
# keeps that upload out of the measured runs.
make_source bench-warm 1
warm=$SNAP
log "warm-up: deploying the chunk helper to host B"
HOME=$TB_HOME "$BIN" --quiet --no-sync-snap --chunked --tmpdir="$CHUNK_TMP" "${warm%@*}" "root@$TB_HOST_B:$TB_POOL_B/bench-warm"
check_replica "$TB_POOL_B/bench-warm" "$(zfs get -Hp -o value guid "$warm")"
# The same for default mode (its compressor runs our binary on host B),
# then a no-op run: a second one with nothing to send.
resync_push warm "$warm" bench-warm
time_it noop resync_push warm "$warm" bench-warm
check_replica "$TB_POOL_B/bench-warm" "$(zfs get -Hp -o value guid "$warm")"

RTT_PLAIN=$(bash scripts/netdelay.sh rtt "$TB_HOST_B" 22 9)

# ---------------------------------------------------------------------------
# Phase: plain link

if phase plain; then
	log "phase plain: $bytes bytes, $PLAIN_REPS round(s)"
	DATASETS+=("$TB_POOL_A/bench-local")
	for ((rep = 1; rep <= PLAIN_REPS; rep++)); do
		time_it raw raw "$src"
		time_it pipe pipeline "$src" bench-pipe
		check_replica "$TB_POOL_B/bench-pipe" "$guid"
		time_it local local_recv "$src" bench-local
		check_replica "$TB_POOL_A/bench-local" "$guid"
		time_it resync resync_push resync "$src" bench-resync
		check_replica "$TB_POOL_B/bench-resync" "$guid"
		time_it resync-none resync_push resync-none "$src" bench-resync --compress=none
		check_replica "$TB_POOL_B/bench-resync" "$guid"
		time_it chunked chunked_push chunked "$src" bench-chunked
		check_replica "$TB_POOL_B/bench-chunked" "$guid"
		time_it syncoid syncoid_push "$src" bench-syncoid
		check_replica "$TB_POOL_B/bench-syncoid" "$guid"
	done
	reps_note=""
	((PLAIN_REPS == 1)) || reps_note=", fastest of $PLAIN_REPS round-robin rounds"
	table "Plain veth link (RTT $RTT_PLAIN ms), $bytes-byte stream ($MB MiB of random data)$reps_note:" "$bytes" raw \
		"raw:$L_RAW" "pipe:$L_PIPE" "local:$L_LOCAL" "resync:$L_RESYNC" "resync-none:$L_RESYNC_NONE" "chunked:$L_CHUNKED" "syncoid:$L_SYNCOID"
fi

# ---------------------------------------------------------------------------
# Phase: delayed link

if phase delay; then
	log "phase delay: +$DELAY_MS ms on packets entering host B, $dbytes bytes"
	DELAY_ON=1
	bash scripts/netdelay.sh on "$TB_NS_B" "$DELAY_MS"
	RTT_DELAY=$(bash scripts/netdelay.sh rtt "$TB_HOST_B" 22 9)
	log "RTT to host B: $RTT_PLAIN ms plain, $RTT_DELAY ms delayed"
	time_it d-raw raw "$dsrc"
	time_it d-pipe pipeline "$dsrc" bench-d-pipe
	check_replica "$TB_POOL_B/bench-d-pipe" "$dguid"
	time_it d-resync resync_push d-resync "$dsrc" bench-d-resync
	check_replica "$TB_POOL_B/bench-d-resync" "$dguid"
	time_it d-chunked chunked_push d-chunked "$dsrc" bench-d-chunked
	check_replica "$TB_POOL_B/bench-d-chunked" "$dguid"
	time_it d-syncoid syncoid_push "$dsrc" bench-d-syncoid
	check_replica "$TB_POOL_B/bench-d-syncoid" "$dguid"
	# Still delayed at the end? (The program could have died; bypass would hide it.)
	RTT_AFTER=$(bash scripts/netdelay.sh rtt "$TB_HOST_B" 22 5)
	bash scripts/netdelay.sh off "$TB_NS_B"
	DELAY_ON=0
	table "$DELAY_MS ms added to packets entering host B (TCP connect RTT measured: $RTT_PLAIN ms plain, $RTT_DELAY ms delayed, $RTT_AFTER ms after the last run), $dbytes-byte stream ($DELAY_MB MiB of random data):" \
		"$dbytes" d-raw "d-raw:$L_RAW" "d-pipe:$L_PIPE" "d-resync:$L_RESYNC" "d-chunked:$L_CHUNKED" "d-syncoid:$L_SYNCOID"
	out '\nresync `--chunked` vs syncoid at +%s ms: %sx (target: at least 2x)\n' "$DELAY_MS" \
		"$(ratio "${SECS[d-syncoid]}" "${SECS[d-chunked]}")"
fi

# ---------------------------------------------------------------------------
# Phase: one link cut mid-transfer

# Runs a push in the background, cuts host B's link for CUT_SECS once 40%
# of the stream crossed, restores it; reruns (foreground) while it fails.
# Sets CUT_WIRE, CUT_RUNS, CUT_RESENT, CUT_SECS_TOTAL.
cut_run() { # KEY DST [ARGS...]
	local key=$1 dst=$2 w0 t0 pid rc=0 i
	shift 2
	local log=$WORK/$key.log
	: >"$log"
	w0=$(wire_tx)
	t0=$(now)
	HOME=$TB_HOME "$BIN" --no-sync-snap --timeout=5m "$@" "${src%@*}" "root@$TB_HOST_B:$TB_POOL_B/$dst" \
		>>"$log" 2>&1 &
	pid=$!
	BG_PIDS+=("$pid")
	while alive "$pid" && (($(wire_tx) - w0 < bytes * 2 / 5)); do
		sleep 0.05
	done
	if alive "$pid"; then
		log "$key: cutting $TB_LINK_B for $CUT_SECS s after $(($(wire_tx) - w0)) bytes"
		LINK_CUT=1
		ip link set "$TB_LINK_B" down
		sleep "$CUT_SECS"
		ip link set "$TB_LINK_B" up
		LINK_CUT=0
	else
		log "WARNING: $key finished before the cut"
	fi
	wait "$pid" || rc=$?
	forget "$pid"
	CUT_RUNS=1
	while ((rc != 0)); do
		((CUT_RUNS < 4)) || die "$key: still failing after $CUT_RUNS runs: $(tail -n 3 "$log")"
		log "$key: run $CUT_RUNS failed ($rc): $(tail -n 1 "$log"); running it again"
		echo "--- rerun" >>"$log"
		CUT_RUNS=$((CUT_RUNS + 1))
		rc=0
		HOME=$TB_HOME "$BIN" --no-sync-snap --timeout=5m "$@" "${src%@*}" "root@$TB_HOST_B:$TB_POOL_B/$dst" \
			>>"$log" 2>&1 || rc=$?
	done
	CUT_SECS_TOTAL=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
	CUT_WIRE=$(($(wire_tx) - w0))
	CUT_RESENT=$(grep -oE '[0-9.]+( ?[KMGTP]?i?B| bytes)? re-sent' "$log" | tail -n 1 | sed 's/ re-sent$//') || true
	[[ -n $CUT_RESENT ]] || CUT_RESENT=n/a
	check_replica "$TB_POOL_B/$dst" "$guid"
	log "$key: $CUT_RUNS run(s), $CUT_SECS_TOTAL s, $CUT_WIRE bytes to B, resync says re-sent: $CUT_RESENT"
}
alive() {
	local st
	st=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
	[[ -n $st && $st != Z && $st != X ]]
}
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }

if phase cut; then
	log "phase cut: $CUT_SECS s link cut, $bytes bytes"
	# Bytes to B of an uncut run of each mode: the plain phase's, or one now.
	if [[ -z ${WIRE[chunked]:-} ]]; then
		time_it chunked chunked_push chunked "$src" bench-chunked
		check_replica "$TB_POOL_B/bench-chunked" "$guid"
	fi
	if [[ -z ${WIRE[resync]:-} ]]; then
		time_it resync resync_push resync "$src" bench-resync
		check_replica "$TB_POOL_B/bench-resync" "$guid"
	fi
	out '\nOne %s s cut of host B'"'"'s link (`ip link set ... down`) once 40%% of a %s-byte stream crossed; bytes the link carried to B (tx counter of its veth, so SSH, TCP and resync'"'"'s own traffic count too):\n\n' \
		"$CUT_SECS" "$bytes"
	out '| method | runs | seconds | MB to B | minus the stream | minus an uncut run | re-sent (resync'"'"'s summary) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n'
	for m in chunked resync; do
		if [[ $m == chunked ]]; then
			cut_run cut-chunked bench-cut-chunked --chunked --tmpdir="$CHUNK_TMP"
			label=$L_CHUNKED
		else
			cut_run cut-resync bench-cut-resync
			label=$L_RESYNC
		fi
		out '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$CUT_RUNS" "$CUT_SECS_TOTAL" "$(mb "$CUT_WIRE")" \
			"$(mb $((CUT_WIRE - bytes)))" "$(mb $((CUT_WIRE - WIRE[$m])))" "$CUT_RESENT"
		[[ $m == chunked ]] && RESENT_WIRE=$((CUT_WIRE - WIRE[$m]))
	done
	out '\n(Uncut runs carried %s MB (chunked) and %s MB (default mode) for the same stream.)\n' \
		"$(mb "${WIRE[chunked]}")" "$(mb "${WIRE[resync]}")"
fi

# ---------------------------------------------------------------------------
# Phase: compressible data over a 100 Mbit/s link

SHAPED=0
unshape() {
	if ((SHAPED)); then
		tc qdisc del dev "$TB_LINK_B" root 2>/dev/null || true
	fi
	SHAPED=0
}
if phase compress; then
	csrc_ds=$TB_POOL_A/bench-tar
	zfs create -o compression=off "$csrc_ds"
	DATASETS+=("$csrc_ds")
	sleep 1
	mp=$(zfs get -H -o value mountpoint "$csrc_ds")
	log "writing $COMPRESS_MB MiB of a tar of /usr to $csrc_ds"
	{ tar -cf - -C / usr 2>/dev/null || true; } | head -c "$((COMPRESS_MB * 1024 * 1024))" >"$mp/usr.tar"
	sync
	zfs snapshot "$csrc_ds@b1"
	csrc=$csrc_ds@b1
	cbytes=$(zfs send "$csrc" | wc -c)
	cguid=$(zfs get -Hp -o value guid "$csrc")
	zstd1=$(zfs send "$csrc" | zstd -1 -T1 -c | wc -c)
	lzo=$(zfs send "$csrc" | lzop -c | wc -c)
	log "phase compress: $cbytes bytes (zstd -1: $zstd1, lzop: $lzo), link to B at 100 Mbit/s"
	tc qdisc add dev "$TB_LINK_B" root tbf rate 100mbit burst 64kb latency 400ms
	SHAPED=1
	time_it c-syncoid syncoid_push "$csrc" bench-c-syncoid
	check_replica "$TB_POOL_B/bench-c-syncoid" "$cguid"
	time_it c-resync resync_push c-resync "$csrc" bench-c-resync
	check_replica "$TB_POOL_B/bench-c-resync" "$cguid"
	time_it c-chunked chunked_push c-chunked "$csrc" bench-c-chunked
	check_replica "$TB_POOL_B/bench-c-chunked" "$cguid"
	unshape
	table "Compressible data: $COMPRESS_MB MiB of a tar of /usr ($cbytes-byte stream; zstd -1 leaves $zstd1 bytes, lzop $lzo) over host B's link shaped to 100 Mbit/s (tc tbf); \"vs raw ssh\" is against syncoid here:" \
		"$cbytes" c-syncoid "c-syncoid:$L_SYNCOID" "c-resync:$L_RESYNC" "c-chunked:$L_CHUNKED"
fi

if phase scale; then
	if [[ -f scripts/bench-scale.sh ]]; then
		log "phase scale: scripts/bench-scale.sh"
		bash scripts/bench-scale.sh >&2 || log "WARNING: scripts/bench-scale.sh failed"
	else
		log "phase scale: no scripts/bench-scale.sh here; skipped"
	fi
fi

# ---------------------------------------------------------------------------
# Issue 10's table and targets

if phase plain; then
	out '\nIssue 10 table (plain link, random data; CPU is busy time of the whole machine per GiB of stream):\n\n'
	out '| method | MB/s | CPU core-s/GiB |\n| --- | ---: | ---: |\n'
	for kv in "pipe:OpenSSH pipeline \`zfs send \\| ssh host zfs receive\`" "syncoid:$L_SYNCOID" \
		"resync:resync default" "resync-none:resync \`--compress=none\`" "chunked:resync \`--chunked\`"; do
		key=${kv%%:*}
		out '| %s | %s | %s |\n' "${kv#*:}" "$(rate "$bytes" "${SECS[$key]}")" "$(per_gib "${CPU[$key]}" "$bytes")"
	done
fi
if [[ -n ${SECS[noop]:-} ]]; then
	out '\nNo-op run (default mode, nothing to send, plain link): %s s\n' "${SECS[noop]}"
fi

# Targets, from the numbers above.
verdict() { [[ $1 == 1 ]] && echo met || echo "NOT met"; }
out '\nTargets:\n'
at_least() { verdict "$(awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t) }')"; }
at_most() { verdict "$(awk -v r="$1" -v t="$2" 'BEGIN { print (r <= t) }')"; }
if phase plain; then
	cpu_pipe=$(per_gib "${CPU[pipe]}" "$bytes")
	for kv in "resync:default:1.2" "chunked:\`--chunked\`:1.6"; do
		IFS=: read -r key what t <<<"$kv"
		r=$(ratio "$(per_gib "${CPU[$key]}" "$bytes")" "$cpu_pipe")
		out '- CPU per GiB, resync %s at most %sx the OpenSSH pipeline: %sx, %s\n' "$what" "$t" "$r" "$(at_most "$r" "$t")"
	done
	for kv in "resync:default:1.5" "chunked:\`--chunked\`:1.0"; do
		IFS=: read -r key what t <<<"$kv"
		r=$(ratio "${SECS[syncoid]}" "${SECS[$key]}")
		out '- LAN throughput, resync %s at least %sx syncoid'"'"'s defaults: %sx, %s\n' "$what" "$t" "$r" "$(at_least "$r" "$t")"
	done
	r=$(awk -v a="${SECS[resync]}" -v b="${SECS[resync-none]}" 'BEGIN { printf "%.1f", (a / b - 1) * 100 }')
	out '- random data, the default compression costs at most 5%% against `--compress=none`: %s%% (%s s vs %s s), %s\n' \
		"$r" "${SECS[resync]}" "${SECS[resync-none]}" "$(at_most "$r" 5)"
fi
if phase delay; then
	r=$(ratio "${SECS[d-syncoid]}" "${SECS[d-chunked]}")
	out '- +%s ms, `--chunked` at least 3x syncoid: %sx, %s\n' "$DELAY_MS" "$r" "$(at_least "$r" 3)"
	r=$(ratio "${SECS[d-pipe]}" "${SECS[d-resync]}")
	out '- +%s ms, default at least 1.0x the OpenSSH pipeline: %sx, %s\n' "$DELAY_MS" "$r" "$(at_least "$r" 1)"
fi
if phase compress; then
	for kv in "c-resync:default mode" "c-chunked:\`--chunked\`"; do
		key=${kv%%:*}
		r=$(ratio "${SECS[c-syncoid]}" "${SECS[$key]}")
		out '- compressible data at 100 Mbit/s, resync %s at least 1.3x syncoid (lzo): %sx (%s s vs %s s), %s\n' \
			"${kv#*:}" "$r" "${SECS[$key]}" "${SECS[c-syncoid]}" "$(at_least "$r" 1.3)"
	done
fi
if phase cut; then
	# Wire bytes carry SSH and TCP overhead: scale by the uncut run's ratio.
	resent=$(awk -v x="$RESENT_WIRE" -v b="$bytes" -v w="${WIRE[chunked]}" 'BEGIN { printf "%.0f", x * b / w }')
	out '- re-sent after the cut at most one chunk (32 MiB = 33.6 MB): about %s MB of stream (%s MB on the wire beyond an uncut run), %s\n' \
		"$(mb "$resent")" "$(mb "$RESENT_WIRE")" "$(verdict "$((resent <= 32 * 1024 * 1024))")"
fi
peak=0 peak_what=""
for k in "${!RSS[@]}"; do
	if [[ -n ${RSS[$k]} ]] && ((RSS[$k] > peak)); then
		peak=${RSS[$k]} peak_what=$k
		case $k in
		*/send) peak_what="${k%/*} sender helper" ;;
		*/recv) peak_what="${k%/*} receiver helper" ;;
		*) peak_what="$k orchestrator" ;;
		esac
	fi
done
if ((peak > 0)); then
	out '- peak RSS of every resync process at most 64 MiB: largest %s MiB (%s), %s\n' "$(kib2mib "$peak")" \
		"$peak_what" "$(verdict "$((peak <= 64 * 1024))")"
fi

out '\nMachine: %s cores (%s), kernel %s, %s; %s.\n' "$(nproc)" \
	"$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" "$(uname -r)" \
	"zfs-fuse $(dpkg-query -W -f '${Version}' zfs-fuse 2>/dev/null || echo '?')" "$(date -u +%F)"
printf '\n'
cat "$OUT"
cp "$OUT" "${BENCH_OUT:-/var/tmp/resync-bench.md}"
