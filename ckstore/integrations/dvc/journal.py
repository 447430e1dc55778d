"""Reading publish journals (``<repo>/.dvc/tmp/ckstore/publish-*.json``) as untrusted input.

A journal tells recovery which stage an interrupted publish reached. It sits in
the repository, so a downloaded repository can ship one, and under a loose
umask another local user can plant one. Recovery acts on it (removes a
temporary directory, renames one into place, runs DVC and git), so:

* a journal must be a regular file owned by the current user and not writable
  by group or others; otherwise recovery stops with :class:`DvcError` naming
  it, before acting on any journal;
* every field is checked strictly: the name and dest as publish checks them,
  the step a non-negative integer, strings without control characters, the
  file name the one ckstore would give this name and dest;
* no path is ever taken from it. The temporary directories are rebuilt from
  the checked name and dest and an 8-hex-digit token
  (``<dest>/.<name>.ckstore-tmp-<token>``). Journals written before the token
  (format version 1, with ``tmp``/``old`` paths) are accepted only when those
  paths are exactly what the token rebuilds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from typing import Any

from .publish import DEFAULT_DEST, JOURNAL_FORMAT, STAGES, PublishJob, _journal_path, _tmp_paths, check_dest, check_name
from .files import has_control, read_capped, show
from ...errors import CkstoreError, DvcError

JOURNAL_CAP = 1 << 20
_TOKEN = re.compile(r"[0-9a-f]{8}")
_OLD_TOKEN = re.compile(r"\.[^/]*\.ckstore-tmp-([0-9a-f]{8})")


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    path: str
    stage: str
    job: PublishJob
    token: str | None
    record: dict[str, Any]


def journal_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names if n.startswith("publish-") and n.endswith(".json")]


def load_journal(repo: str, path: str) -> JournalEntry:
    """The checked content of the journal at ``path``; DvcError naming it if any check fails."""
    hint = "remove it if you did not create it"
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise DvcError(f"{path}: publish journal is not a regular file; {hint}")
    if st.st_uid != os.geteuid():
        raise DvcError(f"{path}: publish journal is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); {hint}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DvcError(f"{path}: publish journal is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); {hint}")
    try:
        record = json.loads(read_capped(path, JOURNAL_CAP, what="publish journal"))
    except FileNotFoundError:
        raise
    except (ValueError, RecursionError):
        raise DvcError(f"{path}: publish journal is not JSON; {hint}") from None
    try:
        return _check(repo, path, record)
    except DvcError as exc:
        raise DvcError(f"{path}: publish journal {exc}; {hint}") from None
    except CkstoreError as exc:  # check_name / check_dest
        raise DvcError(f"{path}: publish journal names {exc}; {hint}") from None


def _check(repo: str, path: str, record: Any) -> JournalEntry:
    if not isinstance(record, dict) or record.get("format") != JOURNAL_FORMAT or record.get("format_version") not in (1, 2):
        raise DvcError("is not a ckstore publish journal this version reads")
    stage = record.get("stage")
    if stage not in STAGES:
        raise DvcError(f"has an unknown stage {show(stage)}")
    raw = record.get("job")
    if not isinstance(raw, dict):
        raise DvcError("has no job")
    name = check_name(raw.get("name"))
    dest = check_dest(raw.get("dest", DEFAULT_DEST))
    step = raw.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**30:
        raise DvcError(f"has step {show(step)}, not a non-negative integer")
    store = raw.get("store")
    remote = raw.get("remote")
    if not isinstance(store, str) or has_control(store):
        raise DvcError(f"has store {show(store)}")
    if remote is not None and (not isinstance(remote, str) or has_control(remote) or not remote):
        raise DvcError(f"has remote {show(remote)}")
    metrics = raw.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in metrics.items()
    ):
        raise DvcError("has malformed metrics")
    job = PublishJob(name=name, step=step, store=store, repo=repo, dest=dest, remote=remote, metrics=dict(metrics))
    if os.path.abspath(path) != os.path.abspath(_journal_path(repo, dest, name)):
        raise DvcError(f"is named for another publish than {show(name)} in {show(dest)}")
    token = record.get("token")
    if record["format_version"] == 1 and token is None and (record.get("tmp") is not None or record.get("old") is not None):
        match = _OLD_TOKEN.fullmatch(os.path.basename(str(record.get("tmp"))))
        token = match.group(1) if match else None
        if token is None or (record.get("tmp"), record.get("old")) != _tmp_paths(job, token):
            raise DvcError("names temporary directories other than its own")
    if token is not None and (not isinstance(token, str) or not _TOKEN.fullmatch(token)):
        raise DvcError(f"has token {show(token)}, not 8 hex digits")
    return JournalEntry(path=path, stage=stage, job=job, token=token, record=record)
