#!/usr/bin/env python3
# Connects to QEMU's NIC backend (TCP -netdev socket,listen= or unix -netdev stream,server=on),
# answers the tiny guest's ARP for the sink, counts its numbered datagrams for SECONDS, checks order.
import socket, struct, sys, time, re
kind, addr, seconds, pause = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "pause"
SINK_IP = bytes([10, 77, 0, 4]); SINK_MAC = bytes([2, 0, 0, 0, 0, 4])
for _ in range(100):
    try:
        if kind == "tcp":
            h, p = addr.split(":"); s = socket.create_connection((h, int(p)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(addr)
        break
    except OSError:
        time.sleep(0.1)
buf = b""; seqs = []; t0 = None; frames = 0
def send(f): s.sendall(struct.pack(">I", len(f)) + f)
s.settimeout(0.5)
while True:
    if t0 and time.time() - t0 > seconds: break
    try: d = s.recv(1 << 16)
    except socket.timeout: continue
    if not d: break
    buf += d
    while len(buf) >= 4:
        n = struct.unpack(">I", buf[:4])[0]
        if len(buf) < 4 + n: break
        f = buf[4:4 + n]; buf = buf[4 + n:]; frames += 1
        et = f[12:14]
        if et == b"\x08\x06" and f[21] == 1 and f[38:42] == SINK_IP:
            send(f[6:12] + SINK_MAC + b"\x08\x06" + bytes([0,1,8,0,6,4,0,2]) + SINK_MAC + SINK_IP + f[22:28] + f[28:32] + bytes(18))
        elif et == b"\x08\x00":
            m = re.search(rb"seq=(\d+)", f)
            if m:
                seqs.append(int(m.group(1)))
                if t0 is None: t0 = time.time()
                if pause and len(seqs) % 20 == 0: time.sleep(0.02)
inorder = all(b == a + 1 for a, b in zip(seqs, seqs[1:]))
span = (seqs[-1] - seqs[0] + 1) if seqs else 0
print(f"{kind} {'pausing' if pause else 'keeping up'}: {len(seqs)} datagrams of {span} sent ({len(seqs)/seconds:.0f}/s), in order: {inorder}, missing: {span - len(seqs)}")
