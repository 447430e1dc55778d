"""The DVC and file operations publish and pull share: opening a DVC repository, typed DVC errors,
streaming a file while hashing it, reading a manifest, creating and removing directories durably."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import CkstoreError, DvcError, IntegrityError, ManifestError
from ...format.chunks import ChunkedHash, ChunkStreamHasher
from ...format.hashing import HashInfo, new_hasher
from ...format.manifest import MAX_MANIFEST_BYTES
from ...storage import durable as _durable
from ...storage import safeio as _safeio
from .files import check_real_dirs, read_capped

INSTALL_HINT = "DVC is not installed; install it with: pip install 'ckstore[dvc]'"
_CHUNK = 8 << 20


def _import_dvc():
    try:
        from dvc.repo import Repo
    except ImportError as exc:
        raise DvcError(INSTALL_HINT) from exc
    return Repo


def _check_installed() -> None:
    try:
        found = importlib.util.find_spec("dvc.repo") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise DvcError(INSTALL_HINT)


@contextlib.contextmanager
def _dvc_repo(root: str) -> Iterator[Any]:
    """A fresh ``dvc.repo.Repo`` per operation: a long-lived one caches stale state."""
    Repo = _import_dvc()
    try:
        repo = _dvc_call("open", lambda: Repo(root, _wait_for_lock=True))  # wait for DVC's lock, don't fail after 3 s
    except DvcError as exc:
        if not isinstance(exc.__cause__, TypeError):
            raise
        repo = _dvc_call("open", lambda: Repo(root))  # pragma: no cover - a DVC without the private flag
    try:
        repo.scm_context.quiet = True  # no "To track the changes with git" hints on stdout
        yield repo
    finally:
        repo.close()


def _dvc_call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except CkstoreError:
        raise
    except Exception as exc:  # DVC raises its own hierarchy (DvcException) and library errors
        raise DvcError(f"dvc {what} failed: {type(exc).__name__}: {exc}") from exc


def _hash_file(
    path: str, *, copy_to: str | None, expected: HashInfo | ChunkedHash | None, md5: str | None = None, site: str
) -> tuple[int, str]:
    """Stream ``path`` once: hash it (manifest algorithm and md5), optionally copying it to ``copy_to`` (fsynced).

    Raises IntegrityError naming ``path`` (or ``md5``'s object) on any mismatch.
    Returns ``(size, md5 hex)``.
    """
    # A format-2 file is checked against its root, recomputed from its chunks as the bytes stream by.
    if isinstance(expected, ChunkedHash):
        hasher: Any = ChunkStreamHasher(expected.algo, expected.chunk_size)
        expected = expected.root
    else:
        hasher = new_hasher(expected.algo) if expected is not None else None
    md5_hasher = hashlib.md5(usedforsecurity=False)
    try:
        # The store's one no-follow open: never a symlink, never blocked by a FIFO planted where a file belongs.
        fd, _ = _safeio.open_regular(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing", path=path, expected="file", actual="missing") from None
    except _safeio.NotRegularFile as exc:
        raise IntegrityError(f"{path}: not a regular file ({exc.kind})", path=path, expected="regular file", actual="special file") from None
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot open ({exc.strerror})", path=path, expected="readable file", actual=exc.strerror) from None
    fh = os.fdopen(fd, "rb", buffering=0)
    writer = None
    size = 0
    try:
        with fh:
            writer = _durable.create(copy_to, site=site) if copy_to is not None else None
            while True:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                md5_hasher.update(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                if writer is not None:
                    writer.write(chunk)
        if writer is not None:
            writer.sync()
    finally:
        if writer is not None:
            writer.close()
    actual_md5 = md5_hasher.hexdigest()
    if md5 is not None and actual_md5 != md5:
        raise IntegrityError(f"{path}: md5 {actual_md5} but DVC names it {md5}", path=path, expected=f"md5:{md5}", actual=f"md5:{actual_md5}")
    if hasher is not None and expected is not None:
        actual = HashInfo(expected.algo, hasher.hexdigest())
        if actual != expected:
            raise IntegrityError(f"{path}: hash {actual} but the manifest says {expected}", path=path, expected=str(expected), actual=str(actual))
    return size, actual_md5


def _read_small(path: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """A manifest's bytes: never through a symlink, never blocking on a FIFO, at most ``limit`` (the cap every manifest reader applies)."""
    try:
        return read_capped(path, limit, what="manifest")
    except DvcError as exc:
        raise ManifestError(str(exc), path=path) from None


def _make_dirs(root: str, path: str, *, what: str) -> None:
    """Create ``path`` below ``root`` (durably), after checking no component is a symlink.

    A cloned repository may hold ``models -> /home/victim``: writing through it
    would put the publish's files outside the repository before DVC refuses.
    """
    check_real_dirs(root, path, what=what)
    rel = os.path.relpath(path, root)
    here = root
    for part in [] if rel == "." else rel.split(os.sep):
        here = os.path.join(here, part)
        if _durable.make_dir(here, site="publish_mkdir", exist_ok=True):
            _durable.sync_dir(os.path.dirname(here), site="publish_mkdir_dir")
    check_real_dirs(root, path, what=what)


def _remove(path: str, *, site: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        _durable.remove_tree(path, site=site)
    elif os.path.lexists(path):
        _durable.unlink(path, site=site)


def _sweep_atomic_temps(directory: str, names: tuple[str, ...], *, site: str) -> None:
    """Remove what a killed atomic replace of ``names`` in ``directory`` left (``.<name>.tmp-<hex>``).

    A publish killed between writing such a temp file and renaming it over the target
    leaves an untracked file in the user's git work tree (``git status`` is no longer
    clean); only the caller's files are matched, so nothing of the user's is touched.
    Runs under the repository lock: no live publish is writing one of these.
    """
    prefixes = tuple(f".{name}.tmp-" for name in names)
    for leftover in os.listdir(directory):
        if leftover.startswith(prefixes) and _durable.is_temp_name(leftover):
            with contextlib.suppress(FileNotFoundError):
                _durable.unlink(os.path.join(directory, leftover), site=site)
