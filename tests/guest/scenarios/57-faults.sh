# shellcheck shell=bash
# Injected storage faults (dm-flakey): the image sits on a device-mapper device whose
# table is switched at run time between linear (healthy) and flakey with every write
# failing (error_writes). Writes through /dev/ublkbN and a flush fail within seconds
# (never a hang), the daemon stays up and keeps serving reads of acknowledged data;
# once the fault is gone, the image checks clean and holds every acknowledged write.
# Also: fvd create on a device that fails writes gives one error line, quickly.
# timeout: 900

fvd_prelude
modprobe_dm
modprobe_loop
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

# timed CMD...: runs CMD, prints how long it took; its exit status is in $rc.
timed() {
    local t0=${EPOCHREALTIME/./}
    rc=0
    "$@" || rc=$?
    took_ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
    printf '  -> exit %d after %d ms\n' "$rc" "$took_ms"
}

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

step "the fault is gone: stop, check, and every acknowledged write reads back"
set_table "$healthy"
out=$("$FVD" stop -n "$id" --force 2>&1) || true
printf '%s\n' "$out"
run "$FVD" check "$dm"
dev=$("$FVD" start "$dm")
id=${dev#/dev/ublkb}
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
step "ok"
