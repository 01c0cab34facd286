#!/usr/bin/env bash
# mirrors-test.sh: checks that openzfs-guest.sh takes its Debian mirrors from
# the host's apt sources (deb822 `URIs:` first, then one-line sources.list),
# and that OZG_MIRROR / OZG_SECURITY_MIRROR override them. Needs no root and
# no network: it runs `openzfs-guest.sh mirrors` against sample apt
# directories. Run by scripts/test.sh; exits non-zero on the first mismatch.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
guest=$here/../openzfs-guest.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0

# expect NAME WANT [VAR=VALUE...]: `mirrors` with those variables prints WANT.
expect() {
  local name=$1 want=$2 got
  shift 2
  got=$(env -u OZG_MIRROR -u OZG_SECURITY_MIRROR "$@" bash "$guest" mirrors 2>/dev/null) || got="(failed)"
  if [[ $got == "$want" ]]; then
    echo "ok   $name"
  else
    printf 'FAIL %s\n  want: %q\n  got:  %q\n' "$name" "$want" "$got"
    fails=$((fails + 1))
  fi
}

# A deb822 host (like Debian 12's debian.sources) behind a local mirror, with
# a deb-src stanza, a disabled stanza and comments in the way.
d=$tmp/deb822
mkdir -p "$d/sources.list.d"
cat >"$d/sources.list.d/debian.sources" <<'EOF'
# local mirror
Types: deb-src
URIs: http://src.mirror.test/debian
Suites: bookworm
Components: main

Types: deb
Enabled: no
URIs: http://disabled.mirror.test/debian
Suites: bookworm

Types: deb deb-src
# a comment inside a stanza
URIs: http://mirror.test/debian/ http://second.mirror.test/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.test/debian-security
Suites: bookworm-security
Components: main
EOF
# A one-line file is read after the deb822 ones.
echo "deb http://later.mirror.test/debian bookworm main" >"$d/sources.list"
expect "deb822 URIs: lines" $'main http://mirror.test/debian\nsecurity http://mirror.test/debian-security' \
  OZG_APT_DIR="$d"
expect "OZG_MIRROR overrides the main archive" \
  $'main http://override.test/debian\nsecurity http://mirror.test/debian-security' \
  OZG_APT_DIR="$d" OZG_MIRROR=http://override.test/debian
expect "OZG_SECURITY_MIRROR overrides the security archive" \
  $'main http://mirror.test/debian\nsecurity http://sec.override.test/x' \
  OZG_APT_DIR="$d" OZG_SECURITY_MIRROR=http://sec.override.test/x

# A classic sources.list with options and comments.
d=$tmp/oneline
mkdir -p "$d/sources.list.d"
cat >"$d/sources.list" <<'EOF'
# deb http://commented.mirror.test/debian bookworm main
deb-src http://src.mirror.test/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://classic.mirror.test/debian bookworm main
deb http://classic.mirror.test/security bookworm-security main
EOF
expect "sources.list lines" $'main http://classic.mirror.test/debian\nsecurity http://classic.mirror.test/security' \
  OZG_APT_DIR="$d"

# Without a security source the guest gets none; without any source, or
# with only an override, the override alone counts.
d=$tmp/nosec
mkdir -p "$d"
echo "deb http://only.mirror.test/debian bookworm main" >"$d/sources.list"
expect "no security source" "main http://only.mirror.test/debian" OZG_APT_DIR="$d"
expect "no apt sources at all is an error" "(failed)" OZG_APT_DIR="$tmp/empty"
expect "no apt sources, but OZG_MIRROR" "main http://override.test/debian" \
  OZG_APT_DIR="$tmp/empty" OZG_MIRROR=http://override.test/debian

if ((fails)); then
  echo "mirrors-test.sh: $fails failed"
  exit 1
fi
echo "mirrors-test.sh: all passed"
