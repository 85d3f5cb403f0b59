# shellcheck shell=bash
# The seeded torture run (examples/torture): every operation at once over five devices,
# one per kind of storage fvd serves, checked against a model after every step:
#   file     an image file
#   lv       a linear LV in a volume group close to full (grown by the daemon, 16 MiB units)
#   thin     a thin LV in a small thin pool (error when full)
#   flakey   a loop device full of old random bytes behind a dm table that turns into
#            dm-flakey error_writes during fault windows
#   overlay  an overlay (copy-on-read, prefetch at 1 MiB/s) over a base that holds stamps of
#            its own, exported by qemu-storage-daemon over NBD; its server is killed and
#            brought back during the run
# Writers keep a model of every acknowledged write and flush; the schedule (snapshots
# onto new files and LVs, online resize where the kernel has it, stop / offline commit,
# rebase, resize, check --repair / start, kill -9 and recover, sometimes twice, SIGSTOP, write
# faults, a full volume group) comes from the seed.
#
# Power cuts: all the storage lives on an ext4 file system on the guest's own disk (a
# virtio-blk disk that outlives the guest). Each phase but the last ends with the whole
# guest's power cut, every writer's requests in flight (the page cache and every buffer
# not flushed are lost); the next phase boots a new guest, attaches the same storage
# again, starts every device on its top layer (the daemon recovers it), reads it whole
# against what the model allows after a power cut, and goes on with a schedule of its
# own. The last phase ends with every daemon killed at once, recovered and read, a clean
# stop, and every layer checked clean; then the control.
#
# FVD_TORTURE_SEED and FVD_TORTURE_SECONDS choose the run (the seconds are shared out
# over the phases); FVD_TORTURE_POWER_CUTS (default 2) how many power cuts. A failure
# prints the seed and the log's tail.
# timeout: 900
# memory: 3G
# disk: 8G

if [[ -z ${FVD_TORTURE_SECONDS:-} ]]; then
    echo "SKIP: 96-torture needs FVD_TORTURE_SECONDS (scripts/torture sets it)"
    exit 0
fi
phase=${FVD_GUEST_PHASE:-1}
cuts=${FVD_TORTURE_POWER_CUTS:-2}
[[ -n ${FVD_GUEST_DISK:-} ]] || fail "no disk of its own (the harness gives one for \"# disk:\")"
lv_prelude
modprobe dm-flakey || fail "modprobe dm-flakey failed"
modprobe nbd nbds_max=2 || fail "modprobe nbd failed"
command -v nbd-client >/dev/null || fail "nbd-client not installed"
command -v qemu-storage-daemon >/dev/null || fail "qemu-storage-daemon not installed"
if ((phase == 1)); then
    step "the guest's disk: ext4 on $FVD_GUEST_DISK, mounted on the scratch folder (every image and PV lives there)"
    run mkfs.ext4 -q -F "$FVD_GUEST_DISK"
fi
run mount "$FVD_GUEST_DISK" "$WORK"
at_exit "umount -l $WORK"
at_exit "nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true; [[ -f $WORK/qsd.pid ]] && kill -9 \$(cat $WORK/qsd.pid) 2>/dev/null || true"
at_exit "\"$FVD\" stop --all --force >/dev/null 2>&1 || true"
TORTURE=$FVD_ROOT/target/release/examples/torture
[[ -x $TORTURE ]] || fail "no $TORTURE: cargo build --release --example torture"
cp "$TORTURE" "$WORK/torture"
cp "$FVD" "$WORK/fvd" # private copies: the shared target/ may be rebuilt meanwhile
FVD=$WORK/fvd
seed=${FVD_TORTURE_SEED:-1}
secs=$((FVD_TORTURE_SECONDS / (cuts + 1)))
((secs >= 10)) || secs=10
M=$((1 << 20))
export FVD_GROW_UNIT=16M
torture_args=(--fvd "$FVD" --work "$WORK" --results "$RESULTS" --seed "$seed" --seconds "$secs" --phase "$phase"
    --dev "file:$WORK/file.fvd" --dev "lv:/dev/fvdtl/lin" --dev "thin:/dev/fvdtp/thin"
    --dev "flakey:/dev/mapper/fvdtorture" --dev "overlay:$WORK/overlay.fvd"
    --overlay-base /dev/nbd0 --nbd-down "$WORK/nbd-down" --nbd-up "$WORK/nbd-up" --thin-pool fvdtp/pool)
