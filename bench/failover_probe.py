#!/usr/bin/env python3
"""Write probe for bench/failover.sh (standard library only, no driver).

    failover_probe.py probe --port P --table T --log FILE [--interval 0.1]
        Every INTERVAL seconds (on a fixed schedule, each attempt in its own
        thread so a hanging attempt does not delay the next), opens a new
        connection to 127.0.0.1:P (connect + authentication within
        --connect-timeout, default 1 s), runs
            INSERT INTO T (id) VALUES (<attempt number>)
        (within --query-timeout, default 1 s) and logs one tab-separated
        line per attempt:
            id  start_epoch  end_epoch  ok(1/0)  error
        The id is the attempt number, chosen here, so a row is identified
        exactly even if a sequence on a promoted replica reissues numbers.
        A write counts as acknowledged (ok=1) only when CommandComplete and
        ReadyForQuery (idle) arrived: with the simple query protocol the
        implicit transaction has committed by then.
        Creates T first (retrying until it succeeds). Runs until SIGTERM or
        SIGINT. The password comes from PGPASSWORD.

    failover_probe.py analyze --log FILE --fault EPOCH --present FILE
        Reads the probe log, the fault time and the ids present on the
        primary at the end of the run (one per line), and prints
        shell-assignable figures: FIRST_WRITE_SECS (fault -> acknowledgement
        of the first successful attempt that started after the fault, or
        "none"), LAST_FAIL_SECS (fault -> start of the last failed attempt:
        from then on every write succeeded), LAST_ACK_BEFORE_SECS,
        ACKED_BEFORE, ACKED_AFTER, FAILED_AFTER, LOST, LOST_BEFORE,
        LOST_AFTER, LOST_IDS.

    failover_probe.py window --log FILE --start EPOCH [--until EPOCH]
        (bench/switchover.sh) Figures for the attempts that started in
        [START, UNTIL), printed shell-assignable: FAILED (failed attempts),
        WINDOW_SECS (from the start of the first failed attempt to the
        acknowledgement of the first successful attempt that started after
        it; 0.00 if none failed, "none" if no write succeeded after it),
        FIRST_FAIL_SECS and LAST_FAIL_SECS (START -> start of the first /
        last failed attempt), SPAN_SECS (start of the first failed attempt
        -> acknowledgement of the first successful attempt that started
        after the last failed one: equals WINDOW_SECS unless writes failed
        again after recovering), EPISODES (separate runs of failures, in
        start order), OK (acknowledged attempts), MAX_OK_SECS (slowest
        acknowledged attempt), ERRORS (the commonest error texts).
"""

import argparse
import base64
import hashlib
import hmac
import os
import shlex
import signal
import socket
import struct
import sys
import threading
import time


class PgError(Exception):
    pass


