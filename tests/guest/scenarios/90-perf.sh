# shellcheck shell=bash
# The peer benchmark: the same fio jobs, in one boot, on the kernel loop device (direct
# I/O), rublk's loop target (a libublk server, the same ublk path fvd takes; built pinned
# by scripts/setup-guest into target/rublk) and fvd: no table, the default layout, the
# default layout with its run dir off tmpfs (no volatile log: allocations are journaled
# before writes complete), and copy-on-write over a base, all in copy mode
# (--zero-copy off); with FVD_PERF_TUNED=1 (by hand: scripts/perf-median passes it on) the
# default layout again with the tuned queue ring (FVD_QUEUE_RING=tuned: SINGLE_ISSUER,
# DEFER_TASKRUN) and with the all-async queue (FVD_QUEUE_PATH=async: every request a task,
# as before the hybrid queue); and the default layout in zero copy (fvd-zc, where the
# kernel has UBLK_F_AUTO_BUF_REG), against rublk's loop -z (on a fresh file, as fvd's
# images are). One more job: 4 KiB random first writes on a fresh image, where most writes
# allocate, with the kernel loop device doing the same on a fresh sparse file (the
# storage's own cost of first writes). Every backing file sits on the guest's tmpfs.
# Prints IOPS or MiB/s, p99 latency and the ratios to rublk and to loop into
# $RESULTS/perf.txt (and JSON in perf.json).
# Nothing is asserted: under software emulation the numbers only compare these with
# each other, within this boot.
# timeout: 1200

need_fvd
modprobe_ublk
modprobe_loop
export RUST_LOG=${RUST_LOG:-fvd=warn}
at_exit "cp /run/fvd/*.log \"$RESULTS\"/ 2>/dev/null || true"
at_exit "FVD_RUN_DIR=$RESULTS/run \"$FVD\" stop --all >/dev/null 2>&1 || true"
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
SIZE=256M
RUNTIME=${FVD_PERF_RUNTIME:-8}

# measured PID TAG JOB FIO-ARGS...: runs one fio job and keeps, beside its JSON, the
# server's CPU ticks during it ($RESULTS/TAG-JOB.cpu: user, system, ticks per second).
measured() {
    local pid=$1 tag=$2 job=$3 u0 s0 u1 s1
    shift 3
    read -r u0 s0 < <(cpu_of "$pid")
    fio --name="$job" "$@" --output-format=json --output="$RESULTS/$tag-$job.json"
    read -r u1 s1 < <(cpu_of "$pid")
    echo "$((u1 - u0)) $((s1 - s0)) $(getconf CLK_TCK)" >"$RESULTS/$tag-$job.cpu"
}

# jobs DEV TAG [PID]: seq write 1M over the whole device (also fills it, so the
# random reads read data), then 4k random writes and reads at QD32. PID: the server.
jobs() {
    local dev=$1 tag=$2 pid=${3:-}
    measured "$pid" "$tag" seqwrite-1M --filename="$dev" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
        --iodepth=8 --size=$SIZE
    for rw in randwrite randread; do
        measured "$pid" "$tag" $rw-4k --filename="$dev" --ioengine=io_uring --direct=1 --rw=$rw --bs=4k \
            --iodepth=32 --size=$SIZE --time_based --runtime="$RUNTIME"
    done
}

# cow_jobs DEV TAG PID: over a base, random reads first (from the base), then random
# writes (each first write to a block copies the block's rest from the base).
cow_jobs() {
    local dev=$1 tag=$2 pid=$3 rw
    for rw in randread randwrite; do
        measured "$pid" "$tag" $rw-4k --filename="$dev" --ioengine=io_uring --direct=1 --rw=$rw --bs=4k \
            --iodepth=32 --size=$SIZE --time_based --runtime="$RUNTIME"
    done
}

RUBLK=$FVD_ROOT/target/rublk/bin/rublk
if [[ -x $RUBLK ]]; then
    step "rublk loop ($("$RUBLK" --version)), $(nproc) queues, direct I/O on a raw file"
    truncate -s $SIZE "$WORK/rublk.raw"
    "$RUBLK" add loop -n 9 -q "$(nproc)" -f "$WORK/rublk.raw" --quiet >"$RESULTS/rublk-add.txt" 2>&1 ||
        fail "rublk add loop failed: $(cat "$RESULTS/rublk-add.txt")"
    at_exit "\"$RUBLK\" del -n 9 >/dev/null 2>&1 || true"
    wait_for_path /dev/ublkb9 10 || fail "rublk's /dev/ublkb9 did not appear"
    jobs /dev/ublkb9 rublk "$(pgrep -n -x rublk)"
    "$RUBLK" del -n 9
    # Zero copy (UBLK_F_AUTO_BUF_REG, Linux 6.16 and later): the request's pages go
    # straight to the file, never through the server's memory. On a fresh file, as every
    # other target's first job runs: on tmpfs a page's first write costs several times
    # an overwrite (the loop reference below), and fvd's images are fresh too.
    rm -f "$WORK/rublk.raw"
    truncate -s $SIZE "$WORK/rublk.raw"
    if "$RUBLK" add loop -n 9 -q "$(nproc)" -f "$WORK/rublk.raw" -z --quiet >"$RESULTS/rublk-zc-add.txt" 2>&1 &&
        wait_for_path /dev/ublkb9 10; then
        step "rublk loop, zero copy (-z)"
        jobs /dev/ublkb9 rublk-zc "$(pgrep -n -x rublk)"
        "$RUBLK" del -n 9
    else
        printf 'rublk loop -z not available on this kernel: %s\n' "$(head -c 300 "$RESULTS/rublk-zc-add.txt")"
        "$RUBLK" del -n 9 >/dev/null 2>&1 || true
    fi
    rm -f "$WORK/rublk.raw"
