#!/usr/bin/env bash
# netdelay.sh: add a fixed delay to every IPv4 packet entering a network
# namespace (this kernel has no netem). Delaying what enters a host adds
# the delay to every round trip through it; delaying what leaves a sender
# instead collapses TCP throughput (TCP small queues), so don't.
#
#   netdelay.sh on NS DELAY_MS     (re)start: packets entering NS wait DELAY_MS
#   netdelay.sh off NS             stop; idempotent, safe on a dead namespace
#   netdelay.sh status NS          print the delay in force, exit 1 if none
#   netdelay.sh rtt ADDR PORT [N]  median TCP connect time in ms (N tries,
#                                  default 5), from the caller's namespace
#   netdelay.sh build              compile the program, print its path
#
# How: scripts/netdelay/netdelay.c (libnetfilter_queue) runs inside NS and
# holds each packet of NFQUEUE queue $NETDELAY_QUEUE (default 4242; queues
# are per namespace) for DELAY_MS, then accepts it, in order. The rule is
#   iptables -t mangle -I PREROUTING ! -i lo -j NFQUEUE --queue-num Q --queue-bypass
# in NS, added once the program is bound. Fail-safe: --queue-bypass lets
# packets through if the program is gone, the kernel queue fails open when
# full, and a supervisor removes the rule whenever the program exits (also
# `off` removes it). The program is compiled on first use into
# $NETDELAY_CACHE (default /var/tmp/resync-netdelay), keyed by the source's
# hash; libnetfilter-queue-dev is installed with apt-get if missing.
set -euo pipefail
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export LC_ALL=C

SRC=$(cd "$(dirname "$0")" && pwd)/netdelay/netdelay.c
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
CACHE=${NETDELAY_CACHE:-/var/tmp/resync-netdelay}
RUN=${NETDELAY_RUN:-/run/resync-netdelay}
QUEUE=${NETDELAY_QUEUE:-4242}
COMMENT=resync-netdelay

log() { printf 'netdelay: %s\n' "$*" >&2; }
die() {
	printf 'netdelay: FAILED: %s\n' "$*" >&2
	exit 1
}

build() {
	local hash bin
	hash=$(sha256sum "$SRC" | cut -c1-12)
	bin=$CACHE/netdelay-$hash
	if [[ ! -x $bin ]]; then
		if [[ ! -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ]]; then
			log "installing libnetfilter-queue-dev"
			{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
				libnetfilter-queue-dev gcc libc6-dev; } </dev/null >&2 || die "apt-get install libnetfilter-queue-dev failed"
		fi
		command -v gcc >/dev/null || die "gcc is missing"
		mkdir -p "$CACHE"
		gcc -O2 -Wall -Wextra -o "$bin.tmp" "$SRC" -lnetfilter_queue >&2 || die "compiling $SRC failed"
		mv "$bin.tmp" "$bin"
	fi
	echo "$bin"
}

netns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"; }

check_ns() {
	[[ $1 =~ ^[A-Za-z0-9._-]+$ ]] || die "bad namespace name: $1"
	netns_exists "$1" || die "no network namespace $1"
}

rule() { # ACTION(-I|-D|-C) NS
	ip netns exec "$2" iptables -w 5 -t mangle "$1" PREROUTING ! -i lo -m comment --comment "$COMMENT" \
		-j NFQUEUE --queue-num "$QUEUE" --queue-bypass
}

remove_rules() { # NS: every copy of our rule
	local i
	for ((i = 0; i < 10; i++)); do
		rule -D "$1" 2>/dev/null || return 0
	done
}

# Is this pid alive and not a zombie?
alive() {
	local st
	st=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
	[[ -n $st && $st != Z && $st != X ]]
}

# Runs in NS (through ip netns exec): the program, then the rule's removal
# however the program ended. TERM/INT/HUP are passed on to the program.
supervise() { # NS BIN DELAY_MS READY
	local ns=$1 bin=$2 delay=$3 ready=$4 pid rc=0 again
	trap '[[ -n ${pid:-} ]] && kill -TERM "$pid" 2>/dev/null' TERM INT HUP
	"$bin" -q "$QUEUE" -d "$delay" -r "$ready" &
	pid=$!
	# A trapped signal interrupts `wait` (status > 128) while the program
	# still runs: wait again; once it is gone, one more wait gives its status.
	while :; do
		wait "$pid" && rc=0 || rc=$?
		((rc > 128)) || break
		if ! alive "$pid"; then
			again=0
			wait "$pid" 2>/dev/null || again=$?
			((again == 127)) || rc=$again
			break
		fi
	done
	iptables -w 5 -t mangle -D PREROUTING ! -i lo -m comment --comment "$COMMENT" \
		-j NFQUEUE --queue-num "$QUEUE" --queue-bypass 2>/dev/null || true
	log "program for $ns exited ($rc); rule removed"
}

