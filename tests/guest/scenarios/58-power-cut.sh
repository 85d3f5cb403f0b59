# shellcheck shell=bash
# A real power cut, replayed at every flush. The image lives directly on a dm-log-writes
# device over a loop device full of old random bytes, so the kernel logs every write
# that reached storage, in the order it became durable, with each flush and FUA. A
# deterministic workload writes, discards and zeroes through /dev/ublkbN (the image grows
# over storage create never zeroed, the 32 KiB journal fills and checkpoints), flushes
# every few rounds and after each acknowledged flush logs a mark and notes it in its
# journal; then a few writes are left to the commit timer, the daemon is killed (-9) and
# a mark "powercut" logged. The log is replayed (tests/tools/replay-log.py, checked first
# against the data device's final bytes) onto the data device's initial bytes, up to each
# mark, each FLUSH/FUA entry in between (fvd's own flushes: journal commits, checkpoints,
# growth, the timer) and one write entry halfway between any two of those
# (tests/tools/powercut-check.py). At every such point: fvd check finds no damage (and at
# a flush mark no leak either), the image recovers, every write acknowledged before the
# last flush mark reads back, zeros everywhere else (exactly at a mark; between marks,
# each sector written since holds its old bytes or one of its new ones), and fvd check is
# clean after the recovery. A control claims the first point holds what the first flush
# mark does, which must fail.
# timeout: 900

fvd_prelude
modprobe_dm
modprobe_loop
modprobe dm-log-writes || fail "modprobe dm-log-writes failed"
modprobe dm-snapshot || fail "modprobe dm-snapshot failed"
# A private copy: the shared target/ may be rebuilt while this runs.
cp "$FVD" "$WORK/fvd"
FVD=$WORK/fvd
M=$((1 << 20))
IMG=$((64 * M))
DATA=$((80 * M))
replay_log() { python3 tests/tools/replay-log.py "$@"; }
t_start=$SECONDS

step "data device: a loop device over $((DATA / M)) MiB of old random bytes (kept: the replays start from them); log device 512 MiB, sparse"
head -c $((4 * M)) /dev/urandom >"$WORK/old" # urandom is slow under emulation: 4 MiB, repeated
for _ in $(seq $((DATA / (4 * M)))); do cat "$WORK/old"; done >"$WORK/data"
rm "$WORK/old"
cp "$WORK/data" "$WORK/target"
truncate -s $((512 * M)) "$WORK/log"
dloop=$(losetup -f --show "$WORK/data")
at_exit "losetup -d $dloop 2>/dev/null || true"
lloop=$(losetup -f --show "$WORK/log")
at_exit "losetup -d $lloop 2>/dev/null || true"
run dmsetup create fvdlw --table "0 $((DATA / 512)) log-writes $dloop $lloop"
at_exit "dmsetup remove fvdlw 2>/dev/null || true"
lw=/dev/mapper/fvdlw
q=/sys/block/$(basename "$(readlink -f $lw)")/queue
printf 'log-writes device: logical block %s, write-zeroes max %s, discard max %s, cache %s, fua %s\n' \
    "$(cat $q/logical_block_size)" "$(cat $q/write_zeroes_max_bytes)" "$(cat $q/discard_max_bytes)" \
    "$(cat $q/write_cache)" "$(cat $q/fua)"

step "fvd create through the log-writes device, on its first 8 MiB: create zeroes only that much, the daemon the rest as the image grows"
run dmsetup create fvdpre --table "0 $((8 * M / 512)) linear $lw 0"
at_exit "dmsetup remove fvdpre 2>/dev/null || true"
run "$FVD" create --size $((IMG / M))M --journal-size 32k /dev/mapper/fvdpre
run dmsetup remove --retry fvdpre
run dmsetup message fvdlw 0 mark created
echo "durable created" >"$WORK/journal"

