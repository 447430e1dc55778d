"""``ckstore pull``: fetch a published checkpoint and install it verified, touching nothing else.

Order, and why:

1. read ``<name>.dvc`` (bounded, no YAML aliases) for the directory object's md5;
2. get the directory object alone: from the local cache if an intact copy is
   there, else straight from the remote, never through ``dvc fetch``, which
   would follow the listing before anyone checked it;
3. check the listing (:func:`ckstore.integrations.dvc.files.parse_dir_object`: 32-hex md5s,
   plain relative paths, no duplicates) and that it is a one-checkpoint ckstore
   directory (plus, optionally, ``model.safetensors`` with the same md5 as the
   checkpoint's: the stable weights path, installed as a hard link). Only then
   does any path get built from it;
4. check the target: no local work in it that this pull would destroy (a
   checkpoint whose manifest the DVC cache does not know, unknown files) and
   its writer lock is free, unless ``force``; the lock stays held until the swap;
5. fetch exactly the listed file objects by md5 (``DataCloud.pull``);
6. copy each file from the cache into a temporary directory next to the target,
   checking DVC's md5 and the manifest's hash at once, then swap it in.

A corrupt object is removed from the local cache (so a later plain ``dvc
checkout`` cannot install it), and only after checking that the path is a
regular file directly inside the cache's two-hex-digit fan-out directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from ...storage import durable as _durable
from .ops import _dvc_call, _dvc_repo, _hash_file, _read_small, _remove
from .publish import (
    _ALIAS_ENTRIES,
    _repo_lock,
    _storage_errors,
    check_remote,
    resolve_repo,
    swap_dir,
)
from .files import DIR_OBJECT_CAP, check_real_dirs, parse_dir_object, parse_dvc_file, read_capped, read_dvc_file, show
from .revision import dvc_file_at, set_dvc_file
from ...errors import DvcError, IntegrityError, InvalidArgumentError, StoreLockedError
from ...format.chunks import ChunkedHash
from ...format.hashing import HashInfo
from ...storage.lock import WriterLock
from ...format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, parse_manifest
from ...storage.layout import CHECKPOINTS_DIR, QUARANTINE_DIR, STEP_DIR
from .weights import WEIGHTS_FILE, link_or_copy

_HEX2 = re.compile(r"[0-9a-f]{2}")


class _Cache:
    """DVC's local object cache, addressed only by checked md5s."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, md5: str) -> str:
        # md5 is checked by the caller (32 hex, optionally ".dir"): the join cannot leave the cache.
        return os.path.join(self.root, md5[:2], md5[2:])

    def has(self, md5: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path(md5)).st_mode)
        except OSError:
            return False

    def drop(self, path: str) -> None:
        """Remove a corrupt object, but only a regular file directly inside ``<cache>/<2 hex>/``."""
        prefix_dir = os.path.dirname(path)
        if os.path.dirname(prefix_dir) != self.root or not _HEX2.fullmatch(os.path.basename(prefix_dir)):
            return  # not a path this class built: never unlink it
        if os.path.realpath(prefix_dir) != os.path.join(os.path.realpath(self.root), os.path.basename(prefix_dir)):
            return  # the fan-out directory is a symlink out of the cache
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                # A corrupt copy in the local cache would be installed by a later plain `dvc checkout`.
                _durable.unlink(path, site="pull_drop_corrupt")

    def store(self, md5: str, data: bytes) -> None:
        """Put a checked directory object into the cache, so DVC's status and checkout find it."""
        here = self.root
        missing = []
        while not os.path.isdir(here):
            missing.append(here)
            here = os.path.dirname(here)
        for path in [*reversed(missing), os.path.join(self.root, md5[:2])]:
            _durable.make_dir(path, site="pull_cache", exist_ok=True)
        _durable.write_file_atomic(self.path(md5), data, site="pull_cache")