else
    printf 'rublk not built (target/rublk/bin/rublk: scripts/setup-guest builds it): no rublk column\n'
fi

step "loop device on a raw file"
truncate -s $SIZE "$WORK/loop.raw"
loop=$(losetup -f --show "$WORK/loop.raw")
jobs "$loop" loop
losetup -d "$loop"
# The storage's own cost of first writes: the same random 4 KiB first writes as fvd's
# alloc-4k job below, on a fresh sparse file (each write is the first to its page).
truncate -s 64G "$WORK/loop-alloc.raw"
loop=$(losetup -f --show "$WORK/loop-alloc.raw")
measured "" loop alloc-4k --filename="$loop" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=64G --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0
losetup -d "$loop"
rm -f "$WORK/loop-alloc.raw"
rm -f "$WORK/loop.raw"

head -c $SIZE /dev/urandom >"$WORK/base.raw"
kinds="notable default journaled cow zc"
[[ ${FVD_PERF_TUNED:-0} == 1 ]] && kinds="notable default tuned async journaled cow zc"
for kind in $kinds; do
    step "fvd, $kind"
    img=$WORK/$kind.fvd
    case $kind in
        notable) "$FVD" create --no-table -s $SIZE "$img" >/dev/null ;;
        cow) "$FVD" create --base "$WORK/base.raw" "$img" >/dev/null ;;
        *) "$FVD" create -s $SIZE "$img" >/dev/null ;;
    esac
    rundir=/run/fvd
    [[ $kind == journaled ]] && rundir=$RESULTS/run # 9p: not tmpfs
    zc=off
    if [[ $kind == zc ]]; then
        if ! dev=$(FVD_RUN_DIR=$rundir "$FVD" start --zero-copy on "$img" 2>"$RESULTS/fvd-zc-start.txt"); then
            printf 'fvd zero copy not available on this kernel: %s\n' "$(head -c 300 "$RESULTS/fvd-zc-start.txt")"
            rm -f "$img"
            continue
        fi
        FVD_RUN_DIR=$rundir "$FVD" list --output json | grep -q '"zero-copy": *true' ||
            fail "fvd-zc: fvd list does not show zero copy"
    elif [[ $kind == tuned ]]; then
        # The default layout with the queue rings set up as issue 22 item 2 asks
        # (SINGLE_ISSUER, DEFER_TASKRUN): off by default until measured.
        dev=$(FVD_QUEUE_RING=tuned FVD_RUN_DIR=$rundir "$FVD" start --zero-copy $zc "$img")
    elif [[ $kind == async ]]; then
        dev=$(FVD_QUEUE_PATH=async FVD_RUN_DIR=$rundir "$FVD" start --zero-copy $zc "$img")
    else
        dev=$(FVD_RUN_DIR=$rundir "$FVD" start --zero-copy $zc "$img")
    fi
    pid=$(FVD_RUN_DIR=$rundir daemon_pid "${dev#/dev/ublkb}")
    if [[ $kind == cow ]]; then
        # Reads first, from the base; then writes, each copying its block's rest.
        cow_jobs "$dev" "fvd-$kind" "$pid"
    else
        jobs "$dev" "fvd-$kind" "$pid"
    fi
    FVD_RUN_DIR=$rundir "$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
    "$FVD" check "$img" >/dev/null
    rm -f "$img"
done
rm -f "$WORK/base.raw"

