"""A real HTTP server on loopback in front of a DICOMweb server, damaging its answers.

Each request is forwarded to the target; ``plan(path, n)`` (the request's path, prefixed
with its method and a space unless it is a GET, and its number, from 1) names the fault
to apply to the answer, or None to forward it as is. The faults are what networks,
proxies and servers do to an answer:

- ``"500"``, ``"503"``: that status, no body;
- ``"close"``: no Content-Length; part of the body, then the connection is closed (the
  end of an HTTP/1.0 body: the client cannot tell it from the whole);
- ``"short"``: the whole body's Content-Length, part of the body, then closed;
- ``"chunked-cut"``: chunked transfer, part of the body, closed before the last chunk;
- ``"garbage"``: bytes in the middle of the body overwritten (same length, framing kept);
- ``"drop-part"``, ``"repeat-part"``: one part of a multipart answer removed, or sent
  twice (framing kept);
- ``"no-close"``: a multipart answer without its closing boundary (complete parts);
- ``"html"``: status 200 with an HTML error page (a portal or a misconfigured proxy);
- ``"json-cut"``: a JSON answer (QIDO-RS) cut in the middle, Content-Length of what is
  sent;
- ``"stall"``: no answer for ``stall`` seconds, then the connection is closed;
- ``"lost-answer"``: the request is forwarded (the server does it), then the connection
  is closed without an answer (the client cannot tell whether it was done).
"""

from __future__ import annotations

import http.client
import http.server
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable

FAULTS = ("500", "503", "close", "short", "chunked-cut", "garbage", "drop-part",
          "repeat-part", "no-close", "html", "json-cut", "stall", "lost-answer")
#: response headers not forwarded as they came (the proxy frames the body itself)
_HOP = ("connection", "transfer-encoding", "content-length", "keep-alive")


def _parts(body: bytes, content_type: str) -> tuple[bytes, list[bytes]] | None:
    """(boundary, parts with their headers) of a multipart body; None if it is not one."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/") or not m:
        return None
    boundary = m.group(1).encode()
    chunks = body.split(b"--" + boundary)
    # chunks[0] is the preamble, the last one "--" and the epilogue
    return boundary, [c[2:-2] if c.startswith(b"\r\n") else c for c in chunks[1:-1]]


def _request_body(h: http.server.BaseHTTPRequestHandler) -> bytes | None:
    """A request's body, sent with a length or in chunks (None: no body)."""
    if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else None


def _join(boundary: bytes, parts: list[bytes], close: bool = True) -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


class FaultProxy:
    def __init__(self, target: str, plan: Callable[[str, int], str | None],
                 seed: int = 0, stall: float = 3.0,
                 rewrite: Callable[[str, bytes], bytes] | None = None,
                 drop_headers: tuple[str, ...] = (), tls: ssl.SSLContext | None = None):
        """``rewrite(path, body)``: what every answer's body becomes before any fault;
        ``drop_headers``: prefixes (lower case) of answer headers not forwarded; ``tls``:
        a server context: the proxy speaks HTTPS (in front of a server that does not)."""
        self.target, self.plan, self.stall, self.rewrite = target, plan, stall, rewrite
        self.drop_headers = drop_headers
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.count = 0
        self.applied: Counter[str] = Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                where = self.path if self.command == "GET" else f"{self.command} {self.path}"
                with proxy.lock:
                    proxy.count += 1
                    fault = proxy.plan(where, proxy.count)
                    cut = proxy.rng.random()
                if fault:
                    with proxy.lock:
                        proxy.applied[fault] += 1
                proxy._answer(self, fault, cut)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up on a stalled or damaged answer

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- answering -------------------------------------------------------------------
    def _answer(self, h: http.server.BaseHTTPRequestHandler, fault: str | None,
                cut: float) -> None:
        if fault in ("500", "503"):
            h.send_response(int(fault))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if fault == "stall":
            time.sleep(self.stall)
            h.close_connection = True
            return
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() not in ("host", "connection", "accept-encoding", "expect")}
        data = _request_body(h)
        if data is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "transfer-encoding"}
            headers["Content-Length"] = str(len(data))
        # http.client, not urllib: urllib gives a body without a Content-Type a form's type
        target = urllib.parse.urlsplit(self.target)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            conn.request(h.command, h.path, body=data, headers=headers)
            r = conn.getresponse()
            status, answer, body = r.status, r.headers, r.read()
        finally:
            conn.close()
        if fault == "lost-answer":
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        ctype = answer["Content-Type"] or ""
        if self.rewrite is not None:
            body = self.rewrite(h.path, body)
        if fault == "html":
            ctype, body = "text/html", b"<html><body>Gateway says hello</body></html>"
        elif fault == "json-cut" and ctype.startswith("application/dicom+json"):
            body = body[:max(1, int(len(body) * cut))]
        elif fault == "garbage" and len(body) > 64:
            start = 32 + int((len(body) - 64) * cut)
            n = min(256, len(body) - start)
            body = body[:start] + bytes(self.rng.randrange(256) for _ in range(n)) \
                + body[start + n:]
        elif fault in ("drop-part", "repeat-part", "no-close"):
            split = _parts(body, ctype)
            if split is not None:
                boundary, parts = split
                i = int(cut * len(parts)) if parts else 0
                if fault == "drop-part" and parts:
                    parts = parts[:i] + parts[i + 1:]
                elif fault == "repeat-part" and parts:
                    parts = parts[:i + 1] + parts[i:]
                body = _join(boundary, parts, close=fault != "no-close")
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        for k, v in answer.items():
            if k.lower() not in (*_HOP, "content-type", "server", "date") \
                    and not k.lower().startswith(self.drop_headers or ("\0",)):
                h.send_header(k, v)
        if fault in ("close", "short", "chunked-cut"):
            sent = body[:int(len(body) * cut)]
            if fault == "short":
                h.send_header("Content-Length", str(len(body)))
            elif fault == "chunked-cut":
                h.send_header("Transfer-Encoding", "chunked")
            h.send_header("Connection", "close")
            h.end_headers()
            if fault == "chunked-cut":
                sent = b"%x\r\n%s\r\n" % (len(sent), sent) if sent else b""
            h.wfile.write(sent)
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        if h.command == "HEAD":  # the length of what a GET would give
            h.send_header("Content-Length", answer["Content-Length"] or "0")
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


def request_kind(path: str) -> str:
    """``"search"`` (QIDO-RS), ``"series"`` or ``"instance"`` (WADO-RS retrieval), or
    ``"other"``, of a DICOMweb request's path."""
    segments = path.split("?", 1)[0].rstrip("/").split("/")
    if segments[-1] in ("studies", "series", "instances"):
        return "search"
    if len(segments) >= 2 and segments[-2] in ("series", "instances"):
        return "series" if segments[-2] == "series" else "instance"
    return "other"
