"""Peer replicas of tier 1: node i's checkpoint files also live on node (i + 1) mod N.

A replaced host (HyperPod, EKS, Slurm, an elastic restart) loses its node-local checkpoints while
its peers keep theirs; without a replica every replaced host re-downloads from S3 at once. Here:

* each node's ``llm-runtime launch`` runs a :class:`ReplicaServer`: HTTP on the host's own address
  (the job's network), holding its peers' files under ``<local run dir>/replicas/node-K/step-N/``,
  refusing a file its disk cannot take (507, ``checkpoint.replica_min_free_mb``) and pruning
  each peer's steps by ``checkpoint.keep``, as tier 1 is pruned;
* after node i's commit, its agent pushes the node's files to node (i + 1) mod N in the
  background, under ``checkpoint.upload_timeout_s`` (:func:`push`);
* where things are is recorded in objects of their own in the run's store:
  ``replicas/servers/node-K.json`` (node K's server now) and ``replicas/node-I.json`` (which node
  holds node I's files, and which steps);
* a restoring rank takes a file it does not have from the node that wrote it (which serves its
  own committed tier 1), else from the node that holds that node's replica, checked against the
  manifest's sha256 (:func:`peer_fetch`); only what neither has comes from S3. A replaced host
  so restores from its peer, and no node reads another node's files from S3 while they live.
"""
from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import logging
import os
import secrets
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .layout import MANIFEST, Manifest, NodeObject, Member, retention, step_dir

__all__ = ["ReplicaServer", "holder_of", "peer_fetch", "push", "server_record", "replica_record"]

log = logging.getLogger(__name__)
COMPLETE = ".complete"
RESERVE = ".reserve"
REQUEST_TIMEOUT_S = 60.0


def holder_of(node: int, num_nodes: int) -> int:
    """The node that holds node ``node``'s replica (pure)."""
    return (node + 1) % num_nodes


def server_record(node: int) -> str:
    return f"replicas/servers/node-{node:05d}.json"


def replica_record(node: int) -> str:
    return f"replicas/node-{node:05d}.json"


def _safe(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - no stderr line per request
        pass

    def _target(self) -> tuple[Path, str] | None:
        """(the step directory, the member name) of ``/r/<node>/<step>/<name>``; None: refused."""
        path = self.path.split("?")[0]
        if not path.startswith(f"/{self.server.token}/"):  # the token is in the job's store, not guessable
            self.send_error(403, "not this job's replica server")
            return None
        parts = path[len(self.server.token) + 2:].split("/", 3)
        if len(parts) != 4 or parts[0] != "r" or not (parts[1].isdigit() and parts[2].isdigit()) \
                or not _safe(parts[3]):
            self.send_error(400, "expected /r/<node>/<step>/<name>")
            return None
        node, step = int(parts[1]), int(parts[2])
        if node == self.server.own_node and self.command == "GET":  # this node's own tier 1
            return self.server.own_dir / step_dir(step), parts[3]
        return self.server.root / f"node-{node:05d}" / step_dir(step), parts[3]

    def do_PUT(self):  # noqa: N802 - http.server's names
        target = self._target()
        if target is None:
            return
        directory, name = target
        length = int(self.headers.get("Content-Length", "0"))
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if free - length < self.server.min_free:
            self.send_error(507, f"{free >> 20} MB free, {length >> 20} MB offered, "
                                 f"{self.server.min_free >> 20} MB kept free (checkpoint.replica_min_free_mb)")
            return
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as sink:
            left = length
            while left:
                block = self.rfile.read(min(left, 1 << 20))
                if not block:
                    break
                sink.write(block)
                left -= len(block)
        if left:
            tmp.unlink(missing_ok=True)
            self.send_error(400, "the body broke off")
            return
        os.replace(tmp, path)
        self._reply(204)

    def do_POST(self):  # noqa: N802 - ``.reserve`` (room for the step's files?) and ``.complete`` (all in)
        target = self._target()
        if target is None:
            return
        directory, name = target
        if name == RESERVE:  # asked before any byte is sent: a refusal costs the sender nothing
            directory.parent.mkdir(parents=True, exist_ok=True)
            wanted, free = int(self.headers.get("X-Replica-Bytes", "0")), shutil.disk_usage(directory.parent).free
            if free - wanted - self.server.own_latest_bytes() < self.server.min_free:  # its own next save first
                self.send_error(507, f"{free >> 20} MB free, {wanted >> 20} MB offered, "
                                     f"{self.server.min_free >> 20} MB kept free (checkpoint.replica_min_free_mb) "
                                     "beside room for this node's own next save")
            else:
                self._reply(204)
            return
        if name != COMPLETE or not directory.is_dir():
            self.send_error(400, "POST only /r/<node>/<step>/.complete, after the files")
            return
        (directory / COMPLETE).write_text(f"{time.time()}\n")
        self.server.prune(directory.parent)
        self._reply(204)

    def do_GET(self):  # noqa: N802
        target = self._target()
        if target is None:
            return
        directory, name = target
        path = directory / name
        done = MANIFEST if directory.parent == self.server.own_dir else COMPLETE  # committed / all in
        if not (directory / done).exists() or not path.is_file():
            self.send_error(404, "no complete copy of that file here")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with open(path, "rb") as source:
            shutil.copyfileobj(source, self.wfile, 1 << 20)

    def _reply(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    min_free: int
    keep: int
    own_node: int
    own_dir: Path
    token: str

    def own_latest_bytes(self) -> int:
        """The size of this node's newest step directory: room its own next save needs."""
        steps = sorted(self.own_dir.glob("step-*")) if self.own_dir.is_dir() else []
        return sum(p.stat().st_size for p in steps[-1].rglob("*") if p.is_file()) if steps else 0

    def server_bind(self):  # HTTPServer's own looks the address up in DNS
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = self.server_address[:2]

    def prune(self, node_dir: Path) -> None:
        """A peer's complete steps beyond ``checkpoint.keep`` go, as its tier 1 does."""
        steps = {}
        for child in node_dir.iterdir():
            if child.name.startswith("step-") and child.name[5:].isdigit():
                steps[int(child.name[5:])] = (child / COMPLETE).exists()
        for old in retention([s for s, ok in steps.items() if ok], list(steps), self.keep):
            shutil.rmtree(node_dir / step_dir(old), ignore_errors=True)


class ReplicaServer:
    """On ``address`` (the host's own), a free port: this host's holder of its peer's files, which
    also serves its own node's committed tier-1 files (``own_node``, ``own_dir``) to the other nodes."""

    def __init__(self, root: Path, address: str, *, keep: int, min_free_mb: int, own_node: int = -1,
                 own_dir: Path | None = None):
        self._server = _Server((address, 0), _Handler)
        self._server.root, self._server.keep, self._server.min_free = Path(root), keep, min_free_mb << 20
        self._server.own_node, self._server.own_dir = own_node, Path(own_dir) if own_dir else Path("/nonexistent")
        self._server.token = secrets.token_hex(16)
        self.address = f"{address}:{self._server.server_address[1]}"
        self.url = f"http://{self.address}/{self._server.token}"
        """With the job's token: only what can read the run's store (the record) can use it."""
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="checkpoint-replica-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _request(method: str, url: str, body=None, length: int = 0):
    request = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        request.add_header("Content-Length", str(length))
    return urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S)  # noqa: S310 - the job's own hosts


def push(directory: Path, manifest: Manifest, node: int, holder_url: str, deadline: float) -> bool:
    """PUT node ``node``'s files of ``manifest``'s step to the holder, then mark them complete.
    False (logged) when the holder refuses, fails or the deadline passes: the S3 copy stands."""
    obj = next(o for o in manifest.objects if o.node == node)
    base = f"{holder_url}/r/{node}/{manifest.step}"
    try:
        request = urllib.request.Request(f"{base}/{RESERVE}", data=b"", method="POST",
                                         headers={"X-Replica-Bytes": str(sum(m.size for m in obj.members))})
        urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S).close()  # noqa: S310 - the job's own hosts
        for member in obj.members:
            if time.monotonic() > deadline:
                raise TimeoutError("the replica did not finish within checkpoint.upload_timeout_s")
            with open(directory / member.name, "rb") as source:
                _request("PUT", f"{base}/{member.name}", source, member.size).close()
        _request("POST", f"{base}/{COMPLETE}", b"", 0).close()
        return True
    except urllib.error.HTTPError as err:
        reason = "refused: the peer's disk is short" if err.code == 507 else f"HTTP {err.code}"
        log.warning("checkpoint step %d: node %d's replica on its peer %s (%s); the S3 copy stands", manifest.step,
                    node, reason, err.reason)
    except (OSError, TimeoutError, http.client.HTTPException) as err:
        log.warning("checkpoint step %d: node %d's replica on its peer failed (%s); the S3 copy stands",
                    manifest.step, node, type(err).__name__ if isinstance(err, urllib.error.URLError) else err)
    return False