def pull(
    target: str | os.PathLike[str],
    *,
    repo: str | os.PathLike[str] | None = None,
    remote: str | None = None,
    force: bool = False,
    rev: str | None = None,
) -> Path:
    """Fetch a published checkpoint and install it verified at ``target`` (``<dest>/<name>`` or its ``.dvc`` file).

    ``rev`` (a git tag such as ``best@v1.0.0``, a branch or a commit) pulls the
    version the ``.dvc`` file names at that revision and then writes that
    ``.dvc`` file into the workspace (see :mod:`ckstore.integrations.dvc.revision`).

    See the module docstring for the order of checks. Without ``force``, a
    target holding checkpoints that no published version has (saved locally,
    e.g. by fine-tuning from the pulled model), files ckstore did not put
    there, or a held writer lock is refused with a message naming ``--force``.
    Returns the store directory (``<dest>/<name>``).
    """
    remote = check_remote(remote)
    path = os.path.abspath(os.fspath(target))
    alias = path[: -len(".dvc")] if path.endswith(".dvc") else path
    dvc_file = alias + ".dvc"
    root = resolve_repo(repo, os.path.dirname(alias))
    parent, base = os.path.split(alias)
    check_real_dirs(root, parent, what="pull target")
    if rev is None:
        md5, rel = read_dvc_file(dvc_file)
        at_rev = None
    else:
        commit, at_rev = dvc_file_at(root, rev, dvc_file)
        md5, rel = parse_dvc_file(at_rev, f"{dvc_file} at {show(rev)} ({commit[:12]})")
    if rel != base:
        raise DvcError(f"{dvc_file}: tracks {show(rel)}, not {show(base)}; not a ckstore publish")
    with _storage_errors(f"pulling {alias}"), _repo_lock(root):
        lock = _check_target(alias, force=force)
        try:
            with _dvc_repo(root) as dvc:
                cache = _Cache(dvc.cache.local.path)
                raw = _dir_object(dvc, cache, md5, remote, dvc_file)
                entries = parse_dir_object(raw, where=f"{dvc_file} (directory object {md5})")
                step_name = _one_checkpoint(entries, dvc_file)
                if not force:
                    _check_local_work(alias, cache, step_name)
                wanted = sorted(set(entries.values()) - {m for m in entries.values() if cache.has(m)})
                if wanted:  # by md5, checked above; what fails to arrive is named by file below
                    _dvc_call("fetch", lambda: dvc.cloud.pull([_md5_hash_info(m) for m in wanted], remote=remote))
            token = secrets.token_hex(4)
            tmp = os.path.join(parent, f".{base}.ckstore-tmp-{token}")
            old = os.path.join(parent, f".{base}.ckstore-old-{token}")
            try:
                _install(cache, entries, step_name, tmp, alias)
                swap_dir(tmp, alias, old)
                if at_rev is not None:
                    set_dvc_file(dvc_file, at_rev)
            except BaseException:
                with contextlib.suppress(OSError):
                    _remove(tmp, site="pull_rollback")
                raise
        finally:
            if lock is not None:
                lock.release()
    return Path(alias)


def _md5_hash_info(md5: str) -> Any:
    from dvc_data.hashfile.hash_info import HashInfo as DvcHashInfo

    return DvcHashInfo("md5", md5)


