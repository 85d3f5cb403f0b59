# shellcheck shell=bash
# Injected storage faults (dm-flakey): the image sits on a device-mapper device whose
# table is switched at run time between linear (healthy) and flakey with every write
# failing (error_writes). Writes through /dev/ublkbN and a flush fail within seconds
# (never a hang), the daemon stays up and keeps serving reads of acknowledged data;
# once the fault is gone, the image checks clean and holds every acknowledged write.
# Also: fvd create on a device that fails writes gives one error line, quickly.
# Then the same device drops writes silently (drop_writes: the disk acknowledges and
# loses them, as a power cut loses a volatile cache) and the daemon is killed: the
# image checks clean and holds what was acknowledged before the drop began.
# Last, a PV whose backing store (a small tmpfs) runs out: the issue's `fvd create
# --size 4G` on a 16 MiB LV ends quickly and grows the LV only as far as the
# metadata needs; writes through /dev/ublkbN that outrun the tmpfs fail within
# seconds with the daemon up; with room again the image checks clean.
# timeout: 900

lv_prelude
modprobe dm-flakey || fail "modprobe dm-flakey failed"
M=$((1 << 20))

truncate -s 256M "$WORK/pv"
loop=$(losetup -f --show "$WORK/pv")
at_exit "losetup -d $loop"
sectors=$(blockdev --getsz "$loop")
healthy="0 $sectors linear $loop 0"
faulty="0 $sectors flakey $loop 0 0 30 1 error_writes"
dmsetup create fvdfault --table "$healthy"
at_exit "dmsetup remove -f fvdfault 2>/dev/null || true"
dm=/dev/mapper/fvdfault
set_table() { dmsetup suspend fvdfault && dmsetup load fvdfault --table "$1" && dmsetup resume fvdfault; }

step "create on a device whose writes fail: one error, quickly"
set_table "$faulty"
timed timeout 120 "$FVD" create --size 128M "$dm"
((rc != 0 && rc != 124)) || fail "create on a failing device: exit $rc (124 is a hang)"
((took_ms < 20000)) || fail "create took $took_ms ms to fail"
set_table "$healthy"

step "create, start, acknowledged writes"
run "$FVD" create --size 128M "$dm"
dev=$("$FVD" start "$dm")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id --force >/dev/null 2>&1 || true"
head -c $((8 * M)) /dev/urandom >"$WORK/a"
dd if="$WORK/a" of="$dev" bs=1M oflag=direct conv=fsync status=none

step "writes fail while the device fails them"
set_table "$faulty"
head -c $((4 * M)) /dev/urandom >"$WORK/b"
# A first write into a new chunk (allocation, then a flush).
timed timeout 120 dd if="$WORK/b" of="$dev" bs=1M seek=64 oflag=direct conv=fsync status=none
((rc != 0 && rc != 124)) || fail "a write to a failing device: exit $rc (124 is a hang)"
((took_ms < 30000)) || fail "the failed write took $took_ms ms to surface"
fail_new=$took_ms
# An overwrite of allocated data, then a flush.
timed timeout 120 dd if="$WORK/b" of="$dev" bs=1M seek=2 count=1 oflag=direct conv=fsync status=none
((rc != 0 && rc != 124)) || fail "an overwrite on a failing device: exit $rc (124 is a hang)"
((took_ms < 30000)) || fail "the failed overwrite took $took_ms ms to surface"
fail_over=$took_ms
kill -0 "$(daemon_pid "$id")" || fail "the daemon died"
step "reads of acknowledged data still work"
cmp <(dd if="$dev" bs=1M count=2 iflag=direct status=none) <(head -c $((2 * M)) "$WORK/a") ||
    fail "acknowledged data does not read back during the fault"
cmp <(dd if="$dev" bs=1M skip=3 count=5 iflag=direct status=none) <(tail -c $((5 * M)) "$WORK/a") ||
    fail "acknowledged data does not read back during the fault"

