# shellcheck shell=bash
# Online scrub (issue 21): an image on a loop device over old random bytes, over a raw
# base, served as /dev/ublkbN with ext4 mounted and files written. Under the running
# daemon, metadata sectors are damaged with dd on the loop device (a byte flipped): the
# table's first copy, the bitmap's twin, the second copy of journal block 0 (the current log), and a
# header slot. `fvd scrub -n ID`, paced to take seconds, finds each and rewrites it from
# a good copy while the files are read; a second scrub finds nothing. Then a table
# sector in both copies: the scrub rewrites both from the daemon's memory (a
# checkpoint). The files stay intact; after a stop, check is clean, the sectors hold
# their good bytes again, and a new daemon serves the same files.
# timeout: 400

fvd_prelude
modprobe_loop
M=$((1 << 20))
mnt=$WORK/mnt
mkdir -p "$mnt"

step "an image on a loop device over old bytes, over a raw base; ext4 and files"
head -c $((96 * M)) /dev/urandom >"$WORK/old.bin"
loop=$(losetup -f --show "$WORK/old.bin")
at_exit "losetup -d $loop 2>/dev/null || true"
head -c $((32 * M)) /dev/urandom >"$WORK/base.raw"
run "$FVD" create --size 64M --base "$WORK/base.raw" "$loop"
"$FVD" info --output json "$loop" >"$WORK/info.json"
geo() { python3 -c "import json; g=json.load(open('$WORK/info.json'))['regions']['$1']; print(g[0], g[1])"; }
read -r t_off _ < <(geo table)
read -r b_off _ < <(geo bitmap)
read -r j_off _ < <(geo journal)
read -r tw_off _ < <(geo twin)
twb_off=$((tw_off + b_off - t_off))
printf 'table %#x bitmap %#x journal %#x twin %#x (its bitmap %#x)\n' "$t_off" "$b_off" "$j_off" "$tw_off" "$twb_off"
dev=$("$FVD" start "$loop")
id=${dev#/dev/ublkb}
at_exit "umount \"$mnt\" 2>/dev/null; \"$FVD\" stop -n $id >/dev/null 2>&1 || true"
run mkfs.ext4 -q "$dev"
mount "$dev" "$mnt"
for i in 1 2 3 4; do head -c $((6 * M)) /dev/urandom >"$mnt/f$i.bin"; done
sync
(cd "$mnt" && sha256sum ./*.bin) >"$WORK/files.sum"

sector() { dd if="$loop" bs=512 skip=$(($1 / 512)) count=1 iflag=direct status=none; }
put() { dd of="$loop" bs=512 seek=$(($1 / 512)) count=1 conv=notrunc oflag=direct status=none; }
flip() { sector "$1" | python3 -c "import sys; b=bytearray(sys.stdin.buffer.read()); b[37]^=0x10; sys.stdout.buffer.write(b)" | put "$1"; }
for at in "$t_off" "$twb_off" "$((j_off + 4096))" 4096; do sector "$at" >"$WORK/good.$at"; done
[[ $(head -c 4 "$WORK/good.$((j_off + 4096))") == FVDJ ]] || fail "journal block 0 has no second copy to damage"

step "four sectors damaged under the daemon; fvd scrub -n $id while the files are read"
flip "$t_off"
flip "$twb_off"
flip "$((j_off + 4096))"
flip 4096
(
    for _ in 1 2 3; do (cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || exit 1; done
) &
reader=$!
t0=${EPOCHREALTIME/./}
rc=0
"$FVD" scrub -n "$id" --rate 4k --output json >"$WORK/scrub1.json" || rc=$?
echo "scrub took $(((${EPOCHREALTIME/./} - t0) / 1000)) ms, exit $rc"
cat "$WORK/scrub1.json"
wait "$reader" || fail "the files read wrong during the scrub"
((rc == 0)) || fail "the scrub exited $rc"
q() { python3 -c "import json,sys; r=json.load(open('$1')); print($2)"; }
[[ $(q "$WORK/scrub1.json" "len(r['unrepaired'])") == 0 ]] || fail "damage left"
for what in "table stripe 0 at $(printf '%#x' "$t_off") (the first copy)" \
    "bitmap stripe 1 at $(printf '%#x' "$twb_off") (the twin copy)" \
    "journal block 0, copy 1 at $(printf '%#x' $((j_off + 4096)))" "header slot 1 at 0x1000"; do
    grep -qF "$what" "$WORK/scrub1.json" || fail "the scrub did not report: $what"
done
[[ $(q "$WORK/scrub1.json" "r['seconds'] >= 2") == True ]] || fail "--rate 4k did not pace the scrub"
for at in "$t_off" "$twb_off" "$((j_off + 4096))"; do
    cmp -s <(sector "$at") "$WORK/good.$at" || fail "sector $(printf '%#x' "$at") does not hold its good bytes again"
done
run "$FVD" scrub -n "$id" --rate 0 | tee "$WORK/scrub2.txt"
grep -q "0 repaired, 0 left" "$WORK/scrub2.txt" || fail "a second scrub found more"

step "a table sector in both copies: rewritten from the daemon's memory"
flip "$t_off"
flip "$tw_off"
run "$FVD" scrub -n "$id" | tee "$WORK/scrub3.txt"
grep -q "from memory (a checkpoint)" "$WORK/scrub3.txt" || fail "not rewritten from memory"
head -c $((6 * M)) /dev/urandom >"$mnt/f5.bin"
sync
(cd "$mnt" && sha256sum ./*.bin) >"$WORK/files.sum"

step "stop; check clean; a new daemon serves the same files"
umount "$mnt"
run "$FVD" stop -n "$id"
run "$FVD" check "$loop"
dev=$("$FVD" start "$loop")
id=${dev#/dev/ublkb}
mount "$dev" "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || fail "files differ after a restart"
umount "$mnt"
run fsck.ext4 -fn "$dev"
run "$FVD" stop -n "$id"
run "$FVD" check "$loop"
step "ok"
