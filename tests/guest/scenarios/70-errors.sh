# shellcheck shell=bash
# Every error a user can hit says what is wrong, and exits non-zero.
# timeout: 300

need_fvd
img=$WORK/disk.fvd
img2=$WORK/other.fvd
"$FVD" create -s 64M "$img" >/dev/null
"$FVD" create -s 64M "$img2" >/dev/null

# expect_fail TEXT CMD...: CMD must fail and say TEXT on stderr.
expect_fail() {
    local want=$1 rc=0 out
    shift
    out=$("$@" 2>&1 >/dev/null) || rc=$?
    printf '+ %s\n    -> exit %s: %s\n' "$*" "$rc" "$out"
    [[ $rc -ne 0 ]] || fail "'$*' succeeded; want a failure saying '$want'"
    [[ $out == *"$want"* ]] || fail "'$*' said '$out'; want '$want'"
}

step "ublk_drv not loaded"
if [[ -e /dev/ublk-control ]]; then
    rmmod ublk_drv || fail "ublk_drv is loaded and can't be unloaded"
fi
expect_fail "ublk_drv is not loaded: run 'modprobe ublk_drv'" "$FVD" start "$img"
"$FVD" list >/dev/null || fail "fvd list must work without the driver"

modprobe_ublk

step "not root"
expect_fail "needs root" setpriv --reuid=65534 --regid=65534 --clear-groups "$FVD" start "$img"
expect_fail "needs root" setpriv --reuid=65534 --regid=65534 --clear-groups "$FVD" stop -n 0

step "image missing, not an image"
expect_fail "$WORK/nope.fvd: no such image file" "$FVD" start "$WORK/nope.fvd"
head -c 1M /dev/zero >"$WORK/zeros.img"
expect_fail "$WORK/zeros.img" "$FVD" start "$WORK/zeros.img"

step "zero copy: on where the driver has no auto buffer registration (before 6.16) fails"
expect_fail "--zero-copy is auto, on or off" "$FVD" start --zero-copy maybe "$img"
kv=$(uname -r)
kmaj=${kv%%.*} kmin=${kv#*.}
kmin=${kmin%%.*}
if ((kmaj > 6 || (kmaj == 6 && kmin >= 16))); then
    dev=$("$FVD" start --zero-copy on "$img") || fail "--zero-copy on failed on $kv"
    "$FVD" list --output json | grep -q '"zero-copy": *true' || fail "fvd list does not show zero copy"
    "$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
else
    expect_fail "no auto buffer registration (UBLK_F_AUTO_BUF_REG" "$FVD" start --zero-copy on "$img"
    expect_fail "no auto buffer registration (UBLK_F_AUTO_BUF_REG" env FVD_ZERO_COPY=on "$FVD" start "$img"
    dev=$("$FVD" start "$img") || fail "--zero-copy auto (the default) must fall back to copy on $kv"
    "$FVD" list --output json | grep -q '"zero-copy": *false' || fail "fvd list does not show the copy path"
    "$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
fi

step "bad and unknown IDs"
expect_fail "no fvd device with ID 99" "$FVD" stop -n 99
expect_fail "no fvd device with ID 99" "$FVD" recover -n 99
expect_fail "bad device ID -1" "$FVD" stop -n -1
expect_fail "bad device ID -2" "$FVD" start -n -2 "$img"
expect_fail "give -n ID, --image IMAGE or --all" "$FVD" stop

step "a running device"
dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
expect_fail "is in use by another fvd process (lock held)" "$FVD" start "$img"
expect_fail "device ID $id is already in use" "$FVD" start -n "$id" "$img2"
expect_fail "is still running; nothing to recover" "$FVD" recover -n "$id"
n=$("$FVD" list --output json | grep -c '"id":')
[[ $n -eq 1 ]] || fail "failed starts left devices behind: fvd list shows $n"
[[ $(ls /sys/class/ublk-char | wc -l) -eq 1 ]] || fail "failed starts left ublk devices: $(ls /sys/class/ublk-char)"

step "stop of a mounted device"
mkfs.ext4 -q "$dev"
mkdir -p "$WORK/mnt"
mount "$dev" "$WORK/mnt"
expect_fail "$dev is in use (mounted on $WORK/mnt)" "$FVD" stop -n "$id"
umount "$WORK/mnt"

step "queue and depth limits"
expect_fail "--queues must be" "$FVD" start --queues 0 "$img2"
expect_fail "--depth must be" "$FVD" start --depth 0 "$img2"
expect_fail "logical block size is 512 or 4096" "$FVD" start --logical-block-size 1024 "$img2"
expect_fail "give an interval such as 5s" "$FVD" start --commit-interval 5m "$img2"

step "SIGTERM during start-up: the daemon still stops, and leaves no device"
# Sent at once, the signal lands while the image opens or the device is set up;
# the daemon must not go on serving a device nobody can stop.
for delay in 0 0.05 0.2; do
    "$FVD" start --foreground "$img2" >"$WORK/fg.out" 2>"$WORK/fg.err" &
    fg=$!
    sleep "$delay"
    kill -TERM "$fg"
    for _ in $(seq 1 100); do kill -0 "$fg" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$fg" 2>/dev/null; then
        cat "$WORK/fg.err"
        fail "SIGTERM after ${delay}s of start-up: the daemon still runs 20 s later"
    fi
    wait "$fg" || true
    printf 'SIGTERM after %ss: daemon gone; it printed "%s"\n' "$delay" "$(cat "$WORK/fg.out")"
    n=$(ls /sys/class/ublk-char | wc -l)
    [[ $n -eq 1 ]] || fail "SIGTERM during start-up left a device: $(ls /sys/class/ublk-char)"
done
"$FVD" check "$img2" >/dev/null || fail "the image was not closed clean after SIGTERM during start-up"

run "$FVD" stop -n "$id"
expect_fail "no fvd device with ID $id" "$FVD" stop -n "$id"
run "$FVD" check "$img"
step "ok"
