# shellcheck shell=bash
# Where the servers' CPU goes per request (a tool for issue work, not a check): the
# same 4 KiB random write and read jobs on rublk's loop target and on fvd (no table,
# default). Prints the server's CPU time per request (utime + stime from /proc, all
# threads) into $RESULTS/profile.txt, and, from a second run under `strace -c -f`, its
# system calls per request (perf sampling gives a few dozen samples under TCG: no PMU). Runs only when asked
# (tests/guest/run 91-profile); in a full run it says so and passes.
# timeout: 900

if [[ ${FVD_PROFILE:-0} != 1 && ! -e $FVD_ROOT/target/.profile ]]; then
    printf 'skipped: a profiling tool, run by hand (touch target/.profile, then tests/guest/run 91-profile)\n'
    return 0
fi
need_fvd
modprobe_ublk
command -v strace >/dev/null || fail "strace not installed"
export RUST_LOG=fvd=warn
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
SIZE=256M
RUNTIME=8
RUBLK=$FVD_ROOT/target/rublk/bin/rublk
out=$RESULTS/profile.txt
: >"$out"


# fio_job DEV RW TAG SECS: one 4 KiB QD32 job; prints "requests IOPS".
fio_job() {
    fio --name="$2" --filename="$1" --ioengine=io_uring --direct=1 --rw="$2" --bs=4k --iodepth=32 \
        --size=$SIZE --time_based --runtime="$4" --output-format=json --output="$RESULTS/$3-$2.json"
    python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; s=j['read'] if sys.argv[2]=='randread' else j['write']; print(s['total_ios'], round(s['iops']))" \
        "$RESULTS/$3-$2.json" "$2"
}

# profile PID DEV TAG: fill, then per job: the server's CPU per request (no tracer
# attached), then its system calls per request (strace -c, a second run).
profile() {
    local pid=$1 dev=$2 tag=$3 rw u0 s0 u1 s1 n iops hz
    hz=$(getconf CLK_TCK)
    fio --name=fill --filename="$dev" --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 \
        --size=$SIZE --output=/dev/null
    for rw in randwrite randread; do
        read -r u0 s0 < <(cpu_of "$pid")
        read -r n iops < <(fio_job "$dev" $rw "$tag" $RUNTIME)
        read -r u1 s1 < <(cpu_of "$pid")
        python3 -c "
import sys
t, rw, iops, hz, n, u, s = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
per = lambda x: x / hz * 1e6 / max(n, 1)
print(f'{t:<14} {rw:<10} {iops:>8} IOPS  server CPU {per(u + s):6.1f} us/request: user {per(u):5.1f}, system {per(s):5.1f} ({n} requests)')
" "$tag" $rw "$iops" "$hz" "$n" $((u1 - u0)) $((s1 - s0)) | tee -a "$out"
        strace -c -f -q -p "$pid" -o "$WORK/$tag-$rw.strace" &
        local spid=$!
        sleep 1
        read -r n iops < <(fio_job "$dev" $rw "$tag-strace" 4)
        kill -INT "$spid"
        wait "$spid" || true
        {
            printf '\n== %s %s: system calls for %d requests (under strace: %s IOPS) ==\n' "$tag" "$rw" "$n" "$iops"
            awk -v n="$n" 'NR>2 && $4 ~ /^[0-9]+$/ {printf "%-22s %10d  %6.2f per request\n", $NF, $4, $4/n}' \
                "$WORK/$tag-$rw.strace" | sort -k2 -nr | head -15
        } >>"$RESULTS/profile-syscalls.txt"
    done
}

if [[ -x $RUBLK ]]; then
    step "rublk loop"
    truncate -s $SIZE "$WORK/rublk.raw"
    "$RUBLK" add loop -n 9 -q "$(nproc)" -f "$WORK/rublk.raw" --quiet >/dev/null 2>&1 || fail "rublk add failed"
    at_exit "\"$RUBLK\" del -n 9 >/dev/null 2>&1 || true"
    wait_for_path /dev/ublkb9 10 || fail "no /dev/ublkb9"
    profile "$(pgrep -n -x rublk)" /dev/ublkb9 rublk
    "$RUBLK" del -n 9
    step "rublk loop, async/await handlers (-a: libublk's executor model, as fvd)"
    "$RUBLK" add loop -n 9 -q "$(nproc)" -f "$WORK/rublk.raw" -a --quiet >/dev/null 2>&1 || fail "rublk add -a failed"
    wait_for_path /dev/ublkb9 10 || fail "no /dev/ublkb9"
    profile "$(pgrep -n -x rublk)" /dev/ublkb9 rublk-async
    "$RUBLK" del -n 9
    rm -f "$WORK/rublk.raw"
fi

for kind in notable default; do
    step "fvd $kind"
    img=$WORK/$kind.fvd
    if [[ $kind == notable ]]; then "$FVD" create --no-table -s $SIZE "$img" >/dev/null; else "$FVD" create -s $SIZE "$img" >/dev/null; fi
    dev=$("$FVD" start --zero-copy off "$img")
    profile "$(daemon_pid "${dev#/dev/ublkb}")" "$dev" "fvd-$kind"
    "$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
    rm -f "$img"
done
cat "$RESULTS/profile-syscalls.txt"
step "ok"
