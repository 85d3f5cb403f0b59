# shellcheck shell=bash
# kill -9 the daemon while it grows the LV, at several moments of the growth
# (lvextend running, just after): `fvd recover` takes the device back and fio
# finishes with its verify passing; then, with every write synchronous and
# logged, kill -9 during a growth again, stop the crashed device (its journal
# is replayed) and start the image anew: every acknowledged write reads back,
# fvd check is clean.
# timeout: 1200

lv_prelude
export FVD_GROW_UNIT=32M
M=$((1 << 20))

make_vg fvdkill 900M
make_lv fvdkill 32M
run "$FVD" create -s 2G "$lv"

lv_size() { blockdev --getsize64 "$lv"; }
# Waits until the daemon is inside a growth (its status says so and an lvm
# child runs), then sleeps $1 s and kills it with SIGKILL.
kill_in_growth() {
    local pid=$1 delay=$2 deadline=$((SECONDS + 120))
    until grep -q '"state": "growing"' "$status" 2>/dev/null && pgrep -P "$pid" >/dev/null; do
        ((SECONDS < deadline)) || fail "no growth seen within 120 s"
        sleep 0.02
    done
    sleep "$delay"
    local before
    before=$(lv_size)
    kill -9 "$pid"
    printf 'killed daemon %s %ss into a growth; LV %d MiB at the kill, %d MiB now\n' \
        "$pid" "$delay" $((before / M)) $(($(lv_size) / M))
}

step "round 1..3: fio write+verify; kill -9 inside a growth; fvd recover; fio verifies"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
off=0
for round in 1 2 3; do
    delay=$(echo "0 0.3 0.6" | cut -d' ' -f$round)
    fio --name=r$round --filename="$dev" --ioengine=io_uring --direct=1 --rw=write --bs=256k \
        --offset=$((off * M)) --size=160M --iodepth=8 --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
        --output="$RESULTS/fio-$round.txt" &
    fio_pid=$!
    kill_in_growth "$(daemon_pid "$id")" "$delay"
    sleep 0.5
    newdev=$("$FVD" recover -n "$id")
    [[ $newdev == "$dev" ]] || fail "recover gave $newdev"
    rc=0
    wait "$fio_pid" || rc=$?
    grep -E 'err=' "$RESULTS/fio-$round.txt" || true
    [[ $rc -eq 0 ]] || { cat "$RESULTS/fio-$round.txt"; fail "fio failed across the kill in round $round"; }
    off=$((off + 160))
done
grep -h "LV grown\|journal replayed" /run/fvd/"$id".log | tail -n 6 || true

step "round 4: synchronous logged writes; kill -9 inside a growth; start anew"
for i in $(seq 0 63); do head -c $((2 * M)) /dev/urandom >"$WORK/src-$i"; done
: >"$WORK/done"
(
    i=0
    while ((i < 64)); do
        dd if="$WORK/src-$i" of="$dev" bs=1M seek=$((off + 2 * i)) oflag=direct,sync conv=notrunc status=none || exit 0
        echo "$i" >>"$WORK/done"
        i=$((i + 1))
    done
) &
writer=$!
kill_in_growth "$(daemon_pid "$id")" 0.1
sleep 0.5
# The device is held by the writer: --force. Stopping a crashed device
# replays the image's journal and closes it clean.
out=$("$FVD" stop -n "$id" --force 2>&1) || true
printf '%s\n' "$out"
[[ $out == *"journal replayed"* ]] || fail "stopping the crashed device did not replay the journal"
wait "$writer" || true
acked=$(wc -l <"$WORK/done")
printf '%d synchronous 2 MiB writes acknowledged before the kill\n' "$acked"
((acked > 0)) || fail "no write was acknowledged before the kill"
"$FVD" info "$lv" | grep -E "clean|storage size" || true
run "$FVD" check "$lv" || printf 'check before the restart exited %s\n' "$?"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
while read -r i; do
    cmp <(dd if="$dev" bs=1M skip=$((off + 2 * i)) count=2 iflag=direct status=none) "$WORK/src-$i" ||
        fail "acknowledged write $i lost"
done <"$WORK/done"
# The same jobs as rounds 1-3, reading only.
for round in 1 2 3; do
    fio --name=r$round --filename="$dev" --ioengine=io_uring --direct=1 --rw=write --bs=256k \
        --offset=$(((round - 1) * 160 * M)) --size=160M --iodepth=8 --verify=crc32c --verify_only --verify_fatal=1 --verify_state_save=0 \
        --output="$RESULTS/fio-verify-$round.txt" ||
        { cat "$RESULTS/fio-verify-$round.txt"; fail "round $round data does not verify after the restart"; }
done
run "$FVD" stop -n "$id"
run "$FVD" check "$lv"
lvs --units m fvdkill
step "ok"
