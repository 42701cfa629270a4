#!/usr/bin/env python3
"""Wait until smtp-sink's running counter (-c) reaches a message count.

usage: sinkwait.py COUNTER_FILE MESSAGES TIMEOUT_SECONDS

smtp-sink -c rewrites one status line ("sess=N quit=N mesg=N", separated by
CR) every time a "." is received. Polling it from Python rather than from a
shell loop matters on a 2-core machine: a `tail | tr | grep` every few
milliseconds would steal CPU from the MTA being measured.

Prints "SINK mesg=N at=UNIX_TIME" and exits 0 once the count is reached,
the time being when the count was first seen; exits 1 on timeout with the
last count seen.
"""
import re
import sys
import time

POLL = 0.01  # 10 ms: the timing error over a multi-second run stays < 1%
MESG = re.compile(rb"mesg=(\d+)")


def main() -> int:
    path, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    deadline = time.time() + timeout
    seen = 0
    tail = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read()
            if chunk:
                # Keep a little of the previous read: a status line can be
                # split between two reads.
                tail = (tail + chunk)[-4096:]
                counts = MESG.findall(tail)
                if counts:
                    seen = int(counts[-1])
            now = time.time()
            if seen >= want:
                print(f"SINK mesg={seen} at={now:.6f}", flush=True)
                return 0
            if now > deadline:
                print(f"SINK mesg={seen} timeout_after={timeout}", flush=True)
                return 1
            time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main())
