#!/usr/bin/env bash
# smoke.sh: run inside the OpenZFS guest (openzfs-guest.sh ssh bash -s -- DISK1 DISK2 < smoke.sh).
# Exercises what resync relies on: pools, send size estimates, resumable
# receive, bookmarks, holds. Prints each command and its real output.
set -euo pipefail
SRC_DISK=$1 DST_DISK=$2
P=ozgsrc Q=ozgdst
run() { echo "# $*"; "$@"; }
cleanup() { zpool destroy -f $P 2>/dev/null || true; zpool destroy -f $Q 2>/dev/null || true; }
trap cleanup EXIT
cleanup

run zfs version
run zpool create -f $P "$SRC_DISK"
run zpool create -f $Q "$DST_DISK"
run zpool get -H -o value feature@extensible_dataset,feature@bookmarks $P
run zfs create $P/src
head -c 48M /dev/urandom >/$P/src/a.bin
echo hello >/$P/src/b.txt
run zfs snapshot $P/src@s1
head -c 8M /dev/urandom >/$P/src/c.bin
run zfs snapshot $P/src@s2
run zfs send -nvP $P/src@s1
run zfs send -nvP -i @s1 $P/src@s2
run zfs send -nvP -I @s1 $P/src@s2

echo "# zfs send $P/src@s1 | head -c 20000000 | zfs recv -s $Q/dst"
if zfs send $P/src@s1 | head -c 20000000 | zfs recv -s $Q/dst; then
  echo "cut receive succeeded?!"
  exit 1
fi
echo "# zfs get -H -o value receive_resume_token $Q/dst"
TOKEN=$(zfs get -H -o value receive_resume_token $Q/dst)
echo "$TOKEN"
[[ $TOKEN != - ]] || { echo "no resume token"; exit 1; }
run zfs send -nvP -t "$TOKEN"
echo "# zfs send -t TOKEN | zfs recv -s $Q/dst"
zfs send -t "$TOKEN" | zfs recv -s $Q/dst
run zfs get -H -o value receive_resume_token $Q/dst
echo "# zfs send -i @s1 $P/src@s2 | zfs recv $Q/dst"
zfs send -i @s1 $P/src@s2 | zfs recv $Q/dst

run zfs bookmark $P/src@s2 "$P/src#b2"
run zfs list -H -t bookmark -o name,guid,createtxg $P/src
echo more >/$P/src/d.txt
run zfs snapshot $P/src@s3
run zfs destroy $P/src@s2
run zfs send -nvP -i "#b2" $P/src@s3
echo "# zfs send -i $P/src#b2 $P/src@s3 | zfs recv $Q/dst"
zfs send -i "$P/src#b2" $P/src@s3 | zfs recv $Q/dst

run zfs hold resync $P/src@s3
run zfs holds -H $P/src@s3
echo "# zfs destroy $P/src@s3 (must fail: held)"
if zfs destroy $P/src@s3; then echo "destroy of a held snapshot succeeded?!"; exit 1; fi
run zfs release resync $P/src@s3

echo "# checksums"
a=$(cd /$P/src && find . -type f | sort | xargs md5sum | md5sum)
b=$(cd /$Q/dst && find . -type f | sort | xargs md5sum | md5sum)
echo "src $a"; echo "dst $b"
[[ $a == "$b" ]] || { echo "checksums differ"; exit 1; }
run zfs list -H -t snapshot -o name,guid -r $P $Q
echo "SMOKE OK"
