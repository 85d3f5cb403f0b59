# shellcheck shell=bash
# Growth ahead in proportion (issue 26): a 2 GiB image on a 16 MiB linear LV, served with
# the default grow unit (1 GiB, nobody chose it). 8 MiB written through the device used
# to make the LV as large as the whole disk (2,068 MiB); now the unit is at most an eighth
# of what the image can need, so the LV holds the data, the metadata and at most a quarter
# of the disk ahead. The status shows the growth limit; the image checks clean.
# timeout: 300

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
run "$FVD" stop -n "$id"
run "$FVD" check "$lv"
printf 'LV after 8 MiB into a 2 GiB image: %s MiB (was 2,068 MiB with the unbounded 1 GiB unit)\n' "$size"
