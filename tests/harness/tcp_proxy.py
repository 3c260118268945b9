"""A loopback TCP proxy that a test can cut and restore, to take a broker away from one process.

The shared RabbitMQ and Redis serve every engineer's tests, so a broker outage is simulated
between one process and its broker instead of by stopping the broker. `cut()` closes every
proxied connection at once and then either refuses new ones (accept, then close at once) or
blackholes them (accept, never answer: the client's own timeouts must fire). `restore()`
forwards again. Everything is bounded: a connection cap, fixed buffers, daemon threads joined
on `close()`.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

#: Default ports of the broker schemes recalq accepts.
_DEFAULT_PORTS = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int


def broker_address(url: str) -> Address:
    """The TCP address a broker URL points at (amqp:// or redis://)."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"cannot proxy a {parts.scheme!r} broker URL; use amqp:// or redis://")
    return Address(parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[parts.scheme])


def with_address(url: str, address: Address) -> str:
    """The same URL (credentials, vhost, database, query) pointed at another host and port."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@" if userinfo else ""
    netloc += f"{address.host}:{address.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class TcpProxy:
    def __init__(self, upstream: Address, max_connections: int = 64, buffer_size: int = 65536) -> None:
        if not ipaddress.ip_address(socket.gethostbyname(upstream.host)).is_loopback:
            raise ValueError(f"the test proxy only forwards to loopback, not {upstream.host}")
        self.upstream = upstream
        self._max_connections = max_connections
        self._buffer_size = buffer_size
        self._lock = threading.Lock()
        self._mode = "forward"  # or "refuse" or "blackhole"
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = Address("127.0.0.1", self._listener.getsockname()[1])
        #: Connections accepted in each mode, so a test can see its client kept trying.
        self.accepted = {"forward": 0, "refuse": 0, "blackhole": 0}
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True)
        self._acceptor.start()

    def url_for(self, url: str) -> str:
        """`url` rewritten to go through this proxy."""
        if broker_address(url) != self.upstream:
            raise ValueError(f"{url} does not point at this proxy's upstream {self.upstream}")
        return with_address(url, self.address)

    # -- control -------------------------------------------------------------------------
    def cut(self, blackhole: bool = False) -> None:
        """Drops every live connection; new ones are refused, or accepted and never answered."""
        with self._lock:
            self._mode = "blackhole" if blackhole else "refuse"
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            _close(sock)

    def restore(self) -> None:
        """Forwards new connections again; blackholed ones are closed so their clients reconnect."""
        with self._lock:
            held = list(self._sockets) if self._mode == "blackhole" else []
            self._sockets.difference_update(held)
            self._mode = "forward"
        for sock in held:
            _close(sock)

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(5)
        _close(self._listener)
        with self._lock:
            doomed = list(self._sockets)
            self._sockets.clear()
        for sock in doomed:
            _close(sock)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- forwarding ----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                mode = self._mode
                self.accepted[mode] += 1
                full = len(self._sockets) >= 2 * self._max_connections
                if mode == "blackhole" and not full:
                    self._sockets.add(client)  # held open, never read: closed on restore/close
                    continue
            if mode != "forward" or full:
                _close(client)
                continue
            try:
                server = socket.create_connection((self.upstream.host, self.upstream.port), timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._mode != "forward":  # cut while we were connecting
                    _close(client)
                    _close(server)
                    continue
                self._sockets.update((client, server))
                self._threads = [t for t in self._threads if t.is_alive()]
                for source, sink in ((client, server), (server, client)):
                    thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True,
                                              name="tcp-proxy-pump")
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(self._buffer_size)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
