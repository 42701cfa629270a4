#!/usr/bin/env python3
"""Accept-latency load client: how long an MTA takes to say "250" after DATA.

usage: latency.py HOST PORT [--messages N] [--sessions 20] [--size 4096]
                  [--per-session 1] [--from ADDR] [--to ADDR]
                  [--stop-file PATH]

smtp-source reports no latency, so this client applies the same shape of
load (SESSIONS parallel sessions, by default one message per connection
like smtp-source without -d, SIZE bytes of payload) and times, for every
message, the interval from writing the end-of-data marker "\\r\\n.\\r\\n"
to reading the complete reply. With an MTA that fsyncs before answering,
that interval is the durability cost a client sees.

As a load generator in Python it is slower than smtp-source, so it is best
used as a probe: a couple of sessions next to an smtp-source run, with
--stop-file naming a file whose appearance (when smtp-source is done) ends
the run; --messages is then only a cap. relay.sh does this.

Prints a human summary and one machine-readable line:

    LATENCY messages=N ok=N failed=N seconds=S msgs_per_sec=R
            p50_ms=... p90_ms=... p99_ms=... max_ms=...

Exit status is 1 if any message was not answered 250.
"""
import argparse
import asyncio
import collections
import os
import time


class SmtpError(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one (possibly multi-line) SMTP reply."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed")
        lines.append(line)
        # "250-" continues, "250 " ends (RFC 5321 4.2.1).
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SmtpError(f"bad reply {lines[-1]!r}")
    return code, b"".join(lines)


async def command(reader, writer, line: bytes, want: int) -> None:
    writer.write(line + b"\r\n")
    await writer.drain()
    code, text = await reply(reader)
    if code != want:
        raise SmtpError(f"{line.split()[0].decode()} -> {text.strip()!r}")


def make_body(size: int, sender: str, rcpt: str) -> bytes:
    header = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: latency probe\r\n\r\n"
    ).encode()
    # Payload in 78-byte lines (76 chars + CRLF), none starting with '.',
    # so no dot-stuffing is needed and the payload is exactly `size` bytes.
    line = b"x" * 76 + b"\r\n"
    payload = line * (size // len(line))
    payload += b"y" * (size - len(payload))
    # The end-of-data marker "\r\n.\r\n" is sent separately; its leading
    # CRLF terminates the last payload line.
    return header + payload


async def session(args, queue_left, body, samples, failures, ehlo_name) -> None:
    while queue_left[0] > 0 and not (args.stop_file and os.path.exists(args.stop_file)):
        batch = min(args.per_session, queue_left[0])
        queue_left[0] -= batch
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port), args.timeout
            )
            code, text = await asyncio.wait_for(reply(reader), args.timeout)
            if code != 220:
                raise SmtpError(f"greeting {text.strip()!r}")
            await command(reader, writer, b"EHLO " + ehlo_name, 250)
            for _ in range(batch):
                await command(reader, writer, f"MAIL FROM:<{args.sender}>".encode(), 250)
                await command(reader, writer, f"RCPT TO:<{args.rcpt}>".encode(), 250)
                await command(reader, writer, b"DATA", 354)
                writer.write(body)
                await writer.drain()
                t0 = time.perf_counter()
                writer.write(b"\r\n.\r\n")
                await writer.drain()
                code, text = await asyncio.wait_for(reply(reader), args.timeout)
                elapsed = time.perf_counter() - t0
                if code == 250:
                    samples.append(elapsed)
                else:
                    failures[f"{code}"] += 1
                batch -= 1
            writer.write(b"QUIT\r\n")
            await writer.drain()
            await asyncio.wait_for(reply(reader), args.timeout)
        except (OSError, SmtpError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            # Count the messages this connection did not get to deliver, so
            # the totals add up and a failing MTA is visible.
            # A failure after the last message (at QUIT) loses nothing.
            if batch:
                name = type(e).__name__
                failures[f"{name}: {e}" if isinstance(e, SmtpError) else name] += batch
        finally:
            if writer is not None:
                writer.close()


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--per-session", type=int, default=1,
                    help="messages per connection (smtp-source's default is 1)")
    ap.add_argument("--from", dest="sender", default="latency@example.test")
    ap.add_argument("--to", dest="rcpt", default="sink@dest.example")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--stop-file", help="stop starting sessions once this file exists")
    args = ap.parse_args()

    body = make_body(args.size, args.sender, args.rcpt)
    samples: list[float] = []
    failures: collections.Counter = collections.Counter()
    left = [args.messages]  # shared work counter; one event loop, no lock needed
    start = time.perf_counter()
    await asyncio.gather(*(
        session(args, left, body, samples, failures, b"latency.example.test")
        for _ in range(args.sessions)
    ))
    seconds = time.perf_counter() - start

    s = sorted(samples)
    ms = lambda v: f"{v * 1000:.2f}"
    ok, failed = len(s), sum(failures.values())
    rate = ok / seconds if seconds > 0 else 0.0
    print(f"latency: {ok} accepted, {failed} failed in {seconds:.2f}s "
          f"({rate:.1f} msg/s, {args.sessions} sessions)")
    for reason, n in failures.most_common():
        print(f"  failed {n}: {reason}")
    print(
        f"LATENCY messages={ok + failed} ok={ok} failed={failed} "
        f"seconds={seconds:.3f} msgs_per_sec={rate:.1f} "
        f"p50_ms={ms(pct(s, 50))} p90_ms={ms(pct(s, 90))} "
        f"p99_ms={ms(pct(s, 99))} max_ms={ms(s[-1] if s else float('nan'))}",
        flush=True,
    )
    return 0 if failed == 0 and (args.stop_file or ok == args.messages) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
