#!/usr/bin/env python3
"""A Corosync cluster in network namespaces on this machine, for the cluster tests (root).

One network namespace per node (`TAG-nI`, address NET.I on its eth0), a bridge `br0` in one
more (`TAG-br`, so the root namespace and its iptables stay out of the path), one veth from the
bridge into each node. Corosync (knet) runs on nodes 1..N, each with a private /run (its pid
file path is fixed) and its own corosync.conf, log and state directory under DIR/nI/; client
nodes (N+1..N+C) get a namespace and an address but no Corosync. Everything is recorded in
DIR/lab.json, so each subcommand finds the lab again from DIR:

  corosync_lab.py up [DIR] [--nodes 3] [--clients 0] [--token 1000] [--tag T] [--net 10.A.B] [--no-wait]
      builds the namespaces, starts Corosync on every node (pid in DIR/nI/corosync.pid) and
      waits until all are quorate; prints DIR (a new /tmp/geminus-lab-* without one)
  corosync_lab.py start DIR I [--name corosync]     (re)starts node I's Corosync (DIR/nI/NAME.pid, .out)
  corosync_lab.py wait-quorum DIR [--nodes 1,2,3] [--seconds 15]   status 1 if not all quorate in time
  corosync_lab.py cut DIR A B [--one-way]           drops A<->B (or only A's packets to B) with iptables
  corosync_lab.py isolate DIR A                     drops everything on A's eth0
  corosync_lab.py heal DIR                          flushes every node's iptables rules
  corosync_lab.py ns DIR I                          prints node I's namespace name
  corosync_lab.py conf --node I [--nodes 3] [--token 1000] [--tag T] [--net 10.A.B] [--dir DIR]
      prints the corosync.conf node I gets (the one template)
  corosync_lab.py down DIR [--rm]                   kills every process in the lab's namespaces,
      removes libqb's leftover /dev/shm buffers, deletes the namespaces (and DIR with --rm)

As a module (Tools/ca-partition-test): `Lab(dir, ...)`, then build(), start_corosync(i),
wait_quorate(), cut()/isolate()/heal(), pids(i), down(); and sweep_libqb_buffers(), alive().
Python 3 standard library only.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

STATE = "lab.json"


def run(*cmd, ns=None, check=True):
    """Runs a command (inside namespace `ns` if given); raises on failure unless check=False."""
    full = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def alive(pid):
    """A process that exists and is not a zombie (PID 1 does not reap killed daemons here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def sweep_libqb_buffers():
    """libqb's IPC buffers (/dev/shm/qb-SERVER-CLIENT-..., ~3 MB of rings each, hundreds per
    run) and Corosync's blackboxes (qb-corosync-PID-blackbox-*, 8 MB) outlive killed daemons
    and clients: remove those whose processes are all gone."""
    for f in glob.glob("/dev/shm/qb-[0-9]*-[0-9]*-*"):
        parts = os.path.basename(f).split("-")
        if len(parts) > 2 and parts[1].isdigit() and parts[2].isdigit() and not alive(int(parts[1])) and not alive(int(parts[2])):
            shutil.rmtree(f, ignore_errors=True)
    for f in glob.glob("/dev/shm/qb-corosync-*-blackbox-*"):
        pid = os.path.basename(f).split("-")[2]
        if pid.isdigit() and not alive(int(pid)):
            try:
                os.unlink(f)
            except OSError:
                pass


def lab_authkey(node_dir):
    """The lab's Corosync key (256 random bytes, 0400), made once, shared by its nodes."""
    path = os.path.join(os.path.dirname(os.path.abspath(node_dir)), "corosync-authkey")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    except FileExistsError:
        return path
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(256))
    return path


def corosync_conf(tag, net, node, nodes, token, node_dir):
    """The one corosync.conf (one key per line: Corosync rejects one-line blocks)."""
    nodelist = "".join(f"    node {{\n        nodeid: {j}\n        name: n{j}\n        ring0_addr: {net}.{j}\n    }}\n"
                       for j in range(1, nodes + 1))
    return (f"totem {{\n    version: 2\n    cluster_name: {tag}\n    transport: knet\n    token: {token}\n"
            # token_coefficient 0: `token` is the real timeout, whatever the node count.
            "    token_coefficient: 0\n"
            # Authenticated and encrypted, as a production ring must be: the CA agents and the
            # witness trust a message's node ID only as far as the ring's crypto (they warn at
            # start without it; docs/THREATS.md). One key for the lab, beside the nodes' dirs.
            f"    crypto_cipher: aes256\n    crypto_hash: sha256\n    keyfile: {lab_authkey(node_dir)}\n"
            # knet's default ping timeout is token / 2: at 150 ms the two survivors of a node
            # loss flap their own link every few seconds on this machine (token 300 and 400;
            # 500 holds), and each flap costs the quorum. Membership follows the token, not
            # knet's pings, so a longer ping timeout changes no bound (ArbitrationSetup.swift).
            "    interface {\n        linknumber: 0\n        knet_ping_interval: 100\n        knet_ping_timeout: 1000\n    }\n}\n"
            f"nodelist {{\n{nodelist}}}\n"
            "quorum {\n    provider: corosync_votequorum\n}\n"
            f"logging {{\n    to_syslog: no\n    to_stderr: no\n    to_logfile: yes\n    logfile: {node_dir}/corosync.log\n"
            "    timestamp: hires\n}\n"
            f"system {{\n    state_dir: {node_dir}/state\n}}\n")


