# shellcheck shell=bash
# The cloud case over the network: a golden qcow2 image exported by qemu-storage-daemon
# over NBD (a unix socket), attached by the kernel's NBD client (nbd-client), as the base of a thin fvd overlay served
# with copy-on-read and prefetch.
#   1. The golden ext4 reads through the device (its files match their checksums), fio
#      with verify writes into it, prefetch finishes, the export is detached and the
#      server stopped, and a restarted daemon still reads every file.
#   2. The server dies while the base is still needed: reads of blocks already local go
#      on, a read that needs the base fails with an error within seconds (never a hang),
#      writes go on, the prefetch fails and keeps retrying. Once the server is back, the
#      daemon is stopped, the export re-attached, and a new daemon's prefetch resumes
#      from the cursor the first one saved and finishes.
#   3. Two daemons prefetch from the one server at once, each held to 2 MiB/s: both
#      finish, and the bytes the server read for them (rchar of its process) never
#      exceed the two limits' sum by more than two prefetch pieces per daemon in any
#      second (the limiter's bound), and average at most the limits' sum.
# timeout: 600

fvd_prelude
modprobe nbd nbds_max=4 || fail "modprobe nbd failed"
command -v nbd-client >/dev/null || fail "nbd-client not installed"
command -v qemu-storage-daemon >/dev/null || fail "qemu-storage-daemon not installed"
export RUST_LOG=fvd=info
SOCK=$WORK/qsd.sock
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
at_exit "umount \"$WORK/mnt\" 2>/dev/null || true"
at_exit "nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true; nbd-client -d /dev/nbd1 >/dev/null 2>&1 || true"
at_exit "[[ -f $WORK/qsd.pid ]] && kill \$(cat $WORK/qsd.pid) 2>/dev/null || true"

# since T0: seconds from T0 (date +%s.%N) until now, one decimal.
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

# serve: qemu-storage-daemon exports golden.qcow2, read-only, as "golden" on $SOCK.
serve() {
    rm -f "$SOCK"
    qemu-storage-daemon \
        --blockdev driver=file,node-name=f0,filename="$WORK/golden.qcow2",read-only=on \
        --blockdev driver=qcow2,node-name=golden,file=f0,read-only=on \
        --nbd-server addr.type=unix,addr.path="$SOCK" \
        --export type=nbd,id=e0,node-name=golden,name=golden \
        --pidfile "$WORK/qsd.pid" --daemonize || fail "qemu-storage-daemon did not start"
    wait_for_path "$SOCK" 10 || fail "no NBD socket"
}

# attach DEV: the kernel client on DEV, read-only, 5 s timeout.
attach() {
    nbd-client -N golden -u "$SOCK" "$1" -t 5 -R -L >"$RESULTS/nbd-client-${1##*/}.txt" 2>&1 ||
        fail "nbd-client $1 failed: $(cat "$RESULTS/nbd-client-${1##*/}.txt")"
    for _ in $(seq 50); do
        if [[ $(blockdev --getsize64 "$1" 2>/dev/null || echo 0) -gt 0 ]]; then
            return 0
        fi
        sleep 0.2
    done
    fail "$1 has no size after nbd-client"
}

step "a golden ext4 (64 MiB, files with checksums) as a qcow2 image"
mnt=$WORK/mnt
mkdir -p "$mnt"
mkdir -p "$WORK/files"
for i in 1 2 3 4 5 6; do head -c $((3 << 20)) /dev/urandom >"$WORK/files/file$i"; done
(cd "$WORK/files" && sha256sum file* >"$WORK/golden.sums")
truncate -s 64M "$WORK/golden.raw"
mkfs.ext4 -q -F -d "$WORK/files" "$WORK/golden.raw"
rm -rf "$WORK/files"
qemu-img convert -f raw -O qcow2 "$WORK/golden.raw" "$WORK/golden.qcow2"
golden_sum=$(sha256sum <"$WORK/golden.raw" | cut -d' ' -f1)
rm -f "$WORK/golden.raw"
printf 'golden.qcow2: %s bytes on disk\n' "$(stat -c %s "$WORK/golden.qcow2")"

step "qemu-storage-daemon exports it over NBD; nbd-client attaches /dev/nbd0"
serve
attach /dev/nbd0
sum=$(dd if=/dev/nbd0 bs=1M status=none | sha256sum | cut -d' ' -f1)
[[ $sum == "$golden_sum" ]] || fail "/dev/nbd0 does not read the golden image"

step "a thin overlay over /dev/nbd0, copy-on-read and prefetch"
img=$WORK/vm1.fvd
run "$FVD" create --base /dev/nbd0 --copy-on-read --prefetch "$img"
t0=$(date +%s.%N)
dev=$(run "$FVD" start "$img" | tail -n 1)
mount "$dev" "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$WORK/golden.sums") || fail "golden files differ through the overlay"
fio --name=verify --filename="$mnt/fio.dat" --size=16M --rw=randwrite --bs=4k --ioengine=io_uring --direct=1 \
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_state_save=0 --output="$RESULTS/fio.txt" || fail "fio verify failed"
grep -q "err= 0" "$RESULTS/fio.txt" || fail "fio reported errors"
(cd "$mnt" && sha256sum fio.dat >"$WORK/fio.sum")

