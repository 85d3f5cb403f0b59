# shellcheck shell=bash
# An image over a raw base with known content: the device reads the base,
# writes through the device (aligned, unaligned, across a block, across the
# base's end) and a discard land in the image only, the base never changes,
# and `fvd convert -O raw` and a read-only start show what the device showed.
# timeout: 400

fvd_prelude
base=$WORK/base.raw
img=$WORK/disk.fvd
want=$WORK/want.raw    # what the device must show, kept by hand alongside

step "64 MiB base with random content, a 96 MiB image over it"
head -c $((64 << 20)) /dev/urandom >"$base"
base_sum=$(sha256sum <"$base")
run "$FVD" create -b "$base" -s 96M "$img"
cp "$base" "$want"
truncate -s 96M "$want"

dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
run "$FVD" list

step "the device reads the base, then zeros past it"
cmp "$dev" "$want" || fail "device differs from the base before any write"

# write OFFSET LENGTH: the same random bytes to the device and to $want.
write() {
    head -c "$2" /dev/urandom >"$WORK/patch"
    dd if="$WORK/patch" of="$dev" bs=512 seek=$(($1 / 512)) oflag=direct conv=notrunc status=none
    dd if="$WORK/patch" of="$want" bs=512 seek=$(($1 / 512)) conv=notrunc status=none
}

step "writes through the device"
write 0 4096                                 # first block, partly
write $((100 * 1024)) 1536                   # inside a block, unaligned to 4k
write $((65536 - 512)) 1024                  # across a block boundary
write $((10 << 20)) $((1 << 20))             # whole blocks
write $(((63 << 20) + (32 << 10))) $((2 << 20)) # across the base's end
write $((90 << 20)) 65536                    # past the base
blockdev --flushbufs "$dev"
cmp "$dev" "$want" || fail "device differs after writes"

step "discard 1 MiB inside the base: it reads zeros"
run blkdiscard -o $((20 << 20)) -l $((1 << 20)) "$dev"
dd if=/dev/zero of="$want" bs=1M seek=20 count=1 conv=notrunc status=none
cmp "$dev" "$want" || fail "device differs after discard"

step "the base is unchanged"
[[ $(sha256sum <"$base") == "$base_sum" ]] || fail "the base changed"

step "dump the device, stop, check, convert to raw"
dd if="$dev" of="$WORK/dump.raw" bs=1M iflag=direct status=none
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
run "$FVD" map "$img" >"$RESULTS/map.txt"
head -n 20 "$RESULTS/map.txt"
run "$FVD" convert -O raw "$img" "$WORK/conv.raw"
run qemu-img compare -f raw -F raw "$WORK/conv.raw" "$WORK/dump.raw"
cmp "$WORK/conv.raw" "$want" || fail "converted image differs from what the device showed"
rm -f "$WORK/conv.raw" "$WORK/dump.raw"

step "start read-only: same content, writes refused"
dev=$("$FVD" start --read-only -n "$id" "$img")
[[ $(blockdev --getro "$dev") == 1 ]] || fail "$dev is not read-only"
cmp "$dev" "$want" || fail "read-only device differs"
if dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
    fail "a write to the read-only device succeeded"
fi
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
[[ $(sha256sum <"$base") == "$base_sum" ]] || fail "the base changed"
step "ok"
