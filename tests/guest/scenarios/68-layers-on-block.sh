# shellcheck shell=bash
# Snapshot, commit, rebase and resize where the images live on block devices that hold
# someone's old bytes, not on files: linear LVs carved from a volume group over a loop
# device full of random data (lvcreate zeroes only an LV's first 4 KiB), and plain loop
# devices over such data. Part 1, LVs: an image on a 32 MiB LV that the daemon grows,
# an online snapshot onto a second LV while it is served, writes on the overlay, then
# offline `fvd commit` into the first LV, `fvd rebase -b ""` (the overlay stands alone),
# `fvd resize` past the table's room (the metadata moves; the LV grows for it), and the
# grown image served again. Part 2, plain block devices: the same chain on two loop
# devices, commit, rebase, a resize within the device and one past it (refused, in one
# line). After every step: fvd check is clean, each device reads what was written and
# zeros wherever nothing was, never the old bytes.
# timeout: 420
# memory: 3G

lv_prelude
M=$((1 << 20))
at_exit "\"$FVD\" stop --all >/dev/null 2>&1 || true"

# old FILE SIZE: SIZE of random bytes (4 MiB of urandom, repeated: urandom is slow here).
old() {
    head -c $((4 * M)) /dev/urandom >"$WORK/old4"
    for _ in $(seq $(($2 / (4 * M)))); do cat "$WORK/old4"; done >"$1"
}
sum_of() {
    "$FVD" io -r "$1" -c "read -o $WORK/read.bin 0 $2" >/dev/null || fail "fvd io -r $1 failed"
    sha256sum <"$WORK/read.bin" | cut -d' ' -f1
    rm -f "$WORK/read.bin"
}
# zeros IMAGE OFF LEN: the range reads zeros (fvd io checks the pattern itself).
zeros() { "$FVD" io -r "$1" -c "read -P 0 $2 $3" >/dev/null || fail "$1: $2+$3 does not read zeros"; }
check() { "$FVD" check "$1" >"$WORK/check.txt" 2>&1 || { cat "$WORK/check.txt"; fail "fvd check $1"; }; }
devsum() { dd if="$1" bs=1M count="$2" iflag=direct status=none | sha256sum | cut -d' ' -f1; }
lv_mib() { lvs --noheadings --units m --nosuffix -o lv_size "$1" | awk '{ printf "%d", $1 }'; }

step "a volume group over a loop device full of old random bytes"
old "$WORK/pv.img" $((384 * M))
make_vg fvdly 384M "$WORK/pv.img"
lvcreate -q -y -L 32M -n gold fvdly
lvcreate -q -y -L 32M -n top fvdly
udev_settle
gold=/dev/fvdly/gold top=/dev/fvdly/top
nz=$(dd if="$gold" bs=1M skip=8 count=1 status=none | tr -d '\0' | wc -c)
printf 'old bytes on the fresh LV: %d non-zero of 1 MiB at 8 MiB\n' "$nz"
((nz > 0)) || fail "the LV reads zeros: the test needs old data under it"

