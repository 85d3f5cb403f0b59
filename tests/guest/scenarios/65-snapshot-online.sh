# shellcheck shell=bash
# Online snapshots (fvd snapshot -n ID NEW) on a live device:
# 1. fio writes with crc32c verify while three snapshots are taken one after
#    another: no error, then a verify-only pass over the chain; each pause printed.
# 2. point in time: write A, snapshot, write B, snapshot, write C, stop; each
#    frozen layer (fvd convert -O raw) holds exactly what the device held at its
#    snapshot, the top the final content. A snapshot that can't be taken (NEW
#    exists) leaves the device serving and writable.
# 3. the daemon killed during a snapshot (test hook FVD_TEST_SNAPSHOT_DIE_AFTER:
#    after the hold, after the freeze, after the overlay), with fio writing:
#    fvd recover rolls back or completes, and fio verifies with no error.
# timeout: 1500

fvd_prelude
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"

fio_job() {
    fio --name=verify --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
        --size="$2" --iodepth=32 --verify=crc32c --verify_fatal=1 --verify_dump=0 \
        --verify_state_save=0 --randseed=4242 "${@:3}"
}

# snap ID NEW: an online snapshot; prints the pause, appends it to $RESULTS/pauses.txt.
snap() {
    local out
    out=$("$FVD" snapshot -n "$1" --output json "$2") || fail "fvd snapshot -n $1 $2 failed"
    printf '%s\n' "$out" >>"$RESULTS/snapshots.json"
    local held
    held=$(printf '%s\n' "$out" | sed -nE 's/^  "held-ms": ([0-9.]+),?$/\1/p')
    [[ -n $held ]] || fail "no held-ms in: $out"
    printf '%s %s\n' "$(basename "$2")" "$held" >>"$RESULTS/pauses.txt"
    step "snapshot $(basename "$2"): requests held $held ms"
}

devsum() {
    dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1
}

fio_ok() {
    grep -E 'IOPS|err=|verify' "$1" || true
    grep -q 'err= 0' "$1" || fail "fio reported errors ($1)"
}

: >"$RESULTS/pauses.txt"

