# shellcheck shell=bash
# Common prelude of the real-kernel scenarios, sourced inside the guest before each
# tests/guest/scenarios/<name>.sh (by the entry script tests/guest/run writes).
#
# The scenario runs under `set -Eeuo pipefail`, as root, in the repo's top folder, with:
#   FVD       absolute path of the fvd binary (empty when target/release/fvd was not built)
#   RESULTS   a folder writable from the guest and kept on the host (target/guest-results/<name>)
#   WORK      an empty scratch folder under /tmp in the guest (guest memory: keep files small)
#   SCENARIO  the scenario's name;  FVD_ROOT  the repo's top folder (read-only in the guest)
#
# Helpers:
#   step TEXT              print a timestamped progress line
#   fail MSG               print MSG and exit 1
#   need_fvd               fail unless $FVD is an executable
#   at_exit CMD            run CMD (a shell string) when the scenario ends, last registered first,
#                          whatever the outcome; its failures are reported, never fatal
#   wait_for_path PATH [T] wait up to T seconds (default 10) for PATH to exist; returns 1 if not
#   modprobe_ublk          load ublk_drv and wait for /dev/ublk-control
#   modprobe_dm            load dm-mod and dm-thin-pool and wait for /dev/mapper/control
#   modprobe_loop          load loop and wait for /dev/loop-control (losetup needs it first:
#                          the guest does not load modules on demand for device nodes)
#   start_udev             make sure systemd-udevd runs (start it, trigger, settle if not)
#   udev_settle            wait for udev's queue to drain
#   run CMD...             print "+ CMD..." and run it
#   timed CMD...           run CMD, print how long it took; sets rc (its exit status) and
#                          took_ms, never fails itself
#   fvd_prelude            need_fvd + ublk loaded + info logging + the daemons' logs kept
#   lv_prelude             fvd_prelude + dm, udev, loop devices
#   make_vg VG SIZE        a volume group on a sparse file behind a loop device, gone at exit
#   make_lv VG SIZE        a linear LV VG/disk: sets lv (its path) and status (its LV status file)
#   daemon_pid ID          the pid in the run dir's state file of device ID
#   json_get FILE KEY      the value of a top-level "KEY": line of a pretty-printed JSON file
#   install_udev_rules     fvd's udev rules and helper in place (removed at exit), ublk loaded

export LVM_SUPPRESS_FD_WARNINGS=1

_GUEST_T0=${EPOCHREALTIME/./}

step() {
    local now=${EPOCHREALTIME/./}
    local ds=$(( (now - _GUEST_T0) / 100000 ))
    printf '[%(%H:%M:%S)T +%d.%ds] %s\n' -1 $((ds / 10)) $((ds % 10)) "$*"
}

fail() {
    printf 'FAIL: %s\n' "$*"
    exit 1
}

need_fvd() {
    [[ -n ${FVD:-} && -x ${FVD:-} ]] ||
        fail "fvd binary not found (FVD='${FVD:-}'): build it first with cargo build --release --bin fvd"
}

run() {
    printf '+ %s\n' "$*"
    "$@"
}

timed() {
    local t0=${EPOCHREALTIME/./}
    rc=0
    "$@" || rc=$?
    took_ms=$(((${EPOCHREALTIME/./} - t0) / 1000))
    printf '  -> exit %d after %d ms\n' "$rc" "$took_ms"
}