step "part 1: an image on LV gold (128 MiB virtual on 32 MiB), served; 16 MiB written at 0 and 64 MiB"
run "$FVD" create -s 128M "$gold"
head -c $((16 * M)) /dev/urandom >"$WORK/a.bin"
dev=$("$FVD" start --grow-unit 32M "$gold")
id=${dev#/dev/ublkb}
dd if="$WORK/a.bin" of="$dev" bs=1M oflag=direct status=none
dd if="$WORK/a.bin" of="$dev" bs=1M seek=64 oflag=direct status=none
sync "$dev"

step "online snapshot onto LV top while gold is served; 8 MiB more through the overlay at 12 MiB"
out=$("$FVD" snapshot -n "$id" --output json "$top") || fail "fvd snapshot -n $id $top failed"
printf '%s\n' "$out" >"$RESULTS/snapshot.json"
head -c $((8 * M)) /dev/urandom >"$WORK/b.bin"
dd if="$WORK/b.bin" of="$dev" bs=1M seek=12 oflag=direct status=none
top_sum=$(devsum "$dev" 128)
run "$FVD" stop -n "$id"
printf 'LV sizes: gold %s MiB, top %s MiB\n' "$(lv_mib fvdly/gold)" "$(lv_mib fvdly/top)"
"$FVD" info --backing-chain --output json "$top" >"$RESULTS/chain.json"
grep -q '"frozen": true' "$RESULTS/chain.json" || fail "gold is not a frozen layer under top: $(cat "$RESULTS/chain.json")"
check "$top"
check "$gold"
# What the chain must read: a.bin at 0 with b.bin over 12-20 MiB, a.bin at 64 MiB, zeros.
want=$({ head -c $((12 * M)) "$WORK/a.bin"; cat "$WORK/b.bin"; head -c $((44 * M)) /dev/zero
    cat "$WORK/a.bin"; head -c $((48 * M)) /dev/zero; } | sha256sum | cut -d' ' -f1)
[[ $top_sum == "$want" ]] || fail "the overlay read through the device differs from what was written"
[[ $(sum_of "$top" 128M) == "$want" ]] || fail "the overlay (fvd io) differs from what was written"
zeros "$top" 80M 48M

step "the overlay names gold by its device-mapper name; the VG made again in another order (new /dev/dm-N numbers), the chain reads the same"
base=$("$FVD" info --output json "$top" | python3 -c 'import json, sys; print(json.load(sys.stdin)["base"]["filename"])')
printf 'top'"'"'s base: %s (gold is %s)\n' "$base" "$(readlink -f "$gold")"
vgchange -q -an fvdly
lvchange -q -ay fvdly/top # top first: it takes the number gold had
lvchange -q -ay fvdly/gold
udev_settle
printf 'now: top is %s, gold is %s\n' "$(readlink -f "$top")" "$(readlink -f "$gold")"
[[ $(sum_of "$top" 128M) == "$want" ]] || fail "the chain reads otherwise once the VG is made again"
[[ $base == /dev/mapper/fvdly-gold ]] || fail "top names its base $base, not /dev/mapper/fvdly-gold: a /dev/dm-N name points elsewhere after a reboot"

step "fvd commit top into gold (offline)"
run "$FVD" commit "$top"
[[ $(sum_of "$gold" 128M) == "$want" ]] || fail "gold does not read what top read after the commit"
[[ $(sum_of "$top" 128M) == "$want" ]] || fail "the emptied top does not read the same over gold"
check "$gold"
check "$top"

step "fvd rebase -b '' top: it stands alone, gold removed"
run "$FVD" rebase -b "" "$top"
lvremove -q -y fvdly/gold
[[ $(sum_of "$top" 128M) == "$want" ]] || fail "top differs once standing alone"
check "$top"
zeros "$top" 80M 48M

step "fvd resize top 2G: past the table's room, the metadata moves"
before=$(lv_mib fvdly/top)
"$FVD" resize --output json "$top" 2G >"$RESULTS/resize.json" || fail "fvd resize $top 2G failed"
cat "$RESULTS/resize.json"
grep -q '"kind": "moved-metadata"' "$RESULTS/resize.json" || fail "the resize did not move the metadata"
printf 'LV top: %s MiB before the resize, %s MiB after\n' "$before" "$(lv_mib fvdly/top)"
check "$top"
[[ $(sum_of "$top" 128M) == "$want" ]] || fail "the first 128 MiB changed in the resize"
zeros "$top" 128M 1920M

step "the grown image served: 2 GiB, old content, 16 MiB written at 1.5 GiB; restarted, all there"
dev=$("$FVD" start --grow-unit 32M "$top")
id=${dev#/dev/ublkb}
[[ $(blockdev --getsize64 "$dev") -eq $((2 << 30)) ]] || fail "$dev is not 2 GiB"
[[ $(devsum "$dev" 128) == "$want" ]] || fail "the grown device's first 128 MiB differ"
dd if="$WORK/a.bin" of="$dev" bs=1M count=16 seek=1536 oflag=direct status=none
run "$FVD" stop -n "$id"
dev=$("$FVD" start "$top")
id=${dev#/dev/ublkb}
cmp <(dd if="$dev" bs=1M skip=1536 count=16 iflag=direct status=none) <(head -c $((16 * M)) "$WORK/a.bin") ||
    fail "the write past the old end did not survive the restart"
cmp <(dd if="$dev" bs=1M skip=1552 count=64 iflag=direct status=none) <(head -c $((64 * M)) /dev/zero) ||
    fail "the grown space past the write does not read zeros"
run "$FVD" stop -n "$id"
check "$top"
printf 'LV top at the end: %s MiB\n' "$(lv_mib fvdly/top)"

step "part 2: the same on plain block devices (loop devices over old random bytes)"
old "$WORK/b1.img" $((96 * M))
cp "$WORK/b1.img" "$WORK/b2.img"
b1=$(losetup -f --show "$WORK/b1.img")
at_exit "losetup -d $b1"
b2=$(losetup -f --show "$WORK/b2.img")
at_exit "losetup -d $b2"
run "$FVD" create -s 32M "$b1"
"$FVD" io "$b1" -c "write -s $WORK/a.bin 0" >/dev/null
run "$FVD" snapshot "$b1" "$b2"
"$FVD" io "$b2" -c "write -s $WORK/b.bin 12M" >/dev/null
want2=$({ head -c $((12 * M)) "$WORK/a.bin"; cat "$WORK/b.bin"; head -c $((12 * M)) /dev/zero; } | sha256sum | cut -d' ' -f1)
[[ $(sum_of "$b2" 32M) == "$want2" ]] || fail "the overlay on $b2 differs"
run "$FVD" commit "$b2"
[[ $(sum_of "$b1" 32M) == "$want2" ]] || fail "$b1 does not read what $b2 read after the commit"
check "$b1"
run "$FVD" rebase -b "" "$b2"
[[ $(sum_of "$b2" 32M) == "$want2" ]] || fail "$b2 differs once standing alone"
check "$b2"
run "$FVD" resize "$b2" 64M
check "$b2"
[[ $(sum_of "$b2" 32M) == "$want2" ]] || fail "$b2's first 32 MiB changed in the resize"
zeros "$b2" 20M 44M
if "$FVD" resize "$b2" 1G 2>"$WORK/err"; then fail "a resize past the end of the device succeeded"; fi
printf 'past the device: %s\n' "$(cat "$WORK/err")"
grep -q "cannot grow" "$WORK/err" || fail "no clear message for a resize past the device"
[[ $(wc -l <"$WORK/err") -eq 1 ]] || fail "the refusal is not one line"
check "$b2"
step "ok"
