# shellcheck shell=bash
# An image on a thin LV in a thin pool: the thin LV grows like a linear one,
# and discards from the guest reach the pool (BLKDISCARD of whole pool
# blocks), so the pool's data usage drops; discarded ranges read as zeros,
# the rest is intact; fvd check is clean.
# timeout: 900

lv_prelude
export FVD_GROW_UNIT=64M
M=$((1 << 20))

step "thin pool of 512 MiB, thin LV of 32 MiB, 4 GiB image"
make_vg fvdthin 640M
lvcreate -q -y -L 512M -T fvdthin/pool
lvcreate -q -y -V 32M -T fvdthin/pool -n disk
udev_settle
lv=/dev/fvdthin/disk
pool_pct() { lvs --noheadings -o data_percent fvdthin/pool | tr -d ' '; }
run "$FVD" create -s 4G "$lv"
printf 'pool data after create: %s%%\n' "$(pool_pct)"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
status=/run/fvd/lv/fvdthin-disk.json
jget() { json_get "$status" "$1"; }
printf 'discard granularity of %s: %s\n' "$dev" "$(cat /sys/block/ublkb$id/queue/discard_granularity)"

step "write 256 MiB of random data"
head -c $((256 * M)) /dev/urandom >"$WORK/data"
dd if="$WORK/data" of="$dev" bs=1M oflag=direct status=none
sync
before=$(pool_pct)
lvs fvdthin
cat "$status"
thin_size=$(blockdev --getsize64 /dev/fvdthin/disk)
((thin_size > 256 * M)) || fail "the thin LV did not grow ($thin_size bytes)"
printf 'pool data after writing: %s%%, thin LV %d MiB\n' "$before" $((thin_size / M))

step "discard 192 MiB in the guest (whole chunks and a partial range)"
run blkdiscard -o $((32 * M)) -l $((192 * M)) "$dev"
run blkdiscard -o $((8 * M + 65536)) -l $((3 * 65536)) "$dev"
after=$(pool_pct)
lvs fvdthin
printf 'pool data: %s%% before the discard, %s%% after\n' "$before" "$after"
awk -v b="$before" -v a="$after" 'BEGIN { exit !(a < b * 0.5) }' ||
    fail "pool usage did not drop by half ($before% -> $after%)"

step "discarded ranges read as zeros, the rest is intact"
cmp <(dd if="$dev" bs=1M skip=32 count=192 iflag=direct status=none) <(head -c $((192 * M)) /dev/zero) ||
    fail "discarded range does not read as zeros"
cmp <(dd if="$dev" bs=64k skip=$((8 * 16 + 1)) count=3 iflag=direct status=none) <(head -c $((3 * 65536)) /dev/zero) ||
    fail "partially discarded range does not read as zeros"
cmp <(dd if="$dev" bs=1M skip=224 count=32 iflag=direct status=none) <(tail -c $((32 * M)) "$WORK/data") ||
    fail "data after the discarded range changed"
cmp <(dd if="$dev" bs=64k count=$((8 * 16 + 1)) iflag=direct status=none) <(head -c $((8 * M + 65536)) "$WORK/data") ||
    fail "data before the partial discard changed"

step "write into the discarded space again (freed chunks are reused)"
dd if="$WORK/data" of="$dev" bs=1M seek=32 count=64 oflag=direct status=none
cmp <(dd if="$dev" bs=1M skip=32 count=64 iflag=direct status=none) <(head -c $((64 * M)) "$WORK/data") ||
    fail "rewrite reads back wrong"
sleep 0.5
cp "$status" "$RESULTS/status.json"
cat "$status"

step "stop; fvd check; fvd info shows the pool"
run "$FVD" stop -n "$id"
run "$FVD" check "$lv"
"$FVD" info "$lv" | tee "$RESULTS/info.txt"
grep -q "pool-data-percent" "$RESULTS/info.txt" || fail "fvd info does not show the pool's data usage"
step "ok"