step "workload through /dev/ublkbN: writes, discards, write-zeroes; a flush and a mark every 4 rounds"
head -c $((4 * M)) /dev/urandom >"$WORK/src"
# Growth in 16 MiB steps: each is zeroed and synced before the header's initialised end
# moves past it.
dev=$("$FVD" start --grow-unit 16M "$lw")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id --force >/dev/null 2>&1 || true"
pid=$(daemon_pid "$id")
RANDOM=58 # the same workload every run (rnd sets R: no subshell, which would reseed)
rnd() { R=$(((RANDOM << 15 | RANDOM) % $1)); }
nwrites=0 nzero=0 nflush=0
write_random() { # 4 KiB to 256 KiB of $WORK/src at a random 4 KiB-aligned offset
    local len off soff
    rnd 64; len=$(((1 + R) * 4096))
    rnd $(((IMG - len) / 4096)); off=$((R * 4096))
    rnd $(((4 * M - len) / 4096)); soff=$((R * 4096))
    dd if="$WORK/src" of="$dev" bs="$len" count=1 skip="$soff" seek="$off" \
        iflag=skip_bytes oflag=seek_bytes,direct conv=notrunc status=none
    echo "write $off $len $soff" >>"$WORK/journal"
    nwrites=$((nwrites + 1))
}
for i in $(seq 1 40); do
    rnd 4
    for _ in $(seq 0 "$R"); do
        write_random
    done
    rnd 8
    case $R in
    0) # a discard: whole 1 MiB chunks are freed, partial ones zeroed
        rnd 48; len=$(((1 + R) * 65536))
        rnd $(((IMG - len) / 65536)); off=$((R * 65536))
        blkdiscard -o "$off" -l "$len" "$dev"
        echo "discard $off $len" >>"$WORK/journal"
        nzero=$((nzero + 1))
        ;;
    1) # write-zeroes
        rnd 32; len=$(((1 + R) * 4096))
        rnd $(((IMG - len) / 4096)); off=$((R * 4096))
        blkdiscard -z -o "$off" -l "$len" "$dev"
        echo "zero $off $len" >>"$WORK/journal"
        nzero=$((nzero + 1))
        ;;
    esac
    if ((i % 4 == 0)); then
        sync "$dev" # fsync of the block device: a flush reaches fvd, which flushes its storage
        nflush=$((nflush + 1))
        dmsetup message fvdlw 0 mark "f$nflush"
        echo "durable f$nflush" >>"$WORK/journal"
    fi
done
step "$nwrites writes, $nzero discards/write-zeroes, $nflush flushes; then writes never flushed: the commit timer journals them; then the power cut"
# One into a chunk no write touched yet: its allocation waits in memory until the commit
# timer (5 s) journals it, with a flush of its own.
free=$(awk -v M=$M -v n=$((IMG / M)) '$1 == "write" { for (c = int($2 / M); c <= int(($2 + $3 - 1) / M); c++) u[c] = 1 }
    END { for (c = 0; c < n; c++) if (!(c in u)) { print c; exit } }' "$WORK/journal")
[[ -n $free ]] || fail "every chunk was written: no free chunk for the commit timer's allocation"
dd if="$WORK/src" of="$dev" bs=64k count=1 seek=$((free * M + 131072)) oflag=seek_bytes,direct conv=notrunc status=none
echo "write $((free * M + 131072)) 65536 0" >>"$WORK/journal"
nwrites=$((nwrites + 1))
write_random
sleep 8
kill -9 "$pid"
sleep 0.5
run dmsetup message fvdlw 0 mark powercut
# Stopping the crashed device replays the journal: those writes come after the mark.
out=$("$FVD" stop -n "$id" --force 2>&1) || true
printf '%s\n' "$out"
"$FVD" info "$lw" | grep -iE "initiali|allocated" || true
run dmsetup status fvdlw
run dmsetup remove fvdlw
if dmesg | grep -q "log-writes: Ran out of space"; then fail "the log device filled up"; fi
losetup -d "$lloop"
losetup -d "$dloop"
cp "$WORK/journal" "$RESULTS/journal.txt"
t_work=$SECONDS

step "the log: super block, first entries, marks"
replay_log info "$WORK/log" | tee "$RESULTS/log-info.txt"
timer=$(replay_log find "$WORK/log" --flush --after "f$nflush" --until powercut | wc -l)
printf 'FLUSH/FUA entries after the last guest flush, from the commit timer: %d\n' "$timer"
((timer > 0)) || fail "the commit timer flushed nothing before the power cut"
replay_log list "$WORK/log" >"$RESULTS/log-entries.txt"
head -n 4 "$RESULTS/log-entries.txt"

step "format check: the whole log replayed onto the initial bytes gives the data device's final bytes"
cp "$WORK/target" "$WORK/scratch"
nr=$(sed -nE 's/.* nr_entries ([0-9]+) .*/\1/p' "$RESULTS/log-info.txt")
replay_log replay -v "$WORK/log" "$WORK/scratch" --to $((nr - 1))
cmp "$WORK/scratch" "$WORK/data" || fail "the whole log replayed does not give the data device's bytes: the log is misread"
rm -f "$WORK/data" "$WORK/scratch"
t_format=$SECONDS

step "replay to every mark and every FLUSH/FUA entry from 'created' to 'powercut'; recover and check at each"
rc=0
python3 tests/tools/powercut-check.py --log "$WORK/log" --target "$WORK/target" --journal "$WORK/journal" \
    --src "$WORK/src" --size "$IMG" --fvd "$FVD" --work "$WORK" --after-mark created --until-mark powercut --control f1 --midpoints \
    | tee "$RESULTS/points.txt" || rc=$?
t_end=$SECONDS
printf 'summary: workload %d writes, %d discards/write-zeroes, %d flushes; %s; workload %ds, format check %ds, replay and checks %ds\n' \
    "$nwrites" "$nzero" "$nflush" "$(sed -n 's/^points: //p' "$RESULTS/points.txt")" \
    $((t_work - t_start)) $((t_format - t_work)) $((t_end - t_format)) | tee "$RESULTS/summary.txt"
((rc == 0)) || fail "a replay point failed (see above)"
step "ok"
