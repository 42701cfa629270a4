#!/usr/bin/env python3
"""Sample the memory of a process tree until told to stop.

usage: memsample.py ROOT_PID [INTERVAL_SECONDS]

Every interval it sums VmRSS and Pss over ROOT_PID and all its descendants
(Postfix is a master process plus short-lived children; mtad is one
process) and remembers the peak of each sum. On SIGTERM or SIGINT, or when
the root process is gone, it prints one line:

    MEM peak_rss_kib=N peak_pss_kib=N peak_procs=N root_hwm_kib=N samples=N

RSS sums count shared pages (libc, the Postfix shared libraries) once per
process, so for a multi-process MTA they overstate; PSS splits shared pages
between the processes sharing them and is the fairer sum. root_hwm_kib is
the kernel's own high-water mark (VmHWM) of the root process, exact for a
single-process MTA, read at the last sample before stopping.
"""
import os
import signal
import sys
import time


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; ppid is the
        # second field after the last ')'.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def field_kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass  # the process exited between listing and reading
    return 0


def main() -> int:
    root = int(sys.argv[1])
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    peak_rss = peak_pss = peak_procs = hwm = samples = 0
    while not stop and os.path.exists(f"/proc/{root}"):
        pids = tree(root)
        rss = sum(field_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
        pss = sum(field_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
        hwm = max(hwm, field_kib(f"/proc/{root}/status", "VmHWM:"))
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        peak_procs = max(peak_procs, len(pids))
        samples += 1
        time.sleep(interval)
    print(
        f"MEM peak_rss_kib={peak_rss} peak_pss_kib={peak_pss} "
        f"peak_procs={peak_procs} root_hwm_kib={hwm} samples={samples}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
