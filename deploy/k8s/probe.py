"""Kubernetes exec probes of a `mesh run` pod, standard library only (the image's Python).

`mesh run` serves no HTTP; what a probe can see from inside the pod is its sockets, and
from the NATS monitoring port the connections of each node. So:

    python probe.py live    this pod holds an established TCP connection to a NATS client
                            port (PROBE_NATS_PORT, 4222). The process's own watchdog exits
                            when its connection stops reading or closes for good; a process
                            that hangs keeps no connection once the server drops it for
                            missed pings, and this fails.
    python probe.py ready   a NATS node (PROBE_NATS_MONITOR, comma-separated monitoring URLs)
                            lists a connection from this pod (PROBE_POD_IP) subscribed to the
                            agent's discovery subject ``$SRV.PING.<PROBE_AGENT>.<instance>``:
                            the agent has started (consumers bound) and answers `mesh agents`.

Exit 0 when the check holds, 1 otherwise, with the reason on stdout (kubectl describe pod).
The variables are not named MESH_*: a mesh process refuses MESH_ names it does not know.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

ESTABLISHED = "01"
PAGE = 1024


def established(port: int, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> bool:
    """Whether a socket of this network namespace is connected to `port` on a remote host."""
    for table in tables:
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == ESTABLISHED and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def joined(agent: str, pod_ip: str, monitors: list[str], timeout: float = 3.0) -> bool:
    """Whether one of the NATS nodes has a connection from `pod_ip` that answers discovery
    for `agent` (every agent process subscribes to $SRV.PING.<agent>.<its instance id>)."""
    prefix = f"$SRV.PING.{agent}."
    for monitor in monitors:
        offset = 0
        while True:
            url = f"{monitor.rstrip('/')}/connz?subs=1&limit={PAGE}&offset={offset}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    page = json.load(resp)
            except (OSError, ValueError):
                break  # this node is down or busy: ask the next one
            conns = page.get("connections") or []
            for conn in conns:
                if conn.get("ip") == pod_ip and any(
                    s.startswith(prefix) for s in conn.get("subscriptions_list") or []
                ):
                    return True
            offset += len(conns)
            if not conns or offset >= int(page.get("total", 0)):
                break
    return False


def main(argv: list[str]) -> int:
    check = argv[1] if len(argv) > 1 else ""
    if check == "live":
        port = int(os.environ.get("PROBE_NATS_PORT", "4222"))
        if established(port):
            return 0
        print(f"no established connection to a NATS client port ({port})")
        return 1
    if check == "ready":
        agent = os.environ.get("PROBE_AGENT", "")
        pod_ip = os.environ.get("PROBE_POD_IP", "")
        monitors = [m.strip() for m in os.environ.get("PROBE_NATS_MONITOR", "").split(",") if m.strip()]
        if not (agent and pod_ip and monitors):
            print("set PROBE_AGENT, PROBE_POD_IP and PROBE_NATS_MONITOR")
            return 1
        if joined(agent, pod_ip, monitors):
            return 0
        print(f"no NATS node lists a connection from {pod_ip} answering discovery for agent {agent!r}")
        return 1
    print("usage: probe.py live|ready")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
