"""The quarantine: committed checkpoints a save had to move aside, kept until someone empties it.

A run that fell back past a corrupt checkpoint, or was rolled back to an older
one, reaches a step that is already committed. Steps are never overwritten,
and nothing that failed verification is ever deleted silently, so
``save(step=N)`` over a committed step ``N`` does this:

* ``N`` verifies and nothing committed after it has a lower step: it is a
  real duplicate, the save raises ``CheckpointExistsError``;
* ``N`` fails verification (reason ``"failed verification"``), or it verifies
  but a checkpoint with a lower step was committed after it, i.e. a rollback
  left it ahead of the run (reason ``"left ahead by a rollback"``): it is moved
  into the quarantine and the save proceeds.

Layout, inside the store::

    .quarantine/step-00000020.20261202T061502Z.3fa9c2d1/        the checkpoint, byte for byte
    .quarantine/step-00000020.20261202T061502Z.3fa9c2d1.json   why: step, time, reason, problems, tags

The move is one atomic rename out of ``checkpoints/`` (site ``"quarantine"``),
made durable by fsyncing both directories before the note is written; a crash
in between leaves an entry without a note, listed with reason ``"unknown"``.
Tags that named the step are dropped from ``tags.json`` (the new checkpoint
``N`` is another one) and recorded in the note. Readers never look inside
``.quarantine/``; ``ckstore ls`` and :meth:`Store.quarantine` list it; only
:meth:`Store.empty_quarantine` (``ckstore quarantine PATH --empty``) removes
it, each entry by a rename into ``.trash/`` then removal, like any delete.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import json
import os
import re
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..storage import durable as _durable
from ..storage import safeio as _safeio
from ..errors import CheckpointExistsError, CkstoreError, ManifestError, UnsafeStoreError
from ..storage.layout import QUARANTINE_DIR, step_dir_name
from .annotations import Annotations
from .catalog import CorruptCheckpointWarning
from .commit import guarded
from .retention import left_ahead

FAILED_VERIFICATION = "failed verification"
LEFT_AHEAD = "left ahead by a rollback"
NOTE_FORMAT = "ckstore.quarantine"
# ASCII digits only: "\d" also matches "١" (Arabic-Indic one), which int() reads as 1.
_ENTRY = re.compile(r"^step-([0-9]{1,30})\.([0-9]{8}T[0-9]{6}Z)\.([0-9a-f]{8})$", re.ASCII)
_MAX_NOTE_BYTES = 1 << 20


@dataclass(frozen=True)
class QuarantineEntry:
    """A checkpoint moved aside by a save, as listed by :meth:`Store.quarantine`."""

    step: int
    path: Path
    moved: float
    reason: str
    tags: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


def move_aside(root: str, checkpoint: str, step: int, *, reason: str, problems: Sequence[str], tags: Sequence[str]) -> QuarantineEntry:
    """Rename ``checkpoint`` (a directory of ``checkpoints/``) into the quarantine; durable when this returns.

    The caller holds the writer lock (nothing else renames inside
    ``checkpoints/``) and the metadata lock (a tag cannot be added to the
    step while it leaves).
    """
    directory = os.path.join(root, QUARANTINE_DIR)
    if _durable.make_dir(directory, site="quarantine_dir", exist_ok=True):
        _durable.sync_dir(root, site="quarantine_root_dir")
    now = time.time()
    name = f"{os.path.basename(checkpoint)}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}.{secrets.token_hex(4)}"
    target = os.path.join(directory, name)
    _durable.rename(checkpoint, target, site="quarantine")
    _durable.sync_dir(os.path.dirname(checkpoint), site="quarantine_checkpoints_dir")
    _durable.sync_dir(directory, site="quarantine_entries_dir")
    note = {
        "format": NOTE_FORMAT,
        "format_version": 1,
        "step": step,
        "moved": now,
        "reason": reason,
        "problems": list(problems),
        "tags": sorted(tags),
    }
    _durable.write_file_atomic(target + ".json", json.dumps(note, sort_keys=True).encode("utf-8"), site="quarantine_note")
    return QuarantineEntry(step, Path(target), now, reason, tuple(sorted(tags)), tuple(problems))


def _open_quarantine(root: str) -> int | None:
    """A descriptor of ``.quarantine/`` (None when absent); a symlink there is refused, never followed.

    Emptying through a planted link would delete whatever it points to.
    """
    directory = os.path.join(root, QUARANTINE_DIR)
    try:
        return _durable.open_dir(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeStoreError(
                f"{directory}: is a symlink or not a directory; refusing to read or empty the quarantine through it", path=directory
            ) from None
        raise


def entries(root: str) -> list[QuarantineEntry]:
    """Every quarantined checkpoint, oldest move first. Entries that are not ours are ignored."""
    directory = os.path.join(root, QUARANTINE_DIR)
    fd = _open_quarantine(root)
    if fd is None:
        return []
    try:
        names = os.listdir(fd)
    finally:
        os.close(fd)
    out = []
    for name in names:
        match = _ENTRY.fullmatch(name)
        path = os.path.join(directory, name)
        if match is None or os.path.islink(path) or not os.path.isdir(path):
            continue  # a link is never listed, so never emptied through
        try:
            moved = calendar.timegm(time.strptime(match.group(2), "%Y%m%dT%H%M%SZ"))
        except ValueError:
            continue  # "99999999T999999Z": not a time ckstore wrote, so not our entry
        entry = QuarantineEntry(int(match.group(1)), Path(path), float(moved), "unknown (no readable note)")
        out.append(_with_note(entry))
    out.sort(key=lambda e: (e.moved, e.path.name))
    return out


def _with_note(entry: QuarantineEntry) -> QuarantineEntry:
    """The entry completed from its note; a missing or unreadable note (a crash before it was written) leaves "unknown"."""
    try:
        data = _safeio.read_small(f"{entry.path}.json", cap=_MAX_NOTE_BYTES, what="quarantine note", error=ManifestError)
    except (OSError, CkstoreError):  # absent, a link, a FIFO, too large, EIO: the entry stays, without its note
        return entry
    try:
        note = json.loads(data)
        if note.get("format") != NOTE_FORMAT or note.get("step") != entry.step:
            return entry
        return QuarantineEntry(
            entry.step,
            entry.path,
            float(note["moved"]),
            str(note["reason"]),
            tuple(str(t) for t in note["tags"]),
            tuple(str(p) for p in note["problems"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return entry


def empty(root: str, trash_dir: str) -> list[Path]:
    """Remove every quarantined checkpoint and its note; returns the checkpoints' paths. Caller holds the writer lock."""
    removed: list[Path] = []
    directory = os.path.join(root, QUARANTINE_DIR)
    for entry in entries(root):  # refuses a symlinked .quarantine/
        trash = os.path.join(trash_dir, f"{entry.path.name}.{secrets.token_hex(4)}")
        # Leaving .quarantine/ is the removal's commit point, as for any delete: a kill
        # mid-removal leaves the rest in .trash/, which the next writer's recovery removes.
        _durable.rename(str(entry.path), trash, site="quarantine_empty")
        _durable.sync_dir(directory, site="quarantine_empty_dir")
        with contextlib.suppress(FileNotFoundError):
            _durable.unlink(f"{entry.path}.json", site="quarantine_empty")
        _durable.remove_tree(trash, site="quarantine_empty")
        removed.append(entry.path)
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        stray = os.path.join(directory, name)
        # Temp files of an interrupted note write, and notes whose checkpoint is gone.
        orphan = name.endswith(".json") and _ENTRY.fullmatch(name[:-5]) is not None and not os.path.lexists(stray[:-5])
        if orphan or _durable.is_temp_name(name):
            with contextlib.suppress(FileNotFoundError):
                _durable.unlink(stray, site="quarantine_empty")
    if removed:
        _durable.sync_dir(directory, site="quarantine_empty_dir")
    return removed


