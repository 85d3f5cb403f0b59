# shellcheck shell=bash
# Online resize: a mounted ext4 on /dev/ublkbN grows while files are being read;
# `fvd resize -n ID` grows the image and the device (UBLK_U_CMD_UPDATE_SIZE), then
# `resize2fs` grows the mounted file system into it; the files are intact, new files
# fill the new space, fsck is clean after, and a restarted daemon serves the new size.
# On a kernel without UPDATE_SIZE (before 6.16), `fvd resize -n` says so in one line
# and changes nothing. A table that outgrows its room moves the metadata online too.
# timeout: 500

fvd_prelude
img=$WORK/disk.fvd
mnt=$WORK/mnt
mkdir -p "$mnt"

step "a 64 MiB image (table with 4 KiB of room: 1 GiB), ext4, files"
run "$FVD" create -s 64M "$img"
dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
at_exit "umount \"$mnt\" 2>/dev/null; \"$FVD\" stop -n $id >/dev/null 2>&1 || true"
run mkfs.ext4 -q "$dev"
mount "$dev" "$mnt"
for i in 1 2 3; do head -c $((8 << 20)) /dev/urandom >"$mnt/f$i.bin"; done
sync
(cd "$mnt" && sha256sum ./*.bin) >"$WORK/files.sum"
before=$(blockdev --getsize64 "$dev")

step "fvd resize -n $id 192M, while the file system is mounted"
if ! "$FVD" resize -n "$id" 192M --output json >"$WORK/out" 2>"$WORK/err"; then
    cat "$WORK/err"
    grep -q "UPDATE_SIZE" "$WORK/err" || fail "no clear message for the missing kernel feature"
    [[ $(wc -l <"$WORK/err") -eq 1 ]] || fail "more than one line"
    [[ $(blockdev --getsize64 "$dev") == "$before" ]] || fail "the device changed size"
    (cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || fail "files changed"
    echo "this kernel ($(uname -r)) cannot resize a live ublk device: refused cleanly"
    umount "$mnt"
    run "$FVD" stop -n "$id"
    run "$FVD" check "$img"
    step "ok"
    exit 0
fi
cat "$WORK/out"
after=$(blockdev --getsize64 "$dev")
echo "device size: $before -> $after"
[[ $after == $((192 << 20)) ]] || fail "the device is $after bytes, want $((192 << 20))"

step "resize2fs grows the mounted ext4; files intact; new files in the new space"
run resize2fs "$dev"
df -h "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || fail "files differ after the resize"
# 96 MiB more than the old 64 MiB disk could hold with its first files.
for i in 4 5 6 7 8 9 10 11 12 13 14 15; do
    head -c $((10 << 20)) /dev/urandom >"$mnt/f$i.bin" || fail "writing f$i into the grown file system failed"
done
sync
(cd "$mnt" && sha256sum ./*.bin) >"$WORK/files.sum"

step "past the table's room (1 GiB): 2 GiB online, the metadata moves"
timed "$FVD" resize -n "$id" 2G --output json
[[ $rc == 0 ]] || fail "the second resize failed"
[[ $(blockdev --getsize64 "$dev") == $((2 << 30)) ]] || fail "the device is not 2 GiB"
run resize2fs "$dev"
(cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || fail "files differ after the second resize"
umount "$mnt"

step "stop, fsck, check, start again: the new size, the files"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
dev=$("$FVD" start -n "$id" "$img")
[[ $(blockdev --getsize64 "$dev") == $((2 << 30)) ]] || fail "a restarted daemon serves another size"
run fsck.ext4 -fn "$dev"
mount -o ro "$dev" "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || fail "files differ after a restart"
umount "$mnt"
run "$FVD" stop -n "$id"
step "ok"
