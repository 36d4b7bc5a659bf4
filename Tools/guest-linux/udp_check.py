#!/usr/bin/env python3
"""UDP helpers for the guest-linux workload.

    udp_check.py ask HOST PORT [SECONDS]     send "0", "1", ... one at a time for SECONDS
                                             (default 3), check each reply is "N COUNTER"
                                             with a non-decreasing counter; print requests/s
    udp_check.py sink BIND_IP PORT SECONDS   receive the guest's "SEQ COUNTER" packets for
                                             SECONDS; print how many, the sequence gaps, and
                                             the counter range

Exit 1 when no valid reply / no packet arrived or a reply was malformed.
"""
import socket
import sys
import time


def ask(host, port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    n = ok = lost = 0
    last = -1
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        s.sendto(str(n).encode(), (host, port))
        try:
            while True:
                r = s.recv(512).decode().split()
                if len(r) == 2 and int(r[0]) == n:
                    break  # ignore late replies to earlier requests
        except socket.timeout:
            lost += 1
            n += 1
            continue
        lat.append(time.monotonic() - t)
        c = int(r[1])
        if c < last:
            print(f"counter went backwards: {last} -> {c}")
            return 1
        if ok == 0:
            print(f"first reply: {' '.join(r)}")
        last = c
        ok += 1
        n += 1
    lat.sort()
    if not ok:
        print(f"no reply from {host}:{port} ({lost} timeouts)")
        return 1
    print(f"replies={ok} timeouts={lost} rate={ok / seconds:.0f}/s "
          f"latency_ms median={1000 * lat[len(lat) // 2]:.2f} p99={1000 * lat[int(len(lat) * .99)]:.2f} "
          f"last_counter={last}")
    return 0


def sink(bind_ip, port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind_ip, port))
    s.settimeout(0.2)
    seqs, counters = [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            r = s.recv(512).decode().split()
        except socket.timeout:
            continue
        seqs.append(int(r[0]))
        counters.append(int(r[1]))
    if not seqs:
        print(f"no packet on {bind_ip}:{port} in {seconds} s")
        return 1
    gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
    print(f"packets={len(seqs)} seq={seqs[0]}..{seqs[-1]} gaps={gaps} "
          f"counter={counters[0]}..{counters[-1]}")
    return 0


def main(argv):
    if len(argv) >= 3 and argv[0] == "ask":
        return ask(argv[1], int(argv[2]), float(argv[3]) if len(argv) > 3 else 3.0)
    if len(argv) == 4 and argv[0] == "sink":
        return sink(argv[1], int(argv[2]), float(argv[3]))
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
