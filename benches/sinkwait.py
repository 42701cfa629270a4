#!/usr/bin/env python3
"""Wait until smtp-sink's running counter (-c) reaches a message count.

usage: sinkwait.py COUNTER_FILE MESSAGES TIMEOUT_SECONDS [WATCH_PID]

smtp-sink -c rewrites one status line ("sess=N quit=N mesg=N", separated by
CR) every time a "." is received. Polling it from Python rather than from a
shell loop matters on a 2-core machine: a `tail | tr | grep` every few
milliseconds would steal CPU from the MTA being measured.

Prints "SINK mesg=N at=UNIX_TIME" and exits 0 once the count is reached,
the time being when the count was first seen. Gives up (exit 1, with the
last count seen and why) after TIMEOUT_SECONDS in all, after STALL seconds
without progress, or as soon as WATCH_PID (the MTA) has exited, so a broken
run fails in seconds rather than at the overall timeout.
"""
import os
import re
import sys
import time

POLL = 0.01  # 10 ms: the timing error over a multi-second run stays < 1%
STALL = float(os.environ.get("STALL", "120"))  # queue retries are slower
MESG = re.compile(rb"mesg=(\d+)")


def main() -> int:
    path, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    watch = int(sys.argv[4]) if len(sys.argv) > 4 else None
    deadline = time.time() + timeout
    seen = 0
    last_progress, last_seen = time.time(), 0
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
            if seen != last_seen:
                last_progress, last_seen = now, seen
            why = None
            if now > deadline:
                why = f"timeout_after={timeout}"
            elif now - last_progress > STALL:
                why = f"no_progress_for={STALL}"
            elif watch is not None and not os.path.exists(f"/proc/{watch}"):
                why = f"pid_{watch}_exited"
            if why:
                print(f"SINK mesg={seen} {why}", flush=True)
                return 1
            time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main())
