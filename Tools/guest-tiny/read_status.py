#!/usr/bin/env python3
"""Read the Geminus tiny guest's status page from a guest-RAM file.

    read_status.py [RAM_FILE]                 print the status page once
    read_status.py RAM_FILE --rate SECONDS    two reads SECONDS apart; print iterations/s;
                                              exit 1 if the counter did not grow
    read_status.py RAM_FILE --still SECONDS   two reads SECONDS apart; exit 1 if it moved
    read_status.py RAM_FILE --verify          also check the work pages written last
    read_status.py RAM_FILE --exact           check every work page against the guest's
                                              deterministic model: only for a stopped guest
                                              or a replica file (see README.md)
    add --json for one JSON object per read

RAM_FILE is the file behind QEMU's memory-backend-file (guest-physical address 0 at file
offset 0 for a `-machine pc` guest below 3.5 GiB), default /dev/shm/gt.ram.
Exit codes: 0 ok, 1 check failed, 2 no valid status page (not booted yet, or wrong file).
"""
import argparse
import json
import os
import struct
import sys
import time

STATUS_ADDR = 0x00200000
PAGE_SIZE = 4096
MAGIC = 0x47454D494E555331  # "GEMINUS1"
MIX = 0x9E3779B97F4A7C15
MIX_INVERSE = pow(MIX, -1, 1 << 64)  # MIX is odd, so c*MIX gives c back
MASK64 = (1 << 64) - 1
FIELDS = [
    "magic", "counter", "pages_per_loop", "loop_iterations_since_boot", "boot_marker",
    "work_base", "work_pages", "next_start", "print_every", "flush_every", "flags",
    "mem_upper_kib", "layout_version", "walk",
    # layout 2 (zero in layout 1 and without net=1)
    "net_sent", "net_answered", "net_frames_in", "net_ip",
]
W_OFFSETS = (0, 8, 2048, 4088)  # counter, page index, counter*MIX, boot_marker^counter


def read_status(fd):
    raw = os.pread(fd, 8 * len(FIELDS), STATUS_ADDR)
    if len(raw) < 8 * len(FIELDS):
        return None
    st = dict(zip(FIELDS, struct.unpack("<%dQ" % len(FIELDS), raw)))
    if st["magic"] != MAGIC:
        return None
    st["paging"] = bool(st["flags"] & 1)
    return st


