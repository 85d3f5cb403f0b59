# shellcheck shell=bash
# Media damage on a plain block device (issue 21): an image on a loop device over old
# random bytes, over a raw base, with data written and closed. Sectors of its header
# slots, table, bitmap and twin are damaged in turn (zeroed, one byte flipped) with dd
# on the device; `fvd check` must report every change to the table,
# bitmap or twin, and the image must read exactly what it read before (read-only, through
# `fvd convert`). Then one damaged table sector: a read-write open rewrites it from the
# twin, and check is clean again. Then the same sector in both copies: open refuses.
# timeout: 600

need_fvd
modprobe_loop
M=$((1 << 20))

step "an image on a loop device over old bytes, over a raw base"
head -c $((48 * M)) /dev/urandom >"$WORK/old.bin"
loop=$(losetup -f --show "$WORK/old.bin")
at_exit "losetup -d $loop 2>/dev/null || true"
head -c $((8 * M)) /dev/urandom >"$WORK/base.raw"
run "$FVD" create --size 16M --journal-size 64k --base "$WORK/base.raw" "$loop"
run "$FVD" io "$loop" -c "write -P 0x11 0 64k" -c "write -P 0x22 3M 1M" -c "write -P 0x33 9M 128k" -c flush
"$FVD" convert -O raw "$loop" "$WORK/want.raw"
want=$(md5sum <"$WORK/want.raw")
rm -f "$WORK/want.raw"
"$FVD" info --output json "$loop" >"$WORK/info.json"
geo() { python3 -c "import json; g=json.load(open('$WORK/info.json'))['regions']['$1']; print(g[0], g[1])"; }
read -r t_off t_len < <(geo table)
read -r b_off b_len < <(geo bitmap)
read -r tw_off tw_len < <(geo twin)
printf 'table %#x+%#x bitmap %#x+%#x twin %#x+%#x\n' "$t_off" "$t_len" "$b_off" "$b_len" "$tw_off" "$tw_len"

sector() { dd if="$loop" bs=512 skip=$(($1 / 512)) count=1 iflag=direct status=none; }
put() { dd of="$loop" bs=512 seek=$(($1 / 512)) count=1 conv=notrunc oflag=direct status=none; }

declare -A count=()
silent=0
unnoticed=0
# Each case runs check and convert in an emulated guest (seconds): every sector of the
# table's block, and the first sectors of the header slots, the bitmap's block and the
# twin's two blocks. The host sweep (tests/corruption_sweep.rs) takes every sector.
table_sectors=$(seq -s " " "$t_off" 512 $((t_off + 4095)))
for region in "header 0 2560 4096 6656" "table $table_sectors" "bitmap $b_off $((b_off + 2048))" \
    "twin $tw_off $((tw_off + 4096))"; do
    read -r name sectors <<<"$region"
    step "$name: sectors zeroed, then flipped"
    for at in $sectors; do
        sector "$at" >"$WORK/saved"
        for kind in zeroed flipped; do
            if [[ $kind == zeroed ]]; then
                head -c 512 /dev/zero | put "$at"
            else
                python3 -c "import sys; b=bytearray(open('$WORK/saved','rb').read()); b[37]^=0x10; sys.stdout.buffer.write(b)" | put "$at"
            fi
            changed=1
            cmp -s <(sector "$at") "$WORK/saved" && changed=0
            rc=0
            "$FVD" check "$loop" >"$WORK/check.out" 2>&1 || rc=$?
            if [[ $name == table || $name == bitmap || $name == twin ]] && ((changed && rc != 2)); then
                printf 'UNNOTICED %s %#x %s: check exited %s\n' "$name" "$at" "$kind" "$rc"
                unnoticed=$((unnoticed + 1))
            fi
            if "$FVD" convert -O raw "$loop" "$WORK/got.raw" 2>"$WORK/convert.err"; then
                if [[ $(md5sum <"$WORK/got.raw") == "$want" ]]; then
                    outcome=intact
                elif ((rc != 0)); then
                    outcome=detected
                else
                    outcome=silent
                    silent=$((silent + 1))
                    printf 'SILENT %s %#x %s\n' "$name" "$at" "$kind"
                fi
            else
                outcome=refused
            fi
            rm -f "$WORK/got.raw"
            count[$name $kind $outcome]=$((${count[$name $kind $outcome]:-0} + 1))
            put "$at" <"$WORK/saved"
        done
    done
done
for k in "${!count[@]}"; do printf '%s: %s\n' "$k" "${count[$k]}"; done | sort | tee "$RESULTS/sweep.txt"
((silent == 0)) || fail "$silent case(s) read other bytes while check said clean"
((unnoticed == 0)) || fail "$unnoticed change(s) to checksummed metadata check did not report"
grep -vE ' intact: ' "$RESULTS/sweep.txt" && fail "cases that did not read what they read before (above)"
run "$FVD" check "$loop"

step "a damaged table sector: a read-write open rewrites it from the twin"
sector "$t_off" >"$WORK/saved"
head -c 512 /dev/zero | put "$t_off"
rc=0
"$FVD" check "$loop" || rc=$?
((rc == 2)) || fail "check of a damaged table exited $rc"
run "$FVD" io "$loop" -c "read -P 0x22 3M 1M"
run "$FVD" check "$loop"
cmp <(sector "$t_off") "$WORK/saved" || fail "the table sector was not rewritten"

step "the same table sector damaged in both copies: refused, never used"
head -c 512 /dev/zero | put "$t_off"
head -c 512 /dev/zero | put "$tw_off"
if "$FVD" io -r "$loop" -c "read 0 4k" 2>"$WORK/err"; then fail "an image whose table is bad in both copies opened"; fi
cat "$WORK/err"
grep -q "damaged in both copies" "$WORK/err" || fail "the refusal does not say why"
rc=0
"$FVD" check "$loop" || rc=$?
((rc == 2)) || fail "check exited $rc"
step "ok"
