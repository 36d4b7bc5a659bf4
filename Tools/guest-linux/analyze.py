#!/usr/bin/env python3
"""analyze.py DIR: client figures and the primary agent's pause figures from a kill-test copy run."""
import json, os, sys, glob
d = sys.argv[1]
rep = json.load(open(os.path.join(d, "report.json")))
out = {"dir": d, "mode": rep.get("mode"), "disk": rep.get("disk"), "ok": rep.get("ok"), "error": rep.get("error"),
       "boot_s": rep.get("boot_to_service_seconds"), "first_protected_s": rep.get("first_protected_seconds")}
c = rep.get("client", {})
out["client"] = {k: c.get(k) for k in ("seconds", "acknowledged", "per_second", "latency_ms", "reconnects", "lost", "seq_back")}
# latency from replies (all of them; the protected runs have no kill)
lat = []
start_wall = None
for line in open(os.path.join(d, "replies.jsonl")):
    r = json.loads(line)
    if r.get("event") == "start":
        start_wall = r["wall"]
    elif "latency_ms" in r:
        lat.append((r["t"], r["latency_ms"]))
def pct(v, p):
    s = sorted(v); return s[min(len(s) - 1, int(len(s) * p / 100))] if s else None
if lat:
    # skip the first second (connection set-up) for a steady-state figure
    tl = lat[-1][0]
    steady = [l for t, l in lat if 1.0 <= t]
    out["replies_steady"] = {"n": len(steady), "window_s": round(tl - 1.0, 2), "per_s": round(len(steady) / (tl - 1.0), 1),
                             "p50": pct(steady, 50), "p90": pct(steady, 90), "p99": pct(steady, 99), "max": max(steady),
                             "mean": round(sum(steady) / len(steady), 3)}
# agents' events
for f in sorted(glob.glob(os.path.join(d, "events-*.jsonl"))):
    tag = os.path.basename(f)[7:-6]
    ev = []
    for line in open(f):
        w = json.loads(line)
        try:
            e = json.loads(w["line"])
        except ValueError:
            continue
        e["_wall"] = w["_wall"]
        ev.append(e)
    prog = [e for e in ev if e.get("event") == "progress"]
    sp0 = rep.get("client_stop_wall") or 1e12
    bad = [e.get("event") + ":" + str(e.get("reason", "")) for e in ev
           if e.get("event") in ("link-lost", "took-over", "unprotected", "peer-lost", "primary-lost") and e["_wall"] <= sp0]
    out.setdefault("split_or_lost_before_client_stop", []).extend(f"{tag} {b}" for b in bad)
    first = ev[0]["_wall"] if ev else None
    a = {"events": len(ev), "names": sorted({e.get("event") for e in ev})}
    prot = [e for e in ev if e.get("event") == "protected"]
    if prot and first:
        a["start_to_protected_s"] = round(prot[0]["_wall"] - first, 2)
    a["live_copy"] = [{k: e.get(k) for k in ("epoch", "round", "pages", "micros", "full")} for e in ev if e.get("event") == "live-copy"]
    if not a["live_copy"]:
        del a["live_copy"]
    def snap(e):
        return {"t_since_first_event": round(e["_wall"] - first, 2), "state": e.get("state"), "epochs": e.get("epochs"),
                "epochsPerSecond": round(e.get("epochsPerSecond", 0), 1), "pauseMicros": e.get("pauseMicros"),
                "fullSyncPauseMicros": e.get("fullSyncPauseMicros"), "stopMicros": e.get("stopMicros"),
                "dirtyPagesMicros": e.get("dirtyPagesMicros"), "deviceStateMicros": e.get("deviceStateMicros"),
                "resumeMicros": e.get("resumeMicros"), "commitMicros": e.get("commitMicros"),
                "heldPackets": e.get("heldPackets"), "outputStalls": e.get("outputStalls"), "liveRounds": e.get("liveRounds"),
                "livePages": e.get("livePages"), "dirtyPages": e.get("dirtyPages")}
    if prog:
        cs = rep.get("client_start_wall")
        before = [e for e in prog if cs and e["_wall"] <= cs]
        if before:
            a["progress_at_client_start"] = snap(before[-1])
        a["progress_last"] = snap(prog[-1])
        sp = rep.get("client_stop_wall")
        bs = [e for e in prog if sp and e["_wall"] <= sp]
        if bs:
            a["progress_at_client_stop"] = snap(bs[-1])
    out["agent_" + tag] = a
print(json.dumps(out, indent=1))