def _dir_object(dvc: Any, cache: _Cache, md5: str, remote: str | None, dvc_file: str) -> bytes:
    """The directory object's bytes, md5-checked: from the cache when intact, else from the remote alone."""
    local = cache.path(md5)
    try:
        raw = read_capped(local, DIR_OBJECT_CAP, what="DVC directory object")
    except FileNotFoundError:
        raw = None
    except DvcError:
        raw = None  # not a regular file: fetch a good copy (the bad entry is left alone, never followed)
    if raw is not None and hashlib.md5(raw, usedforsecurity=False).hexdigest() + ".dir" == md5:
        return raw
    if raw is not None:
        cache.drop(local)
    odb = _dvc_call("remote", lambda: dvc.cloud.get_remote_odb(remote, "pull"))
    remote_path = odb.oid_to_path(md5)

    def download() -> bytes:
        with odb.fs.open(remote_path, "rb") as fh:
            return fh.read(DIR_OBJECT_CAP + 1)

    try:
        raw = _dvc_call("fetch", download)
    except DvcError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise DvcError(f"{dvc_file}: directory object {md5} is not in the remote") from None
        raise
    if len(raw) > DIR_OBJECT_CAP:
        raise DvcError(f"{dvc_file}: directory object {md5} in the remote is larger than {DIR_OBJECT_CAP} bytes")
    actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if actual + ".dir" != md5:
        raise IntegrityError(
            f"{dvc_file}: the remote's directory object {md5} is corrupt (md5 {actual}); nothing installed",
            path=remote_path, expected=md5, actual=actual + ".dir",
        )
    cache.store(md5, raw)
    return raw


def _one_checkpoint(entries: dict[str, str], dvc_file: str) -> str:
    """The ``step-N`` directory name of a one-checkpoint ckstore directory listing."""
    steps = set()
    for rel in entries:
        if rel == WEIGHTS_FILE:
            continue  # the stable path: checked below to be the checkpoint's own weights file
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] != CHECKPOINTS_DIR or not STEP_DIR.fullmatch(parts[1]):
            raise DvcError(f"{dvc_file}: does not track a one-checkpoint ckstore directory (entry {show(rel)})")
        steps.add(parts[1])
    if len(steps) != 1:
        raise DvcError(f"{dvc_file}: does not track a one-checkpoint ckstore directory ({len(steps)} checkpoints)")
    (step_name,) = steps
    if f"{CHECKPOINTS_DIR}/{step_name}/{MANIFEST_NAME}" not in entries:
        raise DvcError(f"{dvc_file}: the tracked checkpoint has no {MANIFEST_NAME}")
    if WEIGHTS_FILE in entries and entries[WEIGHTS_FILE] != entries.get(f"{CHECKPOINTS_DIR}/{step_name}/{WEIGHTS_FILE}"):
        # Same md5 or refused: the stable path is a link to a verified file, never a file of its own.
        raise DvcError(f"{dvc_file}: {WEIGHTS_FILE} is not the checkpoint's {CHECKPOINTS_DIR}/{step_name}/{WEIGHTS_FILE}")
    return step_name


def _check_target(alias: str, *, force: bool) -> WriterLock | None:
    """Refuse a target that is not a directory ckstore could have put there; take its writer lock.

    The lock is held through the swap, so no writer starts saving into the
    directory that is about to be replaced.
    """
    try:
        st = os.lstat(alias)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        if force:
            return None  # replaced by the swap; a symlink is renamed away, never followed
        raise InvalidArgumentError(f"{alias} is not a plain directory; refusing to replace it (pass --force to replace it)")
    lock = WriterLock(alias)
    taken = lock.try_acquire()
    if not taken and not force:
        pid, host = lock.holder()
        who = f"pid {pid} on {show(host)}" if pid is not None else "another process"
        raise StoreLockedError(
            f"{alias}: a writer ({who}) holds this store; pull refuses to replace it under a writer "
            "(stop the writer, or pass --force)",
            path=alias, pid=pid, host=host,
        )
    try:
        unknown = sorted(set(os.listdir(alias)) - _ALIAS_ENTRIES)
        if unknown and not force:
            raise InvalidArgumentError(
                f"{alias} holds {', '.join(map(show, unknown[:5]))}, which no pull put there; refusing to replace it (pass --force to replace it)"
            )
    except BaseException:
        if taken:
            lock.release()
        raise
    return lock if taken else None


