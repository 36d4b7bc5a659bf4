#!/usr/bin/env python3
"""Read the guest-linux status page (counter) from a guest-RAM file.

    read_counter.py RAMFILE [ADDR]              print the status page once
    read_counter.py RAMFILE [ADDR] --rate S     two reads S seconds apart; print increments/s;
                                                exit 1 if the counter did not grow
    read_counter.py RAMFILE [ADDR] --still S    two reads S seconds apart; exit 1 if it moved
    add --json for one JSON object per read

ADDR is the guest-physical address of the status page, printed by the guest on its serial
console as `geminus-counter-phys=0x...` (hex or decimal). Without ADDR the file is scanned,
page by page, for the status page's magic "GEMLINUX" (a fraction of a second for 256 MiB).
The counter is the u64 at ADDR+8. RAMFILE is the file behind QEMU's memory-backend-file
(guest-physical address = file offset for a `-machine pc` guest below 3.5 GiB).
Exit codes: 0 ok, 1 check failed, 2 no valid status page at ADDR / none found.
"""
import argparse
import json
import mmap
import os
import struct
import sys
import time

MAGIC = 0x58554E494C4D4547  # b"GEMLINUX" little-endian
FIELDS = ["magic", "counter", "boot_marker", "requests", "sent", "phys", "pages",
          "pages_phys", "version",
          # layout version 2: the transaction service (txn.c)
          "txn_seq", "txn_balance", "txn_applied", "disk_checks", "disk_mismatches", "disk_mode",
          "disk_ahead"]


def read(fd, addr):
    raw = os.pread(fd, 8 * len(FIELDS), addr)
    if len(raw) < 8 * len(FIELDS):
        return None
    st = dict(zip(FIELDS, struct.unpack("<%dQ" % len(FIELDS), raw)))
    if st["magic"] != MAGIC or st["phys"] != addr:
        return None
    return st


def scan(fd):
    size = os.fstat(fd).st_size
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    needle, pos, found = struct.pack("<Q", MAGIC), 0, []
    while True:
        pos = m.find(needle, pos)
        if pos < 0:
            break
        if pos % 4096 == 0 and read(fd, pos):
            found.append(pos)
        pos += 8
    m.close()
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ramfile")
    ap.add_argument("addr", nargs="?")
    ap.add_argument("--rate", type=float)
    ap.add_argument("--still", type=float)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    fd = os.open(a.ramfile, os.O_RDONLY)
    if a.addr is not None:
        addr = int(a.addr, 0)
    else:
        found = scan(fd)
        if not found:
            print("no status page found", file=sys.stderr)
            return 2
        if len(found) > 1:
            print("several status pages (stale ones from an earlier boot?): "
                  + " ".join(hex(f) for f in found) + "; pass ADDR", file=sys.stderr)
            return 2
        addr = found[0]

    def show(st):
        if a.json:
            print(json.dumps(st))
        else:
            print(f"addr=0x{addr:x} counter={st['counter']} requests={st['requests']} "
                  f"sent={st['sent']} boot_marker=0x{st['boot_marker']:x}")

    st1 = read(fd, addr)
    if not st1:
        print(f"no valid status page at 0x{addr:x}", file=sys.stderr)
        return 2
    show(st1)
    wait = a.rate if a.rate is not None else a.still
    if wait is None:
        return 0
    t1 = time.monotonic()
    time.sleep(wait)
    st2 = read(fd, addr)
    t2 = time.monotonic()
    if not st2:
        print(f"status page at 0x{addr:x} vanished", file=sys.stderr)
        return 2
    show(st2)
    d = (st2["counter"] - st1["counter"]) & ((1 << 64) - 1)
    if a.rate is not None:
        print(f"rate={d / (t2 - t1):.0f}/s")
        return 0 if d > 0 else 1
    print("still" if d == 0 else f"moved by {d}")
    return 0 if d == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
