# shellcheck shell=bash
# Smoke test of the harness itself: the guest kernel has what fvd's tests need.
# timeout: 300

step "kernel $(uname -r), fvd: ${FVD:-not built}"
uname -r >"$RESULTS/kernel.txt"

step "modprobe ublk_drv"
modprobe_ublk
[[ -c /dev/ublk-control ]] || fail "/dev/ublk-control is not a character device"

step "modprobe dm-mod, dm-thin-pool"
modprobe_dm
[[ -c /dev/mapper/control ]] || fail "/dev/mapper/control is not a character device"

step "udevd"
start_udev
udevadm control --ping || fail "udevd does not answer"

step "loop device"
modprobe_loop
truncate -s 256M "$WORK/pv.img"
loop=$(losetup -f --show "$WORK/pv.img")
at_exit "losetup -d $loop"
[[ -b $loop ]] || fail "$loop is not a block device"

step "LVM volume group on $loop"
pvcreate -q "$loop"
vgcreate -q fvdtest "$loop"
at_exit "vgremove -q -f fvdtest"

step "linear LV + lvextend"
lvcreate -q -y -L 64M -n lin fvdtest
wait_for_path /dev/mapper/fvdtest-lin 10 || fail "no /dev/mapper/fvdtest-lin"
lvextend -q -L +32M fvdtest/lin
size=$(blockdev --getsize64 /dev/mapper/fvdtest-lin)
[[ $size -eq $((96 << 20)) ]] || fail "lin is $size bytes after lvextend, want $((96 << 20))"

step "thin pool + thin LV + lvextend"
lvcreate -q -y -L 64M -T fvdtest/pool
lvcreate -q -y -V 128M -T fvdtest/pool -n thin
wait_for_path /dev/mapper/fvdtest-thin 10 || fail "no /dev/mapper/fvdtest-thin"
lvextend -q -L 192M fvdtest/thin
size=$(blockdev --getsize64 /dev/mapper/fvdtest-thin)
[[ $size -eq $((192 << 20)) ]] || fail "thin is $size bytes after lvextend, want $((192 << 20))"

step "ext4 on the thin LV"
mkfs.ext4 -q /dev/mapper/fvdtest-thin
mkdir -p "$WORK/mnt"
mount /dev/mapper/fvdtest-thin "$WORK/mnt"
at_exit "umount $WORK/mnt"
echo hello >"$WORK/mnt/hello"
sync
[[ $(cat "$WORK/mnt/hello") == hello ]] || fail "read back from ext4 differs"
lvs --noheadings -o lv_name,lv_size,data_percent fvdtest >"$RESULTS/lvs.txt"

step "ok"
