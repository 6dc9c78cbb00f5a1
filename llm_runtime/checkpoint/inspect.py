"""``llm-runtime checkpoints list URI`` and ``checkpoints verify URI [--step N]``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..storage import StorageError, open_store
from .commit import store_steps
from .layout import MANIFEST, Manifest, ManifestError, run_id_for, step_dir
from .transfer import verify_object

__all__ = ["main"]


def _store(uri: str, run_id: str):
    if not uri:
        raise ValueError("a checkpoint URI (s3://bucket/prefix or a directory) is required")
    return open_store(uri).child(run_id_for(uri, run_id))


def _list(store) -> int:
    steps = store_steps(store)
    if not steps:
        print(f"no checkpoints under {store.uri}")
        return 0
    print(f"{'step':>10}  {'state':<10} {'objects':>7} {'bytes':>14}  world")
    for step in sorted(steps):
        if not steps[step]:
            print(f"{step:>10}  {'incomplete':<10} {'-':>7} {'-':>14}  -   (no manifest: never used)")
            continue
        try:
            manifest = Manifest.parse(store.read_text(f"{step_dir(step)}/{MANIFEST}") or "", f"step {step}")
        except ManifestError as err:
            print(f"{step:>10}  {'invalid':<10} {'-':>7} {'-':>14}  -   ({err})")
            continue
        print(f"{step:>10}  {'complete':<10} {2 * len(manifest.objects):>7} {manifest.total_bytes():>14}  "
              f"{manifest.world_size} ranks on {manifest.num_nodes} node(s), {manifest.backend}")
    return 0


def _verify(store, step: int | None) -> int:
    complete = sorted(s for s, ok in store_steps(store).items() if ok)
    if not complete:
        print(f"no complete checkpoint under {store.uri}", file=sys.stderr)
        return 1
    targets = [step] if step is not None else complete
    bad = 0
    for target in targets:
        text = store.read_text(f"{step_dir(target)}/{MANIFEST}")
        if text is None:
            print(f"step {target}: no manifest (incomplete or absent)", file=sys.stderr)
            bad += 1
            continue
        try:
            manifest = Manifest.parse(text, f"step {target}")
        except ManifestError as err:
            print(f"step {target}: {err}", file=sys.stderr)
            bad += 1
            continue
        problems = []
        for obj in manifest.objects:  # streamed and hashed block by block: memory stays one block
            try:
                problems += verify_object(store, obj)
            except StorageError as err:
                problems.append(str(err))
        for problem in problems:
            print(f"step {target}: {problem}", file=sys.stderr)
        bad += bool(problems)
        if not problems:
            print(f"step {target}: ok ({len(manifest.objects)} objects, {manifest.total_bytes()} bytes verified)")
    return 1 if bad else 0


def main(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-runtime checkpoints")
    sub = parser.add_subparsers(dest="action", required=True)
    for name in ("list", "verify"):
        cmd = sub.add_parser(name)
        cmd.add_argument("uri", help="checkpoint.uri of the job (s3://bucket/prefix or a directory)")
        cmd.add_argument("--run-id", default="", help="checkpoint.run_id (default: derived from the URI)")
        if name == "verify":
            cmd.add_argument("--step", type=int, default=None, help="one step (default: every complete one)")
    ns = parser.parse_args(args)
    store = _store(ns.uri, ns.run_id)
    if ns.action == "list":
        return _list(store)
    return _verify(store, ns.step)
