"""git for publish: every call hardened against the repository's own configuration, and the version tags.

A repository may be someone else's (a clone, a downloaded tarball): its hooks,
``core.fsmonitor`` and signing programs are commands it names, so every git
call disables them (:data:`GIT_SAFE_CONFIG`). Version tags are annotated
``<name>@v<k>.0.0`` (``<dest>/<name>@v<k>.0.0`` outside the default dest): GTO's
``<artifact>@v<semver>``, so ``dvc artifacts get`` and GTO find each version.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import TYPE_CHECKING

from ...errors import DvcError

if TYPE_CHECKING:
    from .publish import PublishJob

DEFAULT_DEST = "models"


#: git options for every call into a repository someone else may have prepared: its hooks
#: (post-commit, reference-transaction, ...), fsmonitor and signing programs are commands the
#: repository's config names, and none of them may run. safe.directory is left alone on purpose:
#: git's refusal of a repository owned by another user stands.
GIT_SAFE_CONFIG = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.untrackedCache=false",
    "-c", "commit.gpgSign=false",
    "-c", "tag.gpgSign=false",
    "-c", "tag.forceSignAnnotated=false",
    "-c", "gc.auto=0",
    "-c", "maintenance.auto=false",
)


def _git(repo: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # core.fsync: the commits ckstore makes survive a power cut, not just a crash.
    cmd = ["git", *GIT_SAFE_CONFIG, "-c", "core.fsync=committed", "-C", repo, *args]
    env = dict(os.environ)
    if not _has_identity(repo):
        env.setdefault("GIT_AUTHOR_NAME", "ckstore")
        env.setdefault("GIT_AUTHOR_EMAIL", "ckstore@localhost")
        env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
        env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise DvcError("git is not installed; publishing needs git") from exc
    if check and proc.returncode != 0:
        raise DvcError(f"git {' '.join(args[:2])} failed in {repo}: {(proc.stderr or proc.stdout).strip()}")
    return proc


_identity_cache: dict[str, bool] = {}


def _has_identity(repo: str) -> bool:
    if repo not in _identity_cache:
        proc = subprocess.run(["git", *GIT_SAFE_CONFIG, "-C", repo, "var", "GIT_COMMITTER_IDENT"], capture_output=True, stdin=subprocess.DEVNULL)
        _identity_cache[repo] = proc.returncode == 0
    return _identity_cache[repo]


def _one_line(text: str) -> str:
    """``text`` for one line of a commit message: control characters shown as escapes (``\\n``)."""
    return text if text.isprintable() and text.isascii() else ascii(text)[1:-1]


def version_tag_prefix(name: str, dest: str) -> str:
    """``<name>`` for the default dest, ``<dest>/<name>`` for another: versions never collide across dests."""
    return name if dest == DEFAULT_DEST else f"{dest.replace(os.sep, '/')}/{name}"


#: A version tag of ``<prefix>``: ``@v<k>.0.0`` (GTO's ``<name>@v<semver>``, what ``dvc artifacts`` and model
#: registries parse), or ``@v<k>`` as releases before semver tags wrote them; both count for the next number.
#: [0-9], not \d: "\d" also matches "١", so a hand-made "best@v١٠٠" is not version 100.
_VERSION = r"@v(0|[1-9][0-9]*)(?:\.0\.0)?"


def version_number(prefix: str, tag: str) -> int | None:
    """``k`` of a version tag ``<prefix>@v<k>.0.0`` (or the older ``<prefix>@v<k>``), None for any other tag."""
    match = re.fullmatch(re.escape(prefix) + _VERSION, tag, re.ASCII)
    return int(match.group(1)) if match else None


def _tag(job: PublishJob, commit: str) -> str:
    """Annotated tag ``<prefix>@v<k>.0.0`` on ``commit``, unless one of this name's version tags already points there.

    Annotated, because GTO and ``dvc artifacts get`` ignore lightweight tags. Each publish is a
    new major version: nothing tells ckstore whether a new checkpoint is compatible.
    """
    prefix = version_tag_prefix(job.name, job.dest)
    listing = _git(job.repo, "tag", "--list", f"{prefix}@v*", "--format=%(refname:strip=2) %(*objectname)").stdout
    versions = []
    for line in listing.splitlines():
        tag, _, target = line.partition(" ")
        number = version_number(prefix, tag)
        if number is not None:
            if target == commit:
                return tag
            versions.append(number)
    tag = f"{prefix}@v{max(versions, default=0) + 1}.0.0"
    _git(job.repo, "tag", "-a", tag, "-m", f"ckstore publish {job.name}: step {job.step}", commit)
    return tag
