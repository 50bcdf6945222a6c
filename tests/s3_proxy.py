"""A proxy of our own on loopback between boto3 and the tests' S3 (moto): it damages the
bodies of the first GET responses, as a flaky network or a broken middlebox would."""

from __future__ import annotations

import http.client
import http.server
import socket


class CuttingProxy(http.server.ThreadingHTTPServer):
    """Forwards to `upstream`; the first `cuts` GET responses with a body are damaged: cut
    off halfway (the full Content-Length is announced, then the connection closes), or with
    `damage="flip"` delivered whole with one byte changed (its checksum header kept)."""

    def __init__(self, upstream: str, cuts: int, damage: str = "cut"):
        self.upstream = upstream.removeprefix("http://")
        self.cuts, self.damage = cuts, damage
        self.cut = 0
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = self.server.upstream
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        cut = self.command == "GET" and len(data) > 1 and self.server.cut < self.server.cuts
        if cut and "list-type" not in self.path and self.server.damage == "flip":
            self.server.cut += 1
            middle = len(data) // 2
            self.wfile.write(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
            return
        if cut and "list-type" not in self.path:
            self.server.cut += 1
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass
