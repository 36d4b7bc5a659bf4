#!/usr/bin/env python3
"""Client of the guest-linux transaction service (TCP, `TXN ID AMOUNT` -> `OK ID BALANCE SEQ`).

    txn_client.py run HOST PORT --seconds S --out replies.jsonl [--summary summary.json]
    txn_client.py dump HOST PORT            # the guest's log, as JSON lines
    txn_client.py status HOST PORT [--check]

`run` sends transactions one at a time (unique ids: a random 32-bit run tag in the high half,
1, 2, ... in the low half; amount 1..100), reconnecting on any error or after --timeout
seconds without a reply, and resending the SAME id until it is acknowledged (so a transaction
that the guest applied but whose reply was lost is not applied twice: the guest answers a
repeated id with its original reply). Every reply is one JSON line in --out:
    {"t": seconds since start, "id", "amount", "balance", "seq", "attempt", "latency_ms"}
plus {"event": "reconnect", "t", "reason"} lines. It stops after --seconds or on SIGTERM/SIGINT
(then the transaction in flight gets --final-timeout seconds more), asks the guest for its
log (`DUMP`) and checks:
  - lost:       acknowledged ids missing from the guest's log
  - changed:    acknowledged ids in the log with another seq or balance than acknowledged
  - duplicated: ids that appear more than once in the log
  - chain:      the log's balances are not the running sum of its amounts, or seqs not contiguous
  - seq_back:   acknowledged replies whose seq was not above every seq acknowledged before
                (the service went back in time under the client)
The summary (one JSON object) goes to stdout and --summary; exit status 0 only if lost,
changed, duplicated and chain are all zero (seq_back is reported, not judged: it follows from
lost). Python 3 stdlib only.
"""
import argparse
import json
import os
import random
import signal
import socket
import sys
import time


