# shellcheck shell=bash
# The demo (scripts/demo runs it, on this machine as root when its kernel has
# ublk, else in the guest): a 256 MiB image over a 64 MiB base, served as
# /dev/ublkbN, with ext4 on it.
# timeout: 300

need_fvd
modprobe_ublk
base=$WORK/base.raw
img=$WORK/demo.fvd
mnt=$WORK/mnt

step "a 64 MiB raw base with known content"
{ yes "fvd demo base" || true; } | head -c $((64 << 20)) >"$base"
base_sum=$(sha256sum <"$base")
run "$FVD" create -b "$base" -s 256M "$img"
run "$FVD" info "$img"

step "serve it"
dev=$(run "$FVD" start "$img" | tail -n 1)
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
printf 'device: %s, %s bytes\n' "$dev" "$(blockdev --getsize64 "$dev")"
printf 'its first bytes come from the base: %s\n' "$(head -c 13 "$dev")"

step "mkfs.ext4, mount, write and read files"
run mkfs.ext4 -q -F "$dev"
mkdir -p "$mnt"
run mount "$dev" "$mnt"
at_exit "umount $mnt 2>/dev/null || true"
head -c $((8 << 20)) /dev/urandom >"$mnt/random.bin"
cp -r "$FVD_ROOT/src" "$mnt/src"
sync
(cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/sums"
printf '%s files written\n' "$(wc -l <"$WORK/sums")"
echo 3 >/proc/sys/vm/drop_caches
(cd "$mnt" && sha256sum --quiet -c "$WORK/sums") || fail "files read back differ"
echo "read back: all files match"
df -h "$mnt"
run "$FVD" list

step "umount, stop, check"
run umount "$mnt"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
run "$FVD" info "$img"
[[ $(sha256sum <"$base") == "$base_sum" ]] || fail "the base changed"
echo "the base is unchanged"
step "ok"
