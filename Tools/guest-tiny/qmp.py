#!/usr/bin/env python3
"""Send QMP commands to a QEMU monitor socket, one per argument, and print each reply.

    qmp.py /tmp/gt.qmp stop
    qmp.py /tmp/gt.qmp cont
    qmp.py /tmp/gt.qmp '{"execute": "query-status"}'

A bare word is sent as {"execute": WORD}. Exit 1 if any reply is an error.
"""
import json
import socket
import sys


def main():
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    rc = 0
    for cmd in ["qmp_capabilities"] + sys.argv[2:]:
        msg = json.loads(cmd) if cmd.lstrip().startswith("{") else {"execute": cmd}
        f.write(json.dumps(msg) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" not in reply:
                break
        if cmd != "qmp_capabilities":
            print(json.dumps(reply))
        if "error" in reply:
            rc = 1
    s.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