class Conn:
    def __init__(self, host, port, timeout):
        self.s = socket.create_connection((host, port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s.settimeout(timeout)
        self.buf = b""

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the guest")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def ask(self, req):
        self.s.sendall(req.encode() + b"\n")
        return self.line()

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def dump(host, port, timeout=30.0):
    c = Conn(host, port, timeout)
    try:
        head = c.ask("DUMP").split()
        if head[0] != "DUMP":
            raise RuntimeError(f"unexpected DUMP reply {head}")
        seq, bal, count, first = int(head[1]), int(head[2]), int(head[3]), int(head[4])
        recs = []
        while True:
            line = c.line()
            if line == "END":
                break
            _, s, i, a, b = line.split()
            recs.append((int(s), int(i), int(a), int(b)))
        if len(recs) != count:
            raise RuntimeError(f"DUMP announced {count} records, got {len(recs)}")
        return {"seq": seq, "balance": bal, "first_seq": first, "records": recs}
    finally:
        c.close()


def status(host, port, check=False, timeout=30.0):
    c = Conn(host, port, timeout)
    try:
        line = c.ask("CHECK" if check else "STATUS")
    finally:
        c.close()
    words = line.split()
    out = {"line": line}
    for w in words[1:]:
        if "=" in w:
            k, v = w.split("=", 1)
            out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def check(acked, d):
    """acked: {id: (amount, balance, seq)} as acknowledged; d: dump()."""
    recs = d["records"]
    by_id = {}
    dup = 0
    for r in recs:
        if r[1] in by_id:
            dup += 1
        by_id.setdefault(r[1], r)
    lost, changed = [], []
    for i, (amount, bal, seq) in acked.items():
        r = by_id.get(i)
        if r is None:
            lost.append(i)
        elif r[0] != seq or r[3] != bal:
            changed.append(i)
    chain = 0
    for a, b in zip(recs, recs[1:]):
        if b[0] != a[0] + 1 or b[3] != a[3] + b[2]:
            chain += 1
    if recs and recs[-1][3] != d["balance"]:
        chain += 1
    return lost, changed, dup, chain


def run(args):
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    rnd = random.Random(args.seed)
    tag = rnd.getrandbits(31) << 32
    out = open(args.out, "w", buffering=1)
    t0 = time.monotonic()
    out.write(json.dumps({"event": "start", "wall": time.time(), "tag": tag}) + "\n")
    deadline = t0 + args.seconds if args.seconds > 0 else float("inf")
    conn = None
    acked = {}
    n = 0
    reconnects = connect_failures = retries = errors = 0
    max_seq = 0
    seq_back = 0
    lat = []
    gaps = []  # (t, seconds) without an acknowledgement longer than 1 s
    last_ack = t0
    reason = None
    while True:
        if stop["now"] or time.monotonic() >= deadline:
            break
        n += 1
        tid = tag | n
        amount = rnd.randint(1, 100)
        attempt = 0
        final_deadline = None
        while True:
            now = time.monotonic()
            if (stop["now"] or now >= deadline) and final_deadline is None:
                final_deadline = now + args.final_timeout
            if final_deadline is not None and now >= final_deadline:
                break
            if conn is None:
                try:
                    conn = Conn(args.host, args.port, args.timeout)
                    if reason is not None:
                        reconnects += 1
                        out.write(json.dumps({"event": "reconnect", "t": round(now - t0, 4), "reason": reason}) + "\n")
                except OSError as e:
                    connect_failures += 1
                    reason = reason or f"connect: {e}"
                    time.sleep(0.1)
                    continue
            attempt += 1
            if attempt > 1:
                retries += 1
            ts = time.monotonic()
            try:
                rep = conn.ask(f"TXN {tid} {amount}").split()
            except (OSError, ConnectionError) as e:
                reason = f"{type(e).__name__}: {e}"
                conn.close()
                conn = None
                continue
            te = time.monotonic()
            if len(rep) == 4 and rep[0] == "OK" and int(rep[1]) == tid:
                bal, seq = int(rep[2]), int(rep[3])
                acked[tid] = (amount, bal, seq)
                if seq <= max_seq:
                    seq_back += 1
                max_seq = max(max_seq, seq)
                ms = (te - ts) * 1000
                lat.append(ms)
                if te - last_ack > 1.0:
                    gaps.append((round(last_ack - t0, 3), round(te - last_ack, 3)))
                last_ack = te
                out.write(json.dumps({"t": round(te - t0, 4), "id": tid, "amount": amount, "balance": bal,
                                      "seq": seq, "attempt": attempt, "latency_ms": round(ms, 3)}) + "\n")
                break
            errors += 1
            out.write(json.dumps({"event": "error", "t": round(te - t0, 4), "id": tid, "reply": " ".join(rep)}) + "\n")
            time.sleep(0.05)
        if final_deadline is not None:
            break
    elapsed = time.monotonic() - t0
    if conn:
        conn.close()
    summary = {"seconds": round(elapsed, 2), "sent": n, "acknowledged": len(acked),
               "per_second": round(len(acked) / elapsed, 1) if elapsed else 0,
               "reconnects": reconnects, "connect_failures": connect_failures, "retries": retries,
               "errors": errors, "seq_back": seq_back, "stalls_over_1s": gaps[:50]}
    if lat:
        s = sorted(lat)
        summary["latency_ms"] = {"p50": round(s[len(s) // 2], 2), "p99": round(s[int(len(s) * 0.99)], 2),
                                 "max": round(s[-1], 2)}
    try:
        d = dump(args.host, args.port)
        lost, changed, dup, chain = check(acked, d)
        summary.update({"guest_seq": d["seq"], "guest_balance": d["balance"], "guest_records": len(d["records"]),
                        "lost": len(lost), "changed": len(changed), "duplicated": dup, "chain_errors": chain,
                        "lost_ids_first": lost[:20]})
        if lost:
            lost_seqs = sorted(acked[i][2] for i in lost)
            summary["lost_acked_seq_range"] = [lost_seqs[0], lost_seqs[-1]]
        try:
            st = status(args.host, args.port, check=args.disk_check)
            summary["guest_status"] = st["line"]
        except OSError as e:
            summary["guest_status"] = f"unreachable: {e}"
        ok = not (lost or changed or dup or chain)
    except (OSError, ConnectionError, RuntimeError, ValueError) as e:
        summary["dump_error"] = f"{type(e).__name__}: {e}"
        ok = False
    summary["ok"] = ok
    text = json.dumps(summary)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(json.dumps(dict(summary, lost_ids=lost if "lost" in summary else [])) + "\n")
    print(text)
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("--seconds", type=float, default=20, help="0: until SIGTERM")
    r.add_argument("--out", required=True)
    r.add_argument("--summary")
    r.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a reply before reconnecting")
    r.add_argument("--final-timeout", type=float, default=30.0, help="seconds for the transaction in flight at the end")
    r.add_argument("--seed", type=int)
    r.add_argument("--disk-check", action="store_true", help="end with CHECK (whole disk ring) instead of STATUS")
    d = sub.add_parser("dump")
    d.add_argument("host")
    d.add_argument("port", type=int)
    s = sub.add_parser("status")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--check", action="store_true")
    a = p.parse_args()
    if a.cmd == "run":
        sys.exit(run(a))
    if a.cmd == "dump":
        d = dump(a.host, a.port)
        print(json.dumps({k: v for k, v in d.items() if k != "records"}))
        for rec in d["records"]:
            print(json.dumps(dict(zip(("seq", "id", "amount", "balance"), rec))))
    else:
        print(json.dumps(status(a.host, a.port, a.check)))


if __name__ == "__main__":
    main()
