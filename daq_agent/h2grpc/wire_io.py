"""Byte transports for the HTTP/2 client: a plain TCP socket, or TLS over one.

The client reads on one thread while other threads write. A plain socket allows that; an
``ssl.SSLSocket`` does not (OpenSSL's connection object is not safe for a read and a write at the
same time, and fails with errors such as ``SSLEOFError`` under load). So TLS runs in memory
(``ssl.MemoryBIO`` and ``SSLObject``, guarded by one lock) and only the TCP socket, which is safe
for one reader and one writer, touches the network.
"""

from __future__ import annotations

import socket
import ssl
import threading

__all__ = ["PlainWire", "TlsWire", "Wire"]

_CHUNK = 262144


class PlainWire:
    """A TCP socket: ``sendall`` from one thread, ``recv`` from another."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def sendall(self, data: bytes) -> None:
        """Send every byte.

        Raises:
            OSError: the connection failed.
        """
        self._sock.sendall(data)

    def recv(self) -> bytes:
        """The next bytes received; ``b""`` when the peer closed the connection.

        Raises:
            OSError: the connection failed.
        """
        return self._sock.recv(_CHUNK)

    def close(self) -> None:
        """Shut the connection down (a blocked ``recv`` returns) and close it."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class TlsWire(PlainWire):
    """TLS in memory over a TCP socket; safe for one sending and one receiving thread.

    The handshake runs in the constructor.

    Raises:
        ssl.SSLError: the handshake failed (an untrusted certificate, a wrong host name…).
        OSError: the connection failed during the handshake.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._lock = threading.Lock()  # guards the SSLObject and both BIOs
        self._send_lock = threading.Lock()  # keeps ciphertext in the order it was produced
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(_CHUNK)
                if not data:
                    raise ConnectionResetError(
                        "connection closed during the TLS handshake"
                    ) from None
                self._incoming.write(data)
        self._flush()

    def selected_alpn_protocol(self) -> str | None:
        """The protocol the server chose with ALPN (``"h2"`` for gRPC)."""
        return self._tls.selected_alpn_protocol()

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._outgoing.read()
            if data:
                self._sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        """Encrypt and send every byte.

        Raises:
            OSError: the connection failed.
        """
        with self._send_lock:
            with self._lock:
                view = memoryview(data)
                while view:
                    written = self._tls.write(view)
                    view = view[written:]
                ciphertext = self._outgoing.read()
            self._sock.sendall(ciphertext)

    def recv(self) -> bytes:
        """The next decrypted bytes; ``b""`` when the peer closed the connection.

        Raises:
            OSError: the connection failed (``ssl.SSLError`` for a TLS failure).
        """
        while True:
            with self._lock:
                try:
                    plaintext = self._tls.read(_CHUNK)
                except ssl.SSLWantReadError:
                    plaintext = None
                except ssl.SSLZeroReturnError:
                    return b""
                pending = self._outgoing.pending
            if pending:  # e.g. an answer to a TLS 1.3 key update
                self._flush()
            if plaintext:
                return plaintext
            data = self._sock.recv(_CHUNK)
            if not data:
                return b""
            with self._lock:
                self._incoming.write(data)


Wire = PlainWire
"""Either transport (TlsWire is a PlainWire)."""
