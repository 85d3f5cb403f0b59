# shellcheck shell=bash
# The udev rules: /dev/fvd/<image name> points at /dev/ublkbN while the device
# runs and goes away at stop; the ublk nodes belong to group disk.
# timeout: 300

need_fvd
export RUST_LOG=${RUST_LOG:-fvd=info}
at_exit "cp /run/fvd/*.log \"$RESULTS\"/ 2>/dev/null || true"

step "install the rules and the helper, start udevd"
install_udev_rules
udevadm verify /etc/udev/rules.d/99-fvd.rules 2>/dev/null || true
perm=$(stat -c %G:%a /dev/ublk-control)
printf '/dev/ublk-control: %s\n' "$perm"
[[ $perm == disk:660 ]] || fail "/dev/ublk-control is $perm, want disk:660"

step "start two images"
"$FVD" create -s 64M "$WORK/vol-a.fvd" >/dev/null
"$FVD" create -s 32M "$WORK/vol b.fvd" >/dev/null
deva=$("$FVD" start "$WORK/vol-a.fvd")
devb=$("$FVD" start "$WORK/vol b.fvd")
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
udev_settle
ls -l /dev/fvd/
[[ $(readlink -f /dev/fvd/vol-a.fvd) == "$deva" ]] || fail "/dev/fvd/vol-a.fvd does not point at $deva"
[[ $(readlink -f "/dev/fvd/vol_b.fvd") == "$devb" ]] || fail "/dev/fvd/vol_b.fvd does not point at $devb"
ida=${deva#/dev/ublkb}
for node in "$deva" "/dev/ublkc$ida"; do
    perm=$(stat -c %G:%a "$node")
    printf '%s: %s\n' "$node" "$perm"
    [[ $perm == disk:660 ]] || fail "$node is $perm, want disk:660"
done

step "I/O through the link"
head -c 1M /dev/urandom >"$WORK/data"
dd if="$WORK/data" of=/dev/fvd/vol-a.fvd bs=1M oflag=direct status=none
cmp -n $((1 << 20)) /dev/fvd/vol-a.fvd "$WORK/data" || fail "read back through the link differs"

step "stop: the links go away"
run "$FVD" stop -n "$ida"
udev_settle
[[ ! -e /dev/fvd/vol-a.fvd && ! -L /dev/fvd/vol-a.fvd ]] || fail "/dev/fvd/vol-a.fvd still there after stop"
[[ -L /dev/fvd/vol_b.fvd ]] || fail "/dev/fvd/vol_b.fvd vanished with the other device"
run "$FVD" stop --all
udev_settle
[[ ! -e /dev/fvd/vol_b.fvd ]] || fail "/dev/fvd/vol_b.fvd still there after stop"
step "ok"
