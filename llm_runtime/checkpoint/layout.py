"""Checkpoint names, the manifest and the policies (cadence, retention, resume order): pure.

A checkpoint of step ``n`` of run ``R`` under ``URI`` is

    URI/R/s<k>/step-<n:09d>/node-<i:05d>-<t>.tar   one tar per node (k = i mod prefix_spread, t: the save)
    URI/R/step-<n:09d>/manifest.json           written last, by rank 0, after every node's upload

and exists only once its manifest does. The spread prefix comes first, so every checkpoint's
tars land in the same ``prefix_spread`` prefixes, which S3 keeps partitioned (a ``step-N/sK/``
layout opened a new, unsplit prefix at every step; benchmarks/s3_scale.py). Checkpoints written
with that older layout still read: their manifests name their keys. The manifest lists every object with its size and
sha256, and every member of each node tar with its offset, size and sha256, so one member
can be fetched with one ranged GET and verified before anything reads it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

__all__ = ["MANIFEST", "Manifest", "ManifestError", "Member", "NodeObject", "ResumeTarget", "due", "parse_resume", "resume_order", "run_id_for",
           "step_dir", "step_of_key", "steps_in", "node_key", "retention", "parse_step_dir"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP = re.compile(r"^step-(\d{9})$")
_SPREAD = re.compile(r"^s\d{2,}$")
_NAME = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")


class ManifestError(ValueError):
    """A manifest that cannot be trusted; the message names it and the field."""


def run_id_for(uri: str, explicit: str = "") -> str:
    """``checkpoint.run_id``, or one derived from the URI: stable across resubmissions, never a time."""
    if explicit:
        if not re.match(r"^[A-Za-z0-9._\-]{1,128}$", explicit) or explicit in (".", ".."):
            raise ValueError(f"checkpoint.run_id={explicit!r}: use letters, digits, '.', '_' and '-' only")
        return explicit
    return "run-" + hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    match = _STEP.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ResumeTarget:
    """The one checkpoint ``checkpoint.resume=<base>/<run_id>/step-NNNNNNNNN`` names."""

    base: str
    run_id: str
    step: int

    @property
    def step_name(self) -> str:
        return step_dir(self.step)


def parse_resume(resume: str) -> ResumeTarget | None:
    """``checkpoint.resume``: None for ``auto`` / ``never``, else the checkpoint it names (ValueError if none)."""
    if resume in ("auto", "never"):
        return None
    parts = resume.rstrip("/").rsplit("/", 2)
    step = parse_step_dir(parts[-1])
    if step is None or len(parts) < 3 or not parts[0] or not parts[1]:
        raise ValueError(f"checkpoint.resume={resume!r}: use auto, never, or the URI of one checkpoint "
                         "(.../<run_id>/step-NNNNNNNNN)")
    return ResumeTarget(parts[0], parts[1], step)


def node_key(step: int, node: int, spread: int, token: str = "") -> str:
    """The node object's key relative to the run: spread over ``spread`` prefixes. ``token`` names
    the save, so a step saved again never overwrites the objects its committed manifest lists."""
    suffix = f"-{token}" if token else ""
    return f"s{node % max(1, spread):02d}/{step_dir(step)}/node-{node:05d}{suffix}.tar"


def step_of_key(key: str) -> int | None:
    """The step an object key (relative to the run) belongs to: ``step-N/...`` or ``sK/step-N/...``."""
    parts = key.split("/")
    if len(parts) > 2 and _SPREAD.match(parts[0]):
        return parse_step_dir(parts[1])
    return parse_step_dir(parts[0])


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class NodeObject:
    key: str
    """Relative to the run: ``sK/step-N/node-I-T.tar`` (``step-N/sK/...`` before the spread came first)."""
    node: int
    size: int
    sha256: str
    """The whole object's sha256 (objects written before 2026-12-02; "" since: see ``tree_sha256``)."""
    members: tuple[Member, ...]
    tree_sha256: str = ""
    """sha256 of the object with each member's data replaced by that member's raw sha256: headers
    and padding are covered as they are, and the data is hashed once, not twice."""

    @classmethod
    def from_json(cls, body: dict) -> "NodeObject":
        return cls(key=body["key"], node=int(body["node"]), size=int(body["size"]), sha256=str(body["sha256"]),
                   members=tuple(Member(**m) for m in body["members"]),
                   tree_sha256=str(body.get("tree_sha256", "")))


