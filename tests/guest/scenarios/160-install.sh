# shellcheck shell=bash
# fvd as an operator installs and runs it. scripts/install puts the binary, the udev rules
# and helper, the tmpfiles entry, the systemd template unit, shell completions and manual
# pages in place (the guest's /usr and /etc are writable overlays) and lists them; the
# unit passes `systemd-analyze verify`. The installed unit's own ExecStart line (with %f
# filled in), run with NOTIFY_SOCKET set to a socket a listener holds in PID 1's place,
# sends READY=1 with the device once /dev/ublkbN is live and serves data; its ExecStop
# line stops the device, and the listener gets STOPPING=1 first. --log-format json gives
# one JSON object per log line. scripts/uninstall removes every installed file again.
# timeout: 300

need_fvd
modprobe_ublk
export RUST_LOG=fvd=info
at_exit "/usr/local/bin/fvd stop --all >/dev/null 2>&1 || true"
at_exit "scripts/uninstall >/dev/null 2>&1 || true"

step "scripts/install"
run scripts/install --binary "$FVD"
manifest=/usr/local/share/fvd/installed-files
[[ -f $manifest ]] || fail "no $manifest"
while IFS= read -r f; do
    [[ -e $f ]] || fail "installed file missing: $f"
done <"$manifest"
for f in /usr/local/bin/fvd /etc/udev/rules.d/99-fvd.rules /usr/lib/udev/fvd-udev-name \
    /usr/lib/tmpfiles.d/fvd.conf /etc/systemd/system/fvd@.service \
    /usr/local/share/bash-completion/completions/fvd /usr/local/share/zsh/site-functions/_fvd \
    /usr/local/share/fish/vendor_completions.d/fvd.fish /usr/local/share/man/man1/fvd.1 \
    /usr/local/share/man/man1/fvd-start.1; do
    grep -qxF "$f" "$manifest" || fail "$f is not in the install list"
done
printf '%d files installed\n' "$(wc -l <"$manifest")"
cmp -s "$FVD" /usr/local/bin/fvd || fail "the installed binary differs from the built one"

step "the unit: systemd-analyze verify"
unit=/etc/systemd/system/fvd@.service
grep -q '^ExecStart=/usr/local/bin/fvd start --foreground' "$unit" || fail "ExecStart not filled in: $(grep ExecStart "$unit")"
img=$WORK/vm1.fvd
inst="fvd@$(systemd-escape --path "$img").service"
# A template verifies through an instance: link one beside it.
ln -sf "$unit" "/etc/systemd/system/$inst"
at_exit "rm -f \"/etc/systemd/system/$inst\""
out=$(systemd-analyze verify --man=no "/etc/systemd/system/$inst" 2>&1) || fail "systemd-analyze verify failed: $out"
printf 'systemd-analyze verify %s: ok%s\n' "$inst" "${out:+ ($out)}"

step "completions and manual pages"
bash -n /usr/local/share/bash-completion/completions/fvd || fail "the bash completion script does not parse"
words=$(bash -c '. /usr/local/share/bash-completion/completions/fvd; COMP_WORDS=(fvd st); COMP_CWORD=1; COMP_LINE="fvd st"; COMP_POINT=6; _fvd fvd st fvd; printf "%s " "${COMPREPLY[@]}"')
[[ $words == *start* && $words == *stop* ]] || fail "bash completion of 'fvd st' gave: $words"
printf "bash completes 'fvd st' to: %s\n" "$words"
head -c 200 /usr/local/share/man/man1/fvd-start.1 | grep -q '^\.TH' || fail "fvd-start.1 is not a man page"
if command -v man >/dev/null; then
    page=$(MANPAGER=cat MANWIDTH=80 man -l /usr/local/share/man/man1/fvd-start.1 2>/dev/null)
    grep -q -- '--foreground' <<<"$page" || fail "man fvd-start lacks --foreground"
    printf 'man fvd-start: %d lines\n' "$(wc -l <<<"$page")"
fi
printf 'manual pages: %s\n' "$(grep -c 'man1/' "$manifest")"

