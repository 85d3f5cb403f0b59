# shellcheck shell=bash
# fvd's device handed to QEMU's block layer as a raw disk, as hypervisors use it:
# qemu-io opens /dev/ublkbN with driver=host_device, cache.direct=on, aio=io_uring, writes
# patterns and reads them back (and what fvd io wrote before); then qemu-storage-daemon
# serves the device the same way over NBD (the host_device driver under an NBD export), the
# kernel's NBD client attaches it, and the bytes read there equal the device's.
# timeout: 300

fvd_prelude
modprobe nbd nbds_max=2 || fail "modprobe nbd failed"
command -v qemu-io >/dev/null || fail "qemu-io not installed"
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
at_exit "nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true"
at_exit "[[ -f $WORK/qsd.pid ]] && kill \$(cat $WORK/qsd.pid) 2>/dev/null || true"
img=$WORK/vm.fvd
run "$FVD" create -s 256M "$img"
"$FVD" io "$img" -c "write -P 0x5c 8M 1M" >/dev/null
dev=$(run "$FVD" start "$img" | tail -n 1)
opts="driver=host_device,filename=$dev,cache.direct=on,aio=io_uring"

step "qemu-io on $dev: $opts"
out=$(qemu-io --image-opts "$opts" \
    -c "read -P 0x5c 8M 1M" \
    -c "write -P 0xa1 0 4M" -c "write -P 0xb2 100M 64k" -c "write -z 120M 1M" -c "flush" \
    -c "read -P 0xa1 0 4M" -c "read -P 0xb2 100M 64k" -c "read -P 0 120M 1M" -c "read -P 0 200M 1M" 2>&1) ||
    fail "qemu-io failed: $out"
grep -qi "pattern verification failed\|error" <<<"$out" && fail "qemu-io: $out"
grep -E "^(read|wrote)" <<<"$out" | head -n 9
cmp <(dd if="$dev" bs=1M count=4 iflag=direct status=none) <(head -c 4M /dev/zero | tr '\0' '\241') ||
    fail "the device does not read what qemu-io wrote"

step "qemu-storage-daemon exports $dev over NBD (host_device, io_uring, O_DIRECT); nbd-client reads it"
qemu-storage-daemon --blockdev "node-name=disk,$opts" \
    --nbd-server addr.type=unix,addr.path="$WORK/qsd.sock" \
    --export type=nbd,id=e0,node-name=disk,name=disk,writable=on \
    --pidfile "$WORK/qsd.pid" --daemonize || fail "qemu-storage-daemon did not start"
wait_for_path "$WORK/qsd.sock" 10 || fail "no NBD socket"
nbd-client -N disk -u "$WORK/qsd.sock" /dev/nbd0 -t 10 -L >/dev/null 2>&1 || fail "nbd-client failed"
for _ in $(seq 50); do [[ $(blockdev --getsize64 /dev/nbd0) -gt 0 ]] && break; sleep 0.2; done
[[ $(blockdev --getsize64 /dev/nbd0) == $((256 << 20)) ]] || fail "/dev/nbd0 is not 256 MiB"
head -c 2M /dev/urandom >"$WORK/x.bin"
dd if="$WORK/x.bin" of=/dev/nbd0 bs=1M seek=50 oflag=direct status=none
sync
cmp <(dd if=/dev/nbd0 bs=1M iflag=direct status=none) <(dd if="$dev" bs=1M iflag=direct status=none) ||
    fail "the NBD export reads differently from the device"
cmp <(dd if="$dev" bs=1M skip=50 count=2 iflag=direct status=none) "$WORK/x.bin" ||
    fail "a write through the NBD export did not reach the device"
printf 'the export reads the whole 256 MiB device identically; a 2 MiB write through it reached the device\n'
nbd-client -d /dev/nbd0 >/dev/null
kill "$(cat "$WORK/qsd.pid")"
sleep 0.5
"$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
"$FVD" check "$img" >/dev/null || fail "fvd check"
"$FVD" io "$img" -c "read -P 0xa1 0 4M" -c "read -P 0xb2 100M 64k" -c "read -P 0 120M 1M" >/dev/null ||
    fail "the image does not hold what qemu-io wrote"
step "ok"