# FVD_TORTURE_OPS=NAME,...: only those operations (a failure's replay, aimed).
[[ -z ${FVD_TORTURE_OPS:-} ]] || torture_args+=(--ops "$FVD_TORTURE_OPS")
# FVD_TORTURE_ONLY=KIND: that one device alone (a failure's replay, faster).
if [[ -n ${FVD_TORTURE_ONLY:-} ]]; then
    kept=()
    for ((i = 0; i < ${#torture_args[@]}; i++)); do
        if [[ ${torture_args[i]} == --dev ]]; then
            [[ ${torture_args[i + 1]} == "$FVD_TORTURE_ONLY:"* ]] && kept+=(--dev "${torture_args[i + 1]}")
            i=$((i + 1))
        else
            kept+=("${torture_args[i]}")
        fi
    done
    torture_args=("${kept[@]}")
fi
then_cut=""
if ((phase <= cuts)); then
    torture_args+=(--power-cut)
    then_cut=", then a power cut"
fi

resume=()
if ((phase > 1)); then
    step "phase $phase of $((cuts + 1)), after a power cut: the same storage attached again"
    for vg in fvdtl fvdtp; do
        loop=$(losetup -f --show "$WORK/$vg.pv")
        at_exit "losetup -d $loop"
    done
    run vgchange -ay fvdtl fvdtp
    at_exit "vgchange -q -an fvdtl fvdtp >/dev/null 2>&1 || true"
    loop=$(losetup -f --show "$WORK/flakey.img")
    at_exit "losetup -d $loop"
    table="0 $(blockdev --getsz "$loop") linear $loop 0"
    dmsetup create fvdtorture --table "$table"
    at_exit "dmsetup remove -f fvdtorture 2>/dev/null || true"
    udev_settle
    "$WORK/nbd-up" || fail "could not serve and attach the base"
    resume=(--resume)
else # phase 1: the storage made

step "storage: VG fvdtl (384 MiB; the vg-full operation fills it) with a 16 MiB linear LV; VG fvdtp with a 256 MiB thin pool"
make_vg fvdtl 384M
lvcreate -q -y -L 16M -n lin fvdtl
make_vg fvdtp 512M
lvcreate -q -y -L 256M -T fvdtp/pool --errorwhenfull y
lvcreate -q -y -V 384M -T fvdtp/pool -n thin
udev_settle

step "flakey: 128 MiB of old random bytes behind dm device fvdtorture"
head -c $((4 * M)) /dev/urandom >"$WORK/old"
for _ in $(seq 32); do cat "$WORK/old"; done >"$WORK/flakey.img"
rm "$WORK/old"
loop=$(losetup -f --show "$WORK/flakey.img")
at_exit "losetup -d $loop"
sectors=$(blockdev --getsz "$loop")
table="0 $sectors linear $loop 0"
dmsetup create fvdtorture --table "$table"
at_exit "dmsetup remove -f fvdtorture 2>/dev/null || true"
udev_settle

step "overlay base: stamps written by the torture program into a raw file, exported by qemu-storage-daemon over NBD, attached as /dev/nbd0"
"$WORK/torture" --make-base "$WORK/base.raw:5" --fvd "$FVD" --work "$WORK" --results "$RESULTS"
cat >"$WORK/nbd-up" <<EOF
#!/bin/bash
# Serves base.raw over NBD (a unix socket) and attaches it as /dev/nbd0 (read-only, 5 s timeout).
set -e
rm -f $WORK/qsd.sock
qemu-storage-daemon --blockdev driver=file,node-name=base,filename=$WORK/base.raw,read-only=on \\
    --nbd-server addr.type=unix,addr.path=$WORK/qsd.sock --export type=nbd,id=e0,node-name=base,name=base \\
    --pidfile $WORK/qsd.pid --daemonize
for _ in \$(seq 100); do [[ -S $WORK/qsd.sock ]] && break; sleep 0.1; done
nbd-client -d /dev/nbd0 >/dev/null 2>&1 || true
nbd-client -N base -u $WORK/qsd.sock /dev/nbd0 -t 5 -R -L >/dev/null
for _ in \$(seq 50); do
    [[ \$(blockdev --getsize64 /dev/nbd0 2>/dev/null || echo 0) -gt 0 ]] && exit 0
    sleep 0.2
done
echo "/dev/nbd0 has no size after nbd-client" >&2
exit 1
EOF
printf '#!/bin/bash\n# The NBD server dies.\nkill -9 "$(cat %s/qsd.pid)"\n' "$WORK" >"$WORK/nbd-down"
chmod +x "$WORK/nbd-up" "$WORK/nbd-down"
"$WORK/nbd-up" || fail "could not serve and attach the base"
fi

step "torture phase $phase of $((cuts + 1)): seed $seed for $secs s$then_cut"
rc=0
"$WORK/torture" "${torture_args[@]}" --flakey-table "$table" "${resume[@]}" || rc=$?
step "torture exited $rc"
vgs fvdtl fvdtp || true
lvs fvdtl fvdtp || true
((rc == 0)) || fail "torture phase $phase failed (seed $seed): see above and $RESULTS/torture-ops.log"
((phase > cuts)) || fail "torture phase $phase returned instead of cutting the power"
"$FVD" stop --all >/dev/null 2>&1 || true

step "control: the same run on one image file, with one write left out of the model: it must fail"
mkdir -p "$RESULTS/control"
rc=0
"$WORK/torture" --fvd "$FVD" --work "$WORK" --results "$RESULTS/control" --seed "$seed" --seconds 60 \
    --dev "file:$WORK/control.fvd" --control >"$RESULTS/control/out.txt" 2>&1 || rc=$?
grep -m1 "control:" "$RESULTS/control/torture-ops.log" || true
grep -m1 "FAIL" "$RESULTS/control/out.txt" || true
((rc == 1)) || fail "the control exited $rc: the checks did not catch the write the model left out"
grep -q "FAIL: file dev 1: read: block .*: holds write" "$RESULTS/control/out.txt" ||
    fail "the control failed, but not on the write left out: $(head -3 "$RESULTS/control/out.txt")"