def random_net():
    return f"10.{90 + random.randrange(100)}.{random.randrange(250)}"


class Lab:
    """Nodes 1..nodes run Corosync; nodes+1..nodes+clients are namespaces on the same bridge."""

    def __init__(self, dir, tag=None, net=None, nodes=3, clients=0, token=1000):
        self.dir = os.path.abspath(dir)
        self.tag = tag or f"lab{os.getpid() % 100000}"
        self.net = net or random_net()
        self.nodes, self.clients, self.token = nodes, clients, token
        self.procs = {}  # name@nI -> Popen of the Corosyncs this process started

    @classmethod
    def load(cls, dir):
        with open(os.path.join(dir, STATE)) as f:
            s = json.load(f)
        return cls(dir, s["tag"], s["net"], s["nodes"], s["clients"], s["token"])

    def save(self):
        with open(os.path.join(self.dir, STATE), "w") as f:
            json.dump({"tag": self.tag, "net": self.net, "nodes": self.nodes, "clients": self.clients, "token": self.token}, f)

    def ns(self, i):
        return f"{self.tag}-n{i}"

    def ip(self, i):
        return f"{self.net}.{i}"

    def node(self, i):
        return os.path.join(self.dir, f"n{i}")

    @property
    def bridge(self):
        return f"{self.tag}-br"

    def all(self):
        return range(1, self.nodes + self.clients + 1)

    # ---- bring-up ---------------------------------------------------------------------------

    def build(self):
        """The bridge, every node's namespace and veth, its directories and corosync.conf."""
        os.makedirs(self.dir, exist_ok=True)
        self.save()  # first: `down` must find a half-built lab
        run("ip", "netns", "add", self.bridge)
        run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for i in self.all():
            run("ip", "netns", "add", self.ns(i))
            run("ip", "link", "add", f"{self.tag}-v{i}", "type", "veth", "peer", "name", "eth0", "netns", self.ns(i))
            run("ip", "link", "set", f"{self.tag}-v{i}", "netns", self.bridge)
            run("ip", "-n", self.bridge, "link", "set", f"{self.tag}-v{i}", "master", "br0", "up")
            run("ip", "-n", self.ns(i), "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            run("ip", "-n", self.ns(i), "link", "set", "eth0", "up")
            run("ip", "-n", self.ns(i), "link", "set", "lo", "up")
            os.makedirs(self.node(i), exist_ok=True)
            if i <= self.nodes:
                os.makedirs(os.path.join(self.node(i), "run"), exist_ok=True)
                os.makedirs(os.path.join(self.node(i), "state"), exist_ok=True)
                with open(os.path.join(self.node(i), "corosync.conf"), "w") as f:
                    f.write(corosync_conf(self.tag, self.net, i, self.nodes, self.token, self.node(i)))

    def start_corosync(self, i, name="corosync"):
        """Starts node i's Corosync with a private /run bind-mounted from DIR/nI/run (its pid file
        path is fixed). Each wrapper execs the next, so the pid is Corosync's own: it is written
        to DIR/nI/NAME.pid; stdout and stderr go to DIR/nI/NAME.out."""
        node, conf = self.node(i), os.path.join(self.node(i), "corosync.conf")
        with open(os.path.join(node, f"{name}.out"), "w") as out:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns(i), "unshare", "-m", "--propagation", "private", "sh", "-c",
                                  f"mount --bind '{node}/run' /run && exec corosync -f -c '{conf}'"],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        with open(os.path.join(node, f"{name}.pid"), "w") as f:
            f.write(f"{p.pid}\n")
        self.procs[f"{name}@n{i}"] = p
        return p

    def up(self, wait=True):
        self.build()
        for i in range(1, self.nodes + 1):
            self.start_corosync(i)
        if wait:
            self.wait_quorate()

    def quorate(self, i):
        return re.search(r"Quorate:\s*Yes", run("corosync-quorumtool", "-s", ns=self.ns(i), check=False).stdout) is not None

    def wait_quorate(self, nodes=None, seconds=15):
        nodes = tuple(nodes or range(1, self.nodes + 1))
        deadline = time.time() + seconds
        while time.time() < deadline:
            if all(self.quorate(i) for i in nodes):
                return
            time.sleep(0.05)
        raise RuntimeError(f"corosync did not become quorate on {nodes}; see {self.dir}/n*/corosync.log")

    # ---- faults -----------------------------------------------------------------------------

    def cut(self, a, b, one_way=False):
        """Drops a's packets to b, and (unless one_way) b's to a, in a's namespace."""
        run("iptables", "-A", "OUTPUT", "-d", self.ip(b), "-j", "DROP", ns=self.ns(a))
        if not one_way:
            run("iptables", "-A", "INPUT", "-s", self.ip(b), "-j", "DROP", ns=self.ns(a))

    def isolate(self, a):
        run("iptables", "-A", "OUTPUT", "-o", "eth0", "-j", "DROP", ns=self.ns(a))
        run("iptables", "-A", "INPUT", "-i", "eth0", "-j", "DROP", ns=self.ns(a))

    def heal(self):
        for i in range(1, self.nodes + 1):
            run("iptables", "-F", ns=self.ns(i))

    # ---- teardown ---------------------------------------------------------------------------

    def pids(self, i):
        """Every process in node i's namespace."""
        r = run("ip", "netns", "pids", self.ns(i), check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_all(self):
        """SIGKILLs every process in the nodes' namespaces (SIGCONT first: a stopped one too)."""
        for i in self.all():
            for p in self.pids(i):
                try:
                    os.kill(p, signal.SIGCONT)
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass

    def down(self):
        """Kills everything in the lab, sweeps libqb's buffers, deletes the namespaces (and with
        them the veths and the bridge). The directory stays: it is the caller's."""
        self.kill_all()
        sweep_libqb_buffers()
        for i in self.all():
            run("ip", "netns", "del", self.ns(i), check=False)
        run("ip", "netns", "del", self.bridge, check=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up")
    p.add_argument("dir", nargs="?")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--clients", type=int, default=0)
    p.add_argument("--token", type=int, default=1000)
    p.add_argument("--tag")
    p.add_argument("--net")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--seconds", type=float, default=15)
    p = sub.add_parser("start")
    p.add_argument("dir")
    p.add_argument("node", type=int)
    p.add_argument("--name", default="corosync")
    p = sub.add_parser("wait-quorum")
    p.add_argument("dir")
    p.add_argument("--nodes")
    p.add_argument("--seconds", type=float, default=15)
    p = sub.add_parser("cut")
    p.add_argument("dir")
    p.add_argument("a", type=int)
    p.add_argument("b", type=int)
    p.add_argument("--one-way", action="store_true")
    p = sub.add_parser("isolate")
    p.add_argument("dir")
    p.add_argument("a", type=int)
    p = sub.add_parser("heal")
    p.add_argument("dir")
    p = sub.add_parser("ns")
    p.add_argument("dir")
    p.add_argument("node", type=int)
    p = sub.add_parser("conf")
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--token", type=int, default=1000)
    p.add_argument("--tag", default="lab")
    p.add_argument("--net", default="10.90.0")
    p.add_argument("--dir", default="DIR")
    p = sub.add_parser("down")
    p.add_argument("dir")
    p.add_argument("--rm", action="store_true")
    a = ap.parse_args(argv)

    if a.command == "conf":
        sys.stdout.write(corosync_conf(a.tag, a.net, a.node, a.nodes, a.token, os.path.join(a.dir, f"n{a.node}")))
        return 0
    if a.command == "ns":
        print(Lab.load(a.dir).ns(a.node))
        return 0
    if os.getuid() != 0:
        print("corosync_lab: needs root (network and mount namespaces, iptables)", file=sys.stderr)
        return 2
    try:
        if a.command == "up":
            d = a.dir or tempfile.mkdtemp(prefix="geminus-lab-")
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
            lab = Lab(d, a.tag, a.net, a.nodes, a.clients, a.token)
            lab.build()
            for i in range(1, lab.nodes + 1):
                lab.start_corosync(i)
            if not a.no_wait:
                lab.wait_quorate(seconds=a.seconds)
            print(lab.dir)
        elif a.command == "start":
            Lab.load(a.dir).start_corosync(a.node, a.name)
        elif a.command == "wait-quorum":
            lab = Lab.load(a.dir)
            lab.wait_quorate([int(x) for x in a.nodes.split(",")] if a.nodes else None, a.seconds)
        elif a.command == "cut":
            Lab.load(a.dir).cut(a.a, a.b, a.one_way)
        elif a.command == "isolate":
            Lab.load(a.dir).isolate(a.a)
        elif a.command == "heal":
            Lab.load(a.dir).heal()
        elif a.command == "down":
            Lab.load(a.dir).down()
            if a.rm:
                shutil.rmtree(a.dir, ignore_errors=True)
    except (RuntimeError, OSError) as e:
        print(f"corosync_lab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