@dataclass
class Manifest:
    run_id: str
    step: int
    world_size: int
    num_nodes: int
    backend: str
    objects: list[NodeObject] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    """JSON facts for people and checks: the resolved config, the layout."""
    format_version: int = FORMAT_VERSION

    def member(self, name: str) -> tuple[NodeObject, Member]:
        for obj in self.objects:
            for member in obj.members:
                if member.name == name:
                    return obj, member
        raise KeyError(name)

    def member_names(self) -> list[str]:
        return [m.name for obj in self.objects for m in obj.members]

    def total_bytes(self) -> int:
        return sum(obj.size for obj in self.objects)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str, source: str) -> "Manifest":
        """Parse and check: keys stay under this step's prefix, names are plain relative paths."""
        try:
            body = json.loads(text)
            if body.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {body.get('format_version')!r}, this reader knows {FORMAT_VERSION}")
            objects = [NodeObject.from_json(o) for o in body["objects"]]
            manifest = cls(run_id=str(body["run_id"]), step=int(body["step"]), world_size=int(body["world_size"]),
                           num_nodes=int(body["num_nodes"]), backend=str(body["backend"]), objects=objects,
                           extra=dict(body.get("extra") or {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise ManifestError(f"{source} is not a valid checkpoint manifest: {err}") from None
        prefix = step_dir(manifest.step) + "/"
        names = set()
        try:
            for obj in manifest.objects:
                if step_of_key(obj.key) != manifest.step or not _plain(obj.key):
                    raise ManifestError(f"{source}: object key {obj.key!r} is not under {prefix} or sK/{prefix}")
                for member in obj.members:
                    if not _plain(member.name):
                        raise ManifestError(f"{source}: member name {member.name!r} is not a plain relative path")
                    if member.offset < 0 or member.size < 0 or member.offset + member.size > obj.size:
                        raise ManifestError(f"{source}: member {member.name} lies outside {obj.key}")
                    if member.name in names:
                        raise ManifestError(f"{source}: member {member.name} is listed twice")
                    names.add(member.name)
        except TypeError as err:
            raise ManifestError(f"{source} is not a valid checkpoint manifest: {err}") from None
        return manifest


def _plain(name: str) -> bool:
    """A relative path of plain characters with no empty, '.' or '..' part (it cannot leave its directory)."""
    return isinstance(name, str) and bool(_NAME.match(name)) and all(p not in ("", ".", "..") for p in name.split("/"))


def due(step: int, last_step: int, *, every_steps: int, every_minutes: float, minutes_since_save: float,
        at_end: bool) -> bool:
    """Whether to save after ``step`` (of ``last_step``)."""
    if step == last_step and at_end:
        return True
    if every_steps and step % every_steps == 0:
        return True
    return bool(every_minutes) and minutes_since_save >= every_minutes


def retention(complete: list[int], present: list[int], keep: int, current: int | None = None,
              abandon_later: bool = False) -> list[int]:
    """Steps to delete after ``current`` (default: the newest complete) was saved: all but the newest
    ``keep`` complete ones up to it and incomplete ones older than it. Never ``current`` itself,
    and never a step after it (a fallback left the newer ones; they may be fine) unless
    ``abandon_later``: the user named the checkpoint to continue from (``checkpoint.resume``)."""
    if not complete:
        return []
    current = max(complete) if current is None else current
    kept = set(sorted(s for s in complete if s <= current)[-max(1, keep):]) | {current}
    return sorted(s for s in set(present) | set(complete)
                  if s not in kept and (s < current or abandon_later))


def steps_in(keys) -> dict[int, bool]:
    """Object keys relative to a run -> every step that has objects -> whether its manifest is one."""
    found: dict[int, bool] = {}
    for key in keys:
        step = step_of_key(key)
        if step is not None:
            found[step] = found.get(step, False) or key == f"{step_dir(step)}/{MANIFEST}"
    return found


def resume_order(complete: list[int], not_after: int | None = None) -> list[int]:
    """Checkpoints to try, newest first (a corrupt one falls back to the next)."""
    return sorted((s for s in complete if not_after is None or s <= not_after), reverse=True)
