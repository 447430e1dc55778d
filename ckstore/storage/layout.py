"""Checks on a store directory before ckstore reads or writes it.

A store may come from someone else (a downloaded run, a directory another
user pre-created in a shared ``/tmp``). Two things must hold before ckstore
acts on it:

* **Its layout directories are real directories.** ``checkpoints/``,
  ``.staging/``, ``.trash/`` and ``.quarantine/`` are never symlinks: every
  read would otherwise leave the store, and recovery (or emptying the
  quarantine) would move or empty whatever the link points to. A
  symlink there is refused (:class:`UnsafeStoreError`) on every open, readonly
  included; another file type there is not a store (:class:`InvalidArgumentError`).
* **Only the caller can change it, before a write.** A store whose root or
  layout directory is owned by another user, or writable by group or others
  without the sticky bit, lets that user swap entries in under ckstore's feet
  (a look-alike checkpoint, a symlink in ``.staging/``). Writes refuse it unless
  the caller passes ``trust_foreign=True``. Reads do not check ownership:
  reading changes nothing, and every byte read is verified against its manifest.

These checks only ``lstat``: opening a store to read it never writes.
"""

from __future__ import annotations

import os
import re
import stat

from ..errors import CheckpointNotFoundError, InvalidArgumentError, UnsafeStoreError

# The store's layout and the names of its checkpoints, defined here only (the store, DVC and the CLI use these).
CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".staging"
TRASH_DIR = ".trash"
#: Checkpoints that failed verification, moved aside (``checkpoint/quarantine.py`` owns what goes in it).
QUARANTINE_DIR = ".quarantine"
# ASCII digits only: "\d" also matches "١" (Arabic-Indic one), and int() reads "step-١" as step 1.
STEP_DIR = re.compile(r"^step-([0-9]{1,30})$", re.ASCII)


def step_dir_name(step: int) -> str:
    """The directory of checkpoint ``step`` inside ``checkpoints/`` (zero-padded, so names sort like steps up to 10**8)."""
    return f"step-{step:08d}"


LAYOUT_DIRS = (CHECKPOINTS_DIR, STAGING_DIR, TRASH_DIR, QUARANTINE_DIR)

#: The way out of an ownership refusal, in Python terms (the CLI says it in its own options).
ADVICE = "open it with readonly=True to read it, or with trust_foreign=True to write it if you trust its owner"


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def check_layout(root: str, *, write: bool, trust_foreign: bool = False) -> bool:
    """Check the store at ``root`` as described above; returns whether ``root`` exists.

    ``write`` adds the ownership and permission checks (skipped with
    ``trust_foreign``). A missing root or layout directory is fine here: a
    write creates it, and a read finds nothing in it.
    """
    st = _lstat(root)
    if st is None:
        return False
    if stat.S_ISLNK(st.st_mode):
        # The root may be the caller's own link (~/ckpt -> /data/ckpt); one planted by another user is not.
        if write and not trust_foreign:
            _check_owner(root, st, what="symlink to the store")
        try:
            st = os.stat(root)
        except FileNotFoundError:
            raise InvalidArgumentError(f"{root}: is a dangling symlink, not a store directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError(f"{root}: exists and is not a directory; not a ckstore store")
    entries = [(root, st)]
    for name in LAYOUT_DIRS:
        path = os.path.join(root, name)
        sub = _lstat(path)
        if sub is None:
            continue
        if stat.S_ISLNK(sub.st_mode):
            raise UnsafeStoreError(f"{path}: is a symlink; refusing to read or clean outside the store", path=path)
        if not stat.S_ISDIR(sub.st_mode):
            raise InvalidArgumentError(f"{path}: is not a directory; not a ckstore store")
        entries.append((path, sub))
    if write and not trust_foreign:
        for path, sub in entries:
            _check_owner(path, sub, what="store directory")
            if sub.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sub.st_mode & stat.S_ISVTX:
                who = {stat.S_IWGRP: "group", stat.S_IWOTH: "others"}.get(sub.st_mode & (stat.S_IWGRP | stat.S_IWOTH), "group and others")
                raise UnsafeStoreError(
                    f"{path}: is writable by {who} (mode {stat.S_IMODE(sub.st_mode):o}, no sticky bit), so another user could "
                    f"swap checkpoints or plant links in it; fix the permissions (chmod go-w), or {ADVICE}",
                    path=path,
                )
    return True


def _check_owner(path: str, st: os.stat_result, *, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise UnsafeStoreError(
            f"{path}: {what} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); refusing to write a store another "
            f"user controls: {ADVICE}",
            path=path,
        )


def require_store(root: str) -> None:
    """A readonly open needs an existing store: a real ``checkpoints/`` directory under a directory ``root``."""
    if not check_layout(root, write=False) or _lstat(os.path.join(root, CHECKPOINTS_DIR)) is None:
        raise CheckpointNotFoundError(f"{root}: not a ckstore store (no {CHECKPOINTS_DIR}/ directory)")