def _msg(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


class Conn:
    """The least of the PostgreSQL v3 protocol: startup, trust/cleartext/
    md5/SCRAM-SHA-256 authentication, one simple query, terminate."""

    _scram_cache = {}

    def __init__(self, host, port, user, password, dbname, timeout):
        # One budget for TCP connect + startup + authentication.
        self.deadline = time.monotonic() + timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.user = user
        self.password = password
        params = (
            b"user\0" + user.encode() + b"\0"
            + b"database\0" + dbname.encode() + b"\0"
            + b"application_name\0pgwarden-failover-probe\0\0"
        )
        body = struct.pack("!I", 196608) + params
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self._authenticate()

    def settimeout(self, t):
        """A new budget for what follows (the query)."""
        self.deadline = time.monotonic() + t

    def _read(self, n):
        while len(self.buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise PgError("connection closed by the server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _recv(self):
        head = self._read(5)
        kind = head[:1]
        (length,) = struct.unpack("!I", head[1:])
        payload = self._read(length - 4)
        if kind == b"E":
            raise PgError(_error_text(payload))
        return kind, payload

    def _authenticate(self):
        nonce = None
        first_bare = None
        server_first = None
        while True:
            kind, payload = self._recv()
            if kind == b"R":
                (code,) = struct.unpack("!I", payload[:4])
                if code == 0:
                    continue
                if code == 3:
                    self.sock.sendall(_msg(b"p", self.password.encode() + b"\0"))
                elif code == 5:
                    salt = payload[4:8]
                    inner = hashlib.md5(self.password.encode() + self.user.encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + salt).hexdigest()
                    self.sock.sendall(_msg(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    mechs = payload[4:].split(b"\0")
                    if b"SCRAM-SHA-256" not in mechs:
                        raise PgError(f"unsupported SASL mechanisms {mechs}")
                    nonce = base64.b64encode(os.urandom(18)).decode()
                    first_bare = f"n=,r={nonce}"
                    first = ("n,," + first_bare).encode()
                    body = b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first
                    self.sock.sendall(_msg(b"p", body))
                elif code == 11:
                    server_first = payload[4:].decode()
                    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                    r, s, i = attrs["r"], attrs["s"], int(attrs["i"])
                    if not r.startswith(nonce):
                        raise PgError("SCRAM: server nonce does not extend ours")
                    key = (s, i)
                    salted = Conn._scram_cache.get(key)
                    if salted is None:
                        salted = hashlib.pbkdf2_hmac(
                            "sha256", self.password.encode(), base64.b64decode(s), i)
                        Conn._scram_cache[key] = salted
                    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
                    stored_key = hashlib.sha256(client_key).digest()
                    final_wo_proof = f"c=biws,r={r}"
                    auth_msg = f"{first_bare},{server_first},{final_wo_proof}".encode()
                    sig = hmac.new(stored_key, auth_msg, "sha256").digest()
                    proof = bytes(a ^ b for a, b in zip(client_key, sig))
                    final = f"{final_wo_proof},p={base64.b64encode(proof).decode()}"
                    self.sock.sendall(_msg(b"p", final.encode()))
                elif code == 12:
                    continue  # SASL final; AuthenticationOk follows
                else:
                    raise PgError(f"unsupported authentication request {code}")
            elif kind == b"Z":
                return
            # S (parameter status), K (backend key), N (notice): ignore

    def simple_query(self, sql):
        """Runs one statement; returns the command tag once ReadyForQuery
        reports an idle (committed) session."""
        self.sock.sendall(_msg(b"Q", sql.encode() + b"\0"))
        tag = None
        err = None
        while True:
            try:
                kind, payload = self._recv()
            except PgError as e:
                if "closed" in str(e) or err is not None:
                    raise
                err = e  # ErrorResponse: ReadyForQuery still follows
                continue
            if kind == b"C":
                tag = payload.rstrip(b"\0").decode()
            elif kind == b"Z":
                if err is not None:
                    raise err
                if payload != b"I":
                    raise PgError(f"session not idle after the statement ({payload!r})")
                return tag

    def close(self):
        try:
            self.sock.sendall(_msg(b"X", b""))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _error_text(payload):
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return f"{fields.get(b'S', 'ERROR')} {fields.get(b'C', '')}: {fields.get(b'M', '')}"


def _clean(s):
    return " ".join(str(s).split())[:200]


def probe(args):
    password = os.environ.get("PGPASSWORD", "")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log = open(args.log, "a", buffering=1)
    lock = threading.Lock()

    def connect():
        return Conn("127.0.0.1", args.port, args.user, password, args.dbname,
                    args.connect_timeout)

    # The table, retried until the primary accepts it.
    create = f"CREATE TABLE IF NOT EXISTS {args.table} (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    while not stop.is_set():
        try:
            c = connect()
            try:
                c.settimeout(args.query_timeout + 4)
                c.simple_query(create)
            finally:
                c.close()
            break
        except (OSError, PgError) as e:
            print(f"probe: creating {args.table}: {_clean(e)}", file=sys.stderr)
            stop.wait(0.2)
    with lock:
        log.write(f"# table {args.table} ready at {time.time():.6f}\n")

    def attempt(n):
        start = time.time()
        ok, err = 0, ""
        c = None
        try:
            c = connect()
            c.settimeout(args.query_timeout)
            c.simple_query(f"INSERT INTO {args.table} (id) VALUES ({n})")
            ok = 1
        except (OSError, PgError) as e:
            err = type(e).__name__ + ": " + str(e)
        finally:
            if c is not None:
                c.close()
        end = time.time()
        with lock:
            log.write(f"{n}\t{start:.6f}\t{end:.6f}\t{ok}\t{_clean(err)}\n")

    t0 = time.monotonic()
    n = 0
    threads = []
    while not stop.is_set():
        n += 1
        t = threading.Thread(target=attempt, args=(n,), daemon=True)
        t.start()
        threads.append(t)
        threads = [x for x in threads if x.is_alive()]
        stop.wait(max(0.0, t0 + n * args.interval - time.monotonic()))
    # Let attempts in flight finish (each is bounded by its timeouts).
    deadline = time.monotonic() + args.connect_timeout + args.query_timeout + 1
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        log.write(f"# stopped at {time.time():.6f} after {n} attempts\n")
    log.close()


def analyze(args):
    fault = float(args.fault)
    present = set()
    with open(args.present) as f:
        for line in f:
            line = line.strip()
            if line:
                present.add(int(line))
    acked_before, acked_after = [], []
    failed_after = 0
    last_fail = None
    first = None
    last_ack_before = None
    with open(args.log) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            n, start, end, ok = int(parts[0]), float(parts[1]), float(parts[2]), parts[3] == "1"
            if ok:
                if start < fault:
                    acked_before.append(n)
                    if end <= fault:
                        last_ack_before = max(last_ack_before or end, end)
                else:
                    acked_after.append(n)
                    if first is None or end < first:
                        first = end
            elif start >= fault:
                failed_after += 1
                last_fail = max(last_fail or start, start)
    lost_before = sorted(i for i in acked_before if i not in present)
    lost_after = sorted(i for i in acked_after if i not in present)
    lost = lost_before + lost_after
    out = {
        "FIRST_WRITE_SECS": "none" if first is None else f"{first - fault:.2f}",
        "LAST_ACK_BEFORE_SECS": "none" if last_ack_before is None else f"{fault - last_ack_before:.2f}",
        "LAST_FAIL_SECS": "none" if last_fail is None else f"{last_fail - fault:.2f}",
        "ACKED_BEFORE": len(acked_before),
        "ACKED_AFTER": len(acked_after),
        "FAILED_AFTER": failed_after,
        "LOST": len(lost),
        "LOST_BEFORE": len(lost_before),
        "LOST_AFTER": len(lost_after),
        "LOST_IDS": ",".join(map(str, lost[:50])) + (",…" if len(lost) > 50 else ""),
    }
    for k, v in out.items():
        print(f"{k}={v}")


def window(args):
    start = float(args.start)
    until = float(args.until) if args.until else float("inf")
    rows = []  # (start, end, ok, err) of every attempt, in start order
    with open(args.log) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            err = parts[4] if len(parts) > 4 else ""
            rows.append((float(parts[1]), float(parts[2]), parts[3] == "1", err))
    rows.sort()
    inside = [r for r in rows if start <= r[0] < until]
    failed = [r for r in inside if not r[2]]
    ok = [r for r in inside if r[2]]
    out = {"FAILED": len(failed), "OK": len(ok),
           "MAX_OK_SECS": f"{max((r[1] - r[0] for r in ok), default=0.0):.2f}"}

    def first_ack_after(t):
        ends = [r[1] for r in rows if r[2] and r[0] >= t]
        return min(ends) if ends else None

    if not failed:
        out.update(WINDOW_SECS="0.00", SPAN_SECS="0.00", FIRST_FAIL_SECS="none",
                   LAST_FAIL_SECS="none", EPISODES=0, ERRORS="")
    else:
        f0, f1 = failed[0][0], failed[-1][0]
        a0, a1 = first_ack_after(f0), first_ack_after(f1)
        episodes, prev_ok = 0, True
        for r in inside:
            if not r[2] and prev_ok:
                episodes += 1
            prev_ok = r[2]
        counts = {}
        for r in failed:
            key = r[3].split(" (", 1)[0][:90]
            counts[key] = counts.get(key, 0) + 1
        errors = "; ".join(f"{n}x {e}" for e, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        out.update(
            WINDOW_SECS="none" if a0 is None else f"{a0 - f0:.2f}",
            SPAN_SECS="none" if a1 is None else f"{a1 - f0:.2f}",
            FIRST_FAIL_SECS=f"{f0 - start:.2f}",
            LAST_FAIL_SECS=f"{f1 - start:.2f}",
            EPISODES=episodes,
            ERRORS=errors,
        )
    for k, v in out.items():
        print(f"{k}={shlex.quote(str(v))}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("--port", type=int, required=True)
    pr.add_argument("--table", required=True)
    pr.add_argument("--log", required=True)
    pr.add_argument("--interval", type=float, default=0.1)
    pr.add_argument("--connect-timeout", type=float, default=1.0)
    pr.add_argument("--query-timeout", type=float, default=1.0)
    pr.add_argument("--user", default="postgres")
    pr.add_argument("--dbname", default="postgres")
    an = sub.add_parser("analyze")
    an.add_argument("--log", required=True)
    an.add_argument("--fault", required=True)
    an.add_argument("--present", required=True)
    wi = sub.add_parser("window")
    wi.add_argument("--log", required=True)
    wi.add_argument("--start", required=True)
    wi.add_argument("--until")
    args = p.parse_args()
    if args.cmd == "probe":
        probe(args)
    elif args.cmd == "window":
        window(args)
    else:
        analyze(args)


if __name__ == "__main__":
    main()
