# shellcheck shell=bash
# Four queues, four fio jobs with verify, each in its own region.
# timeout: 600
# cpus: 4

fvd_prelude
img=$WORK/disk.fvd

step "create, start with 4 queues"
run "$FVD" create -s 1G "$img"
dev=$("$FVD" start --queues 4 --depth 64 "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"
nq=$(ls -d /sys/block/ublkb$id/mq/* | wc -l)
[[ $nq -eq 4 ]] || fail "the device has $nq hardware queues, want 4"
pid=$(daemon_pid "$id")
threads=$(ls /proc/$pid/task | wc -l)
printf 'daemon %s has %s threads\n' "$pid" "$threads"
[[ $threads -ge 5 ]] || fail "daemon has $threads threads, want 4 queues + main + signals"

step "fio: 4 jobs x 64 MiB, 4k random writes + verify, mixed 4k-64k blocks"
fio --name=mq --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bsrange=4k-64k --size=64M --offset_increment=64M --numjobs=4 --iodepth=16 \
    --verify=crc32c --verify_fatal=1 --verify_dump=0 --verify_state_save=0 --group_reporting \
    --randseed=99 --output="$RESULTS/fio.txt" || { cat "$RESULTS/fio.txt"; fail "fio failed"; }
grep -E 'IOPS|err=' "$RESULTS/fio.txt"
grep -q 'err= 0' "$RESULTS/fio.txt" || fail "fio reported errors"

step "every queue served requests"
for q in /sys/block/ublkb$id/mq/*; do
    printf '  %s: cpu_list=%s\n' "${q##*/}" "$(cat "$q/cpu_list")"
done
grep -E 'ublkb' /proc/diskstats

step "stop, check, verify-only after restart (1 queue)"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
dev=$("$FVD" start --queues 1 -n "$id" "$img")
fio --name=mq --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bsrange=4k-64k --size=64M --offset_increment=64M --numjobs=4 --iodepth=16 \
    --verify=crc32c --verify_fatal=1 --verify_dump=0 --verify_state_save=0 --group_reporting \
    --randseed=99 --verify_only --output="$RESULTS/fio-verify.txt" ||
    { cat "$RESULTS/fio-verify.txt"; fail "fio verify-only failed"; }
grep -q 'err= 0' "$RESULTS/fio-verify.txt" || fail "fio verify reported errors"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
step "ok"
