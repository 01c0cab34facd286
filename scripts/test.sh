#!/usr/bin/env bash
# test.sh: the whole suite, as root, on a machine of the project's kind.
# Installs missing packages, checks rustfmt and clippy (warnings fail),
# builds (release binary + test binaries), brings
# the test bed up in a fresh state dir (scripts/testbed.sh), runs `cargo
# test` (the bin's unit tests and the `integration` test binary) against it,
# tears the bed down on any exit, and exits with the tests' status.
#
# Environment: TEST_THREADS (default 2); extra args go to the test binaries
# (e.g. `scripts/test.sh smoke::` to filter).
set -euo pipefail

t0=$(date +%s)
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
TB_ROOT=${TB_ROOT:-/var/tmp/resync-testbed}

say() { printf 'test.sh: %s\n' "$*" >&2; }
die() {
	printf 'test.sh: FAILED: %s\n' "$*" >&2
	exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (the test bed needs network namespaces and zfs-fuse)"
command -v cargo >/dev/null || die "cargo not found"

bash scripts/testbed.sh deps || die "could not install the test bed's packages"

say "checking format and lints"
cargo fmt --all -- --check || die "cargo fmt --check: run cargo fmt"
cargo clippy --all-targets --quiet -- -D warnings || die "cargo clippy reports warnings"

say "checking the OpenZFS guest's mirror choice (scripts/guest/mirrors-test.sh)"
bash scripts/guest/mirrors-test.sh >/dev/null || {
	bash scripts/guest/mirrors-test.sh >&2 || true
	die "scripts/guest/mirrors-test.sh failed"
}

say "building"
cargo build --release || die "cargo build --release failed"
cargo test --no-run || die "building the tests failed"
t_build=$(date +%s)

# One bed at a time on this machine: hold the lock from up to down.
mkdir -p "$TB_ROOT"
exec 9>"$TB_ROOT/lock"
if ! flock -n 9; then
	say "another test bed is in use (lock $TB_ROOT/lock); waiting up to 30 min"
	flock -w 1800 9 || die "timed out waiting for $TB_ROOT/lock"
fi
export TB_LOCK_HELD=1

state="$TB_ROOT/test-$(date +%Y%m%d-%H%M%S)-$$"
guest_state="/var/tmp/resync-openzfs-guest/test-$$"
rc=1
t_up=$t_build t_tests=$t_build
finish() {
	local t_down0 t_end
	trap - EXIT INT TERM
	if ((rc != 0)) && [[ -d $state ]]; then
		say "tests failed; last lines of the hosts' sshd logs:"
		tail -n 20 "$state"/host-*/sshd.log >&2 2>/dev/null || true
	fi
	t_down0=$(date +%s)
	if [[ -d $guest_state ]]; then
		bash scripts/openzfs-guest.sh down "$guest_state" >/dev/null ||
			say "WARNING: the OpenZFS guest in $guest_state did not stop cleanly"
	fi
	if ! bash scripts/testbed.sh down "$state"; then
		say "test bed tear down incomplete"
		((rc != 0)) || rc=1
	fi
	t_end=$(date +%s)
	say "run time $((t_end - t0)) s (build $((t_build - t0)) s, bed up $((t_up - t_build)) s," \
		"tests $((t_tests - t_up)) s, bed down $((t_end - t_down0)) s); exit $rc"
	exit "$rc"
}
trap finish EXIT
trap 'rc=130; exit 130' INT
trap 'rc=143; exit 143' TERM

say "bringing the test bed up in $state"
bash scripts/testbed.sh up "$state" >/dev/null || die "the test bed did not come up"
[[ -f $state/env ]] || die "the test bed wrote no env file"
export RESYNC_TESTBED=$state/env

# The real-OpenZFS tier: a QEMU guest (scripts/openzfs-guest.sh). The first
# build on a machine takes about 5 minutes (cached under /var/tmp after);
# booting takes 20-50 s. RESYNC_SKIP_OPENZFS=1 skips the tier, and says so.
skip=()
if [[ ${RESYNC_SKIP_OPENZFS:-} == 1 ]]; then
	say "RESYNC_SKIP_OPENZFS=1: SKIPPING the OpenZFS guest tier (every test named openzfs)"
	skip=(--skip openzfs)
else
	say "building (or finding) and booting the OpenZFS guest"
	bash scripts/openzfs-guest.sh build || die "the OpenZFS guest could not be built (RESYNC_SKIP_OPENZFS=1 skips the tier)"
	bash scripts/openzfs-guest.sh up "$guest_state" || die "the OpenZFS guest did not boot (RESYNC_SKIP_OPENZFS=1 skips the tier)"
	export RESYNC_OPENZFS=$guest_state/env
fi
t_up=$(date +%s)

say "running tests"
set +e
cargo test -- --test-threads="${TEST_THREADS:-2}" "${skip[@]}" "$@" 9>&-
rc=$?
# The SSH transport's live tests start their own sshd on loopback (and cut
# it off with iptables), so they run one at a time, after the rest.
if ((rc == 0)) && [[ $# == 0 ]]; then
	say "running the SSH transport's live tests (own sshd on loopback, one at a time)"
	cargo test --bin resync -- --ignored --test-threads=1 9>&-
	rc=$?
fi
set -e
t_tests=$(date +%s)