# 64 GiB virtual: in a run of this length more than half the writes land in a chunk not
# yet allocated (the file stays sparse: only the written 4 KiB take memory).
step "fvd, first writes: 4 KiB random writes on a fresh 64 GiB image (most allocate a chunk)"
"$FVD" create -s 64G "$WORK/alloc.fvd" >/dev/null
dev=$("$FVD" start --zero-copy off "$WORK/alloc.fvd")
measured "$(daemon_pid "${dev#/dev/ublkb}")" fvd-default alloc-4k --filename="$dev" --ioengine=io_uring \
    --direct=1 --rw=randwrite --bs=4k --iodepth=32 --size=64G --time_based --runtime="$RUNTIME" \
    --norandommap --randrepeat=0
"$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
"$FVD" check "$WORK/alloc.fvd" | tail -n 1
rm -f "$WORK/alloc.fvd"

step "table"
python3 - "$RESULTS" "$(uname -r)" "$(nproc)" <<'PY' | tee "$RESULTS/perf.txt"
import json, os, sys
res, kernel, cpus = sys.argv[1], sys.argv[2], sys.argv[3]
def value(tag, job):
    path = f"{res}/{tag}-{job}.json"
    if not os.path.exists(path):
        return None
    j = json.load(open(path))["jobs"][0]
    side = j["read"] if job.startswith("randread") else j["write"]
    v = side["bw"] / 1024 if job.startswith("seq") else side["iops"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000
    # The server's CPU per request (user + system, all its threads), in us.
    cpu = None
    if os.path.exists(f"{res}/{tag}-{job}.cpu") and tag != "loop":
        u, s, hz = map(int, open(f"{res}/{tag}-{job}.cpu").read().split())
        n = side["total_ios"]
        if n:
            cpu = ((u + s) / hz * 1e6 / n, u / hz * 1e6 / n)
    return v, p99, cpu
targets = [("loop", "loop"), ("rublk", "rublk loop"), ("rublk-zc", "rublk loop -z"), ("fvd-notable", "fvd no-table"),
           ("fvd-default", "fvd default"), ("fvd-tuned", "fvd tuned ring"), ("fvd-async", "fvd all-async"), ("fvd-journaled", "fvd journaled"), ("fvd-cow", "fvd cow"),
           ("fvd-zc", "fvd zero copy")]
jobs = [("randwrite-4k", "IOPS"), ("randread-4k", "IOPS"), ("seqwrite-1M", "MiB/s"), ("alloc-4k", "IOPS")]
print(f"fio in a TCG guest (kernel {kernel}, {cpus} CPUs); backing files on the guest's tmpfs")
print("value, p99 latency in us, ratio to rublk, ratio to loop ('-': not run), the server's CPU")
print("per request in us (all its threads, user + system; of which user), from /proc")
print(f"{'job':<14}{'unit':>6} {'target':<15}{'value':>9}{'p99 us':>9}{'/rublk':>8}{'/loop':>7}{'cpu us':>8}{'user':>6}")
out = {}
for job, unit in jobs:
    base = {t: value(t, job) for t, _ in targets}
    for t, name in targets:
        v = base[t]
        if v is None:
            continue
        r = base.get("rublk")
        l = base.get("loop")
        vs_r = f"{v[0] / r[0]:.2f}" if r else "-"
        vs_l = f"{v[0] / l[0]:.2f}" if l else "-"
        cpu, user = (f"{v[2][0]:.1f}", f"{v[2][1]:.1f}") if v[2] else ("-", "-")
        print(f"{job:<14}{unit:>6} {name:<15}{v[0]:>9.0f}{v[1]:>9.0f}{vs_r:>8}{vs_l:>7}{cpu:>8}{user:>6}")
        out.setdefault(job, {})[t] = {"value": v[0], "p99_us": v[1], "unit": unit,
                                      "cpu_us": v[2][0] if v[2] else None, "user_us": v[2][1] if v[2] else None}
for job, unit in jobs:
    z, c, rz = value("fvd-zc", job), value("fvd-default", job), value("rublk-zc", job)
    if z and c:
        line = f"{job}: fvd zero copy / fvd copy (default layout) = {z[0] / c[0]:.2f}"
        if rz:
            line += f"; fvd zero copy / rublk loop -z = {z[0] / rz[0]:.2f}"
        print(line)
for job, unit in jobs:
    t, d = value("fvd-tuned", job), value("fvd-default", job)
    if t and d:
        print(f"{job}: fvd tuned ring / fvd default = {t[0] / d[0]:.2f}")
for job, unit in jobs:
    d, a = value("fvd-default", job), value("fvd-async", job)
    if a and d:
        print(f"{job}: fvd default (hybrid queue) / fvd all-async queue = {d[0] / a[0]:.2f}")
a, o = value("fvd-default", "alloc-4k"), value("fvd-default", "randwrite-4k")
la, lo = value("loop", "alloc-4k"), value("loop", "randwrite-4k")
if a and o:
    line = f"fvd default: 4k first writes (allocating) / 4k overwrites = {a[0] / o[0]:.2f}"
    if la and lo:
        line += f"; kernel loop on the same tmpfs, first writes / overwrites = {la[0] / lo[0]:.2f}"
    print(line)
json.dump({"kernel": kernel, "cpus": int(cpus), "jobs": out}, open(f"{res}/perf.json", "w"), indent=1)
PY
step "ok"
