#!/usr/bin/env python3
"""Connection storm: N simultaneous connections must each get a greeting.

usage: storm.py HOST PORT N [--limit 2.0] [--grace 10.0]

Opens N TCP connections as fast as one process can, reads each one's first
line, and records its reply code and the time from the start of that
connection's connect() to the arrival of the line. It drives non-blocking
sockets with epoll directly rather than through asyncio: with asyncio the
event loop's own work of starting 10,000 connects delays the reading of
early greetings by hundreds of milliseconds, which would be charged to the
server. Here connects are issued in small batches with a zero-timeout poll
between batches, so a greeting's arrival is noticed within about a
millisecond. Connections stay open
until every one has an outcome, so the server really holds N at once (a
server that accepts, greets and is then relieved by clients quitting would
otherwise look better than it is). Then those still open send QUIT.

Outcomes:
  220 / 421   greeting or overload refusal within --limit seconds (pass)
  late        a 220/421 that came after --limit (a hang in the issue's terms)
  other       any other first line (reported with its code)
  refused     connect() got ECONNREFUSED (listen queue overflow with
              tcp_abort_on_overflow, or nothing listening)
  reset       ECONNRESET before any line
  closed      connection closed without a line
  timeout     nothing within --grace seconds
  client_err  the client itself failed (EMFILE, EADDRNOTAVAIL, ...): the
              run says nothing about the server; fix the client side

Prints a human summary and one machine-readable line:

    STORM n=N ok220=.. ok421=.. late=.. other=.. refused=.. reset=..
          closed=.. timeout=.. client_err=.. p50_ms=.. p99_ms=.. max_ms=..
          pass=yes|no

Exit status 0 only if pass=yes (every connection got 220 or 421 in time).
"""
import argparse
import collections
import errno
import resource
import select
import socket
import time


def raise_nofile(n: int) -> None:
    # Each connection is one descriptor; leave headroom for the interpreter.
    want = n + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            # Only a process with CAP_SYS_RESOURCE may raise the hard limit.
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def pct(sorted_values, p):
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


class Conn:
    __slots__ = ("sock", "t0", "buf", "kind", "line", "elapsed")

    def __init__(self, sock, t0):
        self.sock, self.t0, self.buf = sock, t0, b""
        self.kind, self.line, self.elapsed = None, b"", 0.0


def run(args) -> list:
    addr = (args.host, args.port)
    ep = select.epoll(sizehint=args.n)
    pending: dict[int, Conn] = {}
    done: list[Conn] = []
    BATCH = 32  # connects between polls: small enough to notice replies fast
    EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP

    def finish(c: Conn, kind: str, now: float) -> None:
        c.kind, c.elapsed = kind, now - c.t0
        done.append(c)

    def on_event(fd: int, now: float) -> None:
        c = pending.pop(fd, None)
        if c is None:
            return
        ep.unregister(fd)
        try:
            data = c.sock.recv(4096)
        except BlockingIOError:
            pending[fd] = c  # spurious wake-up; keep waiting
            ep.register(fd, EVENTS)
            return
        except ConnectionRefusedError:
            return finish(c, "refused", now)
        except ConnectionResetError:
            return finish(c, "reset", now)
        except OSError as e:
            c.line = errno.errorcode.get(e.errno, str(e)).encode()
            return finish(c, "client_err", now)
        if not data:
            return finish(c, "closed", now)
        c.buf += data
        if b"\n" not in c.buf:
            pending[fd] = c  # partial line: wait for the rest
            ep.register(fd, EVENTS)
            return
        c.line = c.buf.split(b"\n", 1)[0].rstrip(b"\r")
        code = c.line[:3]
        if code in (b"220", b"421"):
            kind = "ok" + code.decode() if now - c.t0 <= args.limit else "late"
        else:
            kind = "other"
        finish(c, kind, now)

    def poll(timeout: float) -> None:
        for fd, _ in ep.poll(timeout):
            on_event(fd, time.perf_counter())

    for i in range(args.n):
        s = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        c = Conn(s, time.perf_counter())
        err = s.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            pending[s.fileno()] = c
            ep.register(s.fileno(), EVENTS)
        elif err == errno.ECONNREFUSED:
            finish(c, "refused", time.perf_counter())
        else:
            c.line = errno.errorcode.get(err, str(err)).encode()
            finish(c, "client_err", time.perf_counter())
        if i % BATCH == BATCH - 1:
            poll(0)

    while pending:
        poll(0.05)
        now = time.perf_counter()
        for fd, c in list(pending.items()):
            if now - c.t0 > args.grace:
                del pending[fd]
                ep.unregister(fd)
                finish(c, "timeout", now)

    # Every connection has an outcome; only now let them go, politely.
    for c in done:
        if c.kind in ("ok220", "late"):
            try:
                c.sock.send(b"QUIT\r\n")
            except OSError:
                pass
        c.sock.close()
    ep.close()
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--limit", type=float, default=2.0, help="seconds a greeting may take")
    ap.add_argument("--grace", type=float, default=10.0,
                    help="seconds to wait before calling a connection hung")
    args = ap.parse_args()
    raise_nofile(args.n)

    start = time.perf_counter()
    results = run(args)
    seconds = time.perf_counter() - start

    counts = collections.Counter(c.kind for c in results)
    answered = sorted(c.elapsed for c in results if c.kind in ("ok220", "ok421", "late", "other"))
    odd = collections.Counter(c.line[:40] for c in results if c.kind in ("other", "client_err"))
    keys = ["ok220", "ok421", "late", "other", "refused", "reset", "closed", "timeout", "client_err"]
    passed = counts["ok220"] + counts["ok421"] == args.n
    ms = lambda v: f"{v * 1000:.1f}"
    print(f"storm: {args.n} connections to {args.host}:{args.port} in {seconds:.2f}s")
    for k in keys:
        if counts[k]:
            print(f"  {k:<10} {counts[k]}")
    for line, n in odd.most_common(5):
        print(f"  e.g. {n} x {line!r}")
    print(
        f"STORM n={args.n} " + " ".join(f"{k}={counts[k]}" for k in keys)
        + f" p50_ms={ms(pct(answered, 50))} p99_ms={ms(pct(answered, 99))}"
        + f" max_ms={ms(answered[-1] if answered else float('nan'))}"
        + f" max_any_ms={ms(max(c.elapsed for c in results))}"
        + f" pass={'yes' if passed else 'no'}",
        flush=True,
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