step "prefetch finishes; then the export is detached and the server stopped"
wait_prefetched "$img" 150 || fail "prefetch did not finish"
t1=$(date +%s.%N)
sleep 1.5
live=$("$FVD" list --output json)
printf 'prefetch done %s s after start; fvd list: %s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" \
    "$(grep -oE '"(copied-bytes|cursor-blocks|base-blocks|backoffs)": [0-9]+' <<<"$live" | tr '\n' ' ')"
umount "$mnt"
"$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
nbd-client -d /dev/nbd0 >/dev/null
kill "$(cat "$WORK/qsd.pid")"
printf 'detached %s s after prefetch finished (umount, fvd stop, nbd-client -d)\n' "$(since "$t1")"

step "without the server: a restarted daemon reads every file"
dev=$(run "$FVD" start "$img" | tail -n 1)
mount "$dev" "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$WORK/golden.sums" && sha256sum -c --quiet "$WORK/fio.sum") ||
    fail "files differ after the base went away"
umount "$mnt"
"$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
"$FVD" check "$img" >/dev/null || fail "fvd check after part 1"

step "part 2: a second overlay, prefetch at 1 MiB/s; the first 4 MiB read (copied in)"
serve
attach /dev/nbd1
img2=$WORK/vm2.fvd
run "$FVD" create --base /dev/nbd1 --copy-on-read "$img2"
# The last 64 KiB of base data (not a zero block): the prefetch, which goes from the
# start, reaches it last.
far=$("$FVD" map --output json "$img2" | python3 -c '
import json, sys
r = [x for x in json.load(sys.stdin) if x["kind"] == "base"][-1]
print((r["start"] + r["length"]) // 65536 - 1)')
printf 'a block only the base holds: 64 KiB block %d\n' "$far"
dev=$(run "$FVD" start --prefetch --prefetch-rate 1M "$img2" | tail -n 1)
id=${dev#/dev/ublkb}
dd if="$dev" of="$WORK/head.bin" bs=1M count=4 iflag=direct status=none
sleep 1 # copy-on-read stores in the background

step "the NBD server dies"
kill -9 "$(cat "$WORK/qsd.pid")"
sleep 0.5
ts=$(date +%s.%N)
dd if="$dev" of="$WORK/head2.bin" bs=1M count=4 iflag=direct status=none ||
    fail "a read of local blocks failed while the server was down"
cmp "$WORK/head.bin" "$WORK/head2.bin" || fail "local blocks read differently"
printf 'read of 4 MiB already local: ok in %s s\n' "$(since "$ts")"
ts=$(date +%s.%N)
if timeout 60 dd if="$dev" of=/dev/null bs=64k count=1 skip="$far" iflag=direct status=none 2>"$WORK/dd.err"; then
    fail "a read that needs the base succeeded with the server down"
fi
took=$(since "$ts")
awk -v t="$took" 'BEGIN { exit !(t < 50) }' || fail "the read that needs the base hung ($took s)"
printf 'read that needs the base: failed in %s s (%s)\n' "$took" "$(head -c 120 "$WORK/dd.err")"
head -c $((1 << 20)) /dev/urandom >"$WORK/w.bin"
ts=$(date +%s.%N)
dd if="$WORK/w.bin" of="$dev" bs=64k seek=$((32 << 4)) oflag=direct status=none ||
    fail "a write of whole blocks failed while the server was down"
printf 'write of 1 MiB (whole blocks): ok in %s s\n' "$(since "$ts")"
sleep 1.5 # the daemon publishes its status once a second
cursor_down=$("$FVD" list --output json | grep -oE '"cursor-blocks": [0-9]+' | grep -oE '[0-9]+$' || echo '?')
printf 'prefetch while down: %s\n' "$("$FVD" list | awk -v d="$dev" '$2 == d')"

step "the server comes back; the daemon restarts on the re-attached base and the prefetch resumes"
grep -q "prefetch failed; the image keeps using its base, and prefetch tries again" /run/fvd/"$id".log ||
    fail "the daemon's log does not show the prefetch failure and its retry"
serve
"$FVD" stop -n "$id" >/dev/null
nbd-client -d /dev/nbd1 >/dev/null 2>&1 || true
attach /dev/nbd1
saved=$("$FVD" info --output json "$img2" | grep -oE '"prefetch-cursor": [0-9]+' | grep -oE '[0-9]+$')
printf 'prefetch cursor: %s of 1024 blocks while the server was down, %s saved at the stop\n' "$cursor_down" "$saved"
[[ $saved -gt 0 ]] || fail "no prefetch progress was saved"
ts=$(date +%s.%N)
dev=$(run "$FVD" start --prefetch --prefetch-rate 8M "$img2" | tail -n 1)
id=${dev#/dev/ublkb}
cmp <(dd if="$dev" bs=64k skip="$far" count=1 iflag=direct status=none) \
    <(dd if=/dev/nbd1 bs=64k skip="$far" count=1 iflag=direct status=none) ||
    fail "the block only the base held reads differently once the base is back"
wait_prefetched "$img2" 120 || fail "prefetch did not finish after the server came back"
printf 'prefetch finished %s s after the restart\n' "$(since "$ts")"
grep -E "prefetch (started|stopped)" /run/fvd/"$id".log | tail -n 2 | cut -c1-200
cmp <(dd if="$dev" bs=64k skip=$((32 << 4)) count=16 iflag=direct status=none) "$WORK/w.bin" ||
    fail "the write made while the server was down reads back differently"
"$FVD" stop -n "$id" >/dev/null
nbd-client -d /dev/nbd1 >/dev/null
kill "$(cat "$WORK/qsd.pid")"
"$FVD" check "$img2" >/dev/null || fail "fvd check after part 2"

step "part 3: two daemons prefetch from the one server at once, each held to 2 MiB/s"
serve
attach /dev/nbd0
attach /dev/nbd1
run "$FVD" create --base /dev/nbd0 "$WORK/a.fvd" >/dev/null
run "$FVD" create --base /dev/nbd1 "$WORK/b.fvd" >/dev/null
# create read the whole base (zero detection) through the page cache: empty it, so that
# every prefetch read goes to the server.
blockdev --flushbufs /dev/nbd0 /dev/nbd1
echo 3 >/proc/sys/vm/drop_caches
python3 - "$WORK/sampling" >"$RESULTS/server-rate.json" <<'PY' &
import json, os, sys, time
# The bytes the server read from the golden image for its clients: rchar in its
# /proc/PID/io (every read system call of all its threads), sampled every 0.25 s until
# the flag file goes away.
pid = open(os.path.join(os.path.dirname(sys.argv[1]), "qsd.pid")).read().strip()
def read():
    for line in open(f"/proc/{pid}/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise SystemExit("no rchar")
open(sys.argv[1], "w").close()
t0, b0 = time.monotonic(), read()
samples = [(0.0, 0)]
while os.path.exists(sys.argv[1]):
    time.sleep(0.25)
    samples.append((time.monotonic() - t0, read() - b0))
peak = 0.0
for i, (t, b) in enumerate(samples):
    for t2, b2 in samples[i + 1:]:
        if t2 - t >= 1.0:
            peak = max(peak, (b2 - b) / (t2 - t))
            break
total_t, total_b = samples[-1]
print(json.dumps({"seconds": round(total_t, 2), "bytes": total_b, "peak_1s": round(peak), "mean": round(total_b / max(total_t, 1e-9))}))
PY
sampler=$!
wait_for_path "$WORK/sampling" 10 || fail "the sampler did not start"
ts=$(date +%s.%N)
deva=$(run "$FVD" start --prefetch --prefetch-rate 2M "$WORK/a.fvd" | tail -n 1)
devb=$(run "$FVD" start --prefetch --prefetch-rate 2M "$WORK/b.fvd" | tail -n 1)
wait_prefetched "$WORK/a.fvd" 60 || fail "the first daemon's prefetch did not finish"
ta=$(since "$ts")
wait_prefetched "$WORK/b.fvd" 60 || fail "the second daemon's prefetch did not finish"
tb=$(since "$ts")
rm -f "$WORK/sampling"
wait "$sampler"
sleep 1.5 # the daemons publish their status once a second
# Back-offs are reported, not judged: under emulation a copy can take long enough for
# the throughput to fall under the floor (half the limit), which is what they are for.
backoffs=$("$FVD" list --output json | grep -oE '"backoffs": [0-9]+' | awk '{s += $2} END {print s + 0}')
printf 'both finished: %s s and %s s after the first start; back-offs: %s; server side: %s\n' "$ta" "$tb" \
    "$backoffs" "$(cat "$RESULTS/server-rate.json")"
python3 - "$RESULTS/server-rate.json" <<'PY' || fail "the server was asked for more than the two limits allow"
import json, sys
r = json.load(open(sys.argv[1]))
limit = 2 * 2 * 2**20           # two daemons at 2 MiB/s
# Pieces start at least piece/limit apart, so a second holds at most the limit's worth
# plus two 1 MiB pieces per daemon: one still being read as the second begins, one
# begun as it ends.
slack = 2 * 2 * 2**20
assert r["bytes"] >= 2 * 18 * 2**20, r   # each copied the base's 18.7 MiB of data
# The limiter's own bound, plus 5 % for what else the server reads (qcow2 metadata).
assert r["peak_1s"] <= (limit + slack) * 1.05, f"peak {r['peak_1s']} B/s over {(limit + slack) * 1.05:.0f}"
assert r["mean"] <= limit * 1.1, f"mean {r['mean']} B/s"
PY
"$FVD" stop -n "${deva#/dev/ublkb}" >/dev/null
"$FVD" stop -n "${devb#/dev/ublkb}" >/dev/null
nbd-client -d /dev/nbd0 >/dev/null
nbd-client -d /dev/nbd1 >/dev/null
kill "$(cat "$WORK/qsd.pid")"
step "ok"
