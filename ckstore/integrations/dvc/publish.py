"""Publishing checkpoints to DVC, and pulling them back verified.

ckstore owns crash safety; DVC (a git repository with ``.dvc/``) versions and
transfers. A published *name* (``best``, ``release-3``) is one small store
inside the DVC repository, tracked by one ``.dvc`` file::

    <repo>/<dest>/<name>.dvc            in git: DVC's pointer to the directory object
    <repo>/<dest>/<name>/               git-ignored, tracked by DVC: a one-checkpoint store
        model.safetensors               the weights at a stable path (ckstore.integrations.dvc.weights)
        checkpoints/step-<N>/manifest.json, *.safetensors
    <repo>/<dest>/.gitignore            written by DVC

so ``git clone`` + ``dvc pull <dest>/<name>.dvc`` gives a directory that
``ckstore verify`` and ``Store(...).load()`` accept, and ``ckstore pull`` does
the same with every hash re-verified. DVC stores whole files by md5, so a
tensor file that did not change between two published checkpoints is stored
once in the cache and once in the remote.

Stages of one publish, in this order (each is journaled and reported to the
stage hook, see :func:`set_stage_hook`):

``materialize``
    hard-link (or copy and fsync) the committed checkpoint into
    ``<dest>/.<name>.ckstore-tmp-<hex>/``, hashing every file against the
    manifest: only a verified checkpoint is ever published; then merge the
    model's tensors into ``model.safetensors`` (dropping the rest with
    ``weights_only``) and link it at the stable path;
``swap``
    rename the verified directory to ``<dest>/<name>`` (the old one, if any,
    goes to ``.<name>.ckstore-old-<hex>`` first, then is removed);
``add``
    ``dvc add`` the directory (cache objects, ``<name>.dvc``);
``push``
    ``dvc push`` its objects to the remote;
``commit``
    ``git commit`` the ``.dvc`` file (and ``.gitignore``/``.dvcignore``),
    with ``Ckstore-*`` trailers naming the name, step and source store;
``tag``
    an annotated git tag ``<name>@v<k>.0.0`` on that commit (GTO's format, see
    :mod:`ckstore.integrations.dvc.git`).

The commit also sets the name's ``artifacts:`` entry in the root ``dvc.yaml``
(:mod:`ckstore.integrations.dvc.artifacts`), so ``dvc artifacts get`` finds it.

Push comes before commit on purpose: git history never names an object that
the remote lacks, so a kill at any point leaves ``HEAD`` and the remote
consistent (at worst the remote holds objects no commit names yet). The
journal (``<repo>/.dvc/tmp/ckstore/publish-<name>-<key>.json``, atomic) records
the stage reached; the next publish into the same repository (from any
store), or ``ckstore publish --recover``, first finishes what it finds: before
``swap`` it rolls back (removes the temporary directory; the repository was not
touched), from ``swap`` on it rolls forward (every later stage is idempotent).

Before anything is queued, ``publish`` tags the checkpoint ``published.<name>``
in its store: a tag pins a checkpoint against retention, and the tag moves
when the name is published again. Committed checkpoint directories never
change, which is what keeps a published directory's DVC hash stable.

Publishing runs on one background thread per store, in order, so a training
step never waits for DVC. Publishes into one repository are serialized by a
lock file next to the journal, and every DVC operation waits for DVC's own
repository lock instead of failing after 3 s. A failure is raised by the
publication's :meth:`Publication.result`, by the next ``publish`` on that store
(``wait=True`` waits for all of them), and any failure nobody collected is
printed to stderr when the interpreter exits: never silently dropped.

:func:`gc` runs ``dvc gc`` only as ``--workspace --all-branches --all-tags``:
plain ``dvc gc -w -c`` would delete the objects of every earlier version.

DVC itself is imported lazily, only here, with an install hint when missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import stat
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock

from ...storage import durable as _durable
from .files import has_control, read_capped, read_dvc_file
from .ops import _dvc_call, _dvc_repo, _hash_file, _import_dvc, _make_dirs, _read_small, _remove, _sweep_atomic_temps
from . import artifacts as _artifacts
from . import weights as _weights
from .git import DEFAULT_DEST, _git, _one_line, _tag, version_tag_prefix
from ...errors import CheckpointNotFoundError, CkstoreError, DvcError, IntegrityError, InvalidArgumentError, ManifestError, StorageError
from ...storage.layout import CHECKPOINTS_DIR, QUARANTINE_DIR, STAGING_DIR, TRASH_DIR, step_dir_name
from ...storage.lock import LOCK_NAME, OWNER_NAME
from ...format.manifest import MANIFEST_NAME, Manifest, parse_manifest
from ...storage.metadata_lock import META_LOCK_NAME
from ...checkpoint.metrics_log import METRICS_NAME
from ...format.tags import TAGS_NAME

STAGES = ("materialize", "swap", "add", "push", "commit", "tag")
TAG_PREFIX = "published."
JOURNAL_FORMAT = "ckstore.publish-journal"
#: Patterns ckstore keeps in a repository's ``.dvcignore``: a store's private
#: directories and files, and the temporary directories of publish and pull.
DVCIGNORE_LINES = (
    "# ckstore: staging, trash and lock files of stores, temporary dirs of publish/pull",
    ".staging/",
    ".trash/",
    ".ckstore.lock",
    ".ckstore.lock.owner",
    ".ckstore.meta.lock",
    ".quarantine/",
    ".*.ckstore-tmp-*",
    ".*.ckstore-old-*",
)

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}(\.[A-Za-z0-9_-]{1,63}){0,3}", re.ASCII)
_DEST_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}", re.ASCII)

# ------------------------------------------------------------------ hooks

StageHook = Callable[[str, str, Mapping[str, Any]], None]
_stage_hook: StageHook | None = None


def set_stage_hook(hook: StageHook | None) -> StageHook | None:
    """Install ``hook(stage, phase, info)`` called ``"before"`` and ``"after"`` every publish stage; returns the previous one.

    ``stage`` is one of :data:`STAGES`; ``info`` holds ``name``, ``step``,
    ``repo`` and ``dest``. Tests and the fault-injection harness use it to kill
    the process at a stage. A hook may raise to abort the publish.
    """
    global _stage_hook
    previous, _stage_hook = _stage_hook, hook
    return previous


def _emit(stage: str, phase: str, job: PublishJob) -> None:
    hook = _stage_hook
    if hook is not None:
        hook(stage, phase, {"name": job.name, "step": job.step, "repo": job.repo, "dest": job.dest})


# ------------------------------------------------------------------ values


@dataclasses.dataclass(frozen=True)
class PublishJob:
    """One publish: checkpoint ``step`` of the store at ``store`` under ``name`` in ``repo``."""

    name: str
    step: int
    store: str
    repo: str
    dest: str = DEFAULT_DEST
    remote: str | None = None
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: Publish only ``state["model"]`` (and the entries without tensors); see :mod:`ckstore.integrations.dvc.weights`.
    weights_only: bool = False

    @property
    def dest_dir(self) -> str:
        return os.path.join(self.repo, self.dest)

    @property
    def alias_dir(self) -> str:
        return os.path.join(self.dest_dir, self.name)

    @property
    def dvc_file(self) -> str:
        return self.alias_dir + ".dvc"

    @property
    def source_dir(self) -> str:
        return os.path.join(self.store, CHECKPOINTS_DIR, step_dir_name(self.step))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"metrics": dict(self.metrics)}


@dataclasses.dataclass(frozen=True)
class PublishResult:
    """What a finished publish produced."""

    name: str
    step: int
    dvc_file: Path
    md5: str
    commit: str | None
    tag: str | None
    remote: str | None
    #: The ``dvc.yaml`` artifact name (``dvc artifacts get REPO <artifact>``), None when GTO cannot parse the name.
    artifact: str | None = None


# ------------------------------------------------------------------ small helpers


def check_name(name: object) -> str:
    """A publish name is a file name, a git tag component and a ckstore tag suffix at once."""
    # fullmatch: re.match with "$" also accepts "best\n", which then lands in git tags and commit messages.
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(".lock"):
        raise InvalidArgumentError(
            f"invalid publish name {name!r}: a name starts with a letter and holds letters, digits, '_', '-' "
            "and single dots between them (at most 64 characters per part)"
        )
    return name


def check_dest(dest: object) -> str:
    """A relative directory of plain ASCII name parts: it lands in paths, git trailers and messages."""
    if not isinstance(dest, str) or not dest or os.path.isabs(dest):
        raise InvalidArgumentError(f"dest must be a relative directory inside the repository, got {dest!r}")
    parts = dest.strip("/").split("/")
    if any(p in ("..", ".", ".git", ".dvc") or p.startswith(".") for p in parts):
        raise InvalidArgumentError(f"dest {dest!r} must not contain '..', '.' or hidden components")
    if len(parts) > 16 or not all(_DEST_PART.fullmatch(p) and not p.endswith(".lock") for p in parts):
        raise InvalidArgumentError(
            f"dest {dest!r}: each part holds ASCII letters, digits and '_.+-' only (no control characters, spaces or backslashes)"
        )
    return os.path.join(*parts)


def check_remote(remote: object) -> str | None:
    """None (the repository's default remote) or a DVC remote name without control characters."""
    if remote is None:
        return None
    if not isinstance(remote, str) or not remote or has_control(remote):
        raise InvalidArgumentError(f"remote must be a DVC remote name, got {remote!r}")
    return remote


def find_repo(start: str | os.PathLike[str]) -> str | None:
    """The nearest directory at or above ``start`` holding a ``.dvc`` directory, or None."""
    here = Path(os.path.abspath(os.fspath(start)))
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return str(candidate)
    return None


def resolve_repo(repo: str | os.PathLike[str] | None, *starts: str | os.PathLike[str]) -> str:
    if repo is not None:
        root = os.path.abspath(os.fspath(repo))
        if not os.path.isdir(os.path.join(root, ".dvc")):
            raise InvalidArgumentError(f"{root}: not a DVC repository (no .dvc directory; run 'git init && dvc init' there)")
        return root
    for start in starts:
        found = find_repo(start)
        if found is not None:
            return found
    raise InvalidArgumentError(f"no DVC repository at or above {', '.join(map(str, starts))}; pass repo=... (or --repo)")


# ------------------------------------------------------------------ the journal


def _journal_dir(repo: str) -> str:
    return os.path.join(repo, ".dvc", "tmp", "ckstore")


def _journal_path(repo: str, dest: str, name: str) -> str:
    key = hashlib.sha256(f"{dest}\0{name}".encode()).hexdigest()[:16]
    return os.path.join(_journal_dir(repo), f"publish-{name}-{key}.json")


def _write_journal(job: PublishJob, stage: str, token: str | None = None) -> None:
    # Only the token of the temporary directories is recorded, never a path: recovery rebuilds
    # every path from the validated name and dest (a journal is input, see _load_journal).
    record = {"format": JOURNAL_FORMAT, "format_version": 2, "stage": stage, "job": job.to_json()}
    if token is not None:
        record["token"] = token
    _durable.write_file_atomic(_journal_path(job.repo, job.dest, job.name), json.dumps(record, sort_keys=True).encode(), site="publish_journal")


def _tmp_paths(job: PublishJob, token: str) -> tuple[str, str]:
    """The temporary and the moved-aside directory of one publish: siblings of ``<dest>/<name>``."""
    return (
        os.path.join(job.dest_dir, f".{job.name}.ckstore-tmp-{token}"),
        os.path.join(job.dest_dir, f".{job.name}.ckstore-old-{token}"),
    )


@contextlib.contextmanager
def _repo_lock(repo: str) -> Iterator[None]:
    """Serialize ckstore publishes and pulls into one repository (across processes)."""
    directory = _journal_dir(repo)
    _make_dirs(repo, directory, what="publish journal directory")
    lock = filelock.FileLock(os.path.join(directory, "lock"), thread_local=False)
    with lock.acquire(timeout=-1):
        yield


def pending(repo: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Journal records of publishes into ``repo`` that were interrupted (empty when none).

    Each record is checked (see :func:`ckstore.integrations.dvc.journal.load_journal`); a
    journal that fails a check raises DvcError naming it.
    """
    from .journal import journal_files, load_journal

    root = os.path.abspath(os.fspath(repo))
    return [load_journal(root, path).record | {"journal": path} for path in journal_files(_journal_dir(root))]


def recover(repo: str | os.PathLike[str]) -> list[PublishResult]:
    """Finish (or roll back) every interrupted publish into ``repo``; returns the publishes it completed."""
    root = resolve_repo(repo)
    with _storage_errors(f"recovering publishes in {root}"), _repo_lock(root):
        return _recover_locked(root)


@contextlib.contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if isinstance(exc, CkstoreError):
            raise
        raise StorageError(f"{what} failed: {exc.strerror or exc}", errno=exc.errno, path=getattr(exc, "filename", None)) from exc


def _recover_locked(repo: str) -> list[PublishResult]:
    from .journal import journal_files, load_journal

    done = []
    # Every journal is checked before any is acted on: one crafted journal stops recovery
    # before it touches anything (its paths are never used; see _dvc_journal).
    entries = [load_journal(repo, path) for path in journal_files(_journal_dir(repo))]
    # The temp files of a killed atomic replace of the repository files a publish edits (untracked in git).
    _sweep_atomic_temps(repo, (".dvcignore", _artifacts.PROJECT_FILE), site="publish_rollback")
    for entry in entries:
        job, stage, journal = entry.job, entry.stage, entry.path
        if stage == "materialize":
            # Nothing in the repository was touched yet: roll back.
            if entry.token is not None:
                _remove(_tmp_paths(job, entry.token)[0], site="publish_rollback")
            _durable.unlink(journal, site="publish_journal")
            continue
        if stage == "swap":
            if entry.token is None:
                raise DvcError(f"{journal}: a journal at stage 'swap' names no temporary directory; remove it if you did not create it")
            _swap(job, *_tmp_paths(job, entry.token))
        step_dir = os.path.join(job.alias_dir, CHECKPOINTS_DIR, step_dir_name(job.step))
        if not os.path.isfile(os.path.join(step_dir, MANIFEST_NAME)):
            # Someone removed or replaced the published directory since: nothing left to finish.
            warnings.warn(f"interrupted publish of {job.name!r} (step {job.step}) dropped: {step_dir} is gone", RuntimeWarning, stacklevel=2)
            _durable.unlink(journal, site="publish_journal")
            continue
        done.append(_finish(job))
    return done


# ------------------------------------------------------------------ publish stages


def _materialize(job: PublishJob, tmp: str) -> Manifest:
    """Build a verified one-checkpoint store at ``tmp`` from the source checkpoint."""
    source = job.source_dir
    manifest_path = os.path.join(source, MANIFEST_NAME)
    try:
        data = _read_small(manifest_path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{job.store}: no committed checkpoint at step {job.step} to publish", step=job.step) from None
    manifest = parse_manifest(data, path=manifest_path)
    if manifest.step != job.step:
        raise ManifestError(f"{manifest_path}: manifest says step {manifest.step}", path=manifest_path)
    target = os.path.join(tmp, CHECKPOINTS_DIR, os.path.basename(source))
    for path in (tmp, os.path.dirname(target), target):
        _durable.make_dir(path, site="publish_materialize")
    for name in [*manifest.files, MANIFEST_NAME]:
        src, dst = os.path.join(source, name), os.path.join(target, name)
        entry = manifest.files.get(name)
        try:
            # A hard link costs no space; committed checkpoint files are never written again.
            _durable.link(src, dst, site="publish_link")
            linked = True
        except OSError:
            linked = False
        size, _ = _hash_file(src, copy_to=None if linked else dst, expected=entry.expected if entry else None, site="publish_copy")
        if entry is not None and size != entry.size:
            raise IntegrityError(f"{src}: size {size} bytes, manifest says {entry.size}", path=src, expected=entry.size, actual=size)
    # The weights at a stable path (<dest>/<name>/model.safetensors), and weights-only publishing.
    manifest = _weights.rewrite(tmp, target, manifest, weights_only=job.weights_only) or manifest
    for path in (target, os.path.dirname(target), tmp, os.path.dirname(tmp)):
        _durable.sync_dir(path, site="publish_materialize_dir")
    return manifest


def _swap(job: PublishJob, tmp: str, old: str) -> None:
    """Put the verified directory ``tmp`` at the alias path (idempotent: resumes a half-done swap)."""
    swap_dir(tmp, job.alias_dir, old)


def swap_dir(tmp: str, alias: str, old: str) -> None:
    """Rename ``tmp`` to ``alias``, moving what is there to ``old`` first, then remove ``old``. Idempotent.

    All three are siblings: one directory, so each rename is atomic.
    """
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        if os.path.lexists(alias):
            _durable.rename(alias, old, site="publish_swap_old")
        _durable.rename(tmp, alias, site="publish_swap")
        _durable.sync_dir(os.path.dirname(alias), site="publish_swap_dir")
    if os.path.lexists(old):
        _remove(old, site="publish_swap_cleanup")


def _sweep_old_versions(job: PublishJob) -> None:
    """Remove earlier versions of ``job.name`` that a swap moved aside.

    A swap removes the old version without an fsync (it is garbage once the new
    one is in place), so a crash can bring it back after the journal has moved
    on; recovery has finished any swap by now, so what is left is garbage.
    """
    prefix = f".{job.name}.ckstore-old-"
    try:
        names = os.listdir(job.dest_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(prefix):
            _remove(os.path.join(job.dest_dir, name), site="publish_swap_cleanup")


#: What may sit in a published directory: the checkpoint, and what opening it as a store adds.
_ALIAS_ENTRIES = frozenset(
    {CHECKPOINTS_DIR, STAGING_DIR, TRASH_DIR, LOCK_NAME, OWNER_NAME, META_LOCK_NAME, TAGS_NAME, METRICS_NAME, QUARANTINE_DIR,
     _weights.WEIGHTS_FILE}
)


def _check_alias(job: PublishJob) -> None:
    """Refuse to replace anything at ``<dest>/<name>`` that an earlier publish did not put there."""
    alias = job.alias_dir
    if os.path.lexists(job.dvc_file):
        _, rel = read_dvc_file(job.dvc_file)
        if os.path.normpath(os.path.join(job.dest_dir, rel)) != alias:
            raise InvalidArgumentError(f"{job.dvc_file} tracks {rel!r}, not {job.name!r}: not a ckstore publish; choose another name or dest")
    elif os.path.lexists(alias):
        raise InvalidArgumentError(f"{alias} exists and was not published by ckstore (no {job.name}.dvc); choose another name or dest")
    if os.path.lexists(alias):
        if os.path.islink(alias) or not os.path.isdir(alias) or set(os.listdir(alias)) - _ALIAS_ENTRIES:
            raise InvalidArgumentError(f"{alias} holds files a ckstore publish did not put there; refusing to replace it")


def _check_plain_file(path: str) -> None:
    """``path`` is absent or a regular file: git and DVC read and rewrite ignore files, following links.

    A cloned repository's ``.dvcignore`` (or ``<dest>/.gitignore``) pointing at a
    file outside would have that file's content read into a commit, or DVC append to it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgumentError(f"{path} is a symlink; ckstore never reads or writes through a symlink inside a repository")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(f"{path} is not a regular file")


def _ensure_dvcignore(repo: str) -> bool:
    """Add ckstore's patterns to ``.dvcignore``; True when the file changed."""
    path = os.path.join(repo, ".dvcignore")  # a killed update's temp file: swept by _recover_locked
    _check_plain_file(path)
    try:
        text = read_capped(path, 1 << 20, what=".dvcignore").decode("utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    have = set(text.splitlines())
    missing = [line for line in DVCIGNORE_LINES if line not in have]
    if not missing:
        return False
    new = text + ("" if not text or text.endswith("\n") else "\n") + "\n".join(missing) + "\n"
    _durable.write_file_atomic(path, new.encode("utf-8"), site="publish_dvcignore")
    return True


def _finish(job: PublishJob) -> PublishResult:
    """Stages add, push, commit, tag: each idempotent, so this both runs and resumes a publish."""
    repo = job.repo
    _write_journal(job, "add")
    _emit("add", "before", job)
    with _dvc_repo(repo) as dvc:
        _dvc_call("add", lambda: dvc.add([job.alias_dir], relink=False))
    _emit("add", "after", job)
    md5, _ = read_dvc_file(job.dvc_file)

    _write_journal(job, "push")
    _emit("push", "before", job)
    with _dvc_repo(repo) as dvc:
        _dvc_call("push", lambda: dvc.push(targets=[job.dvc_file], remote=job.remote))
    _emit("push", "after", job)

    _write_journal(job, "commit")
    _emit("commit", "before", job)
    rel_dvc = os.path.relpath(job.dvc_file, repo)
    artifact = _update_artifact(job)
    paths = [rel_dvc, os.path.join(job.dest, ".gitignore"), ".dvcignore", _artifacts.PROJECT_FILE]
    paths = [p for p in paths if os.path.exists(os.path.join(repo, p))]
    _git(repo, "add", "--", *paths)
    changed = _git(repo, "diff", "--cached", "--quiet", "--no-ext-diff", "--no-textconv", "--", *paths, check=False).returncode != 0
    if changed:
        # Metric names come from the checkpoint's manifest and the store path from the caller:
        # escaped, so neither can add a line (a forged "Ckstore-Step:" trailer) to the message.
        metrics = " ".join(f"{_one_line(k)}={v:.6g}" for k, v in sorted(job.metrics.items()))
        message = (
            f"ckstore publish {job.name}: step {job.step}{' (' + metrics + ')' if metrics else ''}\n\n"
            f"Ckstore-Name: {job.name}\nCkstore-Step: {job.step}\nCkstore-Store: {_one_line(job.store)}\n"
            f"Ckstore-Dvc-File: {_one_line(rel_dvc)}\nCkstore-Md5: {md5}\n"
        )
        _git(repo, "commit", "-q", "--no-verify", "-m", message, "--", *paths)
    commit = _git(repo, "log", "-1", "--format=%H", "--", rel_dvc).stdout.strip() or None
    _emit("commit", "after", job)

    _write_journal(job, "tag")
    _emit("tag", "before", job)
    tag = _tag(job, commit) if commit else None
    _emit("tag", "after", job)
    with contextlib.suppress(FileNotFoundError):
        _durable.unlink(_journal_path(repo, job.dest, job.name), site="publish_journal")
    return PublishResult(job.name, job.step, Path(job.dvc_file), md5, commit, tag, job.remote, artifact)


def _update_artifact(job: PublishJob) -> str | None:
    """The name's entry in ``dvc.yaml`` (idempotent: a resumed publish rewrites nothing); its artifact name."""
    name = _artifacts.artifact_name(version_tag_prefix(job.name, job.dest))
    if name is not None:
        _check_plain_file(os.path.join(job.repo, _artifacts.PROJECT_FILE))
        path = os.path.relpath(job.alias_dir, job.repo).replace(os.sep, "/")
        _artifacts.update(job.repo, name, _artifacts.entry(path))
    return name


def run_publish(job: PublishJob) -> PublishResult:
    """Publish synchronously (the background worker calls this). Recovers interrupted publishes first."""
    _import_dvc()
    with _repo_lock(job.repo):
        _recover_locked(job.repo)
        _sweep_old_versions(job)
        _check_alias(job)
        _ensure_dvcignore(job.repo)
        _make_dirs(job.repo, job.dest_dir, what="publish dest")
        _check_plain_file(os.path.join(job.dest_dir, ".gitignore"))  # DVC appends "/<name>" to it
        token = secrets.token_hex(4)
        tmp, old = _tmp_paths(job, token)
        _write_journal(job, "materialize", token)
        _emit("materialize", "before", job)
        try:
            _materialize(job, tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                _remove(tmp, site="publish_rollback")
                _durable.unlink(_journal_path(job.repo, job.dest, job.name), site="publish_journal")
            raise
        _emit("materialize", "after", job)
        _write_journal(job, "swap", token)
        _emit("swap", "before", job)
        _swap(job, tmp, old)
        _emit("swap", "after", job)
        return _finish(job)


# ------------------------------------------------------------------ DVC garbage collection


def collect_garbage(repo: str | os.PathLike[str], *, cloud: bool = False, remote: str | None = None, dry: bool = False) -> None:
    """``dvc gc`` that keeps everything any branch, tag or the workspace names.

    Plain ``dvc gc -w`` (and ``-w -c``) deletes the objects behind git tags, i.e.
    every earlier published version (``<name>@v<k>.0.0``); ckstore only ever passes
    ``--workspace --all-branches --all-tags``. ``cloud=True`` also collects the
    remote, with the same protection.
    """
    root = resolve_repo(repo)
    with _repo_lock(root), _dvc_repo(root) as dvc:
        _dvc_call(
            "gc",
            lambda: dvc.gc(workspace=True, all_branches=True, all_tags=True, cloud=cloud, remote=remote if cloud else None, force=True, dry=dry),
        )


# ------------------------------------------------------------------ pull


def pull(
    target: str | os.PathLike[str],
    *,
    repo: str | os.PathLike[str] | None = None,
    remote: str | None = None,
    force: bool = False,
    rev: str | None = None,
) -> Path:
    """Fetch a published checkpoint (as it was at git revision ``rev``) and install it verified at ``target``; see :mod:`ckstore.integrations.dvc.pull`."""
    from .pull import pull as pull_verified

    return pull_verified(target, repo=repo, remote=remote, force=force, rev=rev)
