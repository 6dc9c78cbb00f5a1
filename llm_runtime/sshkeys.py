"""ssh for ``--mpi`` jobs, with keys made when the job starts: nothing is baked into an image.

Each host makes, in a private directory, an ed25519 host key and an ed25519 client key pair, and
publishes the two public keys (never a private one) in the job's own store: the TCPStore on the
first host that also carries mpirun's exit status (MASTER_PORT + 1). Once every host's keys are
in, each host writes ``authorized_keys`` (every host's client key) and ``known_hosts`` (every
host's name and address with its host key, so the client checks host keys strictly), and starts
sshd on its own address only (hosts that share one network namespace, as containers on a shared
loopback do, each get their own port 22). mpirun, on the first host, uses the job's client key and
known_hosts (``OMPI_MCA_plm_rsh_args``) and launches every remote daemon itself (no tree spawn: only
the first host holds a private key the others accept).

Pure: :func:`known_hosts`, :func:`authorized_keys`, :func:`sshd_argv`, :func:`rsh_env`; the rest
runs ssh-keygen and sshd and talks to the store, each wait bounded.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

__all__ = ["JobSsh", "SshSetupError", "authorized_keys", "known_hosts", "rsh_env", "setup", "sshd_argv"]


class SshSetupError(RuntimeError):
    """The job's ssh could not be set up; the message names the host or the tool."""


def known_hosts(hosts: Mapping[str, tuple[str, str]]) -> str:
    """``name,address key`` lines from host -> (address, host public key)."""
    return "".join(f"{name},{address} {key.strip()}\n" for name, (address, key) in sorted(hosts.items()))


def authorized_keys(clients: Iterable[str]) -> str:
    return "".join(f"{key.strip()}\n" for key in sorted(set(clients)))


def sshd_argv(sshd: str, directory: Path, address: str) -> list[str]:
    """sshd in the foreground on ``address``:22 only, with the job's host key and authorized keys."""
    options = {"ListenAddress": address, "AuthorizedKeysFile": str(directory / "authorized_keys"),
               "PidFile": str(directory / "sshd.pid"), "PasswordAuthentication": "no",
               "KbdInteractiveAuthentication": "no", "PermitRootLogin": "prohibit-password", "UsePAM": "no"}
    return [sshd, "-D", "-h", str(directory / "host_key"), *[f"-o{k}={v}" for k, v in options.items()]]


def rsh_env(directory: Path) -> dict[str, str]:
    """What mpirun needs to reach the hosts with the job's client key, checking their host keys."""
    args = ["-i", str(directory / "client_key"), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={directory / 'known_hosts'}", "-o", "BatchMode=yes"]
    return {"OMPI_MCA_plm_rsh_args": shlex.join(args), "OMPI_MCA_plm_rsh_no_tree_spawn": "1"}


class JobSsh:
    """This host's job keys (in a private directory) and, once started, its sshd."""

    def __init__(self, directory: Path, sshd: subprocess.Popen | None = None):
        self.directory, self.sshd = directory, sshd

    def stop(self) -> None:
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _keygen(path: Path, comment: str) -> str:
    if shutil.which("ssh-keygen") is None:
        raise SshSetupError("ssh-keygen is not installed: --mpi needs openssh-client and openssh-server")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   capture_output=True, timeout=60)
    return Path(f"{path}.pub").read_text().strip()


def setup(store, me: str, hosts: Sequence[str], timeout_s: float, *, start_sshd: bool = True) -> JobSsh:
    """Make this host's keys, exchange the public ones through ``store``, write authorized_keys and
    known_hosts, and start sshd on this host's own address. Bounded by ``timeout_s``."""
    home = Path.home() / ".ssh"  # sshd's StrictModes: no group- or world-writable directory (/tmp) on the path
    home.mkdir(mode=0o700, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="llm-runtime-job-", dir=home))
    job = JobSsh(directory)
    try:
        host_key = _keygen(directory / "host_key", f"llm-runtime host {me}")
        client_key = _keygen(directory / "client_key", f"llm-runtime job client {me}")
        address = socket.gethostbyname(me)
        store.set(f"ssh/host/{me}", json.dumps([address, host_key]))
        store.set(f"ssh/client/{me}", client_key)
        wanted = [f"ssh/{kind}/{host}" for host in hosts for kind in ("host", "client")]
        try:
            store.wait(wanted, timedelta(seconds=timeout_s))
        except (RuntimeError, OSError):
            missing = sorted({key.split("/")[2] for key in wanted if not store.check([key])})
            raise SshSetupError(f"host {me}: the ssh keys of {', '.join(missing)} did not arrive within "
                                f"{timeout_s:.0f}s") from None
        peers = {host: tuple(json.loads(store.get(f"ssh/host/{host}"))) for host in hosts}
        (directory / "known_hosts").write_text(known_hosts(peers))
        (directory / "authorized_keys").write_text(authorized_keys(store.get(f"ssh/client/{h}").decode() for h in hosts))
        if start_sshd:
            job.sshd = _start_sshd(directory, address, me)
    except BaseException:
        job.stop()
        raise
    return job


def _start_sshd(directory: Path, address: str, me: str) -> subprocess.Popen:
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None:
        raise SshSetupError(f"host {me}: sshd is not installed; mpirun cannot reach this host over ssh")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    log = open(directory / "sshd.log", "w")
    return subprocess.Popen(sshd_argv(sshd, directory, address), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
