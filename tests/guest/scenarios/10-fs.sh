# shellcheck shell=bash
# ext4 on an 8 GiB (thin) image: files survive umount, stop and a new start;
# the image is clean after each stop.
# timeout: 300

fvd_prelude
img=$WORK/disk.fvd
mnt=$WORK/mnt
mkdir -p "$mnt"

step "create an 8 GiB image"
run "$FVD" create -s 8G "$img"

step "start"
dev=$("$FVD" start "$img")
[[ $dev == /dev/ublkb* ]] || fail "fvd start printed '$dev', want /dev/ublkbN"
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
[[ -b $dev ]] || fail "$dev is not a block device"
size=$(blockdev --getsize64 "$dev")
[[ $size -eq $((8 << 30)) ]] || fail "$dev is $size bytes, want 8 GiB"
run "$FVD" list
for q in logical_block_size physical_block_size optimal_io_size discard_granularity write_cache fua; do
    printf '  queue/%s = %s\n' "$q" "$(cat /sys/block/ublkb$id/queue/$q)"
done
[[ $(cat /sys/block/ublkb$id/queue/write_cache) == "write back" ]] || fail "write cache not write back"
[[ $(cat /sys/block/ublkb$id/queue/discard_granularity) -eq 65536 ]] || fail "discard granularity is not the block size"

step "mkfs.ext4, mount, write files"
run mkfs.ext4 -q -F "$dev"
mount "$dev" "$mnt"
at_exit "umount $mnt 2>/dev/null || true"
mkdir -p "$mnt/d"
for i in $(seq 1 20); do
    head -c $((i * 37 * 1024)) /dev/urandom >"$mnt/d/f$i"
done
head -c $((24 << 20)) /dev/urandom >"$mnt/big"
(cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/sums"
wc -l <"$WORK/sums"
umount "$mnt"

step "fsck -n"
run fsck.ext4 -n -f "$dev"

step "stop; the image is clean"
run "$FVD" stop -n "$id"
[[ ! -e $dev ]] || fail "$dev still exists after stop"
run "$FVD" check "$img"
"$FVD" info "$img" | tee "$RESULTS/info.txt"
info=$("$FVD" info --output json "$img")
[[ $info == *'"clean": true'* ]] || fail "image not clean after stop"

step "start again (--writethrough), files intact"
dev=$("$FVD" start --writethrough -n "$id" "$img")
[[ $dev == "/dev/ublkb$id" ]] || fail "restart with -n $id gave $dev"
[[ $(cat /sys/block/ublkb$id/queue/write_cache) == "write through" ]] || fail "--writethrough: write cache not write through"
mount "$dev" "$mnt"
(cd "$mnt" && sha256sum --quiet -c "$WORK/sums") || fail "files differ after restart"
umount "$mnt"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"

step "start in the foreground with 4 KiB logical blocks; SIGINT stops it clean"
"$FVD" start --foreground --logical-block-size 4096 "$img" >"$WORK/fg.out" 2>"$RESULTS/fg.log" &
fg=$!
for _ in $(seq 100); do [[ -s $WORK/fg.out ]] && break; sleep 0.1; done
dev=$(head -n 1 "$WORK/fg.out")
[[ $dev == /dev/ublkb* ]] || fail "foreground start printed '$dev'"
[[ $(blockdev --getss "$dev") -eq 4096 ]] || fail "logical block size is $(blockdev --getss "$dev"), want 4096"
mount "$dev" "$mnt"
(cd "$mnt" && sha256sum --quiet -c "$WORK/sums") || fail "files differ on the 4k device"
echo more >"$mnt/more"
umount "$mnt"
kill -INT "$fg"
rc=0
wait "$fg" || rc=$?
[[ $rc -eq 0 ]] || fail "foreground daemon exited $rc after SIGINT"
[[ ! -e $dev ]] || fail "$dev still exists after SIGINT"
[[ -z $("$FVD" list) ]] || fail "fvd list still shows a device"
run "$FVD" check "$img"
info=$("$FVD" info --output json "$img")
[[ $info == *'"clean": true'* ]] || fail "image not clean after SIGINT"
step "ok"
