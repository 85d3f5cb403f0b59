# shellcheck shell=bash
# The cloud case: an image over a base with holes, served with copy-on-read
# and background prefetch. Reads while prefetch runs equal the base; once
# prefetch is done the base is moved away and the device (and a restarted
# daemon without any base) still reads every byte; writes over the base's
# holes add no bitmap bits.
# timeout: 500

fvd_prelude
base=$WORK/base.raw
img=$WORK/disk.fvd

step "48 MiB base: random data in three places, holes between"
truncate -s 48M "$base"
for mib in 0 17 40; do
    head -c $((4 << 20)) /dev/urandom | dd of="$base" bs=1M seek=$mib conv=notrunc status=none
done
base_sum=$(sha256sum <"$base" | cut -d' ' -f1)

step "create with copy-on-read and prefetch; zero blocks preset"
run "$FVD" create -b "$base" --block-size 64k --copy-on-read --prefetch "$img" | tee "$WORK/create.txt"
grep -q "zero blocks of the base preset: 576 of 768" "$WORK/create.txt" ||
    fail "expected 576 of 768 zero blocks preset (36 MiB of holes in 64 KiB blocks)"
bits_before=$("$FVD" info --output json "$img" | sed -n 's/.*"copied-blocks": \([0-9]*\).*/\1/p')

dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
run "$FVD" list

step "read the whole device while prefetch runs: it equals the base"
sum=$(dd if="$dev" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)
[[ $sum == "$base_sum" ]] || fail "device content differs from the base during prefetch"

step "wait for prefetch to finish (the header says prefetched)"
wait_prefetched "$img" 120 ||
    fail "prefetch did not finish: $("$FVD" info --output json "$img" | grep -o '"prefetch-cursor": [0-9]*')"
sleep 1.5 # the daemon publishes its status once a second
run "$FVD" info "$img" >"$RESULTS/info-done.txt"
cat "$RESULTS/info-done.txt"
grep -q "^prefetch (live): done, 768 of 768 blocks" "$RESULTS/info-done.txt" ||
    fail "fvd info does not show the daemon's prefetch as done"
"$FVD" list >"$RESULTS/list-done.txt"
cat "$RESULTS/list-done.txt"
awk -v d="$dev" '$2 == d && / done / { ok = 1 } END { exit !ok }' "$RESULTS/list-done.txt" ||
    fail "fvd list does not show prefetch done"

step "move the base away: the device still reads every byte"
mv "$base" "$WORK/base.moved"
echo 3 >/proc/sys/vm/drop_caches
sum=$(dd if="$dev" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)
[[ $sum == "$base_sum" ]] || fail "device content differs after the base was moved away"

step "restart the daemon without the base: it still serves the image"
run "$FVD" stop -n "$id"
dev=$("$FVD" start -n "$id" "$img")
sum=$(dd if="$dev" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)
[[ $sum == "$base_sum" ]] || fail "restarted device differs without the base"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"

step "zero detection: writes over the base's holes add no bitmap bits"
mv "$WORK/base.moved" "$base"
img2=$WORK/plain.fvd
run "$FVD" create -b "$base" --block-size 64k "$img2"
bits0=$("$FVD" info --output json "$img2" | sed -n 's/.*"copied-blocks": \([0-9]*\).*/\1/p')
dev=$("$FVD" start -n "$id" "$img2")
# 8 MiB into the hole at 4..17 MiB: no block there needs a bit.
dd if=/dev/urandom of="$dev" bs=1M seek=6 count=8 oflag=direct status=none
run "$FVD" stop -n "$id"
bits1=$("$FVD" info --output json "$img2" | sed -n 's/.*"copied-blocks": \([0-9]*\).*/\1/p')
[[ $bits1 == "$bits0" ]] || fail "writes over holes changed the bitmap: $bits0 -> $bits1 bits"
dev=$("$FVD" start -n "$id" "$img2")
dd if=/dev/urandom of="$dev" bs=1M seek=1 count=1 oflag=direct status=none
run "$FVD" stop -n "$id"
bits2=$("$FVD" info --output json "$img2" | sed -n 's/.*"copied-blocks": \([0-9]*\).*/\1/p')
[[ $bits2 == $((bits0 + 16)) ]] || fail "a 1 MiB write over base data should set 16 bits: $bits0 -> $bits2"
run "$FVD" check "$img2"
echo "bits: preset $bits_before (prefetch image), $bits0 -> $bits1 after 8 MiB over holes -> $bits2 after 1 MiB over data"
step "ok"
