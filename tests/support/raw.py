"""Raw-socket helpers for requests no well-behaved client library would send."""

from __future__ import annotations

import socket
import ssl


def connect(address: str, timeout: float = 10) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock: socket.socket | ssl.SSLSocket, limit: int = 1 << 20) -> bytes:
    """Read until the peer closes or a full response (by Content-Length) has arrived."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data
            if head.startswith(b"HTTP/1.1 100") or head.startswith(b"HTTP/1.1 200 Connection"):
                return data
    return data


def exchange(address: str, payload: bytes) -> bytes:
    with connect(address) as sock:
        sock.sendall(payload)
        return read_response(sock)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
