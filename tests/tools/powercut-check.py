#!/usr/bin/env python3
"""Replay a dm-log-writes log of an fvd image to every flush, and check the image at each.

Used by tests/guest/scenarios/58-power-cut.sh (run as root in the guest: it sets up loop
and device-mapper devices). The image sits on the data device of a log-writes target;
TARGET holds the data device's bytes from before logging started. A workload wrote to
the image through /dev/ublkbN and kept a journal of what it saw acknowledged:

    write OFF LEN SRCOFF     LEN bytes of SRC, from SRCOFF, written at OFF
    discard OFF LEN          a discard: the range reads zeros
    zero OFF LEN             a write-zeroes: the range reads zeros
    durable NAME             everything above was acknowledged, then a flush was; NAME is
                             the mark logged (dmsetup message ... mark NAME) right after

(offsets and lengths in bytes; the disk starts as zeros). The points checked are every
mark and every FLUSH or FUA entry of the log from --after-mark to --until-mark, both
included. At each, in log order, TARGET is brought forward to the point (replay-log.py,
incrementally) and, on a dm-snapshot of it (the recovery's writes go to a scratch
copy-on-write file and TARGET stays the replayed bytes):

1. `fvd check` on the image as the power cut left it: exit 0. Between two flush marks,
   with writes in flight, exit 3 (leaked chunks, no damage) on an image not closed
   cleanly is allowed too: chunks a write reached before its record was durable, which
   the recovery wipes (step 3 checks it did).
2. `fvd io` opens it read-write (the recovery: journal replayed, unreferenced chunks
   wiped, checkpoint, closed clean) and reads the whole disk back. At a durable mark it
   must equal, byte for byte, the disk as of that mark. Anywhere else it must equal the
   disk as of the last durable mark before the point, except in the ranges the workload
   touched after that mark (up to the next durable mark, or the journal's end): there
   each 512-byte sector must hold either its bytes as of that mark or what one of those
   later operations put there (old or new, in any mix; never bytes from elsewhere).
   Ranges that must be zeros are verified inside fvd (`read -P 0`), the others read
   into files and compared.
3. `fvd check` again: exit 0, and clean.

With --midpoints, the write entry halfway between two consecutive points is checked too
(as a point between marks): a crash that let only part of what was written before a
flush reach storage, in the order the log holds it.

With --control MARK, the first point is also read back as if it were the disk as of the
durable mark MARK, which must fail: a guard against a comparison that sees nothing.

Prints one line per point and a summary; exits 1 if any point failed. POWERCUT_DEBUG=1
in the environment prints each command run and how long it took.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time


def load_replay_log():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("replay_log", os.path.join(here, "replay-log.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rl = load_replay_log()


def parse_journal(path):
    ops = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            w = line.split()
            if not w:
                continue
            if w[0] == "write" and len(w) == 4:
                ops.append(("write", int(w[1]), int(w[2]), int(w[3]), n))
            elif w[0] in ("discard", "zero") and len(w) == 3:
                ops.append((w[0], int(w[1]), int(w[2]), None, n))
            elif w[0] == "durable" and len(w) == 2:
                ops.append(("durable", w[1], 0, None, n))
            else:
                raise SystemExit("%s:%d: bad line %r" % (path, n, line))
    return ops


def expected(ops, end, size):
    """The disk after ops[:end], as sorted segments (start, stop, src offset or None: zeros)."""
    segs = [(0, size, None)]
    for kind, off, length, soff, _ in ops[:end]:
        if kind == "durable":
            continue
        stop = off + length
        out = []
        for s, e, so in segs:
            if e <= off or s >= stop:
                out.append((s, e, so))
                continue
            if s < off:
                out.append((s, off, so))
            if e > stop:
                out.append((stop, e, None if so is None else so + (stop - s)))
        out.append((off, stop, soff))
        out.sort()
        segs = out
    return segs


def subtract(segs, skip):
    """segs minus the (sorted, merged) skip ranges."""
    out = []
    for s, e, so in segs:
        pos = s
        for a, b in skip:
            if b <= pos or a >= e:
                continue
            if a > pos:
                out.append((pos, a, None if so is None else so + (pos - s)))
            pos = max(pos, b)
        if pos < e:
            out.append((pos, e, None if so is None else so + (pos - s)))
    # Adjacent zero pieces become one read.
    merged = []
    for p in out:
        if merged and p[2] is None and merged[-1][2] is None and merged[-1][1] == p[0]:
            merged[-1] = (merged[-1][0], p[1], None)
        else:
            merged.append(p)
    return merged


def merge(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


def materialize(segs, lo, hi, src):
    """The bytes lo..hi of a disk given as segments."""
    out = bytearray()
    for s, e, so in segs:
        if e <= lo or s >= hi:
            continue
        a, b = max(s, lo), min(e, hi)
        out += bytes(b - a) if so is None else src[so + (a - s):so + (b - s)]
    return bytes(out)


SECTOR = 512
BLOCK = 4096


def check_between(got, lo, base, between, src):
    """A range touched after the last durable mark: each sector must hold its content as
    of that mark (`base`) or what one of the later operations put there (any of them may
    have reached storage, in any mix). Returns the first offending sectors."""
    bad = []
    for b in range(lo, lo + len(got), BLOCK):
        n = min(BLOCK, lo + len(got) - b)
        g = got[b - lo:b - lo + n]
        old = base[b - lo:b - lo + n]
        if g == old:
            continue
        versions = []  # (start, stop, bytes) of each later operation over this block
        for _, off, length, soff, _ in between:
            if off < b + n and b < off + length:
                x, y = max(off, b), min(off + length, b + n)
                versions.append((x, y, bytes(y - x) if soff is None else src[soff + (x - off):soff + (y - off)]))
        for sec in range(b, b + n, SECTOR):
            gs = g[sec - b:sec - b + SECTOR]
            if gs == old[sec - b:sec - b + SECTOR]:
                continue
            if any(x <= sec and sec + SECTOR <= y and gs == v[sec - x:sec - x + SECTOR] for x, y, v in versions):
                continue
            bad.append(sec)
            break
        if len(bad) >= 4:
            break
    return bad


DEBUG = bool(os.environ.get("POWERCUT_DEBUG"))


def run(cmd, **kw):
    t = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, **kw)
    if DEBUG:
        print("  [%.2fs] %s" % (time.monotonic() - t, " ".join(cmd)[:100]))
    return r


def must(cmd):
    r = run(cmd)
    if r.returncode != 0:
        raise SystemExit("%s: exit %d: %s" % (" ".join(cmd), r.returncode, r.stdout.strip()))
    return r.stdout.strip()


class Loops:
    """TARGET behind a read-only loop device, and a scratch copy-on-write file behind
    another; both stay for the whole run (a loop device reads its file's current bytes)."""

    def __init__(self, target, cow):
        self.target, self.cow = target, cow
        self.tloop = self.cloop = None

    def __enter__(self):
        self.size = os.stat(self.target).st_size
        self.tloop = must(["losetup", "-r", "-f", "--show", self.target])
        with open(self.cow, "wb") as f:
            f.truncate(self.size + (16 << 20))
        self.cloop = must(["losetup", "-f", "--show", self.cow])
        return self

    def __exit__(self, *exc):
        for loop in (self.cloop, self.tloop):
            if loop:
                run(["losetup", "-d", loop])
        os.unlink(self.cow)
        return False


class Snapshot:
    """A fresh dm-snapshot of the target loop (a transient exception store: it starts
    empty every time), so that the recovery's writes land in the scratch file.

    Without waiting for udev (that costs seconds under emulation): a name of its own per
    point, and the kernel's /dev/dm-N node. udev may still probe the device for a moment
    (fvd waits out its lock; the removal retries)."""

    def __init__(self, loops, name):
        self.loops, self.name = loops, name

    def __enter__(self):
        must(["dmsetup", "create", "--noudevsync", self.name, "--table", "0 %d snapshot %s %s N 8"
              % (self.loops.size // 512, self.loops.tloop, self.loops.cloop)])
        for blk in os.listdir("/sys/block"):
            try:
                with open("/sys/block/%s/dm/name" % blk) as f:
                    if f.read().strip() == self.name:
                        return "/dev/" + blk
            except OSError:
                pass
        raise SystemExit("dm device %s not found in /sys/block" % self.name)

    def __exit__(self, *exc):
        must(["dmsetup", "remove", "--noudevsync", "--retry", self.name])
        return False


def check_json(fvd, dev):
    r = run([fvd, "check", "--output", "json", dev])
    try:
        rep = json.loads(r.stdout[r.stdout.index("{"):])
    except ValueError:
        rep = None
    return r.returncode, rep, r.stdout


def touched_by(ops, lo, hi):
    hits = [op for op in ops if op[0] != "durable" and op[1] < hi and lo < op[1] + op[2]]
    return ", ".join("journal line %d: %s %d+%d" % (op[4], op[0], op[1], op[2]) for op in hits[-3:]) \
        or "nothing (never written: zeros)"


def read_back(fvd, dev, ops, end, between, size, src, segdir, cur):
    """Opens the image read-write (the recovery) and reads it all back: the disk as of
    ops[:end] outside the ranges `between` touched, and in those, sector by sector, old
    or new bytes. Returns (problems, ranges read, bytes read)."""
    base = expected(ops, end, size)
    skip = merge((op[1], op[1] + op[2]) for op in between)
    pieces = subtract(base, skip)
    cmds = []
    files = []
    for i, (lo, hi) in enumerate(skip):
        fn = os.path.join(segdir, "s%d" % i)
        cmds += ["-c", "read -o %s %d %d" % (fn, lo, hi - lo)]
        files.append((fn, lo, hi, None))
    for i, (lo, hi, so) in enumerate(pieces):
        if so is None:
            cmds += ["-c", "read -P 0 %d %d" % (lo, hi - lo)]
        else:
            fn = os.path.join(segdir, "p%d" % i)
            cmds += ["-c", "read -o %s %d %d" % (fn, lo, hi - lo)]
            files.append((fn, lo, hi, so))
    problems = []
    r = run([fvd, "io", dev] + cmds)
    if r.returncode != 0:
        msg = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        if "Pattern verification failed at offset" in msg:
            off = int(msg.split("offset ")[1].split(",")[0])
            msg += "\n  want zeros there; last touched by: %s" % touched_by(ops[:end], off, off + 1)
        problems.append("recovery + read back failed: %s" % msg)
    for fn, lo, hi, so in files:
        if r.returncode != 0:
            if os.path.exists(fn):
                os.unlink(fn)
            continue
        with open(fn, "rb") as f:
            got = f.read()
        os.unlink(fn)
        if so is None:
            for sec in check_between(got, lo, materialize(base, lo, hi, src), between, src):
                g = got[sec - lo:sec - lo + SECTOR]
                problems.append("sector at %d holds neither its bytes as of %s nor any written since (got %s...%s); "
                                "touched since by: %s; before by: %s"
                                % (sec, cur, g[:8].hex(), " (zeros)" if not any(g) else "",
                                   touched_by(between, sec, sec + SECTOR), touched_by(ops[:end], sec, sec + SECTOR)))
            continue
        want = src[so:so + (hi - lo)]
        if got != want:
            i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
            problems.append("bytes %d..%d differ, first at byte %d: got %s..., want %s...%s; last touched by: %s"
                            % (lo, hi, lo + i, got[i:i + 8].hex(), want[i:i + 8].hex(),
                               " (reads zeros)" if not any(got[i:i + BLOCK]) else "",
                               touched_by(ops[:end], lo + i, lo + i + 1)))
    return problems, len(files) + sum(1 for p in pieces if p[2] is None), size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--log", required=True, help="the dm-log-writes log")
    p.add_argument("--target", required=True, help="the data device's bytes as logging started (replayed onto)")
    p.add_argument("--journal", required=True)
    p.add_argument("--src", required=True, help="the file the workload's writes came from")
    p.add_argument("--size", type=int, required=True, help="the image's virtual size")
    p.add_argument("--fvd", required=True)
    p.add_argument("--work", required=True, help="a scratch folder")
    p.add_argument("--after-mark", required=True, help="the first point: this mark (a durable one)")
    p.add_argument("--until-mark", required=True, help="the last point: this mark")
    p.add_argument("--control", metavar="MARK",
                   help="at the first point, also claim the disk is as of the durable mark MARK: "
                        "that must fail (the comparison has teeth)")
    p.add_argument("--midpoints", action="store_true",
                   help="also check, between two consecutive points, the write entry halfway (a crash that "
                        "let only part of what was written before a flush reach storage)")
    p.add_argument("--dm-name", default="fvdpowercut")
    a = p.parse_args()

    log = rl.Log(a.log)
    ents = log.entries()
    first = log.resolve(a.after_mark)
    last = log.resolve(a.until_mark)
    points = [e for e in ents[first:last + 1] if e.flags & (rl.MARK | rl.FLUSH | rl.FUA)]
    if a.midpoints:
        mids = []
        for prev, nxt in zip(points, points[1:]):
            batch = [e for e in ents[prev.index + 1:nxt.index] if not e.flags & rl.MARK]
            if len(batch) >= 2:
                mids.append(batch[len(batch) // 2 - 1])
        points = sorted(points + mids, key=lambda e: e.index)
    ops = parse_journal(a.journal)
    durable = {op[1]: i for i, op in enumerate(ops) if op[0] == "durable"}
    for m in (a.after_mark, a.control):
        if m is not None and m not in durable:
            raise SystemExit("mark %r is not a durable mark of the journal" % m)
    with open(a.src, "rb") as f:
        src = f.read()
    segdir = os.path.join(a.work, "pieces")
    os.makedirs(segdir, exist_ok=True)

    nmarks = nflush = nhalf = failures = leaky = 0
    verified = 0
    times = {"replay+dm": 0.0, "check": 0.0, "recover+read": 0.0}
    cur = None
    pos = -1
    tfd = os.open(a.target, os.O_WRONLY)
    loops = Loops(a.target, os.path.join(a.work, "cow")).__enter__()
    nmid = sum(1 for e in points if not e.flags & (rl.MARK | rl.FLUSH | rl.FUA))
    print("%d points: %d marks, %d FLUSH/FUA entries%s (entries %d..%d of %d)" % (
        len(points), sum(1 for e in points if e.flags & rl.MARK), len(points) - nmid - sum(1 for e in points if e.flags & rl.MARK),
        ", %d halfway through what came before a flush" % nmid if a.midpoints else "", first, last, len(ents)))
    try:
        for e in points:
            t0 = time.monotonic()
            log.replay(tfd, pos + 1, e.index)
            os.fsync(tfd)
            pos = e.index
            if e.flags & rl.MARK and e.mark in durable:
                cur = e.mark
                end, between, what = durable[cur], [], "= %s" % cur
            else:
                end = durable[cur]
                stop = min((i for i in durable.values() if i > end), default=len(ops))
                between = [op for op in ops[end + 1:stop] if op[0] != "durable"]
                what = "%s, old or new bytes in the %d KiB written after it" % (
                    cur, sum(b - a_ for a_, b in merge((op[1], op[1] + op[2]) for op in between)) // 1024)
            label = "entry %5d %-6s" % (e.index, ("mark " + e.mark) if e.flags & rl.MARK else rl.flag_text(e.flags))
            problems = []
            notes = []
            with Snapshot(loops, "%s-%d" % (a.dm_name, e.index)) as dev:
                t1 = time.monotonic()
                # 1. as the power cut left it
                rc, rep, out = check_json(a.fvd, dev)
                if rc == 3 and rep and rep.get("dirty") and not rep.get("corruptions") and between:
                    leaky += 1
                    notes.append("%d chunk(s) leaked before recovery" % len(rep.get("leaked_chunks", [])))
                elif rc != 0:
                    problems.append("fvd check before recovery exited %d:\n%s" % (rc, out.strip()))
                t2 = time.monotonic()
                # 2. recover and read back
                pr, nranges, nbytes = read_back(a.fvd, dev, ops, end, between, a.size, src, segdir, cur)
                problems += pr
                verified += nbytes
                t3 = time.monotonic()
                # 3. clean after the recovery
                rc, rep, out = check_json(a.fvd, dev)
                if rc != 0 or not rep or rep.get("dirty"):
                    problems.append("fvd check after recovery exited %d%s:\n%s"
                                    % (rc, " (still dirty)" if rep and rep.get("dirty") else "", out.strip()))
                t4 = time.monotonic()
                if a.control and e is points[0]:
                    pr, _, _ = read_back(a.fvd, dev, ops, durable[a.control], [], a.size, src, segdir, a.control)
                    if pr:
                        print("control: claiming the disk at entry %d is as of mark %s fails, as it must: %s%s"
                              % (e.index, a.control, pr[0].splitlines()[0], " (+%d more)" % (len(pr) - 1) if len(pr) > 1 else ""))
                    else:
                        problems.append("control: the disk at entry %d passed as the disk as of mark %s: "
                                        "the comparison misses differences" % (e.index, a.control))
            times["replay+dm"] += t1 - t0 + time.monotonic() - t4
            times["check"] += t2 - t1 + t4 - t3
            times["recover+read"] += t3 - t2
            if e.flags & rl.MARK:
                nmarks += 1
            elif e.flags & (rl.FLUSH | rl.FUA):
                nflush += 1
            else:
                nhalf += 1
            writes = sum(1 for op in ops[:end] if op[0] == "write")
            if problems:
                failures += 1
                print("FAIL %s: disk %s (%d writes acknowledged before it):" % (label, what, writes))
                for pr in problems:
                    print("  " + pr.replace("\n", "\n  "))
            else:
                print("ok   %s: disk %s (%d writes acknowledged before it), %d ranges read%s (%.1fs)"
                      % (label, what, writes, nranges, "; " + ", ".join(notes) if notes else "", time.monotonic() - t0))
            sys.stdout.flush()
    finally:
        loops.__exit__(None, None, None)
        os.close(tfd)
    print("points: %d marks and %d FLUSH/FUA entries%s replayed, recovered and read back whole (%d MiB); "
          "%d with chunks leaked before recovery; %d failure(s)" % (
              nmarks, nflush, " and %d halfway entries" % nhalf if a.midpoints else "", verified >> 20, leaky, failures))
    print("time: %s" % ", ".join("%s %.0fs" % kv for kv in times.items()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
