# shellcheck shell=bash
# An 8 GiB image on a 64 MiB linear LV: 1 GiB written through the ublk device
# with fio verify; the LV grows by itself in 64 MiB units ahead of the writer;
# the number of growths matches the unit; fvd check is clean after stop; the
# data verifies again after a restart.
# timeout: 2400
# memory: 5G

lv_prelude
unit=$((64 << 20))

# The PV is a sparse file in the guest's /tmp (tmpfs, half of the 5 GiB this
# scenario asks for): the LV has no write-zeroes, so zeroing new extents costs
# a write of its own. The daemon writes through the LV's page cache: fio ends
# with an fsync so that the flush is not left to the stop.
step "volume group on a 1.5 GiB loop device, 64 MiB LV"
make_vg fvdlv 1536M
make_lv fvdlv 64M
[[ $(blockdev --getsize64 $lv) -eq $unit ]] || fail "LV is not 64 MiB"

step "create an 8 GiB image on the 64 MiB LV"
run "$FVD" create -s 8G "$lv"
run "$FVD" info "$lv"
[[ $(blockdev --getsize64 $lv) -eq $unit ]] || fail "create grew the LV although the metadata fits"

step "start"
dev=$("$FVD" start --grow-unit 64M "$lv")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
[[ $(blockdev --getsize64 "$dev") -eq $((8 << 30)) ]] || fail "$dev is not 8 GiB"
wait_for_path "$status" 10 || fail "no published LV status"

step "fio: 1 GiB sequential write with crc32c verify"
t0=${EPOCHREALTIME/./}
run fio --name=grow --filename="$dev" --rw=write --bs=1M --size=1G --ioengine=io_uring --iodepth=8 \
    --direct=1 --end_fsync=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output="$RESULTS/fio.txt"
t1=${EPOCHREALTIME/./}
grep -E "WRITE:|READ:" "$RESULTS/fio.txt" || true
printf 'write+verify took %d ms\n' $(((t1 - t0) / 1000))
sleep 1
cp "$status" "$RESULTS/status.json"
cat "$status"

step "growth figures"
jget() { json_get "$RESULTS/status.json" "$1"; }
size=$(jget size) used=$(jget used) growths=$(jget growths) initial=$(jget initial-size)
lvsize=$(lvs --noheadings --units b --nosuffix -o lv_size fvdlv/disk | tr -d ' ')
printf 'LV %s bytes (initial %s), used %s, free ahead %s, growths %s, waits %s (%s ms, max %s ms, after the first growth %s)\n' \
    "$lvsize" "$initial" "$used" $((size - used)) "$growths" "$(jget waits)" "$(jget wait-ms-total)" \
    "$(jget wait-ms-max)" "$(jget late-waits)"
[[ $lvsize -eq $size ]] || fail "lvs says $lvsize, the daemon $size"
[[ $initial -eq $unit ]] || fail "initial size $initial"
units=$(jget units-added)
[[ $growths -gt 0 ]] || fail "the LV never grew"
[[ $((size - initial)) -eq $((units * unit)) ]] || fail "the LV grew by $((size - initial)) bytes, not $units units"
free=$((size - used))
((free >= unit && free < 2 * unit)) || fail "free space ahead $free is not between one and two units"
[[ $units -eq $(((used + unit - 1) / unit)) ]] || fail "$units units added, want ceil(used / unit) = $(((used + unit - 1) / unit))"
printf 'units added %s in %s lvextend calls, growth time %s ms total\n' "$units" "$growths" "$(jget growth-ms-total)"
[[ $(jget enospc-errors) -eq 0 ]] || fail "ENOSPC errors while the VG had room"
[[ $(jget state) == ok ]] || fail "state $(jget state)"

step "stop; fvd check"
run "$FVD" stop -n "$id" --timeout 900
run "$FVD" check "$lv"
"$FVD" info "$lv" | tee "$RESULTS/info.txt"

step "start again: the data verifies"
dev=$("$FVD" start --grow-unit 64M -n "$id" "$lv")
run fio --name=grow --filename="$dev" --rw=write --bs=1M --size=1G --ioengine=io_uring --iodepth=8 \
    --direct=1 --verify=crc32c --verify_only --verify_fatal=1 --verify_state_save=0 --output="$RESULTS/fio-verify.txt"
run "$FVD" stop -n "$id" --timeout 900
run "$FVD" check "$lv"
step "ok"
