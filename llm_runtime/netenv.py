"""EFA / NCCL / TORCH_NCCL environment-variable policy.

:func:`plan` decides (pure) which variables a job should run with, each with the
reason that chose it; :func:`resolve` and :func:`conflicts` compare that plan with
what the user already exported; :func:`apply` is the one edge that writes an
environment and never overwrites a user's value. :func:`probe_fabric` is the edge
that looks at the host (``/sys``, ``fi_info``, the aws-ofi-nccl install).

``RDMAV_FORK_SAFE`` is deliberately never set: with a modern kernel, rdma-core
(>= 35) and libfabric's efa provider already cope with fork(); forcing rdma-core's
fork-safe mode makes every memory registration pay for extra ``madvise`` calls.
"""
from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, fields, replace
from typing import Any

from llm_runtime.cluster.base import ClusterInfo

__all__ = [
    "EnvEntry", "EnvPlan", "Fabric", "Resolved", "apply", "coerce_overrides", "config_overrides", "conflicts",
    "format_table", "instance_family", "mpi_exports", "notes", "ofi_nccl_version_from_name",
    "parse_fi_info_version", "parse_version", "plan", "probe_fabric", "rdma_capable",
    "resolve", "verify_planned", "versions_new_enough",
]

log = logging.getLogger(__name__)

#: Instance families whose EFA supports device RDMA (GPUDirect / Neuron direct).
RDMA_FAMILIES = frozenset({"p4d", "p4de", "p5", "p5e", "p5en", "p6", "trn1", "trn1n", "trn2"})
#: From these versions on, aws-ofi-nccl picks the protocol and enables RDMA itself.
MIN_OFI_NCCL = (1, 7)
MIN_LIBFABRIC = (1, 18)
#: Variables shown by :func:`resolve` even when the plan does not set them.
USER_PREFIXES = ("NCCL_", "FI_", "TORCH_NCCL_", "RDMAV_")
SUBPROCESS_TIMEOUT_S = 5.0
FI_INFO_FALLBACK = "/opt/amazon/efa/bin/fi_info"
OFI_NCCL_GLOBS = (
    "opt/amazon/ofi-nccl/lib*/libnccl-net*.so*",
    "opt/aws-ofi-nccl/lib*/libnccl-net*.so*",
    "usr/local/aws-ofi-nccl/lib*/libnccl-net*.so*",
)
VERSION_FILES = ("VERSION", "version", "version.txt")


@dataclass(frozen=True)
class Fabric:
    """What the host's network fabric offers; ``None`` versions are unknown."""

    efa_devices: int = 0
    efa_provider: bool = False
    libfabric_version: str | None = None
    ofi_nccl_version: str | None = None
    nccl_version: str | None = None
    gpus: int = 0
    torch_version: str | None = None
    """Installed torch (read from package metadata, never by importing torch)."""

    @property
    def has_efa(self) -> bool:
        return self.efa_devices > 0 or self.efa_provider


@dataclass(frozen=True)
class EnvEntry:
    value: str
    reason: str


EnvPlan = dict[str, EnvEntry]


@dataclass(frozen=True)
class Resolved:
    value: str
    reason: str
    source: str
    """``plan`` (the runtime sets it) or ``user`` (already in the environment)."""


# ---------------------------------------------------------------- pure helpers

