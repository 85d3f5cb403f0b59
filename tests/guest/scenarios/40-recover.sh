# shellcheck shell=bash
# kill -9 the daemon while fio writes with verify; `fvd recover` takes the
# device back and fio finishes with no error. Then kill -9 again, start the
# image anew (its journal is replayed), verify everything, stop, check.
# timeout: 600

fvd_prelude
img=$WORK/disk.fvd
SIZE=256M

fio_job() {
    fio --name=verify --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
        --size=$SIZE --iodepth=32 --verify=crc32c --verify_fatal=1 --verify_dump=0 \
        --verify_state_save=0 --randseed=777 "${@:2}"
}

step "create and start"
run "$FVD" create -s 1G "$img"
dev=$("$FVD" start --queues 2 "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
pid=$(daemon_pid "$id")
[[ -n $pid ]] || fail "no daemon pid in /run/fvd/$id.json"

step "fio write+verify in the background; kill -9 the daemon (pid $pid) mid-way"
fio_job "$dev" --output="$RESULTS/fio-write.txt" &
fio_pid=$!
sleep 3
kill -0 "$fio_pid" || fail "fio finished before the kill: make the job longer"
kill -9 "$pid"
step "daemon killed"
sleep 1
run "$FVD" list
[[ -b $dev ]] || fail "$dev vanished when its daemon died"

step "fvd recover -n $id"
newdev=$("$FVD" recover -n "$id")
[[ $newdev == "$dev" ]] || fail "recover gave '$newdev', want $dev"
run "$FVD" list
newpid=$(daemon_pid "$id")
[[ $newpid != "$pid" ]] || fail "the state file still names the dead daemon"

step "fio finishes with no error"
rc=0
wait "$fio_pid" || rc=$?
grep -E 'IOPS|err=|verify' "$RESULTS/fio-write.txt" || true
[[ $rc -eq 0 ]] || fail "fio exited $rc across the recovery"
grep -q 'err= 0' "$RESULTS/fio-write.txt" || fail "fio reported errors across the recovery"
grep -q 'recoveries": 1' "/run/fvd/$id.json" || fail "recovery count not recorded"

step "kill -9 again; the image is left dirty"
kill -9 "$newpid"
sleep 1
info=$("$FVD" info --output json "$img")
[[ $info == *'"clean": false'* ]] || fail "image clean after kill -9?"

step "start the image anew: journal replayed"
dev2=$("$FVD" start "$img")
id2=${dev2#/dev/ublkb}
[[ $id2 != "$id" ]] || fail "new start reused the crashed device's ID"
grep -q "journal replayed" "/run/fvd/$id2.log" || fail "the new daemon did not replay the journal"
grep -E "metadata of completed writes|volatile log" "/run/fvd/$id2.log" | sed 's/\x1b\[[0-9;]*m//g' || true
run "$FVD" list

step "verify-only pass: all data is there"
fio_job "$dev2" --verify_only --output="$RESULTS/fio-verify.txt" ||
    { cat "$RESULTS/fio-verify.txt"; fail "fio verify-only failed"; }
grep -E 'IOPS|err=' "$RESULTS/fio-verify.txt"
grep -q 'err= 0' "$RESULTS/fio-verify.txt" || fail "fio verify reported errors"

step "the crashed device can't be recovered while another daemon serves its image"
rc=0
out=$("$FVD" recover -n "$id" 2>&1) || rc=$?
printf '%s\n' "$out"
[[ $rc -ne 0 && $out == *"lock held"* ]] || fail "recover of a device whose image is served elsewhere: exit $rc, '$out'"

step "stop the crashed device, then the new one; the image is clean"
run "$FVD" stop -n "$id"
[[ ! -e /sys/class/ublk-char/ublkc$id ]] || fail "crashed device $id still exists"
run "$FVD" stop -n "$id2"
run "$FVD" check "$img"
info=$("$FVD" info --output json "$img")
[[ $info == *'"clean": true'* ]] || fail "image not clean after stop"

step "a recovered device stops clean too; run dir off tmpfs: no volatile log, journaled before completion"
# 9p is not tmpfs: the daemon journals allocations before writes complete.
export FVD_RUN_DIR=$RESULTS/run-journaled
at_exit "FVD_RUN_DIR=$FVD_RUN_DIR \"$FVD\" stop --all >/dev/null 2>&1 || true"
dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
head -c 4M /dev/urandom >"$WORK/data"
dd if="$WORK/data" of="$dev" bs=1M oflag=direct status=none
kill -9 "$(daemon_pid "$id")"
[[ $("$FVD" recover -n "$id") == "$dev" ]] || fail "second recover failed"
cmp -n $((4 << 20)) "$dev" "$WORK/data" || fail "data written before the kill differs after recovery"
grep -h "metadata of completed writes" "$FVD_RUN_DIR/$id.log" | sed 's/\x1b\[[0-9;]*m//g'
grep -q "journaled before writes complete" "$FVD_RUN_DIR/$id.log" || fail "expected the journal-before-complete mode"
run "$FVD" stop -n "$id"
[[ ! -e /sys/class/ublk-char/ublkc$id ]] || fail "recovered device $id still exists after stop"
run "$FVD" check "$img"
info=$("$FVD" info --output json "$img")
[[ $info == *'"clean": true'* ]] || fail "image not clean after stopping the recovered device"
step "ok"
