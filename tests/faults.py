"""Faults on the wire for every test tier: a TCP proxy in front of the local S3 server.

    proxy = FaultProxy(s3_endpoint)          # point the code under test at proxy.url
    outage = proxy.down_at(is_upload, 30)    # at the first matching request: down for 30 s
    ...
    outage.tripped.wait(60)                  # the fault has landed

Going down closes every live connection and closes the listening socket, so new connections are
refused (ECONNREFUSED) until the proxy comes back on the same port; the server behind it keeps
its state. A fault is armed on a request pattern, so it lands at a known point of a transfer:
before the matching request reaches the server, or after the first bytes of its response.
`answer()` replies to matching requests itself (a canned 403 or 503) without forwarding them.
Every request seen is recorded in `requests` as (method, path).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

Match = Callable[[str, str], bool]


def request(method: str, path: str = "", exclude: str | None = None) -> Match:
    """A request pattern: the HTTP method and a regex searched in the path (path-style: /bucket/key)."""

    def match(m: str, p: str) -> bool:
        return m == method and re.search(path, p) is not None and not (exclude and re.search(exclude, p))

    match.__name__ = f"{method} {path}" + (f" (not {exclude})" if exclude else "")
    return match


@dataclass
class Fault:
    match: Match
    seconds: float | None  # None: down until up() is called
    after_response_bytes: int = 0
    status: int = 0  # answer(): the canned response's status
    body: bytes = b""
    times: int = 1
    tripped: threading.Event = field(default_factory=threading.Event)
    at: float | None = None  # time.monotonic() when it tripped
    hits: int = 0


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self.cut_after: tuple[int, Fault] | None = None  # (response bytes to let through, fault)

    def close(self) -> None:
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _stop_listening(listener: socket.socket) -> None:
    """Free the port now. close() alone leaves the socket listening while the accept thread is
    blocked in accept() on it (the kernel holds it until that call returns): the port would stay
    taken, connections would still be accepted, and coming back up would fail with EADDRINUSE.
    shutdown() wakes accept() and takes the socket out of LISTEN."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