off() {
	local ns=$1 pid i
	[[ $ns =~ ^[A-Za-z0-9._-]+$ ]] || die "bad namespace name: $ns"
	netns_exists "$ns" && remove_rules "$ns"
	if [[ -f $RUN/$ns.pid ]]; then
		pid=$(cat "$RUN/$ns.pid")
		# Only our supervisor: its command line names this script and __supervise.
		if [[ $pid =~ ^[0-9]+$ ]] && grep -qaF -- "__supervise" "/proc/$pid/cmdline" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
			for ((i = 0; i < 50; i++)); do
				alive "$pid" || break
				sleep 0.1
			done
			alive "$pid" && kill -KILL "$pid" 2>/dev/null
		fi
		rm -f "$RUN/$ns.pid" "$RUN/$ns.delay" "$RUN/$ns.ready"
	fi
	# The program itself, if its supervisor was killed hard.
	if [[ -f $RUN/$ns.prog ]]; then
		pid=$(cat "$RUN/$ns.prog")
		if [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == netdelay-* ]]; then
			kill -TERM "$pid" 2>/dev/null || true
		fi
		rm -f "$RUN/$ns.prog"
	fi
	return 0
}

on() {
	local ns=$1 delay=$2 bin i
	check_ns "$ns"
	if ! [[ $delay =~ ^[0-9]{1,5}$ ]] || ((10#$delay > 60000)); then
		die "DELAY_MS must be 0..60000, got '$delay'"
	fi
	delay=$((10#$delay))
	bin=$(build)
	off "$ns"
	mkdir -p "$RUN"
	local ready=$RUN/$ns.ready
	rm -f "$ready"
	setsid ip netns exec "$ns" bash "$SELF" __supervise "$ns" "$bin" "$delay" "$ready" \
		</dev/null >>"$RUN/$ns.log" 2>&1 &
	echo $! >"$RUN/$ns.pid"
	for ((i = 0; i < 100; i++)); do
		[[ -s $ready ]] && break
		alive "$(cat "$RUN/$ns.pid")" || die "the program did not start: $(tail -n 3 "$RUN/$ns.log")"
		sleep 0.05
	done
	[[ -s $ready ]] || {
		off "$ns"
		die "the program did not bind queue $QUEUE in $ns: $(tail -n 3 "$RUN/$ns.log")"
	}
	cp "$ready" "$RUN/$ns.prog"
	echo "$delay" >"$RUN/$ns.delay"
	rule -I "$ns" || {
		off "$ns"
		die "iptables NFQUEUE rule in $ns failed"
	}
	log "packets entering $ns now wait $delay ms (queue $QUEUE, pid $(cat "$ready"))"
}

status() {
	local ns=$1
	check_ns "$ns"
	if rule -C "$ns" 2>/dev/null && [[ -f $RUN/$ns.delay ]] && alive "$(cat "$RUN/$ns.prog" 2>/dev/null || echo x)"; then
		echo "$ns: $(cat "$RUN/$ns.delay") ms"
	else
		echo "$ns: no delay"
		return 1
	fi
}

# Median of N TCP connect times to ADDR:PORT, in ms (one SYN/SYN-ACK round
# trip plus a few microseconds of bash).
rtt() {
	local addr=$1 port=$2 n=${3:-5} i t0 t1 times=()
	if ! [[ $n =~ ^[0-9]{1,4}$ ]] || ((10#$n == 0)); then
		die "N must be a positive integer"
	fi
	for ((i = 0; i < n; i++)); do
		t0=$EPOCHREALTIME
		if { exec 3<>"/dev/tcp/$addr/$port"; } 2>/dev/null; then
			t1=$EPOCHREALTIME
			exec 3>&-
		else
			die "cannot connect to $addr:$port"
		fi
		times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) * 1000 }')")
	done
	printf '%s\n' "${times[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "%.1f\n", v[int((NR + 1) / 2)] }'
}

usage() {
	sed -n '2,12p' "$SELF" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

[[ $(id -u) == 0 ]] || die "run as root"
cmd=${1:-}
shift || true
case $cmd in
on) (($# == 2)) || usage && on "$@" ;;
off) (($# == 1)) || usage && off "$@" ;;
status) (($# == 1)) || usage && status "$@" ;;
rtt) (($# >= 2)) || usage && rtt "$@" ;;
build) build ;;
__supervise) supervise "$@" ;;
*) usage ;;
esac
