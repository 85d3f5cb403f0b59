# shellcheck shell=bash
# Storage that runs out or goes away under a serving daemon:
# 1. a thin pool out of data space (created with --errorwhenfull y, as fvd's docs ask:
#    with the default the kernel queues writes for 60 s): writes through /dev/ublkbN
#    that need new pool blocks fail within seconds, reads of acknowledged data and the
#    daemon go on; after lvextend of the pool and a restart of the daemon (a failed
#    commit leaves the image refusing writes until it is opened again) writing resumes;
#    check is clean and every acknowledged write reads back;
# 2. the device under an image vanishes (its device-mapper table replaced by `error`):
#    reads and writes fail within seconds, nothing hangs, `fvd stop --force` ends it;
#    with the device back, the image checks clean and holds every acknowledged write.
# timeout: 900

lv_prelude
export FVD_GROW_UNIT=32M
M=$((1 << 20))

step "thin pool of 96 MiB (error when full), thin LV of 32 MiB, 1 GiB image"
make_vg fvdtf 400M
lvcreate -q -y -L 96M -T fvdtf/pool --errorwhenfull y
lvcreate -q -y -V 32M -T fvdtf/pool -n disk
udev_settle
lv=/dev/fvdtf/disk
run "$FVD" create -s 1G "$lv"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id --force >/dev/null 2>&1 || true"

for i in $(seq 0 9); do head -c $((16 * M)) /dev/urandom >"$WORK/src-$i"; done
step "write 16 MiB pieces until the pool is full"
acked=0
for i in $(seq 0 9); do
    timed timeout 120 dd if="$WORK/src-$i" of="$dev" bs=1M seek=$((i * 16)) oflag=direct conv=fsync status=none
    ((rc != 124)) || fail "a write to a full thin pool hung (killed after 120 s)"
    if ((rc != 0)); then
        ((took_ms < 30000)) || fail "the full pool took $took_ms ms to surface"
        full_ms=$took_ms
        break
    fi
    acked=$((i + 1))
done
lvs fvdtf
((acked < 10)) || fail "the pool never filled"
printf '%d pieces acknowledged before the pool was full; the failure surfaced in %d ms\n' "$acked" "$full_ms"
kill -0 "$(daemon_pid "$id")" || fail "the daemon died"
for i in $(seq 0 $((acked - 1))); do
    cmp <(dd if="$dev" bs=1M skip=$((i * 16)) count=16 iflag=direct status=none) "$WORK/src-$i" ||
        fail "piece $i does not read back while the pool is full"
done

step "extend the pool, restart the daemon: writing resumes"
# A failed commit (its fsync) leaves the image refusing writes until it is opened
# again: after a failed fsync nobody can say what reached the disk.
lvextend -q -L +256M fvdtf/pool
out=$("$FVD" stop -n "$id" --force 2>&1) || true
printf '%s\n' "$out"
run "$FVD" check "$lv"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
for i in $(seq "$acked" $((acked + 1))); do
    dd if="$WORK/src-$i" of="$dev" bs=1M seek=$((i * 16)) oflag=direct conv=fsync status=none ||
        fail "writing did not resume after the pool was extended and the daemon restarted"
done
run "$FVD" stop -n "$id"
run "$FVD" check "$lv"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
for i in $(seq 0 $((acked + 1))); do
    cmp <(dd if="$dev" bs=1M skip=$((i * 16)) count=16 iflag=direct status=none) "$WORK/src-$i" ||
        fail "piece $i lost after the pool was full"
done
run "$FVD" stop -n "$id"

step "the device under a serving image vanishes (table replaced by error)"
modprobe_loop
truncate -s 128M "$WORK/pv2"
loop=$(losetup -f --show "$WORK/pv2")
at_exit "losetup -d $loop"
sectors=$(blockdev --getsz "$loop")
dmsetup create fvdvan --table "0 $sectors linear $loop 0"
at_exit "dmsetup remove -f fvdvan 2>/dev/null || true"
run "$FVD" create --size 96M /dev/mapper/fvdvan
dev=$("$FVD" start /dev/mapper/fvdvan)
id=${dev#/dev/ublkb}
head -c $((4 * M)) /dev/urandom >"$WORK/v"
dd if="$WORK/v" of="$dev" bs=1M oflag=direct conv=fsync status=none
# The host's page cache of the device would serve the read without touching it.
blockdev --flushbufs /dev/mapper/fvdvan
dmsetup suspend fvdvan && dmsetup load fvdvan --table "0 $sectors error" && dmsetup resume fvdvan
blockdev --flushbufs /dev/mapper/fvdvan || true
timed timeout 120 dd if="$dev" of=/dev/null bs=1M skip=1 count=1 iflag=direct status=none
((rc != 0 && rc != 124)) || fail "a read of written data on a vanished device: exit $rc (124 is a hang)"
read_ms=$took_ms
timed timeout 120 dd if="$WORK/v" of="$dev" bs=1M seek=20 count=1 oflag=direct conv=fsync status=none
((rc != 0 && rc != 124)) || fail "a write to a vanished device: exit $rc (124 is a hang)"
((took_ms < 30000)) || fail "the vanished device took $took_ms ms to surface"
write_ms=$took_ms
timed timeout 120 "$FVD" stop -n "$id" --force
((rc != 124)) || fail "stopping the daemon of a vanished device hung"
dmsetup suspend fvdvan && dmsetup load fvdvan --table "0 $sectors linear $loop 0" && dmsetup resume fvdvan
run "$FVD" check /dev/mapper/fvdvan || run "$FVD" check --repair /dev/mapper/fvdvan
run "$FVD" check /dev/mapper/fvdvan
run "$FVD" io /dev/mapper/fvdvan -c "read -o $WORK/v-back 0 4M"
cmp "$WORK/v-back" "$WORK/v" || fail "acknowledged data lost with the vanished device"
printf 'thin pool full: failure in %d ms; vanished device: read %d ms, write %d ms\n' "$full_ms" "$read_ms" "$write_ms"
step "ok"