# --- 1. fio verify across three online snapshots ---------------------------------
step "1. fio randwrite+verify while three online snapshots are taken"
img=$WORK/disk.fvd
run "$FVD" create -s 1G "$img"
dev=$("$FVD" start --queues 2 "$img")
id=${dev#/dev/ublkb}
fio_job "$dev" 128M --output="$RESULTS/fio-write.txt" &
fio_pid=$!
sleep 2
for n in 1 2 3; do
    kill -0 "$fio_pid" 2>/dev/null || fail "fio finished before snapshot $n: make the job longer"
    snap "$id" "$WORK/snap$n.fvd"
    sleep 1
done
kill -0 "$fio_pid" 2>/dev/null || fail "fio finished before the last snapshot was released: make the job longer"
rc=0
wait "$fio_pid" || rc=$?
[[ $rc -eq 0 ]] || { cat "$RESULTS/fio-write.txt"; fail "fio exited $rc across the snapshots"; }
fio_ok "$RESULTS/fio-write.txt"
run "$FVD" list
"$FVD" list --output json >"$RESULTS/list.json"
grep -q '"snapshots": 3' "$RESULTS/list.json" || fail "fvd list --output json does not count 3 snapshots"
grep -q '"last-snapshot-held-ms"' "$RESULTS/list.json" || fail "fvd list --output json has no last pause"
grep -q "\"image\": \"$WORK/snap3.fvd\"" "$RESULTS/list.json" || fail "the state does not name the new top"
grep -h "online snapshot taken" "/run/fvd/$id.log" | sed 's/\x1b\[[0-9;]*m//g'
[[ $(grep -c "online snapshot taken" "/run/fvd/$id.log") -eq 3 ]] || fail "the log does not show 3 snapshots"
step "verify-only pass over the chain"
fio_job "$dev" 128M --verify_only --output="$RESULTS/fio-verify.txt" ||
    { cat "$RESULTS/fio-verify.txt"; fail "fio verify-only failed"; }
fio_ok "$RESULTS/fio-verify.txt"
run "$FVD" stop -n "$id"
for f in disk snap1 snap2; do
    info=$("$FVD" info --output json "$WORK/$f.fvd")
    [[ $info == *'"frozen": true'* ]] || fail "$f.fvd is not frozen"
done
run "$FVD" check "$WORK/snap3.fvd"
step "restart the top: the data is all there"
dev=$("$FVD" start "$WORK/snap3.fvd")
fio_job "$dev" 128M --verify_only --output="$RESULTS/fio-verify2.txt" ||
    { cat "$RESULTS/fio-verify2.txt"; fail "fio verify-only after a restart failed"; }
fio_ok "$RESULTS/fio-verify2.txt"
run "$FVD" stop -n "${dev#/dev/ublkb}"
rm -f "$WORK"/disk.fvd "$WORK"/snap?.fvd

# --- 2. point in time ------------------------------------------------------------
step "2. point in time: A, snapshot, B, snapshot, C"
img=$WORK/pit.fvd
run "$FVD" create -s 32M "$img"
dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
dd if=/dev/urandom of="$dev" bs=1M count=32 oflag=direct status=none
sum_a=$(devsum "$dev")
snap "$id" "$WORK/pit1.fvd"
dd if=/dev/urandom of="$dev" bs=1M seek=4 count=8 oflag=direct status=none
dd if=/dev/urandom of="$dev" bs=4k seek=7000 count=3 oflag=direct status=none
sum_b=$(devsum "$dev")
[[ $sum_b != "$sum_a" ]] || fail "B did not change the device"
snap "$id" "$WORK/pit2.fvd"
step "a snapshot that can't be taken (NEW exists) leaves the device serving, writable"
rc=0
out=$("$FVD" snapshot -n "$id" "$WORK/pit1.fvd" 2>&1) || rc=$?
printf '%s\n' "$out"
[[ $rc -ne 0 && $out == *"already exists"* ]] || fail "snapshot over an existing file: exit $rc"
dd if=/dev/urandom of="$dev" bs=1M seek=20 count=4 oflag=direct status=none
dd if=/dev/urandom of="$dev" bs=512 seek=3 count=1 oflag=direct status=none
sum_c=$(devsum "$dev")
grep -q "\"image\": \"$WORK/pit2.fvd\"" "/run/fvd/$id.json" || fail "the state does not name pit2.fvd"
run "$FVD" stop -n "$id"
step "each layer holds its moment"
for pair in "pit.fvd:$sum_a" "pit1.fvd:$sum_b" "pit2.fvd:$sum_c"; do
    f=${pair%%:*} want=${pair#*:}
    run "$FVD" convert -O raw "$WORK/$f" "$WORK/$f.raw"
    got=$(sha256sum "$WORK/$f.raw" | cut -d' ' -f1)
    [[ $got == "$want" ]] || fail "$f: content $got, want $want"
    printf '  %s: %s ok\n' "$f" "$got"
    rm -f "$WORK/$f.raw"
done
run "$FVD" check "$WORK/pit2.fvd"
rm -f "$WORK"/pit*.fvd

# --- 3. the daemon killed during a snapshot --------------------------------------
# crash_case HOOK OUTCOME: OUTCOME is "rolled back" (the old top stays) or
# "completed" (NEW is the top).
crash_case() {
    local hook=$1 outcome=$2 base=$WORK/c-$1.fvd new=$WORK/c-$1-new.fvd
    step "3. kill -9 after '$hook' during a snapshot, fio writing: expect $outcome"
    run "$FVD" create -s 256M "$base"
    local dev id pid
    dev=$(FVD_TEST_SNAPSHOT_DIE_AFTER=$hook "$FVD" start --queues 2 "$base")
    id=${dev#/dev/ublkb}
    pid=$(daemon_pid "$id")
    fio_job "$dev" 64M --output="$RESULTS/fio-crash-$hook.txt" &
    local fio_pid=$!
    sleep 2
    kill -0 "$fio_pid" 2>/dev/null || fail "fio finished before the snapshot: make the job longer"
    rc=0
    out=$("$FVD" snapshot -n "$id" "$new" 2>&1) || rc=$?
    printf '%s\n' "$out"
    [[ $rc -ne 0 ]] || fail "the snapshot succeeded although the daemon was to die"
    sleep 1
    ! kill -0 "$pid" 2>/dev/null || fail "the daemon (pid $pid) is still alive"
    grep -q "\"snapshot-pending\": \"$new\"" "/run/fvd/$id.json" || fail "no pending snapshot in the state"
    [[ -b $dev ]] || fail "$dev vanished when its daemon died"
    step "fvd recover -n $id"
    [[ $("$FVD" recover -n "$id" 2>"$RESULTS/recover-$hook.err") == "$dev" ]] ||
        { cat "$RESULTS/recover-$hook.err"; fail "recover failed"; }
    sed 's/\x1b\[[0-9;]*m//g' "$RESULTS/recover-$hook.err"
    grep -q "interrupted online snapshot is $outcome" "$RESULTS/recover-$hook.err" ||
        fail "the recovery did not say the snapshot is $outcome"
    ! grep -q '"snapshot-pending"' "/run/fvd/$id.json" || fail "the snapshot is still pending after recover"
    [[ ! -e $new.fvd-snapshot-tmp ]] || fail "the temporary overlay is left over"
    local top=$base
    if [[ $outcome == completed ]]; then
        top=$new
        [[ -e $new ]] || fail "$new missing after completing"
    else
        [[ ! -e $new ]] || fail "$new exists after a roll back"
    fi
    grep -q "\"image\": \"$top\"" "/run/fvd/$id.json" || fail "the state does not name $top"
    rc=0
    wait "$fio_pid" || rc=$?
    [[ $rc -eq 0 ]] || { cat "$RESULTS/fio-crash-$hook.txt"; fail "fio exited $rc across the crash"; }
    fio_ok "$RESULTS/fio-crash-$hook.txt"
    fio_job "$dev" 64M --verify_only --output="$RESULTS/fio-crash-$hook-verify.txt" ||
        { cat "$RESULTS/fio-crash-$hook-verify.txt"; fail "verify-only after the crash failed"; }
    fio_ok "$RESULTS/fio-crash-$hook-verify.txt"
    step "a snapshot on the recovered daemon works"
    snap "$id" "$WORK/c-$hook-after.fvd"
    run "$FVD" stop -n "$id"
    run "$FVD" check "$WORK/c-$hook-after.fvd"
    rm -f "$WORK"/c-"$hook"*.fvd
}
crash_case hold "rolled back"
crash_case freeze completed
crash_case create completed

step "pauses (ms):"
cat "$RESULTS/pauses.txt"
step "ok"