# restart_checked IMAGE: stops device $id (its daemon may be dead), checks IMAGE,
# starts it again; sets dev and id.
restart_checked() {
    local out
    out=$("$FVD" stop -n "$id" --force 2>&1) || true
    printf '%s\n' "$out"
    run "$FVD" check "$1"
    dev=$("$FVD" start "$1")
    id=${dev#/dev/ublkb}
}

step "the fault is gone: stop, check, and every acknowledged write reads back"
set_table "$healthy"
restart_checked "$dm"
# Block 2 MiB may hold the old or the new 1 MiB (its overwrite failed); the rest is old.
cmp <(dd if="$dev" bs=1M count=2 iflag=direct status=none) <(head -c $((2 * M)) "$WORK/a") ||
    fail "acknowledged data lost"
cmp <(dd if="$dev" bs=1M skip=3 count=5 iflag=direct status=none) <(tail -c $((5 * M)) "$WORK/a") ||
    fail "acknowledged data lost"
dd if="$WORK/b" of="$dev" bs=1M seek=64 oflag=direct conv=fsync status=none
cmp <(dd if="$dev" bs=1M skip=64 count=4 iflag=direct status=none) "$WORK/b" || fail "writing after the fault failed"
run "$FVD" stop -n "$id"
run "$FVD" check "$dm"
printf 'faults surfaced: new-chunk write %d ms, overwrite %d ms\n' "$fail_new" "$fail_over"

step "a write-back error nobody saw (found by the torture run): the next start takes it and serves"
# A buffered write that fails in write-back after its writer went without a sync of its
# own: Linux reports the error to the next process that opens the device and syncs. It
# belongs to writes that were never durable; fvd start used to fail on it with EIO.
set_table_nolockfs() { dmsetup suspend --nolockfs fvdfault && dmsetup load fvdfault --table "$1" && dmsetup resume fvdfault; }
set_table_nolockfs "$faulty"
dd if=/dev/urandom of="$dm" bs=4k count=1 seek=$((sectors / 8 - 1)) conv=notrunc status=none
sync # write-back fails; sync(2) keeps the error for whoever syncs the device next
dmesg | grep -q "lost async page write" || printf 'note: no write-back error was logged\n'
set_table_nolockfs "$healthy"
dev=$("$FVD" start "$dm") || fail "fvd start failed on a stale write-back error of another process"
id=${dev#/dev/ublkb}
cmp <(dd if="$dev" bs=1M skip=64 count=4 iflag=direct status=none) "$WORK/b" || fail "data lost"
run "$FVD" stop -n "$id"
run "$FVD" check "$dm"

step "drop_writes: writes vanish silently, then the daemon dies (a power cut)"
dropping="0 $sectors flakey $loop 0 0 30 1 drop_writes"
dev=$("$FVD" start "$dm")
id=${dev#/dev/ublkb}
pid=$(daemon_pid "$id")
head -c $((4 * M)) /dev/urandom >"$WORK/c"
dd if="$WORK/c" of="$dev" bs=1M seek=16 oflag=direct conv=fsync status=none # acknowledged, kept
set_table "$dropping"
# Acknowledged by the device, but lost: an overwrite, a write into a new chunk, a discard.
dd if="$WORK/b" of="$dev" bs=1M seek=16 count=1 oflag=direct conv=fsync status=none
dd if="$WORK/b" of="$dev" bs=1M seek=96 oflag=direct conv=fsync status=none
blkdiscard -o $((18 * M)) -l $M "$dev"
sync "$dev"
kill -9 "$pid"
sleep 1
set_table "$healthy"
# A power cut takes the page cache and /run with it: what the device "held" in
# its cache, and the daemon's volatile log of completed writes (which, kept, would
# replay the dropped discard: right after a crash of the daemon alone, wrong here).
blockdev --flushbufs "$dm"
echo 3 >/proc/sys/vm/drop_caches
rm -f /run/fvd/*.vlog
restart_checked "$dm"
cmp <(dd if="$dev" bs=1M count=2 iflag=direct status=none) <(head -c $((2 * M)) "$WORK/a") ||
    fail "data acknowledged before the drop lost"
cmp <(dd if="$dev" bs=1M skip=17 count=3 iflag=direct status=none) <(tail -c $((3 * M)) "$WORK/c") ||
    fail "data acknowledged before the drop lost (or a dropped discard took effect partly)"
# The dropped overwrite of 16 MiB: old or new, per 64 KiB block, never anything else.
blocks_old_or_new() { # DEV_OFFSET_MIB OLD_FILE NEW_FILE [MIB]
    local off=$1 n=${4:-1} i got want_old want_new
    for ((i = 0; i < n * 16; i++)); do
        got=$(dd if="$dev" bs=64k skip=$((off * 16 + i)) count=1 iflag=direct status=none | md5sum)
        want_old=$(dd if="$2" bs=64k skip=$i count=1 status=none | md5sum)
        want_new=$(dd if="$3" bs=64k skip=$i count=1 status=none | md5sum)
        [[ $got == "$want_old" || $got == "$want_new" ]] ||
            fail "block $i at $off MiB reads neither the old nor the new bytes"
    done
}
blocks_old_or_new 16 "$WORK/c" "$WORK/b"
head -c $((4 * M)) /dev/zero >"$WORK/z"
blocks_old_or_new 96 "$WORK/z" "$WORK/b" 4
run "$FVD" stop -n "$id"
run "$FVD" check "$dm"
dmsetup remove fvdfault

step "a PV whose backing store (a 200 MiB tmpfs) runs out"
mkdir -p "$WORK/small"
mount -t tmpfs -o size=200M tmpfs "$WORK/small"
at_exit "umount -l $WORK/small"
truncate -s 4G "$WORK/small/pv"
sloop=$(losetup -f --show "$WORK/small/pv")
at_exit "losetup -d $sloop"
pvcreate -q "$sloop"
vgcreate -q -s 4M vgh "$sloop"
at_exit "vgremove -q -f vgh >/dev/null"
lvcreate -q -y -L 16M -n disk vgh
udev_settle
lv=/dev/vgh/disk
timed timeout 120 "$FVD" create --size 4G "$lv"
((rc == 0 || (rc != 124 && took_ms < 20000))) || fail "create on the 16 MiB LV: exit $rc after $took_ms ms"
lvsize=$(blockdev --getsize64 "$lv")
printf 'LV after create: %d MiB (exit %d)\n' $((lvsize / M)) "$rc"
((lvsize <= 64 * M)) || fail "create grew the LV to $((lvsize / M)) MiB; the metadata needs about 17 MiB"
((rc == 0)) || fail "create failed although 200 MiB of backing store leaves room for the metadata"
dev=$("$FVD" start --grow-unit 32M "$lv")
id=${dev#/dev/ublkb}
head -c $((64 * M)) /dev/urandom >"$WORK/d"
dd if="$WORK/d" of="$dev" bs=1M oflag=direct conv=fsync status=none
step "write 400 MiB more than the tmpfs holds"
timed timeout 300 dd if=/dev/urandom of="$dev" bs=1M seek=64 count=400 oflag=direct conv=fsync status=none
((rc != 0 && rc != 124)) || fail "writing past the backing store: exit $rc (124 is a hang)"
fail_full=$took_ms
# From the loop device's first failed write (the kernel log's clock) to dd's error.
up_end=$(cut -d' ' -f1 /proc/uptime)
first_err=$(dmesg | sed -nE 's/^\[ *([0-9.]+)\].*(critical space allocation|I\/O) error, dev loop.*/\1/p' | head -n 1)
[[ -n $first_err ]] || fail "no write error from the loop device in the kernel log"
surfaced_ms=$(awk -v a="$first_err" -v b="$up_end" 'BEGIN { printf "%d", (b - a) * 1000 }')
printf 'first storage error at %s s, dd failed by %s s: %d ms\n' "$first_err" "$up_end" "$surfaced_ms"
((surfaced_ms < 30000)) || fail "the backing store's error took $surfaced_ms ms to reach the writer"
kill -0 "$(daemon_pid "$id")" || fail "the daemon died"
cmp <(dd if="$dev" bs=1M count=64 iflag=direct status=none) "$WORK/d" ||
    fail "acknowledged data does not read back while the backing store is full"
step "room again: restart, check, acknowledged data reads back"
mount -o remount,size=1G "$WORK/small"
restart_checked "$lv"
cmp <(dd if="$dev" bs=1M count=64 iflag=direct status=none) "$WORK/d" || fail "acknowledged data lost"
dd if="$WORK/d" of="$dev" bs=1M seek=128 count=8 oflag=direct conv=fsync status=none
cmp <(dd if="$dev" bs=1M skip=128 count=8 iflag=direct status=none) <(head -c $((8 * M)) "$WORK/d") ||
    fail "writing after the backing store has room again failed"
run "$FVD" stop -n "$id"
run "$FVD" check "$lv"
printf 'backing store full: dd failed after %d ms in all, %d ms after the first storage error\n' "$fail_full" "$surfaced_ms"
step "ok"