step "the unit's ExecStart with NOTIFY_SOCKET: READY=1 once live"
/usr/local/bin/fvd create -s 64M "$img" >/dev/null
sock=$WORK/notify.sock
python3 - "$sock" "$WORK/notify.txt" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
s.settimeout(60)
with open(sys.argv[2], "w") as out:
    while True:
        try:
            m = s.recv(4096).decode()
        except socket.timeout:
            break
        out.write(m.replace("\n", " ") + "\n")
        out.flush()
        if "STOPPING=1" in m:
            break
PY
listener=$!
wait_for_path "$sock" 10 || fail "the listener did not bind"
start_line=$(sed -n 's/^ExecStart=//p' "$unit")
start_line=${start_line//%f/$img}
start_line=${start_line//\$FVD_START_OPTS/}
printf 'ExecStart: %s\n' "$start_line"
# shellcheck disable=SC2086
NOTIFY_SOCKET=$sock $start_line --log-format json >"$WORK/stdout.txt" 2>"$RESULTS/daemon-json.log" &
daemon=$!
for _ in $(seq 100); do
    grep -q READY=1 "$WORK/notify.txt" 2>/dev/null && break
    kill -0 "$daemon" 2>/dev/null || fail "the daemon exited: $(tail -n 3 "$RESULTS/daemon-json.log")"
    sleep 0.2
done
ready=$(grep READY=1 "$WORK/notify.txt") || fail "no READY=1 within 20 s"
printf 'notified: %s\n' "$ready"
dev=$(sed -nE 's/.*STATUS=serving (\/dev\/ublkb[0-9]+).*/\1/p' <<<"$ready")
[[ -b $dev ]] || fail "READY=1 named no live device: $ready"
[[ $ready == *"MAINPID=$daemon"* ]] || fail "MAINPID is not the daemon's ($daemon): $ready"
[[ $(cat "$WORK/stdout.txt") == "$dev" ]] || fail "stdout says $(cat "$WORK/stdout.txt"), READY=1 says $dev"
dd if=/dev/urandom of="$WORK/data" bs=1M count=8 status=none
dd if="$WORK/data" of="$dev" bs=1M oflag=direct status=none
cmp <(head -c 8M "$dev") "$WORK/data" || fail "data read back differs"

step "the unit's ExecStop: a clean stop, STOPPING=1"
stop_line=$(sed -n 's/^ExecStop=//p' "$unit")
stop_line=${stop_line//%f/$img}
printf 'ExecStop: %s\n' "$stop_line"
# shellcheck disable=SC2086
$stop_line
wait "$daemon" || fail "the daemon exited with $?"
wait "$listener" || true
grep -q STOPPING=1 "$WORK/notify.txt" || fail "no STOPPING=1: $(cat "$WORK/notify.txt")"
[[ ! -b $dev ]] || fail "$dev still exists after ExecStop"
/usr/local/bin/fvd check "$img" >/dev/null || fail "fvd check after the stop"
"$FVD" io "$img" -c "read -o $WORK/back 0 8M" >/dev/null
cmp "$WORK/back" "$WORK/data" || fail "the image's content after the stop differs"

step "--log-format json: one object per line"
python3 - "$RESULTS/daemon-json.log" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
objs = [json.loads(l) for l in lines]
msgs = [o.get("fields", {}).get("message", "") for o in objs]
assert any(m == "device live" for m in msgs), msgs
assert all("level" in o and "timestamp" in o for o in objs)
print(f"{len(objs)} log lines, all JSON; e.g. {lines[0].strip()[:160]}")
PY

step "scripts/uninstall"
listed=$(wc -l <"$manifest")
run scripts/uninstall
for f in /usr/local/bin/fvd /etc/systemd/system/fvd@.service /usr/lib/udev/fvd-udev-name \
    /usr/local/share/man/man1/fvd.1 "$manifest"; do
    [[ ! -e $f ]] || fail "$f is still there after uninstall"
done
printf 'uninstall removed the %d listed files\n' "$listed"
step "ok"
