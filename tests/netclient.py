"""A test client that runs inside a network namespace (`ip netns exec NS python -m ...`).

Modes (all print one JSON object per result line on stdout):
  once HOST PORT            connect, read the greeting tag
  hold HOST PORT            connect, print the tag, then for each stdin line send it and
                            print the answer: a long-lived flow a test can drive
  hammer HOST PORT RATE MAX_SECONDS STOPFILE
                            open RATE connections per second until STOPFILE exists (or
                            MAX_SECONDS pass); report counts per tag and every failure
  udp HOST PORT MSG         send one datagram, print the answer
  udphold HOST PORT         one UDP socket; each stdin line is sent, the answer printed
  probe HOST PORT[,PORT...] MAX_SECONDS STOPFILE
                            connect to each port in turn (0.5 s timeout) until STOPFILE
                            exists; report every attempt: [wall time, port, tag or null]
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter


def _greeting(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before greeting")
        data += chunk
    return data.decode().strip()


def once(host: str, port: int) -> dict[str, object]:
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            return {"tag": _greeting(sock)}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def hold(host: str, port: int) -> None:
    sock = socket.create_connection((host, port), timeout=10)
    print(json.dumps({"tag": _greeting(sock)}), flush=True)
    reader = sock.makefile("rb")
    for line in sys.stdin:
        try:
            sock.sendall(line.encode())
            answer = reader.readline().decode().strip()
            print(json.dumps({"answer": answer} if answer else {"error": "closed"}), flush=True)
        except OSError as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)


def hammer(host: str, port: int, rate: float, max_seconds: float, stopfile: str) -> None:
    tags: Counter[str] = Counter()
    failures: list[str] = []
    interval = 1.0 / rate
    start = time.monotonic()
    next_at = start
    attempts = 0
    print(json.dumps({"started": True}), flush=True)
    while time.monotonic() - start < max_seconds and not os.path.exists(stopfile):
        result = once(host, port)
        attempts += 1
        if "tag" in result:
            tags[str(result["tag"])] += 1
        else:
            failures.append(str(result["error"]))
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - start
    print(
        json.dumps(
            {
                "attempts": attempts,
                "seconds": elapsed,
                "rate": attempts / elapsed if elapsed else 0.0,
                "tags": dict(tags),
                "failures": failures,
            }
        ),
        flush=True,
    )


def _udp_socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)


def udp(host: str, port: int, message: str) -> dict[str, object]:
    with _udp_socket(host) as sock:
        sock.settimeout(3)
        sock.sendto(message.encode(), (host, port))
        try:
            return {"answer": sock.recv(4096).decode()}
        except OSError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}


def udp_hold(host: str, port: int) -> None:
    """One UDP socket (one source port, so one conntrack flow) driven line by line."""
    with _udp_socket(host) as sock:
        sock.settimeout(1)
        sock.connect((host, port))
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            sock.send(line.strip().encode())
            try:
                print(json.dumps({"answer": sock.recv(4096).decode()}), flush=True)
            except OSError as exc:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)


def probe(host: str, ports: list[int], max_seconds: float, stopfile: str) -> None:
    """Which app answers each port, attempt by attempt (a misrouted flow shows its tag)."""
    attempts: list[list[object]] = []
    start = time.monotonic()
    print(json.dumps({"started": True}), flush=True)
    while time.monotonic() - start < max_seconds and not os.path.exists(stopfile):
        for port in ports:
            tag = None
            try:
                with socket.create_connection((host, port), timeout=0.5) as sock:
                    sock.settimeout(0.5)
                    tag = _greeting(sock)
            except OSError:
                time.sleep(0.01)  # refused at once: do not spin
            attempts.append([time.time(), port, tag])
    print(json.dumps({"attempts": attempts}), flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "probe":
        probe(argv[1], [int(p) for p in argv[2].split(",")], float(argv[3]), argv[4])
        return
    mode, host, port = argv[0], argv[1], int(argv[2])
    if mode == "once":
        print(json.dumps(once(host, port)), flush=True)
    elif mode == "hold":
        hold(host, port)
    elif mode == "hammer":
        hammer(host, port, float(argv[3]), float(argv[4]), argv[5])
    elif mode == "udphold":
        udp_hold(host, port)
    elif mode == "udp":
        print(json.dumps(udp(host, port, argv[3])), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
