# shellcheck shell=bash
# Unprivileged use: with the udev rules and the tmpfiles entry installed, a
# user in group disk (no CAP_SYS_ADMIN) starts an image as /dev/ublkbN, runs
# fio verify on it, gets its /dev/fvd link, and stops it. `fvd recover`
# explains why it can't help such a device; a user outside the group is told
# what is missing.
# timeout: 400

need_fvd
export RUST_LOG=${RUST_LOG:-fvd=info}
at_exit "cp /run/fvd/*.log \"$RESULTS\"/ 2>/dev/null || true"

step "install the rules, the helper and the run dir entry"
install_udev_rules
rm -rf /run/fvd /run/ublksrvd
systemd-tmpfiles --create "$PWD/udev/fvd-tmpfiles.conf"
printf '/dev/ublk-control %s, /run/fvd %s\n' "$(stat -c %G:%a /dev/ublk-control)" "$(stat -c %G:%a /run/fvd)"
[[ $(stat -c %G:%a /dev/ublk-control) == disk:660 ]] || fail "/dev/ublk-control is not disk:660"
[[ $(stat -c %G:%a /run/fvd) == disk:2775 ]] || fail "/run/fvd is not disk:2775"
[[ $(stat -c %a /run/ublksrvd) == 1777 ]] || fail "/run/ublksrvd is not 1777"

# A user with no passwd entry, in group disk, with no capabilities.
uid=4242
disk_gid=$(getent group disk | cut -d: -f3)
as_user() {
    setpriv --reuid=$uid --regid=$uid --groups="$disk_gid" --inh-caps=-all env HOME="$WORK/u" "$@"
}
mkdir -p "$WORK/u" && chown $uid:$uid "$WORK/u"
img=$WORK/u/user-disk.fvd

step "the user creates and starts an image"
as_user "$FVD" create -s 256M "$img"
dev=$(as_user "$FVD" start "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
echo "started $dev as uid $uid"
run "$FVD" list
st=/run/fvd/$id.json
grep -q '"unprivileged": true' "$st" || fail "the state file does not say unprivileged"
pid=$(daemon_pid "$id")
[[ $(stat -c %u "/proc/$pid") == "$uid" ]] || fail "the daemon does not run as uid $uid"
grep -E '^Cap(Eff|Prm):' "/proc/$pid/status"
udev_settle
[[ $(readlink -f /dev/fvd/user-disk.fvd) == "$dev" ]] || fail "no /dev/fvd/user-disk.fvd link"

step "the user runs fio verify on the device"
as_user fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --size=64M --iodepth=16 --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
    --output="$WORK/u/fio.txt"
cp "$WORK/u/fio.txt" "$RESULTS/"
grep -q 'err= 0' "$RESULTS/fio.txt" || fail "fio reported errors"
grep -E 'WRITE:|READ:' "$RESULTS/fio.txt" || true

step "recover is refused with the reason; another user can't start"
rc=0
out=$(as_user "$FVD" recover -n "$id" 2>&1) || rc=$?
echo "recover as the user: exit $rc: $out"
[[ $rc -ne 0 && $out == *"needs root"* ]] || fail "recover as the user: want 'needs root'"
rc=0
out=$("$FVD" recover -n "$id" 2>&1) || rc=$?
echo "recover as root: exit $rc: $out"
[[ $rc -ne 0 && $out == *"no user recovery"* ]] || fail "recover as root: want the no-recovery reason"
rc=0
out=$(setpriv --reuid=4243 --regid=4243 --clear-groups --inh-caps=-all "$FVD" start "$img" 2>&1) || rc=$?
echo "start outside group disk: exit $rc: $out"
[[ $rc -ne 0 && $out == *"read-write access to /dev/ublk-control"* ]] || fail "want the access hint"

step "the user stops the device; the image is clean"
as_user "$FVD" stop -n "$id"
[[ ! -e /sys/class/ublk-char/ublkc$id ]] || fail "device $id still exists after stop"
udev_settle
[[ ! -e /dev/fvd/user-disk.fvd ]] || fail "the link outlived the device"
as_user "$FVD" check "$img"
step "ok"
