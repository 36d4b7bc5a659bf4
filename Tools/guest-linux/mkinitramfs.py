#!/usr/bin/env python3
"""Writes the guest-linux initramfs: a byte-reproducible newc cpio, gzip-compressed.

    mkinitramfs.py --busybox BB --list APPLETS.txt --modules-dir /.../lib/modules/VER
                   --module virtio_pci --module virtio_net ... --file SRC:DEST[:MODE] ...
                   --out initramfs.cpio.gz

Modules are looked up by name under --modules-dir; their dependencies are read from the
`depends=` entry of each module's ELF `.modinfo` section (what `modinfo -F depends` prints),
and the load order (dependencies first) is written to /lib/modules/order in the image and
printed on stderr. Every entry gets mtime 0, uid/gid 0, sequential inode numbers, entries are
sorted by path, and the gzip header has mtime 0 and no name, so the same inputs always give
the same bytes (for a given zlib).
"""
import argparse
import gzip
import os
import struct
import sys


def elf_section(path, wanted):
    data = open(path, "rb").read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit(f"{path}: not a little-endian ELF64 file (compressed module?)")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def sh(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
    stroff = sh(shstrndx)[4]
    for i in range(shnum):
        name, _t, _f, _a, off, size = sh(i)[:6]
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end].decode() == wanted:
            return data[off:off + size]
    return b""


def depends(path):
    for item in elf_section(path, ".modinfo").split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[8:].decode().split(",") if d]
    return []


def find_modules(moddir):
    found = {}
    for root, _dirs, files in os.walk(moddir):
        for f in files:
            if f.endswith(".ko"):
                found.setdefault(f[:-3].replace("-", "_"), os.path.join(root, f))
    return found


def load_order(moddir, wanted):
    avail = find_modules(moddir)
    order, state = [], {}
    def visit(name):
        name = name.replace("-", "_")
        if state.get(name) == "done":
            return
        if state.get(name) == "busy":
            raise SystemExit(f"module dependency cycle at {name}")
        if name not in avail:
            raise SystemExit(f"module {name} not found under {moddir} (built into this kernel?)")
        state[name] = "busy"
        for d in depends(avail[name]):
            visit(d)
        state[name] = "done"
        order.append(name)
    for w in wanted:
        visit(w)
    return order, avail


class Cpio:
    def __init__(self):
        self.entries = {}  # path -> (mode, data)

    def add_dir(self, path):
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (0o040755, b""))

    def add(self, path, mode, data):
        path = path.strip("/")
        if "/" in path:
            self.add_dir(path.rsplit("/", 1)[0])
        self.entries[path] = (mode, data)

    def bytes(self):
        out = bytearray()
        def rec(ino, name, mode, data, nlink):
            nb = name.encode() + b"\0"
            hdr = "070701" + "".join(f"{v:08X}" for v in (
                ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nb), 0))
            out.extend(hdr.encode() + nb)
            out.extend(b"\0" * (-len(out) % 4))
            out.extend(data)
            out.extend(b"\0" * (-len(out) % 4))
        for ino, path in enumerate(sorted(self.entries), start=1):
            mode, data = self.entries[path]
            rec(ino, path, mode, data, 2 if mode & 0o040000 else 1)
        rec(0, "TRAILER!!!", 0, b"", 1)
        return bytes(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--busybox", required=True)
    ap.add_argument("--list", required=True, help="output of `busybox --list-full`")
    ap.add_argument("--modules-dir", required=True)
    ap.add_argument("--module", action="append", default=[])
    ap.add_argument("--file", action="append", default=[], help="SRC:DEST[:octal mode]")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    c = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "mnt"):
        c.add_dir(d)
    c.add("bin/busybox", 0o100755, open(a.busybox, "rb").read())
    for line in open(a.list):
        p = line.strip().strip("/")
        if p and p != "bin/busybox" and not p.startswith("linuxrc"):
            c.add(p, 0o120777, b"/bin/busybox")
    c.add("etc/passwd", 0o100644, b"root:x:0:0:root:/root:/bin/sh\n")
    c.add("etc/group", 0o100644, b"root:x:0:\n")

    order, avail = load_order(a.modules_dir, a.module)
    ver = os.path.basename(os.path.normpath(a.modules_dir))
    for name in order:
        c.add(f"lib/modules/{ver}/{name}.ko", 0o100644, open(avail[name], "rb").read())
    c.add("lib/modules/order", 0o100644, "".join(f"{ver}/{n}\n" for n in order).encode())
    print("module load order: " + " ".join(order), file=sys.stderr)

    for spec in a.file:
        parts = spec.split(":")
        mode = int(parts[2], 8) if len(parts) > 2 else 0o644
        c.add(parts[1], 0o100000 | mode, open(parts[0], "rb").read())

    gz = gzip.compress(c.bytes(), compresslevel=9, mtime=0)
    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gz)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
