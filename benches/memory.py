#!/usr/bin/env python3
"""What receive_memory does to a flood of large messages arriving at once.

usage: benches/memory.py [CONNECTIONS] [MIB_EACH]   (defaults 100 and 4)

Runs mtad (MTAD_BIN, default target/release/mtad) twice on 127.0.0.1 with
max_message_size = 8MiB: once with receive_memory = 64MiB, once with
4GiB (no effective cap). Each time CONNECTIONS clients start a message at
once and send MIB_EACH MiB of its body without the final dot; when every
client has sent its body, the process's peak RSS (VmHWM) is read; then
each sends the dot and the replies are counted (250 stored, 452 told to
come back later). Prints one line per run:

    MEMORY cap=... connections=... mib_each=... peak_rss_mib=... stored=... later=... other=...

All clients come from 127.0.0.1, which the config trusts (relay_networks),
so the per-address share does not apply: this measures the node-wide cap.
Everything runs in a temp dir under BENCH_TMPDIR (default /var/tmp).
"""
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time

MTAD = os.environ.get("MTAD_BIN", "target/release/mtad")
LINE = b"x" * 998 + b"\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp: str, port: int, cap: str) -> str:
    path = os.path.join(tmp, f"mtad-{cap}.toml")
    with open(path, "w") as f:
        f.write(
            f"""
[node]
name = "bench"
data_dir = "{tmp}/data-{cap}"

[smtp]
listen = ["127.0.0.1:{port}"]
max_message_size = "8MiB"
receive_memory = "{cap}"
idle_timeout = "5m"

[[route]]
domains = ["*"]
drop_dir = "{tmp}/out-{cap}"

[log]
level = "warn"
"""
        )
    return path


def hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def reply(r: asyncio.StreamReader) -> bytes:
    while True:
        line = await r.readline()
        if not line:
            return b"closed"
        if line[3:4] != b"-":
            return line


async def client(port: int, mib: int, all_sent: asyncio.Barrier, read_hwm: asyncio.Event):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await reply(r)
    for cmd in (b"EHLO bench\r\n", b"MAIL FROM:<a@bench.test>\r\n", b"RCPT TO:<b@sink.test>\r\n", b"DATA\r\n"):
        w.write(cmd)
        await w.drain()
        await reply(r)
    for _ in range(mib * 1024 * 1024 // len(LINE)):
        w.write(LINE)
        await w.drain()
    await all_sent.wait()
    await read_hwm.wait()
    w.write(b".\r\n")
    await w.drain()
    answer = await reply(r)
    w.close()
    return answer[:3]


async def run(tmp: str, cap: str, n: int, mib: int) -> str:
    port = free_port()
    proc = subprocess.Popen([MTAD, "run", "--config", config(tmp, port, cap)])
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        all_sent = asyncio.Barrier(n + 1)
        read_hwm = asyncio.Event()
        tasks = [asyncio.create_task(client(port, mib, all_sent, read_hwm)) for _ in range(n)]
        await all_sent.wait()
        # Give the server a moment to read what is in flight.
        await asyncio.sleep(1)
        peak = hwm_mib(proc.pid)
        read_hwm.set()
        codes = await asyncio.gather(*tasks)
        stored = sum(c == b"250" for c in codes)
        later = sum(c == b"452" for c in codes)
        return (
            f"MEMORY cap={cap} connections={n} mib_each={mib} peak_rss_mib={peak:.0f} "
            f"stored={stored} later={later} other={n - stored - later}"
        )
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    base = os.environ.get("BENCH_TMPDIR", "/var/tmp")
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        for cap in ("64MiB", "4GiB"):
            print(asyncio.run(run(tmp, cap, n, mib)), flush=True)


if __name__ == "__main__":
    main()