_VERSION_RE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """``"1.22.0amzn4.0"`` -> ``(1, 22, 0)``, ``"v1.7.4-aws"`` -> ``(1, 7, 4)``; junk -> None."""
    if not text:
        return None
    m = _VERSION_RE.match(text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def versions_new_enough(fabric: Fabric) -> bool:
    """True when aws-ofi-nccl >= 1.7 and libfabric >= 1.18 are both known."""
    ofi, lf = parse_version(fabric.ofi_nccl_version), parse_version(fabric.libfabric_version)
    return ofi is not None and lf is not None and ofi >= MIN_OFI_NCCL and lf >= MIN_LIBFABRIC


def instance_family(instance_type: str | None) -> str | None:
    """``"ml.p4d.24xlarge"`` -> ``"p4d"``; None or empty -> None."""
    if not instance_type:
        return None
    name = instance_type.strip().lower()
    name = name[3:] if name.startswith("ml.") else name
    return name.split(".", 1)[0] or None


def rdma_capable(instance_type: str | None) -> bool:
    """True for instance types whose EFA supports device RDMA (``ml.`` prefix allowed)."""
    return instance_family(instance_type) in RDMA_FAMILIES


NCCL_DEBUG_FILE = "/tmp/llm-runtime-nccl.%h.%p.log"


def verify_planned(mode: str, environ: Mapping[str, str]) -> bool:
    """Plan NCCL_DEBUG(_FILE) for the EFA check only when the user chose neither: their own NCCL
    logging stays where they sent it (the check then reads NCCL_DEBUG_FILE if they set one)."""
    return mode != "off" and "NCCL_DEBUG" not in environ and "NCCL_DEBUG_FILE" not in environ


def plan(info: ClusterInfo, fabric: Fabric, *, timeout_dump: bool = True, verify_efa: bool = True) -> EnvPlan:
    """The variables this job should run with, each with the rule that chose it."""
    out: EnvPlan = {}
    if info.network_interface:
        out["NCCL_SOCKET_IFNAME"] = EnvEntry(
            info.network_interface,
            "interface from resourceconfig network_interface_name / cluster detection")
        # The container's own hostname may resolve to a Docker bridge, not the cluster network.
        out["GLOO_SOCKET_IFNAME"] = EnvEntry(
            info.network_interface,
            "CPU (gloo) groups on the cluster interface too, not whatever the hostname resolves to")
    out["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = EnvEntry(
        "1", "a failed or hung collective aborts the communicator and raises instead of hanging")
    if timeout_dump:
        out["TORCH_NCCL_DUMP_ON_TIMEOUT"] = EnvEntry(
            "1", "flight recorder dumps collective traces when a collective times out")
        # torch 2.7 renamed the buffer variable and warns about the old name.
        renamed = (parse_version(fabric.torch_version) or (0,)) >= (2, 7)
        out["TORCH_FR_BUFFER_SIZE" if renamed else "TORCH_NCCL_TRACE_BUFFER_SIZE"] = EnvEntry(
            "2000", "flight recorder needs a non-zero trace buffer to dump on timeout")
    if not fabric.has_efa:
        return out  # no FI_* at all: NCCL falls back to TCP sockets
    # RDMAV_FORK_SAFE is never planned: see the module docstring.
    out["FI_PROVIDER"] = EnvEntry("efa", "EFA present: libfabric provider efa (SageMaker EFA guide)")
    out["NCCL_LAUNCH_MODE"] = EnvEntry("PARALLEL", "EFA present: NCCL parallel launch mode (AWS EFA guide)")
    out["NCCL_NET_SHARED_COMMS"] = EnvEntry(
        "0", "EFA present: no shared net communicators (aws-ofi-nccl recommendation)")
    if verify_efa:
        out["NCCL_DEBUG"] = EnvEntry("INFO", "EFA present: NCCL's choice of network is verified at start "
                                     "(netenv.verify_efa; off leaves NCCL_DEBUG alone)")
        out["NCCL_DEBUG_SUBSYS"] = EnvEntry("INIT,NET", "only the lines that name the network")
        out["NCCL_DEBUG_FILE"] = EnvEntry(NCCL_DEBUG_FILE, "NCCL's INFO lines go to a file per process, "
                                          "read once at start, not to the job's log")
    if versions_new_enough(fabric):
        return out
    out["NCCL_PROTO"] = EnvEntry(
        "simple", "EFA classic profile (aws-ofi-nccl < 1.7, libfabric < 1.18 or unknown): "
        "only the Simple protocol is safe over EFA")
    if rdma_capable(info.instance_type):
        out["FI_EFA_USE_DEVICE_RDMA"] = EnvEntry(
            "1", f"EFA classic profile on RDMA-capable {instance_family(info.instance_type)}: "
            "enable GPUDirect RDMA")
    return out


def notes(info: ClusterInfo, fabric: Fabric) -> list[str]:
    """Human notes about the chosen profile, printed once per job."""
    out: list[str] = []
    if not info.network_interface:
        out.append("no network interface known: NCCL chooses its own socket interface")
    if not fabric.has_efa:
        out.append("no EFA devices found: FI_* variables not set, NCCL uses TCP sockets")
        return out
    ofi, lf = fabric.ofi_nccl_version, fabric.libfabric_version
    if versions_new_enough(fabric):
        out.append(f"aws-ofi-nccl {ofi} and libfabric {lf}: the plugin picks the protocol "
                   "and enables RDMA itself (NCCL_PROTO, FI_EFA_USE_DEVICE_RDMA not set)")
        return out
    if parse_version(ofi) is None or parse_version(lf) is None:
        unknown = [n for n, v in (("aws-ofi-nccl", ofi), ("libfabric", lf)) if parse_version(v) is None]
        out.append(f"EFA present but {' and '.join(unknown)} version unknown: classic EFA "
                   "profile used (NCCL_PROTO=simple); pin versions with the fabric overrides")
    else:
        out.append(f"aws-ofi-nccl {ofi} / libfabric {lf} older than "
                   "1.7 / 1.18: classic EFA profile used (NCCL_PROTO=simple)")
    if not rdma_capable(info.instance_type):
        out.append(f"instance type {info.instance_type or 'unknown'} is not known to support "
                   "EFA device RDMA: FI_EFA_USE_DEVICE_RDMA not set")
    return out


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def resolve(env_plan: EnvPlan, environ: Mapping[str, str]) -> dict[str, Resolved]:
    """Effective value of every planned variable (plus user-set NCCL_/FI_/... ones); user wins."""
    out: dict[str, Resolved] = {}
    for name, entry in env_plan.items():
        if name not in environ:
            out[name] = Resolved(entry.value, entry.reason, "plan")
        elif _same(environ[name], entry.value):
            out[name] = Resolved(environ[name], "set by the user (same as plan)", "user")
        else:
            out[name] = Resolved(environ[name], f"set by the user; plan suggested {entry.value} "
                                 f"because {entry.reason}", "user")
    for name in sorted(environ):
        if name not in out and name.startswith(USER_PREFIXES):
            out[name] = Resolved(environ[name], "set by the user (not in plan)", "user")
    return out


def conflicts(env_plan: EnvPlan, environ: Mapping[str, str]) -> list[str]:
    """One warning line per variable whose user value contradicts the plan."""
    return [
        f"{name}={environ[name]!r} is set by the user but the plan wants {entry.value!r} "
        f"({entry.reason}); keeping the user's value"
        for name, entry in env_plan.items()
        if name in environ and not _same(environ[name], entry.value)
    ]


def format_table(resolved: Mapping[str, Resolved]) -> str:
    """Aligned text table ``VAR | value | source | reason``."""
    rows = [("VAR", "value", "source", "reason")]
    rows += [(n, r.value, r.source, r.reason) for n, r in resolved.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [" | ".join([*(c.ljust(w) for c, w in zip(row[:3], widths)), row[3]]).rstrip()
             for row in rows]
    lines.insert(1, "-+-".join([*("-" * w for w in widths), "-" * len("reason")]))
    return "\n".join(lines)


def mpi_exports(env_plan: EnvPlan) -> list[str]:
    """Sorted names to pass to ``mpirun -x NAME`` (values come from the applied environment)."""
    return sorted(env_plan)


_INT_FIELDS = {"efa_devices", "gpus"}
_BOOL_FIELDS = {"efa_provider"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def coerce_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Typed Fabric field values from config-style overrides (strings allowed)."""
    names = {f.name for f in fields(Fabric)}
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ValueError(f"fabric override {key!r}: unknown fact, expected one of {sorted(names)}")
        try:
            if key in _INT_FIELDS:
                out[key] = int(value)
            elif key in _BOOL_FIELDS:
                text = str(value).strip().lower()
                if text not in _TRUE | _FALSE:
                    raise ValueError("not a boolean")
                out[key] = text in _TRUE
            else:
                text = None if value is None else str(value).strip()
                out[key] = None if text in (None, "", "none", "None") else text
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fabric override {key}={value!r}: {exc}") from None
    return out


def parse_fi_info_version(output: str) -> str | None:
    """``"fi_info: 1.22.0\\nlibfabric: 1.22.0amzn4.0\\n..."`` -> ``"1.22.0amzn4.0"``."""
    m = re.search(r"^\s*libfabric:\s*(\S+)", output, re.MULTILINE)
    return m.group(1) if m else None


def ofi_nccl_version_from_name(path: str) -> str | None:
    """``libnccl-net.so.1.7.4`` -> ``"1.7.4"``; an all-zero libtool suffix is not a version."""
    m = re.search(r"\.so\.(\d+\.\d+\.\d+)$", path)
    return m.group(1) if m and any(int(p) for p in m.group(1).split(".")) else None


# ---------------------------------------------------------------- edges


def apply(env_plan: EnvPlan, environ: MutableMapping[str, str]) -> list[str]:
    """Set the planned variables missing from ``environ``; warn on conflicts; return names set."""
    for line in conflicts(env_plan, environ):
        log.warning("%s", line)
    added = [name for name in env_plan if name not in environ]
    for name in added:
        environ[name] = env_plan[name].value
    log.debug("set %s", ", ".join(f"{n}={environ[n]}" for n in added) or "nothing")
    return added


def _efa_devices(sys_root: str) -> int:
    base = os.path.join(sys_root, "sys", "class", "infiniband")
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    drivers = (os.path.join(base, n, "device", "driver") for n in names)
    return sum("efa" in n or (os.path.islink(d) and "efa" in os.path.basename(os.path.realpath(d)))
               for n, d in zip(names, drivers))


def _run(run: Callable[..., Any], argv: list[str]) -> str | None:
    """stdout of ``argv`` when it exits 0; None on any failure (missing, timeout, error)."""
    try:
        proc = run(argv, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("%s failed: %s", " ".join(argv), exc)
        return None
    if proc.returncode != 0:
        log.debug("%s exited %s", " ".join(argv), proc.returncode)
        return None
    return proc.stdout or ""


def _ofi_nccl_version(sys_root: str) -> str | None:
    libs = [p for pattern in OFI_NCCL_GLOBS for p in sorted(glob.glob(os.path.join(sys_root, pattern)))]
    for lib in libs:
        if version := ofi_nccl_version_from_name(lib):
            return version
    lib_dirs = dict.fromkeys(os.path.dirname(p) for p in libs)
    for d in dict.fromkeys(x for ld in lib_dirs for x in (ld, os.path.dirname(ld))):
        for fname in VERSION_FILES:
            try:
                with open(os.path.join(d, fname), encoding="utf-8") as fh:
                    text = fh.read().strip()
            except OSError:
                continue
            if parse_version(text):
                return text.split()[0]
    return None


def _torch_cuda_facts() -> dict[str, Any]:
    """NCCL version and GPU count from torch, only if the caller already imported it."""
    torch = sys.modules.get("torch")  # never import torch here: it is slow
    try:
        if torch is None or not torch.cuda.is_available():
            return {}
        return {"nccl_version": ".".join(str(p) for p in torch.cuda.nccl.version()),
                "gpus": int(torch.cuda.device_count())}
    except Exception as exc:  # noqa: BLE001 - a probe never fails the job
        log.debug("torch cuda facts unavailable: %s", exc)
        return {}


def probe_fabric(sys_root: str = "/", run: Callable[..., Any] = subprocess.run,
                 overrides: Mapping[str, Any] | None = None) -> Fabric:
    """Look at the host's fabric; unknown facts stay at their defaults, ``overrides`` win."""
    pinned = coerce_overrides(overrides)
    facts: dict[str, Any] = {}
    if "efa_devices" not in pinned:
        facts["efa_devices"] = _efa_devices(sys_root)
    if not {"efa_provider", "libfabric_version"} <= pinned.keys():
        rooted = os.path.join(sys_root, FI_INFO_FALLBACK.lstrip("/"))
        fi_info = shutil.which("fi_info") or (rooted if os.path.exists(rooted) else "fi_info")
        listing = _run(run, [fi_info, "-p", "efa"])
        facts["efa_provider"] = listing is not None and bool(re.search(r"provider:\s*efa\b", listing))
        version = _run(run, [fi_info, "--version"])
        facts["libfabric_version"] = parse_fi_info_version(version) if version else None
    if "ofi_nccl_version" not in pinned:
        facts["ofi_nccl_version"] = _ofi_nccl_version(sys_root)
    facts.update(_torch_cuda_facts())
    try:
        facts["torch_version"] = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pass
    if "gpus" not in facts:
        try:
            facts["gpus"] = len(os.listdir(os.path.join(sys_root, "proc", "driver", "nvidia", "gpus")))
        except OSError:
            pass
    fabric = replace(Fabric(**facts), **pinned)
    log.debug("probed fabric under %s: %s", sys_root, fabric)
    return fabric


def config_overrides(efa: str = "auto", verify_efa: str = "auto", **versions: str) -> dict[str, Any]:
    """Fabric overrides from the ``[netenv]`` config: ``efa`` on/off/auto (checked by the config) and pinned versions."""
    overrides: dict[str, Any] = {}
    if efa == "off":
        overrides.update(efa_devices=0, efa_provider=False)
    elif efa == "on":
        overrides.update(efa_provider=True)
    overrides.update({key: value for key, value in versions.items() if value})
    return overrides
