# shellcheck shell=bash
# Images on a plain block device that holds old bytes (a loop device over a file of
# random bytes, not an LV): every range never written reads zeros, through fvd io and
# through /dev/ublkbN, with the table and with the raw layout (--no-table); after a
# discard; after kill -9 of the daemon and a restart; and create zeroes only what the
# metadata needs, not the whole device.
# timeout: 900
# memory: 3G

fvd_prelude
modprobe_loop
M=$((1 << 20))
SIZE_MIB=96

# expect_file FILE: zeros of the image's size with the written patterns where they are.
pattern() { # BYTE(octal) OFFSET LEN FILE
    head -c "$3" /dev/zero | tr '\0' "\\$1" | dd of="$4" bs=4k seek=$(($2 / 4096)) conv=notrunc status=none
}

for layout in table raw; do
    opt=()
    [[ $layout == raw ]] && opt=(--no-table)
    step "$layout: a loop device over $((SIZE_MIB + 64)) MiB of random bytes"
    file=$WORK/old-$layout.bin
    head -c $(((SIZE_MIB + 64) * M)) /dev/urandom >"$file"
    loop=$(losetup -f --show "$file")
    at_exit "losetup -d $loop 2>/dev/null || true"
    run "$FVD" create --size ${SIZE_MIB}M "${opt[@]}" "$loop"
    "$FVD" info "$loop" | grep -iE "storage|initiali" || true

    step "$layout: fvd io writes two ranges; every other range reads zeros"
    run "$FVD" io "$loop" -c "write -P 0xab 1M 64k" -c "write -P 0xcd 40M 4k" -c flush
    run "$FVD" io "$loop" -c "read -P 0 0 1M" -c "read -P 0xab 1M 64k" -c "read -P 0 $((M + 65536)) $((M - 65536))" \
        -c "read -P 0 2M 38M" -c "read -P 0xcd 40M 4k" -c "read -P 0 $((40 * M + 4096)) $((56 * M - 4096))"

    exp=$WORK/expect-$layout
    truncate -s ${SIZE_MIB}M "$exp"
    pattern 253 $M 65536 "$exp"
    pattern 315 $((40 * M)) 4096 "$exp"

    step "$layout: through /dev/ublkbN the device reads the same"
    dev=$("$FVD" start "$loop")
    id=${dev#/dev/ublkb}
    at_exit "\"$FVD\" stop -n $id --force >/dev/null 2>&1 || true"
    cmp <(dd if="$dev" bs=1M iflag=direct status=none) "$exp" ||
        fail "$layout: the device shows bytes that were never written"

    step "$layout: writes through the device, a discard, then kill -9 and a restart"
    head -c $((3 * M)) /dev/urandom >"$WORK/w"
    dd if="$WORK/w" of="$dev" bs=1M seek=60 oflag=direct,sync conv=notrunc status=none
    dd if="$WORK/w" of="$exp" bs=1M seek=60 conv=notrunc status=none
    # 4 KiB in the middle of the first chunk: the rest of the chunk must stay zeros.
    dd if=/dev/urandom of="$WORK/w4" bs=4k count=1 status=none
    dd if="$WORK/w4" of="$dev" bs=4k seek=$(((70 * M + 8192) / 4096)) oflag=direct,sync conv=notrunc status=none
    dd if="$WORK/w4" of="$exp" bs=4k seek=$(((70 * M + 8192) / 4096)) conv=notrunc status=none
    run blkdiscard -o $((61 * M)) -l $M "$dev"
    dd if=/dev/zero of="$exp" bs=1M seek=61 count=1 conv=notrunc status=none
    blockdev --flushbufs "$dev"
    cmp <(dd if="$dev" bs=1M iflag=direct status=none) "$exp" || fail "$layout: wrong bytes after the discard"
    kill -9 "$(daemon_pid "$id")"
    sleep 0.5
    out=$("$FVD" stop -n "$id" --force 2>&1) || true
    printf '%s\n' "$out"
    run "$FVD" check "$loop"
    dev=$("$FVD" start "$loop")
    id=${dev#/dev/ublkb}
    cmp <(dd if="$dev" bs=1M iflag=direct status=none) "$exp" ||
        fail "$layout: after kill -9 and a restart the device shows bytes that were never written"
    run "$FVD" stop -n "$id"
    run "$FVD" check "$loop"
    run "$FVD" io "$loop" -c "read -P 0 0 1M" -c "read -P 0 2M 38M" -c "read -P 0 $((80 * M)) $((16 * M))"

    step "$layout: the device beyond what the image used still holds its old bytes (no full-device zeroing)"
    tail_old=$(dd if="$file" bs=1M skip=$((SIZE_MIB + 40)) count=8 status=none | tr -d '\0' | wc -c)
    printf '%d non-zero bytes in 8 MiB past the image\n' "$tail_old"
    ((tail_old > 4 * M)) || fail "$layout: the device was zeroed far past what the image needs"
    losetup -d "$loop"
    rm -f "$file"
done
step "ok"
