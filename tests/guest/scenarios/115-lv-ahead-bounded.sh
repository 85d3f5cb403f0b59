# shellcheck shell=bash
# Growth ahead in proportion (issue 26): a 2 GiB image on a 16 MiB linear LV, served with
# the default grow unit (1 GiB, nobody chose it). 8 MiB written through the device used
# to make the LV as large as the whole disk (2,068 MiB); now the unit is at most an eighth
# of what the image can need, so the LV holds the data, the metadata and at most a quarter
# of the disk ahead. The status shows the growth limit; the image checks clean.
# Then the slack goes back (issue 26): an online snapshot freezes the image and its LV is
# reduced to its used end (within one extent); a stop does the same to the new top; an LV
# tagged fvd-keep-slack keeps its room at a stop, and `fvd reduce` gives it back after.
# `fvd info` shows the used end and the slack; every layer checks clean and reads back.
# timeout: 600
# memory: 3G

lv_prelude
unset FVD_GROW_UNIT
M=$((1 << 20))

step "volume group of 3 GiB, a 16 MiB linear LV, a 2 GiB image"
make_vg fvdahead 3G
make_lv fvdahead 16M
run "$FVD" create -s 2G "$lv"
lv_mib() { lvs --noheadings --units m --nosuffix -o lv_size "$lv" | awk '{ printf "%d", $1 }'; }
printf 'after create: %s MiB\n' "$(lv_mib)"
dev=$("$FVD" start "$lv")
id=${dev#/dev/ublkb}
at_exit "\"$FVD\" stop -n $id >/dev/null 2>&1 || true"

step "8 MiB written through $dev"
head -c $((8 * M)) /dev/urandom >"$WORK/a"
dd if="$WORK/a" of="$dev" bs=1M oflag=direct conv=fsync status=none
# The growth ahead runs in the background: wait until it is idle (state ok, nothing pending).
for _ in $(seq 60); do
    [[ $(json_get "$status" state) == ok ]] && break
    sleep 0.5
done
sleep 1
cat "$status"
size=$(lv_mib)
unit=$(json_get "$status" grow-unit)
limit=$(json_get "$status" growth-limit)
printf 'after 8 MiB: LV %s MiB, grow unit %s MiB (from %s), growth limit %s MiB\n' \
    "$size" $((unit / M)) "$(json_get "$status" grow-unit-from)" $((limit / M))
((unit == 256 * M)) || fail "the default unit for a 2 GiB image should be 256 MiB, not $((unit / M)) MiB"
((limit >= 2048 * M && limit <= 2100 * M)) || fail "growth limit $limit is not the image's need (2 GiB and its metadata)"
# 8 MiB of data + at most 24 MiB of metadata + at most a quarter of the disk (512 MiB) ahead.
((size <= 8 + 24 + 512)) || fail "the LV is $size MiB after 8 MiB written: more than a quarter of the disk ahead"
((size >= 8 + 256)) || fail "the LV is $size MiB: less than one unit ahead of the data"
cmp <(dd if="$dev" bs=1M count=8 iflag=direct status=none) "$WORK/a" || fail "the data does not read back"
printf 'LV after 8 MiB into a 2 GiB image: %s MiB (was 2,068 MiB with the unbounded 1 GiB unit)\n' "$size"

# info_num IMAGE KEY: a number from `fvd info --output json` (0 when absent).
info_num() {
    "$FVD" info --output json "$1" >"$WORK/info.json"
    python3 -c 'import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print(v if v is not None else 0)' \
        "$WORK/info.json" "$2"
}
lv_bytes() { lvs --noheadings --units b --nosuffix -o lv_size "$1" | tr -d ' '; }
EXTENT=$((4 * M))
# expect_reduced LV WHAT: the LV holds its used end, rounded up to one extent, and no more.
expect_reduced() {
    local used have
    used=$(info_num "$1" storage-used-end)
    have=$(lv_bytes "$1")
    printf '%s: LV %s MiB, used end %s MiB, slack %s KiB (fvd info)\n' "$2" $((have / M)) $((used / M)) \
        $(($(info_num "$1" storage-slack) / 1024))
    ((used > 0)) || fail "$2: fvd info gives no used end"
    ((have >= used && have < used + EXTENT)) ||
        fail "$2: the LV is $((have / M)) MiB for a used end of $((used / M)) MiB: not given back"
}

step "online snapshot onto a second 16 MiB LV: the frozen layer gives back its slack"
lvcreate -q -y -L 16M -n b fvdahead
udev_settle
before=$(lv_bytes "$lv")
t0=$(date +%s%N)
run "$FVD" snapshot -n "$id" /dev/fvdahead/b
printf 'snapshot (with the reduce) took %s ms\n' $((($(date +%s%N) - t0) / 1000000))
expect_reduced "$lv" "frozen layer a (was $((before / M)) MiB)"
cmp <(dd if="$dev" bs=1M count=8 iflag=direct status=none) "$WORK/a" || fail "the data does not read back after the snapshot"

step "8 MiB more into the new top, then a stop: the top gives back its slack"
head -c $((8 * M)) /dev/urandom >"$WORK/b"
dd if="$WORK/b" of="$dev" bs=1M seek=16 oflag=direct conv=fsync status=none
sleep 2
printf 'top b while served: %s MiB\n' $(($(lv_bytes /dev/fvdahead/b) / M))
"$FVD" list
run "$FVD" stop -n "$id" || { tail -30 /run/fvd/"$id".log; ps -eo pid,stat,wchan:30,args | grep -E 'fvd|lv' ; fail "stop failed"; }
expect_reduced /dev/fvdahead/b "stopped top b"
run "$FVD" check "$lv"
run "$FVD" check /dev/fvdahead/b
run "$FVD" info /dev/fvdahead/b

step "an LV tagged fvd-keep-slack keeps its room at a stop; fvd reduce gives it back"
lvchange -q --addtag fvd-keep-slack fvdahead/b
dev=$("$FVD" start /dev/fvdahead/b)
id=${dev#/dev/ublkb}
dd if="$WORK/a" of="$dev" bs=1M seek=40 oflag=direct conv=fsync status=none
sleep 2
run "$FVD" stop -n "$id"
kept=$(lv_bytes /dev/fvdahead/b)
used=$(info_num /dev/fvdahead/b storage-used-end)
printf 'kept: LV %s MiB, used end %s MiB\n' $((kept / M)) $((used / M))
((kept >= used + 256 * M)) || fail "the tagged LV did not keep the room grown ahead ($((kept / M)) MiB)"
run "$FVD" reduce /dev/fvdahead/b
expect_reduced /dev/fvdahead/b "after fvd reduce"
run "$FVD" reduce /dev/fvdahead/b | grep -q "nothing to give back" || fail "a second reduce found more to give"
run "$FVD" check /dev/fvdahead/b

step "the chain reads back: a's data under b's, b's own"
dev=$("$FVD" start --read-only /dev/fvdahead/b)
id=${dev#/dev/ublkb}
cmp <(dd if="$dev" bs=1M count=8 iflag=direct status=none) "$WORK/a" || fail "a's data does not read back"
cmp <(dd if="$dev" bs=1M skip=16 count=8 iflag=direct status=none) "$WORK/b" || fail "b's data does not read back"
cmp <(dd if="$dev" bs=1M skip=40 count=8 iflag=direct status=none) "$WORK/a" || fail "b's second data does not read back"
cmp <(dd if="$dev" bs=1M skip=8 count=8 iflag=direct status=none) <(head -c $((8 * M)) /dev/zero) ||
    fail "a range never written does not read zeros"
run "$FVD" stop -n "$id"

# steady WHAT: a 2 GiB image on a 16 MiB thin LV (thin: growth costs an lvextend and no
# zeroing, so the figure is the lead the unit gives against lvextend's time), 384 MiB
# written sequentially at 16 MiB/s, then the growth and wait counters.
steady() {
    lvcreate -q -y -V 16M -T fvdahead/pool -n "s$1"
    udev_settle
    run "$FVD" create -s 2G "/dev/fvdahead/s$1"
    local d i st
    d=$("$FVD" start "/dev/fvdahead/s$1")
    i=${d#/dev/ublkb}
    st=/run/fvd/lv/fvdahead-s$1.json
    run fio --name=steady --filename="$d" --ioengine=io_uring --direct=1 --rw=write --bs=1M --size=384M \
        --iodepth=4 --rate=16m --output="$RESULTS/fio-steady-$1.txt"
    sleep 1
    printf 'steady writer, %s: grow unit %s MiB, %s growths, waits %s (max %s ms), late waits %s\n' "$2" \
        $(($(json_get "$st" grow-unit) / M)) "$(json_get "$st" growths)" "$(json_get "$st" waits)" \
        "$(json_get "$st" wait-ms-max)" "$(json_get "$st" late-waits)" | tee -a "$RESULTS/figures.txt"
    run "$FVD" stop -n "$i"
    lvremove -q -y "fvdahead/s$1"
}
step "a steady writer, the bounded default unit against the 1 GiB unit it replaced (thin LVs, same boot)"
lvcreate -q -y -L 1G -T fvdahead/pool
steady a "default unit (bounded)"
FVD_GROW_UNIT=1G steady b "FVD_GROW_UNIT=1G (the unit before)"
