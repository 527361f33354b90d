"""Fault-isolation figures from outside the agents (issue: fault isolation).

Starts two real ``quelay run`` processes on loopback and measures:

* the listener's RSS before, during and after a client pipelines N ``ls``
  requests and never reads a reply (the agent must drop that client once
  its unread replies pass 1 MiB, and keep serving others);
* how long ``quelay ls`` (first page) and ``quelay ls --all`` take with
  10 000 transfers known to the agent (opened by the peer as streams, then
  canceled: a peer can cause exactly this);
* link-ups (``status.link.ups``) across all of it: 1 means the link never
  dropped.

Usage: ``python bench/faults.py [--unread 2000] [--transfers 10000]``
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quelay.client import BlockingClient  # noqa: E402
from quelay.framing import encode_frame  # noqa: E402
from quelay.identity import load_or_create_identity  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(root: Path, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "quelay.cli", "run", "--state-dir", str(root / "state"),
           "--control", str(root / "control.sock"), "--inbox", str(root / "inbox"),
           "--max-incoming", "20000", "--history-max", "20000", *args]
    log = open(root / "agent.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(cmd, stdout=log, stderr=log)


def wait_up(control: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with BlockingClient(control) as c:
                if c.status()["link"]["state"] == "up":
                    return
        except Exception:  # noqa: BLE001 - not started yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{control}: link not up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unread", type=int, default=2000)
    ap.add_argument("--transfers", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root_a, root_b = Path(tmp) / "a", Path(tmp) / "b"
        fp_a = load_or_create_identity(root_a / "state").fingerprint
        fp_b = load_or_create_identity(root_b / "state").fingerprint
        port = free_port()
        a = start(root_a, "--listen", f"127.0.0.1:{port}", "--trust", fp_b)
        b = start(root_b, "--peer", f"127.0.0.1:{port}", "--trust", fp_a)
        try:
            ctl_a, ctl_b = root_a / "control.sock", root_b / "control.sock"
            wait_up(ctl_a)
            wait_up(ctl_b)
            out: dict[str, object] = {"rss_idle_kib": rss_kib(a.pid)}
            # A client that pipelines requests and never reads a reply.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(ctl_a))
            sock.settimeout(10)
            blob = b"".join(encode_frame({"id": i, "op": "ls"}) for i in range(args.unread))
            sent = 0
            try:
                while sent < len(blob):
                    sent += sock.send(blob[sent:])
            except OSError as exc:
                out["unread_client_dropped"] = type(exc).__name__
            time.sleep(2.0)
            out["rss_unread_kib"] = rss_kib(a.pid)
            out["unread_bytes_sent"] = sent
            t0 = time.monotonic()
            with BlockingClient(ctl_a) as other:
                other.ping()
            out["other_client_ping_s"] = round(time.monotonic() - t0, 4)
            sock.close()
            time.sleep(1.0)
            out["rss_after_kib"] = rss_kib(a.pid)
            # Many transfers: the peer opens them (streams), then they are canceled.
            with BlockingClient(ctl_b) as cb:
                ids = []
                for i in range(args.transfers):
                    ids.append(cb.request("open_stream", name=f"s{i}")["id"])
                for tid in ids:
                    cb.request("cancel", id=tid)
            deadline = time.monotonic() + 120
            with BlockingClient(ctl_a) as ca:
                while time.monotonic() < deadline:
                    page = ca.request("ls", limit=1)
                    if page["total"] >= args.transfers:
                        break
                    time.sleep(0.5)
                out["transfers_known"] = page["total"]
            for label, extra in (("ls_first_page_s", []), ("ls_all_s", ["--all"])):
                t0 = time.monotonic()
                done = subprocess.run([sys.executable, "-m", "quelay.cli", "ls", "--control",
                                       str(ctl_a), "--json", *extra], capture_output=True,
                                      check=True)
                out[label] = round(time.monotonic() - t0, 3)
                out[label.replace("_s", "_count")] = len(json.loads(done.stdout))
            with BlockingClient(ctl_a) as ca, BlockingClient(ctl_b) as cb:
                out["link_ups_a"] = ca.status()["link"]["ups"]
                out["link_ups_b"] = cb.status()["link"]["ups"]
            out["rss_end_kib"] = rss_kib(a.pid)
            print(json.dumps(out, indent=1))
        finally:
            for p in (a, b):
                p.terminate()
            for p in (a, b):
                p.wait(10)


if __name__ == "__main__":
    main()
