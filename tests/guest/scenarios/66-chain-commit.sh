# shellcheck shell=bash
# Snapshots as separate overlay files, through the real block device: an ext4
# made on a device over a raw golden base, then six snapshot layers, each
# served in turn as /dev/ublkbN with files added on it. The chain reads through
# all the layers (`info --backing-chain`, `map` depths); a base changed under
# the chain is refused with one line that names it, and `rebase -u` is the
# override; `fvd commit` down the whole chain leaves the raw base alone reading
# what the top read (sha256 of the whole device, and the files through a
# read-only loop mount); the layers between are marked invalid; the emptied top
# serves the same content over the base.
# timeout: 600

fvd_prelude
modprobe_loop
base=$WORK/golden.raw
mnt=$WORK/mnt
mkdir -p "$mnt"

step "a 128 MiB golden base with an ext4 and files"
truncate -s 128M "$base"
run mkfs.ext4 -q -F "$base"
mount -o loop "$base" "$mnt"
head -c $((3 << 20)) /dev/urandom >"$mnt/golden.bin"
umount "$mnt"
golden_sum=$(sha256sum <"$base")

# serve IMAGE N: the image on /dev/ublkbN; files added on its ext4.
layers=(top0.fvd)
run "$FVD" create -b "$base" "$WORK/top0.fvd"
for i in 0 1 2 3 4 5 6; do
    img=$WORK/top$i.fvd
    dev=$("$FVD" start "$img")
    id=${dev#/dev/ublkb}
    mount "$dev" "$mnt"
    head -c $(((i + 1) << 19)) /dev/urandom >"$mnt/layer$i.bin"
    # Rewrite a file of the layer below: its blocks now live in this layer.
    [[ $i -gt 0 ]] && head -c 65536 /dev/urandom >"$mnt/layer$((i - 1)).bin"
    sync
    (cd "$mnt" && sha256sum ./*.bin) >"$WORK/files.sum"
    umount "$mnt"
    run "$FVD" stop -n "$id"
    if [[ $i -lt 6 ]]; then
        run "$FVD" snapshot "$img" "$WORK/top$((i + 1)).fvd"
        layers+=("top$((i + 1)).fvd")
    fi
done
top=$WORK/top6.fvd

step "the chain: 7 fvd layers over the raw base"
run "$FVD" info --backing-chain "$top" >"$RESULTS/chain.txt"
grep -E '^(image|depth|frozen)' "$RESULTS/chain.txt"
n=$("$FVD" info --backing-chain --output json "$top" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[[ $n == 8 ]] || fail "backing chain lists $n layers, want 8"
"$FVD" map "$top" >"$RESULTS/map.txt"
depths=$(awk 'NR > 1 && $4 != "-" {print $4}' "$RESULTS/map.txt" | sort -un | tr '\n' ' ')
echo "map depths: $depths"
[[ $(wc -w <<<"$depths") -ge 5 ]] || fail "map shows data from only these depths: $depths"

step "the top serves the whole chain: note what it reads"
dev=$("$FVD" start "$top")
id=${dev#/dev/ublkb}
top_sum=$(sha256sum <"$dev")
mount -o ro "$dev" "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || fail "files differ through the chain"
umount "$mnt"
run "$FVD" stop -n "$id"

step "a frozen layer refuses a write-open; a base changed under the chain is refused, naming it"
if "$FVD" io -c "write 0 4k" "$WORK/top3.fvd" 2>"$WORK/err"; then fail "a frozen layer took a write"; fi
cat "$WORK/err"
grep -q "frozen" "$WORK/err" || fail "no clear message for the frozen layer"
cp "$base" "$WORK/golden.keep"
printf 'x' | dd of="$base" bs=1 seek=0 conv=notrunc status=none
if "$FVD" start "$top" >"$WORK/out" 2>"$WORK/err"; then fail "started over a changed base"; fi
cat "$WORK/err"
[[ $(wc -l <"$WORK/err") -le 2 ]] || fail "more than one line for a changed base"
grep -q "golden.raw" "$WORK/err" || fail "the message does not name the changed layer"
grep -q "content changed" "$WORK/err" || fail "the message does not say the content changed"
mv "$WORK/golden.keep" "$base"
[[ $(sha256sum <"$base") == "$golden_sum" ]] || fail "golden base not restored"

step "fvd commit down the whole chain into the raw base"
timed "$FVD" commit -b "$base" --output json "$top" >"$RESULTS/commit.json"
cat "$RESULTS/commit.json"
[[ $rc == 0 ]] || fail "commit failed"
run "$FVD" info --backing-chain "$top" | grep -E '^(image|depth)'
for l in top0 top1 top5; do
    "$FVD" check "$WORK/$l.fvd" | grep "marked invalid" || fail "$l is not marked invalid"
done
if "$FVD" start "$WORK/top5.fvd" 2>"$WORK/err"; then fail "an invalid layer was served"; fi
cat "$WORK/err"

step "the base alone reads what the top read"
[[ $(sha256sum <"$base") == "$top_sum" ]] || fail "the base does not read what the top read"
mount -o loop,ro "$base" "$mnt"
(cd "$mnt" && sha256sum -c --quiet "$WORK/files.sum") || fail "files differ in the base"
umount "$mnt"

step "the emptied top serves the same over the base, and checks clean"
run "$FVD" check "$top"
info=$("$FVD" info --output json "$top")
grep '"data-bytes"' <<<"$info"
grep -q '"data-bytes": 0,' <<<"$info" || fail "the top is not empty"
dev=$("$FVD" start "$top")
id=${dev#/dev/ublkb}
[[ $(sha256sum <"$dev") == "$top_sum" ]] || fail "the emptied top reads differently"
run "$FVD" stop -n "$id"

step "rebase: to a copy of the base (unsafe), then stand alone (safe)"
cp "$base" "$WORK/copy.raw"
run "$FVD" rebase -u -b "$WORK/copy.raw" "$top"
rm "$base"
run "$FVD" rebase -b "" "$top"
rm "$WORK/copy.raw"
dev=$("$FVD" start "$top")
id=${dev#/dev/ublkb}
[[ $(sha256sum <"$dev") == "$top_sum" ]] || fail "the stand-alone top reads differently"
run "$FVD" stop -n "$id"
step "ok"
