# shellcheck shell=bash
# The writeback timer: with --commit-interval 1s, O_DIRECT writes that no
# flush follows reach the journal within the interval. A power cut is played
# by kill -9 plus emptying the volatile log (tmpfs is what a power cut
# empties): the writes survive. With --commit-interval 0 the same steps lose
# them (as writeback allows without a flush), so the test tells the two apart.
# A guest that flushes more often than the interval gets no timer commit.
# Also: `fvd info` and `fvd list` show the daemon's live counters.
# timeout: 300

fvd_prelude
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
head -c $((4 << 20)) /dev/urandom >"$WORK/data"

live_field() { # IMAGE FIELD: a number from the live counters of `fvd info --output json`
    local info
    info=$("$FVD" info --output json "$1")
    awk -v k="\"$2\":" '$1 == k { sub(/,$/, "", $2); print $2; exit }' <<<"$info"
}

# write_then_power_cut INTERVAL IMAGE: writes 4 MiB at 8 MiB with O_DIRECT
# and no flush, waits 3 s, kills the daemon and empties the volatile log,
# then lets `fvd stop` replay the journal. Leaves what the image reads at
# 8 MiB in $WORK/after.
write_then_power_cut() {
    local interval=$1 img=$2 dev id pid
    run "$FVD" create -s 256M "$img"
    dev=$("$FVD" start --commit-interval "$interval" "$img")
    id=${dev#/dev/ublkb}
    pid=$(daemon_pid "$id")
    dd if="$WORK/data" of="$dev" bs=1M seek=8 oflag=direct status=none
    sleep 3
    run "$FVD" info "$img" | tee "$RESULTS/info-$interval.txt"
    run "$FVD" list | tee "$RESULTS/list-$interval.txt"
    TIMER_COMMITS=$(live_field "$img" timer-commits)
    PENDING=$(live_field "$img" pending-records)
    step "interval $interval: timer commits $TIMER_COMMITS, records pending $PENDING; power cut"
    kill -9 "$pid"
    sleep 1
    rm -f /run/fvd/*.vlog
    run "$FVD" stop -n "$id"
    run "$FVD" check "$img"
    "$FVD" io "$img" -c "read -o $WORK/after 8M 4M" >/dev/null
}

step "--commit-interval 1s: unflushed writes reach the journal"
write_then_power_cut 1s "$WORK/timer.fvd"
[[ ${TIMER_COMMITS:-0} -ge 1 ]] || fail "no timer commit in 3 s with a 1 s interval"
[[ $PENDING == 0 ]] || fail "$PENDING metadata records still pending after 3 s"
grep -q 'REC/WR' "$RESULTS/list-1s.txt" || fail "fvd list does not show records per write"
grep -q 'metadata writes (this daemon)' "$RESULTS/info-1s.txt" || fail "fvd info does not show the live counters"
cmp -s "$WORK/data" "$WORK/after" || fail "writes completed 3 s before the power cut were lost"

step "--commit-interval 0: the same writes are lost (nothing asked for them)"
write_then_power_cut 0 "$WORK/flushonly.fvd"
[[ ${TIMER_COMMITS:-0} == 0 ]] || fail "a timer commit ran with the timer off"
[[ ${PENDING:-0} -ge 1 ]] || fail "expected pending records with the timer off"
cmp -s "$WORK/after" <(head -c $((4 << 20)) /dev/zero) ||
    fail "with the timer off the unflushed writes should read as zeros after the power cut"

step "--commit-interval 2s, a guest that flushes every second: no timer commit"
run "$FVD" create -s 256M "$WORK/flushing.fvd"
dev=$("$FVD" start --commit-interval 2s "$WORK/flushing.fvd")
for i in 0 1 2 3 4; do
    dd if="$WORK/data" of="$dev" bs=1M count=1 seek=$((16 + 8 * i)) oflag=direct conv=fsync status=none
    sleep 1
done
sleep 1.2 # the status is published once a second
commits=$(live_field "$WORK/flushing.fvd" timer-commits)
journal=$(live_field "$WORK/flushing.fvd" journal-commits)
echo "flushing guest: $journal journal commits, $commits on the timer"
[[ $commits == 0 ]] || fail "$commits timer commits for a guest that flushes every second"
[[ $journal -ge 5 ]] || fail "the guest's five flushes made $journal journal commits"
run "$FVD" stop -n "${dev#/dev/ublkb}"
step "ok"
