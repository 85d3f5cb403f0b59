# shellcheck shell=bash
# Discard and write-zeroes: the range reads zeros, data around it stays, and
# the image file's allocated size shrinks.
# timeout: 300

fvd_prelude
img=$WORK/disk.fvd

alloc_kib() { du -k "$img" | cut -f1; }
sum_range() { # OFFSET_MIB COUNT_MIB
    dd if="$dev" bs=1M skip="$1" count="$2" iflag=direct status=none | sha256sum
}
zeros() { head -c $(($1 << 20)) /dev/zero | sha256sum; }

step "create, start, write 64 MiB"
run "$FVD" create -s 1G "$img"
dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
dd if=/dev/urandom of="$dev" bs=1M count=64 oflag=direct status=none
blockdev --flushbufs "$dev"
head_sum=$(sum_range 0 16)
tail_sum=$(sum_range 48 16)
before=$(alloc_kib)
printf 'allocated before: %s KiB\n' "$before"
[[ $before -ge $((64 * 1024)) ]] || fail "64 MiB written but only $before KiB allocated"

step "blkdiscard 32 MiB in the middle"
run blkdiscard -o $((16 << 20)) -l $((32 << 20)) "$dev"
blockdev --flushbufs "$dev"
[[ $(sum_range 16 32) == "$(zeros 32)" ]] || fail "discarded range does not read zeros"
[[ $(sum_range 0 16) == "$head_sum" ]] || fail "data before the discard changed"
[[ $(sum_range 48 16) == "$tail_sum" ]] || fail "data after the discard changed"
after=$(alloc_kib)
printf 'allocated after discard: %s KiB\n' "$after"
[[ $after -le $((before - 30 * 1024)) ]] || fail "allocation did not shrink by ~32 MiB ($before -> $after KiB)"

step "blkdiscard -z (write zeroes) 8 MiB, and an unaligned 3 KiB discard"
run blkdiscard -z -o $((48 << 20)) -l $((8 << 20)) "$dev"
[[ $(sum_range 48 8) == "$(zeros 8)" ]] || fail "write-zeroes range does not read zeros"
run blkdiscard -o $(((60 << 20) + 1024)) -l 3072 "$dev"
dd if="$dev" bs=1024 skip=$((60 * 1024)) count=4 iflag=direct status=none | od -An -tx1 | head -n 2
zero_kib=$(dd if="$dev" bs=1024 skip=$((60 * 1024 + 1)) count=3 iflag=direct status=none | tr -d '\0' | wc -c)
[[ $zero_kib -eq 0 ]] || fail "unaligned discard range does not read zeros"
after2=$(alloc_kib)
printf 'allocated after write-zeroes: %s KiB\n' "$after2"
[[ $after2 -le $((after - 6 * 1024)) ]] || fail "write-zeroes did not free space ($after -> $after2 KiB)"

step "stop: still small, clean, and reads back the same after a restart"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
final=$(alloc_kib)
printf 'allocated after stop: %s KiB\n' "$final"
[[ $final -le $((after2 + 1024)) ]] || fail "allocation grew back at stop ($after2 -> $final KiB)"
dev=$("$FVD" start -n "$id" "$img")
[[ $(sum_range 16 32) == "$(zeros 32)" ]] || fail "discarded range not zeros after restart"
[[ $(sum_range 0 16) == "$head_sum" ]] || fail "data changed after restart"
run "$FVD" stop -n "$id"
step "ok"
