# shellcheck shell=bash
# A volume group that runs out: writes that need new space fail with ENOSPC,
# reads and overwrites keep working, the condition shows in the status; after
# vgextend (a second PV) writing resumes without a restart; fvd check is clean.
# timeout: 900

lv_prelude
export FVD_GROW_UNIT=32M
M=$((1 << 20))
piece=16 # MiB per piece written

step "volume group of one 160 MiB PV, 64 MiB linear LV, 1 GiB image"
make_vg fvdfull 160M
make_lv fvdfull 64M
vgs --units m fvdfull
run "$FVD" create -s 1G "$lv"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
jget() { json_get "$status" "$1"; }

# Piece i holds the bytes of src-i (random); written with O_DIRECT so an
# error shows at the write.
write_piece() { # i -> 0 or dd's exit status; dd's message in $WORK/err
    dd if="$WORK/src-$1" of="$dev" bs=1M seek=$(($1 * piece)) oflag=direct conv=notrunc status=none 2>"$WORK/err"
}
check_piece() {
    cmp <(dd if="$dev" bs=1M skip=$(($1 * piece)) count=$piece iflag=direct status=none) "$WORK/src-$1" ||
        fail "piece $1 reads back wrong"
}
for i in $(seq 0 15); do head -c $((piece * M)) /dev/urandom >"$WORK/src-$i"; done

lvmconfig --typeconfig current devices/global_filter || true
step "write $piece MiB pieces until the volume group is full"
n=0
while ((n < 12)); do
    if ! write_piece $n; then
        cat "$WORK/err"
        grep -q "No space left on device" "$WORK/err" || fail "piece $n failed, but not with ENOSPC"
        break
    fi
    n=$((n + 1))
done
step "$n pieces ($((n * piece)) MiB) written before ENOSPC"
((n > 0 && n < 12)) || fail "the volume group never ran out ($n pieces)"
sleep 0.5
cat "$status"
cp "$status" "$RESULTS/status-full.json"
[[ $(jget state) == no-space ]] || fail "status state is $(jget state), want no-space"
[[ $(jget vg-free) -lt $((4 * M)) ]] || fail "the volume group still has $(jget vg-free) bytes free"
info=$("$FVD" info "$lv")
printf '%s\n' "$info" | grep -E "storage|clean" || true
[[ $info == *'"state":"no-space"'* ]] || fail "fvd info does not show the no-space state"

step "reads and overwrites keep working; new space still fails"
for i in $(seq 0 $((n - 1))); do check_piece "$i"; done
cp "$WORK/src-15" "$WORK/src-0"
write_piece 0 || { cat "$WORK/err"; fail "overwrite of piece 0 failed while the VG is full"; }
check_piece 0
if write_piece $((n + 1)); then fail "a write past the used space succeeded with a full VG"; fi
grep -q "No space left on device" "$WORK/err" || { cat "$WORK/err"; fail "no ENOSPC for new space"; }
enospc=$(jget enospc-errors)
printf 'ENOSPC errors so far: %s\n' "$enospc"

step "vgextend with a second PV; writing resumes"
truncate -s 256M "$WORK/pv2.img"
loop2=$(losetup -f --show "$WORK/pv2.img")
at_exit "losetup -d $loop2"
pvcreate -q "$loop2"
run vgextend -q fvdfull "$loop2"
sleep 1.2 # past the one-second fast-fail window
t0=${EPOCHREALTIME/./}
for i in $(seq "$n" $((n + 5))); do
    write_piece "$i" || { cat "$WORK/err"; fail "piece $i failed after vgextend"; }
done
t1=${EPOCHREALTIME/./}
printf 'pieces %d..%d written after vgextend in %d ms\n' "$n" $((n + 5)) $(((t1 - t0) / 1000))
sleep 0.5
cat "$status"
cp "$status" "$RESULTS/status-resumed.json"
# Read once: the state may change between two reads (growing, then ok).
st=$(jget state)
[[ $st == ok || $st == growing ]] || fail "state $st after vgextend"
for i in $(seq 0 $((n + 5))); do check_piece "$i"; done

step "stop; fvd check"
run "$FVD" stop -n "$id"
run "$FVD" check "$lv"
lvs --units m fvdfull
step "ok"
