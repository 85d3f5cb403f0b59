#!/usr/bin/env python3
"""Read and replay a dm-log-writes log (the kernel's log-writes device-mapper target).

dm-log-writes (Documentation/admin-guide/device-mapper/log-writes.rst, drivers/md/
dm-log-writes.c) passes every bio to a data device and records each completed write, in
the order it became durable, in a separate log device. Replaying the log onto a copy of
the data device's content from before logging started gives the device exactly as it
would have been after a power cut at any point of the log. This is a small stand-in for
xfstests' src/log-writes/replay-log, which Debian does not package.

On-disk format (all integers little-endian; S is the super block's sectorsize, the data
device's logical block size):

    offset 0     super block: magic u64 (0x6a736677736872, "rhswfsj"), version u64 (1),
                 nr_entries u64, sectorsize u32; rewritten in place as the log grows
    offset S     entry 0, then entry 1, ... each starting on an S boundary:
                   header block (S bytes): sector u64, nr_sectors u64, flags u64, data_len u64,
                   then, for a MARK entry only, the mark's name (data_len bytes) inline
                   data: nr_sectors * S bytes, the written data; none for DISCARD and MARK

    sector and nr_sectors count S-byte blocks of the data device.
    flags: FLUSH 1 (a REQ_PREFLUSH bio), FUA 2, DISCARD 4, MARK 8, METADATA 16 (REQ_META).

How the kernel orders the log: a plain write is logged only when a later flush completes
(writes completed before a flush was issued are logged just ahead of that flush's own
entry, in completion order); a FUA write is logged as it completes; a mark (`dmsetup
message DEV 0 mark NAME`) is logged at once, so writes not yet followed by a flush come
after it. Removing the target logs what is still unflushed and a mark
"dm-log-writes-end". Replaying up to and including a FLUSH or FUA entry therefore gives
the state a power cut just after that request completed would leave, with every write
not yet flushed lost: the worst case a volatile write cache allows. Entries are numbered
from 0, in log order.

Usage:
    replay-log.py info LOG
    replay-log.py list LOG [--start N] [--count K] [--marks]
    replay-log.py find LOG --mark NAME          entry number of the mark NAME (exit 1 if none)
    replay-log.py find LOG --flush [--after N] [--until N]
                                                entry numbers of every FLUSH or FUA entry
    replay-log.py points LOG [--after-mark A] [--until-mark B]
                                                one line per replay point: "N mark NAME" for
                                                marks, "N flush FLAGS" for FLUSH/FUA entries
    replay-log.py replay LOG TARGET --to N|MARK [--from M] [--discard zero|skip]
                                                apply entries M+1..N (M: -1, from the start)
                                                onto TARGET (a file or block device holding
                                                the data device's content as of entry M)

DISCARD entries are replayed as zeros by default (what a loop device over a file gives);
--discard skip leaves the old bytes, the other thing a device may do. The target offers
no write-zeroes (queue/write_zeroes_max_bytes is 0), so BLKZEROOUT on it falls back to
writing zero pages: those are logged as ordinary writes, with their data.
"""

import argparse
import os
import struct
import sys

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")

FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
FLAG_NAMES = [(FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"), (MARK, "MARK"), (METADATA, "META")]
COPY_CHUNK = 1 << 20


class LogError(Exception):
    pass


def flag_text(flags):
    names = [n for bit, n in FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in FLAG_NAMES)
    if rest:
        names.append("0x%x" % rest)
    return "|".join(names) if names else "WRITE"


class Entry:
    __slots__ = ("index", "pos", "sector", "nr_sectors", "flags", "data_len", "mark", "data_pos")

    def __repr__(self):
        return "Entry(%d)" % self.index


class Log:
    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        if self.size == 0:  # a block device
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        raw = os.pread(self.fd, SUPER.size, 0)
        if len(raw) < SUPER.size:
            raise LogError("%s: too short for a super block" % path)
        self.magic, self.version, self.nr_entries, self.sectorsize = SUPER.unpack(raw)
        if self.magic != MAGIC:
            raise LogError("%s: bad magic 0x%x (want 0x%x): not a dm-log-writes log" % (path, self.magic, MAGIC))
        if self.version != VERSION:
            raise LogError("%s: log version %d, this tool reads %d" % (path, self.version, VERSION))
        if self.sectorsize < 512 or self.sectorsize & (self.sectorsize - 1):
            raise LogError("%s: bad sectorsize %d" % (path, self.sectorsize))
        self._entries = None

    def entries(self):
        """Every entry's header (the data is read only when replayed)."""
        if self._entries is not None:
            return self._entries
        out = []
        s = self.sectorsize
        pos = s
        for i in range(self.nr_entries):
            blk = os.pread(self.fd, s, pos)
            if len(blk) < ENTRY.size:
                raise LogError("%s: entry %d at byte %d lies past the end of the log" % (self.path, i, pos))
            e = Entry()
            e.index = i
            e.pos = pos
            e.sector, e.nr_sectors, e.flags, e.data_len = ENTRY.unpack_from(blk)
            e.mark = None
            if e.flags & MARK:
                if ENTRY.size + e.data_len > s:
                    raise LogError("%s: entry %d: mark of %d bytes does not fit its block" % (self.path, i, e.data_len))
                e.mark = blk[ENTRY.size:ENTRY.size + e.data_len].decode("utf-8", "replace")
            e.data_pos = pos + s
            pos += s
            if not e.flags & (DISCARD | MARK):
                pos += e.nr_sectors * s
            if pos > self.size:
                raise LogError("%s: entry %d (%d blocks at byte %d) runs past the end of the log (%d bytes)"
                               % (self.path, i, e.nr_sectors, e.data_pos, self.size))
            out.append(e)
        self._entries = out
        return out

    def find_mark(self, name):
        for e in self.entries():
            if e.mark == name:
                return e.index
        return None

    def resolve(self, what):
        """An entry number, or the entry number of a mark name."""
        try:
            n = int(what)
        except ValueError:
            n = self.find_mark(what)
            if n is None:
                raise LogError("%s: no mark named %r" % (self.path, what))
            return n
        if n < -1 or n >= self.nr_entries:
            raise LogError("%s: entry %d out of range (the log has %d entries)" % (self.path, n, self.nr_entries))
        return n

    def describe(self, e):
        s = "%6d  %-14s" % (e.index, flag_text(e.flags))
        if e.flags & MARK:
            return s + "  mark %r" % e.mark
        if e.nr_sectors == 0:
            return s + "  (no data)"
        b = self.sectorsize
        return s + "  sector %d +%d  (bytes %d..%d, %d KiB)" % (
            e.sector, e.nr_sectors, e.sector * b, (e.sector + e.nr_sectors) * b, e.nr_sectors * b // 1024)

    def replay(self, target_fd, first, last, discard="zero"):
        """Applies entries first..last (inclusive) to target_fd. Returns (writes, discards, bytes)."""
        s = self.sectorsize
        writes = discards = nbytes = 0
        zeros = bytes(COPY_CHUNK)
        for e in self.entries()[first:last + 1]:
            if e.flags & MARK or e.nr_sectors == 0:
                continue
            off = e.sector * s
            length = e.nr_sectors * s
            if e.flags & DISCARD:
                discards += 1
                if discard == "zero":
                    done = 0
                    while done < length:
                        n = min(COPY_CHUNK, length - done)
                        os.pwrite(target_fd, zeros[:n], off + done)
                        done += n
                continue
            writes += 1
            done = 0
            while done < length:
                n = min(COPY_CHUNK, length - done)
                buf = os.pread(self.fd, n, e.data_pos + done)
                if len(buf) != n:
                    raise LogError("%s: entry %d: short read of its data" % (self.path, e.index))
                os.pwrite(target_fd, buf, off + done)
                done += n
            nbytes += length
        return writes, discards, nbytes


def cmd_info(log, a):
    ents = log.entries()
    counts = {}
    for e in ents:
        for bit, n in FLAG_NAMES:
            if e.flags & bit:
                counts[n] = counts.get(n, 0) + 1
        if not e.flags & (MARK | DISCARD | FLUSH | FUA) or (e.flags & (FLUSH | FUA) and e.nr_sectors):
            counts["data"] = counts.get("data", 0) + 1
    data = sum(e.nr_sectors for e in ents if not e.flags & (MARK | DISCARD)) * log.sectorsize
    end = max((e.data_pos + (0 if e.flags & (MARK | DISCARD) else e.nr_sectors * log.sectorsize) for e in ents),
              default=log.sectorsize)
    print("magic 0x%x version %d nr_entries %d sectorsize %d" % (log.magic, log.version, log.nr_entries, log.sectorsize))
    print("entries with data %d (%d bytes), %s" % (
        counts.pop("data", 0), data, ", ".join("%s %d" % kv for kv in sorted(counts.items())) or "no flags"))
    print("log used up to byte %d of %d" % (end, log.size))
    print("marks: %s" % (", ".join("%s@%d" % (e.mark, e.index) for e in ents if e.flags & MARK) or "none"))
    return 0


def cmd_list(log, a):
    ents = log.entries()
    shown = [e for e in ents[a.start:] if not a.marks or e.flags & MARK]
    if a.count is not None:
        shown = shown[:a.count]
    for e in shown:
        print(log.describe(e))
    return 0


def cmd_find(log, a):
    if a.mark is not None:
        n = log.find_mark(a.mark)
        if n is None:
            print("no mark named %r" % a.mark, file=sys.stderr)
            return 1
        print(n)
        return 0
    after = log.resolve(a.after) if a.after is not None else -1
    until = log.resolve(a.until) if a.until is not None else log.nr_entries - 1
    for e in log.entries()[after + 1:until + 1]:
        if e.flags & (FLUSH | FUA):
            print(e.index)
    return 0


def cmd_points(log, a):
    after = log.resolve(a.after_mark) if a.after_mark is not None else -1
    until = log.resolve(a.until_mark) if a.until_mark is not None else log.nr_entries - 1
    for e in log.entries()[after + 1:until + 1]:
        if e.flags & MARK:
            print("%d mark %s" % (e.index, e.mark))
        elif e.flags & (FLUSH | FUA):
            print("%d flush %s" % (e.index, flag_text(e.flags)))
    return 0


def cmd_replay(log, a):
    first = log.resolve(a.start) + 1 if a.start is not None else 0
    last = log.resolve(a.to)
    if last < first - 1:
        raise LogError("cannot replay backwards: --from %s is past --to %s" % (a.start, a.to))
    fd = os.open(a.target, os.O_WRONLY)
    try:
        w, d, n = log.replay(fd, first, last, a.discard)
        os.fsync(fd)
    finally:
        os.close(fd)
    if a.verbose:
        print("replayed entries %d..%d: %d writes (%d bytes), %d discards" % (first, last, w, n, d))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="super block and a summary")
    s.add_argument("log")
    s = sub.add_parser("list", help="list entries")
    s.add_argument("log")
    s.add_argument("--start", type=int, default=0)
    s.add_argument("--count", type=int)
    s.add_argument("--marks", action="store_true", help="marks only")
    s = sub.add_parser("find", help="entry number of a mark, or of every FLUSH/FUA entry")
    s.add_argument("log")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--mark")
    g.add_argument("--flush", action="store_true")
    s.add_argument("--after", help="entry number or mark name (with --flush)")
    s.add_argument("--until", help="entry number or mark name (with --flush)")
    s = sub.add_parser("points", help="marks and FLUSH/FUA entries, in log order")
    s.add_argument("log")
    s.add_argument("--after-mark", help="start after this mark (or entry number)")
    s.add_argument("--until-mark", help="end at this mark (or entry number), included")
    s = sub.add_parser("replay", help="apply entries onto a target")
    s.add_argument("log")
    s.add_argument("target")
    s.add_argument("--to", required=True, help="last entry to apply: a number or a mark name")
    s.add_argument("--from", dest="start", help="the entry the target is already at (a number or a mark name)")
    s.add_argument("--discard", choices=["zero", "skip"], default="zero")
    s.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    try:
        log = Log(a.log)
        return {"info": cmd_info, "list": cmd_list, "find": cmd_find, "points": cmd_points,
                "replay": cmd_replay}[a.cmd](log, a)
    except (LogError, OSError) as e:
        print("replay-log: %s" % e, file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