def _check_local_work(alias: str, cache: _Cache, step_name: str) -> None:
    """Refuse when ``alias`` holds a checkpoint no published version has: local work the swap would delete.

    A checkpoint came from a publish or a pull when DVC's cache holds its
    manifest's bytes (both put it there); one saved locally into the pulled
    store (fine-tuning from it) does not.
    """
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if os.listdir(os.path.join(alias, QUARANTINE_DIR)):
            # Checkpoints that failed verification are never deleted silently.
            raise InvalidArgumentError(
                f"{alias} holds quarantined checkpoints ({QUARANTINE_DIR}/); pull would delete them. "
                "Empty the quarantine, or pass --force to replace them"
            )
    checkpoints = os.path.join(alias, CHECKPOINTS_DIR)
    try:
        names = os.listdir(checkpoints)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise InvalidArgumentError(f"{checkpoints} is not a directory; refusing to replace it (pass --force)") from None
    local = []
    for name in sorted(names):
        manifest = os.path.join(checkpoints, name, MANIFEST_NAME)
        try:
            md5 = hashlib.md5(read_capped(manifest, MAX_MANIFEST_BYTES, what="manifest"), usedforsecurity=False).hexdigest()
        except (OSError, DvcError):
            md5 = None
        if name == step_name and md5 is None:
            continue  # an earlier pull of this very step, interrupted: nothing of value
        if md5 is None or not cache.has(md5):
            local.append(name)
    if local:
        raise InvalidArgumentError(
            f"{alias} holds checkpoint(s) {', '.join(map(show, local))} that are not from a published version "
            "(saved locally?); pull would delete them. Save them elsewhere, or pass --force to replace them"
        )


def _install(cache: _Cache, entries: dict[str, str], step_name: str, tmp: str, alias: str) -> None:
    prefix = f"{CHECKPOINTS_DIR}/{step_name}/"
    target = os.path.join(tmp, CHECKPOINTS_DIR, step_name)
    for path in (tmp, os.path.dirname(target), target):
        _durable.make_dir(path, site="pull_install")
    final_dir = os.path.join(alias, CHECKPOINTS_DIR, step_name)

    def copy(name: str, expected: HashInfo | ChunkedHash | None) -> int:
        md5 = entries[prefix + name]
        source = cache.path(md5)
        try:
            size, _ = _hash_file(source, copy_to=os.path.join(target, name), expected=expected, md5=md5, site="pull_file")
        except IntegrityError as exc:
            if exc.actual == "missing":
                raise DvcError(f"{final_dir}/{name}: object {md5} was not fetched (missing from the remote, or corrupt there)") from None
            cache.drop(source)
            raise IntegrityError(
                f"{os.path.join(final_dir, name)}: the object DVC fetched for it is corrupt "
                f"(expected {exc.expected}, got {exc.actual}; remote object {md5}); "
                "removed from the local cache, nothing installed",
                path=os.path.join(final_dir, name), expected=exc.expected, actual=exc.actual,
            ) from None
        return size

    copy(MANIFEST_NAME, None)
    manifest = parse_manifest(_read_small(os.path.join(target, MANIFEST_NAME)), path=os.path.join(final_dir, MANIFEST_NAME))
    listed = {prefix + n for n in manifest.files} | {prefix + MANIFEST_NAME}
    if set(entries) - {WEIGHTS_FILE} != listed:
        raise IntegrityError(
            f"{final_dir}: DVC tracks {sorted(set(entries) - listed) or 'fewer'} files than the manifest lists",
            path=final_dir, expected=sorted(listed), actual=sorted(entries),
        )
    for name, entry in manifest.files.items():
        size = copy(name, entry.expected)
        if size != entry.size:
            path = os.path.join(final_dir, name)
            raise IntegrityError(f"{path}: size {size}, manifest says {entry.size}", path=path, expected=entry.size, actual=size)
    if WEIGHTS_FILE in entries:
        # The stable path: a hard link to the verified file, as publish made it (one copy on disk).
        link_or_copy(os.path.join(target, WEIGHTS_FILE), os.path.join(tmp, WEIGHTS_FILE), site="pull_install")
    for path in (target, os.path.dirname(target), tmp, os.path.dirname(tmp)):
        _durable.sync_dir(path, site="pull_install_dir")