_AT_EXIT=()
at_exit() {
    _AT_EXIT+=("$1")
}
_run_at_exit() {
    local rc=$? i
    set +e
    trap - ERR
    for ((i = ${#_AT_EXIT[@]} - 1; i >= 0; i--)); do
        eval "${_AT_EXIT[i]}" || printf 'cleanup failed: %s\n' "${_AT_EXIT[i]}"
    done
    return $rc
}
trap _run_at_exit EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# Say which command failed under set -e.
# shellcheck disable=SC2154
trap '_rc=$?; printf "error: %s:%s: \`%s\` exited %s\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$_rc"' ERR

wait_for_path() {
    local path=$1 secs=${2:-10}
    local deadline=$(( ${EPOCHREALTIME/./} + secs * 1000000 ))
    while [[ ! -e $path ]]; do
        if (( ${EPOCHREALTIME/./} > deadline )); then
            printf 'wait_for_path: %s did not appear within %ss\n' "$path" "$secs"
            return 1
        fi
        sleep 0.1
    done
}

modprobe_ublk() {
    modprobe ublk_drv || fail "modprobe ublk_drv failed"
    wait_for_path /dev/ublk-control 10 || fail "/dev/ublk-control missing after modprobe ublk_drv"
}

modprobe_dm() {
    modprobe dm-mod || fail "modprobe dm-mod failed"
    modprobe dm-thin-pool || fail "modprobe dm-thin-pool failed"
    wait_for_path /dev/mapper/control 10 || fail "/dev/mapper/control missing after modprobe dm-mod"
}

modprobe_loop() {
    modprobe loop || fail "modprobe loop failed"
    wait_for_path /dev/loop-control 10 || fail "/dev/loop-control missing after modprobe loop"
}

udev_settle() {
    udevadm settle --timeout=60 || printf 'udev_settle: udevadm settle timed out\n'
}

start_udev() {
    if ! udevadm control --ping >/dev/null 2>&1; then
        local udevd
        udevd=$(command -v systemd-udevd || echo /usr/lib/systemd/systemd-udevd)
        [[ -x $udevd ]] || fail "systemd-udevd not found (install Debian's udev: scripts/setup-guest)"
        "$udevd" --daemon || fail "could not start systemd-udevd"
        udevadm control --ping --timeout=10 >/dev/null || fail "systemd-udevd does not answer"
        udevadm trigger --action=add --type=subsystems >/dev/null 2>&1 || true
        udevadm trigger --action=add --type=devices >/dev/null 2>&1 || true
    fi
    udev_settle
}

# What a scenario that runs daemons starts with: fvd, ublk, info logging, and
# the daemons' logs kept in $RESULTS.
fvd_prelude() {
    need_fvd
    modprobe_ublk
    export RUST_LOG=${RUST_LOG:-fvd=info}
    at_exit "cp /run/fvd/*.log \"$RESULTS\"/ 2>/dev/null || true"
}

# What every LVM scenario starts with: fvd_prelude, device-mapper, udev, loop devices.
lv_prelude() {
    fvd_prelude
    modprobe_dm
    start_udev
    modprobe_loop
}

# make_vg VG SIZE [FILE]: volume group VG (4 MiB extents) on a sparse SIZE file in
# $WORK (or on FILE as it is, say full of old bytes) behind a loop device; both go
# away when the scenario ends.
make_vg() {
    local vg=$1 file=${3:-$WORK/$1.pv} loop
    [[ -n ${3:-} ]] || truncate -s "$2" "$file"
    loop=$(losetup -f --show "$file")
    at_exit "losetup -d $loop"
    pvcreate -q "$loop"
    vgcreate -q -s 4M "$vg" "$loop"
    at_exit "vgremove -q -f $vg >/dev/null"
}

# make_lv VG SIZE: a linear LV VG/disk of SIZE; sets lv to its path and status
# to the file where the serving daemon publishes its LV status.
make_lv() {
    lvcreate -q -y -L "$2" -n disk "$1"
    udev_settle
    # shellcheck disable=SC2034 # set for the scenario that sources this file
    lv=/dev/$1/disk
    # shellcheck disable=SC2034
    status=/run/fvd/lv/$1-disk.json
}

# wait_prefetched IMAGE SECONDS: until the image's header says prefetched; false on time
# out. (fvd info is captured first: grep -q on a live pipe would SIGPIPE fvd and, under
# pipefail, turn a match into a failure.)
wait_prefetched() {
    local info _
    for _ in $(seq 1 $(($2 * 2))); do
        info=$("$FVD" info --output json "$1")
        [[ $info == *'"prefetched": true'* ]] && return 0
        sleep 0.5
    done
    return 1
}

# cpu_of PID: the process's user and system CPU ticks so far (all its threads), from
# /proc/PID/stat; "0 0" without a PID (a kernel target such as the loop device).
cpu_of() {
    if [[ -n $1 ]]; then awk '{print $14, $15}' "/proc/$1/stat"; else echo "0 0"; fi
}

daemon_pid() {
    sed -nE 's/^  "pid": ([0-9]+),$/\1/p' "${FVD_RUN_DIR:-/run/fvd}/$1.json"
}

json_get() {
    sed -nE "s/^  \"$2\": \"?([^\",]*)\"?,?$/\1/p" "$1"
}

# install_udev_rules: fvd's rules and helper (removed at exit), udevd running
# with them, ublk_drv loaded and /dev/ublk-control under the rules.
install_udev_rules() {
    install -m 0755 udev/fvd-udev-name /usr/lib/udev/fvd-udev-name
    install -m 0644 udev/99-fvd.rules /etc/udev/rules.d/99-fvd.rules
    at_exit "rm -f /etc/udev/rules.d/99-fvd.rules /usr/lib/udev/fvd-udev-name"
    start_udev
    udevadm control --reload
    if [[ -e /dev/ublk-control ]]; then
        udevadm trigger --action=change --sysname-match=ublk-control
    else
        modprobe_ublk
    fi
    udev_settle
}