def window_start(st, c):
    """First work page written by iteration c (counted from 1), as the guest computes it."""
    if st["walk"] == 0:  # sweep
        return ((c - 1) * st["pages_per_loop"]) % st["work_pages"]
    return ((c - 1) // st["walk"]) % st["work_pages"]


def verify_last_pages(fd, st):
    """Check the pages written by the last completed iteration of a running guest: each must
    carry its own index, and each of its three counter-derived words a counter no older than
    that iteration (the guest keeps rewriting its window, so newer is fine). A read can race
    with the guest's 4-byte stores, so a page gets five tries. For an exact check stop the
    guest and use --exact."""
    n = min(st["pages_per_loop"], st["work_pages"])
    done = st["loop_iterations_since_boot"]
    errors = []
    if done == 0:
        return errors
    first = window_start(st, done)
    for k in range(n):
        idx = (first + k) % st["work_pages"]
        addr = st["work_base"] + idx * PAGE_SIZE
        for _ in range(5):
            page = os.pread(fd, PAGE_SIZE, addr)
            c, index, w2, w3 = (struct.unpack_from("<Q", page, off)[0] for off in W_OFFSETS)
            c2, c3 = (w2 * MIX_INVERSE) & MASK64, w3 ^ st["boot_marker"]
            problem = None
            if index != idx:
                problem = "holds index %d" % index
            elif min(c, c2, c3) < done:
                problem = "counters %d/%d/%d (words 0/2048/4088), older than iteration %d" % (c, c2, c3, done)
            if problem is None:
                break
        if problem:
            errors.append("page %d (%#x): %s" % (idx, addr, problem))
            if len(errors) >= 5:
                break
    return errors


def last_writer(st, p, done):
    """The last iteration <= done that wrote work page p, or 0 if none did."""
    n, W, M = st["pages_per_loop"], st["work_pages"], st["walk"]
    if done == 0 or n == 0:
        return 0
    if M == 0:  # sweep: iteration c writes absolute positions [(c-1)n, cn), taken mod W
        a = done * n - 1 - ((done * n - 1 - p) % W)
        return a // n + 1 if a >= 0 else 0
    if n >= W:
        return done
    K = (done - 1) // M  # absolute window start of iteration `done`
    d = (p - K) % W
    if d < n:
        return done
    k = K - (W - d)  # latest earlier start whose window held p at its first slot
    return (k + 1) * M if k >= 0 else 0


def expected_words(st, c, p):
    if c == 0:
        return (0, 0, 0, 0)
    return (c, p, (c * MIX) & MASK64, st["boot_marker"] ^ c)


def verify_exact(fd, st):
    """Compare every work page with the model. A guest stopped in the middle of iteration
    counter = iterations + 1 may have written any 4-byte half of that iteration's words, so
    for pages in its window each half may be old or new. Pages never written must be zero,
    which holds when the RAM file was fresh at boot."""
    done, cur = st["loop_iterations_since_boot"], st["counter"]
    if cur not in (done, done + 1):
        return ["counter %d and iterations %d are inconsistent" % (cur, done)]
    W, base = st["work_pages"], st["work_base"]
    in_progress = set()
    if cur == done + 1:
        first = window_start(st, cur)
        in_progress = {(first + k) % W for k in range(min(st["pages_per_loop"], W))}
    zero_rest = bytes(PAGE_SIZE)
    errors = []
    chunk = 256
    for p0 in range(0, W, chunk):
        data = os.pread(fd, PAGE_SIZE * min(chunk, W - p0), base + p0 * PAGE_SIZE)
        for i in range(len(data) // PAGE_SIZE):
            p = p0 + i
            page = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            got = [struct.unpack_from("<Q", page, off)[0] for off in W_OFFSETS]
            old = expected_words(st, last_writer(st, p, done), p)
            ok = got == list(old)
            if not ok and p in in_progress:
                new = expected_words(st, cur, p)
                ok = all(((g >> s) & 0xFFFFFFFF) in (((o >> s) & 0xFFFFFFFF), ((n >> s) & 0xFFFFFFFF))
                         for g, o, n in zip(got, old, new) for s in (0, 32))
            if ok:
                rest = bytearray(page)
                for off in W_OFFSETS:
                    rest[off:off + 8] = bytes(8)
                ok = rest == zero_rest
                if not ok:
                    errors.append("page %d (%#x): stray bytes outside the four words" % (p, base + p * PAGE_SIZE))
            else:
                errors.append("page %d (%#x): words %s, expected %s (last written by iteration %d)"
                              % (p, base + p * PAGE_SIZE, [hex(x) for x in got], [hex(x) for x in old],
                                 last_writer(st, p, done)))
            if len(errors) >= 5:
                return errors
    return errors


def show(st, as_json):
    if as_json:
        print(json.dumps(st))
    else:
        print("counter=%d iterations=%d pages_per_loop=%d walk=%d next_start=%d/%d boot_marker=%#018x"
              " paging=%s" % (st["counter"], st["loop_iterations_since_boot"], st["pages_per_loop"],
                              st["walk"], st["next_start"], st["work_pages"], st["boot_marker"],
                              "on" if st["paging"] else "off"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ram_file", nargs="?", default="/dev/shm/gt.ram")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, metavar="SECONDS")
    g.add_argument("--still", type=float, metavar="SECONDS")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    try:
        fd = os.open(a.ram_file, os.O_RDONLY)
    except OSError as e:
        print("read_status: cannot open %s: %s" % (a.ram_file, e.strerror), file=sys.stderr)
        return 2
    first = read_status(fd)
    t0 = time.monotonic()
    if first is None:
        print("read_status: no status page (magic %#x) at %#x in %s" % (MAGIC, STATUS_ADDR, a.ram_file),
              file=sys.stderr)
        return 2
    show(first, a.json)
    rc = 0
    if a.verify:
        errs = verify_last_pages(fd, first)
        for e in errs:
            print("verify: " + e, file=sys.stderr)
        if errs:
            rc = 1
    if a.exact:
        errs = verify_exact(fd, first)
        for e in errs:
            print("exact: " + e, file=sys.stderr)
        if errs:
            rc = 1
        else:
            print("exact: all %d work pages match iteration %d" % (first["work_pages"], first["counter"]))
    wait = a.rate if a.rate is not None else a.still
    if wait is not None:
        time.sleep(wait)
        second = read_status(fd)
        dt = time.monotonic() - t0
        if second is None:
            print("read_status: status page vanished", file=sys.stderr)
            return 2
        show(second, a.json)
        delta = (second["counter"] - first["counter"]) & MASK64
        if second["boot_marker"] != first["boot_marker"]:
            print("read_status: the guest rebooted between the reads", file=sys.stderr)
            rc = 1
        if a.rate is not None:
            print("delta=%d in %.3f s: %.0f iterations/s, %.0f pages/s"
                  % (delta, dt, delta / dt, delta * second["pages_per_loop"] / dt))
            if delta == 0:
                print("read_status: counter did not grow", file=sys.stderr)
                rc = 1
        else:
            print("delta=%d in %.3f s" % (delta, dt))
            if delta != 0:
                print("read_status: counter moved", file=sys.stderr)
                rc = 1
    os.close(fd)
    return rc


if __name__ == "__main__":
    sys.exit(main())