def make_room(annotations: Annotations, step: int) -> None:
    """Before ``save(step=N)`` over a committed ``N``: move it aside if it fails verification or a rollback left it ahead.

    Raises CheckpointExistsError for a real duplicate (module docstring).
    """
    catalog = annotations.catalog
    name = step_dir_name(step)
    path = os.path.join(catalog.ckpt_dir, name)
    if not os.path.lexists(path):
        return
    problems = catalog.verify_dir(step, name)
    if problems:
        reason = FAILED_VERIFICATION
    elif left_ahead(catalog.listing(warn=False), step):
        reason = LEFT_AHEAD
    else:
        raise CheckpointExistsError(f"{catalog.root}: step {step} is already committed; steps are never overwritten", step=step)
    with annotations.meta.held():
        tags = catalog.read_tags()  # unreadable: refuse, a tag of this step would silently move to the new one
        mine = sorted(t for t, e in tags.items() if e.step == step)
        entry = guarded(
            catalog.root,
            lambda: move_aside(catalog.root, path, step, reason=reason, problems=[p.message for p in problems], tags=mine),
            what=f"moving step {step} into the quarantine",
        )
        catalog.forget(step)
        catalog.corrupt.pop(step, None)
        annotations.untag_step(step, tags)
    dropped = f"; its tags {mine} were removed (recorded in {entry.path}.json)" if mine else ""
    warnings.warn(
        f"step {step} {reason}: moved into the quarantine at {entry.path} to save step {step} again{dropped}; "
        "nothing was deleted (empty it with `ckstore quarantine PATH --empty`)",
        CorruptCheckpointWarning,
        stacklevel=3,
    )