_SERVERS: dict[tuple[str, int], str] = {}
"""(store, node) -> that node's server URL (or ""), read once per process from its record."""


def _server_url(store, node: int) -> str:
    key = (store.url(), node)
    if key not in _SERVERS:
        try:
            _SERVERS[key] = json.loads(store.read_text(server_record(node)) or "{}").get("url", "")
        except (OSError, ValueError):
            _SERVERS[key] = ""
    return _SERVERS[key]


def peer_fetch(manifest: Manifest, obj: NodeObject, member: Member, dest: Path, store) -> bool:
    """Member ``member`` of node ``obj.node``'s files, from that node's own server (its tier 1), else
    from the server of the node that holds its replica, each checked against the manifest's
    sha256; False when neither has it (the caller reads S3)."""
    tried = []
    for node in dict.fromkeys((obj.node, holder_of(obj.node, manifest.num_nodes))):
        url = _server_url(store, node)
        if not url:
            continue
        try:
            _fetch(f"{url}/r/{obj.node}/{manifest.step}/{member.name}", dest, member.sha256)
            return True
        except urllib.error.HTTPError as err:  # the server is there; it does not have this file
            tried.append(f"node {node}: HTTP {err.code}")
        except (OSError, ValueError, http.client.HTTPException) as err:
            tried.append(f"node {node}: {err if isinstance(err, ValueError) else type(err).__name__}")
            if isinstance(err, (urllib.error.URLError, TimeoutError)):  # gone (a replaced host, an old
                _SERVERS[(store.url(), node)] = ""  # attempt's port): not asked again by this process
    if tried:
        log.info("checkpoint step %d: %s is on no peer (%s); reading it from the store", manifest.step, member.name,
                 "; ".join(tried))
    return False


def _fetch(url: str, path: Path, sha256: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.peer.tmp")
    digest = hashlib.sha256()
    try:
        with _request("GET", url) as response, open(tmp, "wb") as sink:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                sink.write(block)
        if digest.hexdigest() != sha256:
            raise ValueError(f"{path.name} does not match its sha256 in the manifest")  # (no URL: its token)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
