# shellcheck shell=bash
# fio 4 KiB random writes with crc32c verify on the raw device, then, after a
# stop and a new start, a verify-only pass over everything written; the second daemon
# runs its queues on the tuned ring (FVD_QUEUE_RING=tuned: SINGLE_ISSUER, DEFER_TASKRUN).
# The verify-only reads must take the queues' fast path (src/ublk/hybrid.rs).
# timeout: 600

fvd_prelude
img=$WORK/disk.fvd
SIZE=256M

fio_job() {
    fio --name=verify --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
        --size=$SIZE --iodepth=32 --verify=crc32c --verify_fatal=1 --verify_dump=0 \
        --randseed=4242 --verify_state_save=0 "${@:2}"
}

step "create and start a 2 GiB image"
run "$FVD" create -s 2G "$img"
dev=$("$FVD" start "$img")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"

step "fio randwrite $SIZE + verify"
fio_job "$dev" --output="$RESULTS/fio-write.txt" || { cat "$RESULTS/fio-write.txt"; fail "fio write+verify failed"; }
grep -E 'IOPS|err=' "$RESULTS/fio-write.txt"
grep -q 'err= 0' "$RESULTS/fio-write.txt" || fail "fio reported errors"

step "stop, check, start again"
run "$FVD" stop -n "$id"
run "$FVD" check "$img"
dev=$(FVD_QUEUE_RING=tuned "$FVD" start -n "$id" "$img")
grep -q "queue rings: SINGLE_ISSUER" /run/fvd/*.log ||
    fail "the tuned ring is not in use: $(grep -h "tuned queue ring" /run/fvd/*.log | tail -n 1)"

step "verify-only pass over the whole $SIZE"
fio_job "$dev" --verify_only --output="$RESULTS/fio-verify.txt" ||
    { cat "$RESULTS/fio-verify.txt"; fail "fio verify-only failed"; }
grep -E 'IOPS|err=' "$RESULTS/fio-verify.txt"
grep -q 'err= 0' "$RESULTS/fio-verify.txt" || fail "fio verify reported errors"
# Verify-only must really have read everything back.
read_kib=$(sed -nE 's/.*read: IOPS=[^,]*, BW=[^ ]* \([^)]*\)\(([0-9.]+)([MG])iB\/.*/\1 \2/p' "$RESULTS/fio-verify.txt" | head -n 1)
printf 'verify-only read back: %s\n' "${read_kib:-?}"

run "$FVD" stop -n "$id"
run "$FVD" check "$img"

step "the verify-only reads took the fast path (no executor)"
# Each queue logs at its end how many requests the fast path and the tasks carried out.
done_lines=$(grep -h "queue done" /run/fvd/*.log | tail -n 8)
printf '%s\n' "$done_lines"
fast=$(printf '%s\n' "$done_lines" | sed -nE 's/.* fast=([0-9]+).*/\1/p' | sort -n | tail -n 1)
[[ ${fast:-0} -gt 1000 ]] || fail "the fast path carried out ${fast:-no} requests of the verify-only pass"
step "ok"
