"""A published name as it was at a git revision: the ``.dvc`` file's bytes at that commit.

``ckstore pull models/best --rev best@v1.0.0`` (``pull(..., rev=...)``) reads
``models/best.dvc`` from the commit ``rev`` names (a version tag, a branch, a
commit id), installs that version verified, then writes those bytes to the
workspace ``.dvc`` file, exactly as ``git checkout best@v1.0.0 --
models/best.dvc && dvc pull models/best.dvc`` would, so ``dvc status`` agrees
with what is installed.

A revision is user input handed to git: one starting with ``-`` would be an
option (``--output=...``), so it is refused, and git is called with
``--end-of-options`` as well. It is resolved to a commit first
(``<rev>^{commit}``), so a blob or tree expression (``HEAD:path``) is not a
revision here.
"""

from __future__ import annotations

import os
import re
import subprocess

from ...errors import CheckpointNotFoundError, DvcError, InvalidArgumentError
from .files import DVC_FILE_CAP, has_control, show
from .git import GIT_SAFE_CONFIG, _git

_HEX = re.compile(r"[0-9a-f]{40,64}", re.ASCII)


def check_rev(rev: object) -> str:
    """A git revision: a non-empty string without control characters that is not an option."""
    if not isinstance(rev, str) or not rev or has_control(rev) or rev.startswith("-") or len(rev) > 1024:
        raise InvalidArgumentError(
            f"rev must name a git revision (a tag such as best@v1.0.0, a branch or a commit), got {show(rev)}: "
            "it is not empty, has no control characters and does not start with '-'"
        )
    return rev


def dvc_file_at(root: str, rev: str, dvc_file: str) -> tuple[str, bytes]:
    """``(commit, bytes)`` of ``dvc_file`` (an absolute path in the repository at ``root``) at revision ``rev``."""
    check_rev(rev)
    proc = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    commit = proc.stdout.strip()
    if proc.returncode != 0 or not _HEX.fullmatch(commit):
        raise CheckpointNotFoundError(f"{show(rev)} is not a revision (tag, branch or commit) of the git repository at {root}")
    top = _git(root, "rev-parse", "--show-toplevel").stdout.strip()
    rel = os.path.relpath(os.path.realpath(dvc_file), os.path.realpath(top)).replace(os.sep, "/")
    if rel.startswith("../"):
        raise InvalidArgumentError(f"{dvc_file} is not inside the git repository at {top}")
    spec = f"{commit}:{rel}"
    kind = _git(root, "cat-file", "-t", spec, check=False)
    if kind.returncode != 0 or kind.stdout.strip() != "blob":
        raise CheckpointNotFoundError(f"{rel} does not exist at {show(rev)} ({commit[:12]}): not published yet at that revision")
    size = int(_git(root, "cat-file", "-s", spec).stdout.strip())
    if size > DVC_FILE_CAP:
        raise DvcError(f"{rel} at {show(rev)} is {size} bytes, more than the {DVC_FILE_CAP}-byte cap for a .dvc file")
    # Bytes, not text: the workspace file is written with exactly the committed bytes, so git sees no change.
    proc = subprocess.run(
        ["git", *GIT_SAFE_CONFIG, "-C", root, "cat-file", "blob", spec], capture_output=True, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise DvcError(f"git cat-file failed for {rel} at {show(rev)}: {proc.stderr.decode('utf-8', 'replace').strip()}")
    return commit, proc.stdout


def set_dvc_file(dvc_file: str, raw: bytes) -> None:
    """Make the workspace ``.dvc`` file hold ``raw`` (atomically; nothing written when it already does)."""
    from ...storage import durable as _durable
    from .files import read_capped

    try:
        if read_capped(dvc_file, DVC_FILE_CAP, what=".dvc file") == raw:
            return
    except FileNotFoundError:
        pass  # the name did not exist at the checked-out revision: it does now
    # read_capped refused a symlink or special file above (DvcError): never written through one.
    _durable.write_file_atomic(dvc_file, raw, site="pull_dvc_file")
