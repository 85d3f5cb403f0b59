# shellcheck shell=bash
# The same fio jobs on an fvd image without a table, an fvd image with the
# default layout, and the kernel loop device, each on a file in the same
# guest file system. Prints a table with ratios to loop into $RESULTS/perf.txt.
# A fourth column, the default layout with its run dir off tmpfs (so no
# volatile log: allocations are journaled before writes complete), shows what
# the volatile log saves.
# Nothing is asserted: under software emulation the numbers only compare
# these three with each other.
# timeout: 900

need_fvd
modprobe_ublk
modprobe_loop
export RUST_LOG=${RUST_LOG:-fvd=warn}
at_exit "cp /run/fvd/*.log \"$RESULTS\"/ 2>/dev/null || true"
at_exit "FVD_RUN_DIR=$RESULTS/run \"$FVD\" stop --all >/dev/null 2>&1 || true"
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"
SIZE=256M
RUNTIME=${FVD_PERF_RUNTIME:-8}

# jobs DEV TAG: seq write 1M over the whole device (also fills it, so the
# random reads read data), then 4k random writes and reads at QD32.
jobs() {
    local dev=$1 tag=$2
    fio --name=seqwrite-1M --filename="$dev" --ioengine=io_uring --direct=1 --rw=write --bs=1M \
        --iodepth=8 --size=$SIZE --output-format=json --output="$RESULTS/$tag-seqwrite-1M.json"
    for rw in randwrite randread; do
        fio --name=$rw-4k --filename="$dev" --ioengine=io_uring --direct=1 --rw=$rw --bs=4k \
            --iodepth=32 --size=$SIZE --time_based --runtime="$RUNTIME" --ramp_time=1 \
            --output-format=json --output="$RESULTS/$tag-$rw-4k.json"
    done
}

step "loop device on a raw file"
truncate -s $SIZE "$WORK/loop.raw"
loop=$(losetup -f --show "$WORK/loop.raw")
jobs "$loop" loop
losetup -d "$loop"
rm -f "$WORK/loop.raw"

for kind in notable default journaled; do
    step "fvd, $kind layout"
    img=$WORK/$kind.fvd
    if [[ $kind == notable ]]; then
        "$FVD" create --no-table -s $SIZE "$img" >/dev/null
    else
        "$FVD" create -s $SIZE "$img" >/dev/null
    fi
    rundir=/run/fvd
    [[ $kind == journaled ]] && rundir=$RESULTS/run # 9p: not tmpfs
    dev=$(FVD_RUN_DIR=$rundir "$FVD" start "$img")
    jobs "$dev" "fvd-$kind"
    FVD_RUN_DIR=$rundir "$FVD" stop -n "${dev#/dev/ublkb}" >/dev/null
    "$FVD" check "$img" >/dev/null
    rm -f "$img"
done

step "table"
python3 - "$RESULTS" "$(uname -r)" "$(nproc)" <<'PY' | tee "$RESULTS/perf.txt"
import json, sys
res, kernel, cpus = sys.argv[1], sys.argv[2], sys.argv[3]
def value(tag, job):
    j = json.load(open(f"{res}/{tag}-{job}.json"))["jobs"][0]
    side = j["read"] if job.startswith("randread") else j["write"]
    return side["bw"] / 1024 if job.startswith("seq") else side["iops"]
jobs = [("randwrite-4k", "IOPS"), ("randread-4k", "IOPS"), ("seqwrite-1M", "MiB/s")]
print(f"fio in a TCG guest (kernel {kernel}, {cpus} CPUs); backing files on the guest's tmpfs")
print(f"{'job':<14}{'unit':>6}{'loop':>9}{'fvd no-table':>14}{'fvd default':>13}{'no-table/loop':>15}"
      f"{'default/loop':>14}{'journaled':>11}{'journaled/loop':>16}")
for job, unit in jobs:
    l, n, d, z = (value(t, job) for t in ("loop", "fvd-notable", "fvd-default", "fvd-journaled"))
    print(f"{job:<14}{unit:>6}{l:>9.0f}{n:>14.0f}{d:>13.0f}{n / l:>15.2f}{d / l:>14.2f}{z:>11.0f}{z / l:>16.2f}")
PY
step "ok"