class FaultProxy:
    def __init__(self, upstream_url: str):
        parsed = urlparse(upstream_url)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.requests: list[tuple[str, str]] = []
        self.outages: list[tuple[float, float | None]] = []  # (down at, up at) in time.monotonic()
        self._faults: list[Fault] = []
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self._closed = False
        self.port = 0
        self._listen()
        self.url = f"http://127.0.0.1:{self.port}"

    # -- faults ----------------------------------------------------------------------------
    def down_at(self, match: Match, seconds: float | None, after_response_bytes: int = 0) -> Fault:
        """Go down at the first request that matches: before forwarding it, or once
        `after_response_bytes` bytes of its response have reached the client."""
        fault = Fault(match, seconds, after_response_bytes)
        with self._lock:
            self._faults.append(fault)
        return fault

    def answer(self, match: Match, status: int, body: bytes = b"", times: int = 1) -> Fault:
        """Reply to the next `times` matching requests with `status` and an S3 error body, not forwarding them."""
        fault = Fault(match, None, status=status, body=body, times=times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def down(self, seconds: float | None) -> None:
        """Drop every connection and refuse new ones for `seconds` (None: until up())."""
        with self._lock:
            if self._listener is not None:
                _stop_listening(self._listener)
                self._listener = None
                self.outages.append((time.monotonic(), None))
            conns, self._conns = list(self._conns), set()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if seconds is not None:
                self._timer = threading.Timer(seconds, self.up)
                self._timer.daemon = True
                self._timer.start()
        for c in conns:
            c.close()

    def up(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._listener is None and not self._closed:
                self._listen()
                self.outages[-1] = (self.outages[-1][0], time.monotonic())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._listener is not None:
                _stop_listening(self._listener)
                self._listener = None
            conns, self._conns = list(self._conns), set()
        for c in conns:
            c.close()

    def count(self, match: Match) -> int:
        return sum(1 for m, p in list(self.requests) if match(m, p))

    # -- plumbing --------------------------------------------------------------------------
    def _listen(self) -> None:  # called with the lock held (or from __init__)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the proxy went down
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = _Conn(client, upstream)
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._requests, args=(conn,), daemon=True).start()
            threading.Thread(target=self._responses, args=(conn,), daemon=True).start()

    def _matching(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for f in self._faults:
                if f.hits < f.times and f.match(method, path):
                    f.hits += 1
                    if f.hits >= f.times:
                        f.at = time.monotonic()
                    return f
        return None

    def _trip(self, fault: Fault) -> None:
        fault.at = time.monotonic()
        self.down(fault.seconds)
        fault.tripped.set()

    def _requests(self, conn: _Conn) -> None:
        """Client to server: forward bytes, parsing request heads (Content-Length or chunked bodies)."""
        buf = b""
        body_left = 0  # bytes of the current body still to forward
        chunked = False
        try:
            while True:
                data = conn.client.recv(65536)
                if not data:
                    break
                buf += data
                out = b""
                while buf:
                    if body_left:
                        n = min(body_left, len(buf))
                        out, buf, body_left = out + buf[:n], buf[n:], body_left - n
                        continue
                    if chunked:  # "<hex size>[;ext]\r\n<data>\r\n", ended by a 0-size chunk and trailers
                        end = buf.find(b"\r\n")
                        if end < 0:
                            break
                        size = int(buf[:end].split(b";")[0], 16)
                        if size == 0:
                            trailer_end = buf.find(b"\r\n\r\n")
                            if trailer_end < 0:
                                break
                            out, buf, chunked = out + buf[: trailer_end + 4], buf[trailer_end + 4 :], False
                            continue
                        out, buf, body_left = out + buf[: end + 2], buf[end + 2 :], size + 2
                        continue
                    head_end = buf.find(b"\r\n\r\n")
                    if head_end < 0:
                        break
                    head, buf = buf[: head_end + 4], buf[head_end + 4 :]
                    lines = head.decode("latin-1").split("\r\n")
                    method, path = lines[0].split(" ")[:2]
                    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                    body_left = int(headers.get("content-length", 0))
                    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                    fault = self._matching(method, urlparse(path).path)
                    if fault is not None and fault.status:  # answer it here, forward nothing
                        if out:
                            conn.upstream.sendall(out)
                        self._answer(conn, fault)
                        return
                    if fault is not None and not fault.after_response_bytes:
                        if out:
                            conn.upstream.sendall(out)
                        self._trip(fault)
                        return
                    if fault is not None:
                        conn.cut_after = (fault.after_response_bytes, fault)
                    out += head
                if out:
                    conn.upstream.sendall(out)
        except (OSError, ValueError, IndexError):
            pass
        conn.close()
        with self._lock:
            self._conns.discard(conn)

    def _answer(self, conn: _Conn, fault: Fault) -> None:
        head = (
            f"HTTP/1.1 {fault.status} Fault\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(fault.body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            conn.client.sendall(head + fault.body)
        except OSError:
            pass
        conn.close()
        with self._lock:
            self._conns.discard(conn)
        fault.tripped.set()

    def _responses(self, conn: _Conn) -> None:
        """Server to client: forward bytes; cut after the armed number of response bytes."""
        sent = 0
        try:
            while True:
                data = conn.upstream.recv(65536)
                if not data:
                    break
                if conn.cut_after is not None:
                    limit, fault = conn.cut_after
                    room = limit - sent
                    if len(data) >= room:
                        conn.client.sendall(data[:room])
                        self._trip(fault)
                        return
                    sent += len(data)
                conn.client.sendall(data)
        except OSError:
            pass
        conn.close()


def s3_error(code: str, message: str = "") -> bytes:
    """An S3 error document, as a server sends it with a 4xx/5xx status."""
    return f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
