"""The read side of a store: listing, resolving, reading manifests, tags and recorded metrics, verifying.

A :class:`Catalog` belongs to one :class:`ckstore.Store` object and keeps what
that object learned: the bounded manifest cache (``manifest_cache``), the
checkpoints it saw fail to load or verify (``corrupt``: retention gives them no
slot and never deletes them) and those it saw verify (``verified``: retention
need not hash them again). It never writes.

Steps are ordered numerically from the manifest, never by name or mtime;
"latest" is the last committed (the manifest's ``created``; see
``ckstore.checkpoint.retention``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, CheckpointReadError, CkstoreError, IntegrityError, InvalidArgumentError, ManifestError
from ..format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, count_nodes, parse_manifest
from ..format.tags import TAGS_NAME, TagEntry, check_tag_name
from .tagfile import read_tags
from ..engine.read import verify_tensor_file
from ..format.skeleton import tensor_refs
from ..storage import safeio as _safeio
from ..storage.layout import CHECKPOINTS_DIR, STEP_DIR, step_dir_name
from .manifest_cache import ManifestCache
from .metrics_log import METRICS_NAME, Recorded, read_metrics
from .retention import RetentionPolicy, commit_order, rank_best

#: The Python advice of best() with no metric known; the CLI replaces it with its own (it has no ``metric=``).
NO_METRIC_ADVICE = "open the store with metric=... to rank checkpoints"


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint failed verification and was skipped; it is left on disk untouched."""


class CorruptStoreFileWarning(CorruptCheckpointWarning):
    """``tags.json`` or ``metrics.json`` failed its checksum or does not parse; it is ignored until repaired.

    Not a checkpoint: every checkpoint still loads. A subclass of
    CorruptCheckpointWarning, so a filter written for that one still applies.
    """


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as listed by :meth:`Store.checkpoints`."""

    step: int
    metrics: Mapping[str, float]
    tags: tuple[str, ...]
    path: Path
    created: float
    nbytes: int
    files: Mapping[str, FileEntry] = field(repr=False, compare=False, default_factory=dict)
    #: The manifest's format: 2 (chunk tables, ranged verification) or 1 (one hash per file).
    format_version: int = 2


@dataclass(frozen=True)
class Problem:
    """One defect found by :meth:`Store.verify`."""

    step: int | None
    path: str
    message: str
    expected: Any = None
    actual: Any = None


def check_step(step: object) -> int:
    """A step number as given by a caller: a non-negative int below 2**63 (InvalidArgumentError otherwise)."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidArgumentError(f"step must be an integer, got {type(step).__name__}")
    if step < 0:
        raise InvalidArgumentError(f"step must be non-negative, got {step}")
    if step >= 1 << 63:  # step directories hold at most 30 digits; int64 is plenty and portable
        raise InvalidArgumentError(f"step must be below 2**63, got {step}")
    return int(step)


class Catalog:
    """Listing, resolving and verifying the committed checkpoints of the store at ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = Path(root)
        self.ckpt_dir = os.path.join(root, CHECKPOINTS_DIR)
        self.manifest_cache = ManifestCache()
        #: step -> manifest ``created`` of each checkpoint a load or verify through this object found corrupt
        #: (``created`` tells it from a later checkpoint of the same step); retention gives them no slot.
        self.corrupt: dict[int, float] = {}
        #: step -> ``created`` of each checkpoint this object committed or that verified in retention's check
        #: (``ckstore.checkpoint.pruning``): one that holds a retention slot is verified once per object, not per save.
        self.verified: dict[int, float] = {}

    # ------------------------------------------------------------ store files

    def read_tags(self) -> dict[str, TagEntry]:
        return read_tags(os.path.join(self.root, TAGS_NAME))

    def read_metrics_log(self) -> dict[int, Recorded]:
        return read_metrics(os.path.join(self.root, METRICS_NAME))

    def step_dirs(self) -> list[tuple[int, str]]:
        try:
            names = os.listdir(self.ckpt_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CheckpointReadError(f"{self.ckpt_dir}: cannot list checkpoints: {exc.strerror or exc}", path=self.ckpt_dir, errno=exc.errno) from None
        out = []
        for name in names:
            match = STEP_DIR.fullmatch(name)  # not match(): "$" also accepts "step-00000001\n"
            if match:
                out.append((int(match.group(1)), name))
        out.sort()
        return out

    def exists(self, step: int) -> bool:
        # lexists, not isfile: a committed step whose manifest.json is a directory or a FIFO is malformed,
        # not gone; pruning its tag here would drop the tag that its quarantine note must record.
        return os.path.lexists(os.path.join(self.ckpt_dir, step_dir_name(step), MANIFEST_NAME))

    def manifest(self, name: str, *, full: bool = True) -> Manifest:
        """Parse (or reuse the parse of) a checkpoint's manifest. Raises ManifestError/IntegrityError.

        The file is read through ``ckstore.storage.safeio`` (no symlink, no
        FIFO, at most MAX_MANIFEST_BYTES) and the parse cached, bounded
        (``ckstore.checkpoint.manifest_cache``); ``full=False`` accepts a
        cached summary without the state skeleton, which is all a listing
        needs. A vanished manifest is CheckpointNotFoundError (deleted by a
        writer meanwhile); an OS error (EIO) is CheckpointReadError.
        """
        path = os.path.join(self.ckpt_dir, name, MANIFEST_NAME)
        if os.path.islink(os.path.join(self.ckpt_dir, name)):
            # A symlinked checkpoint directory would make every read leave the store.
            raise ManifestError(f"{os.path.join(self.ckpt_dir, name)}: checkpoint directory is a symlink; refusing to read outside the store", path=path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: checkpoint vanished or has no manifest") from None
        except OSError as exc:
            raise CheckpointReadError(f"{path}: cannot read manifest: {exc.strerror or exc}", path=path, errno=exc.errno) from None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self.manifest_cache.get(name, key, full=full)
        if cached is not None:
            return cached
        try:
            data = _safeio.read_small(path, cap=MAX_MANIFEST_BYTES, what="manifest", error=lambda reason: ManifestError(f"{path}: {reason}", path=path))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: checkpoint vanished or has no manifest") from None
        manifest = parse_manifest(data, path=path)
        expected = int(STEP_DIR.match(name).group(1))  # type: ignore[union-attr]
        if manifest.step != expected:
            raise ManifestError(f"{path}: manifest says step {manifest.step} but lives in {name}", path=path)
        self.manifest_cache.put(name, key, manifest, len(data), count_nodes(data))
        return manifest

    def remember(self, name: str, manifest: Manifest) -> None:
        """Cache the manifest a commit just wrote: it need not be read back and parsed again
        (a 10,000-tensor skeleton costs tens of milliseconds to check)."""
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(self.ckpt_dir, name, MANIFEST_NAME))
            self.manifest_cache[name] = ((st.st_ino, st.st_mtime_ns, st.st_size), manifest)

    def forget(self, step: int) -> None:
        """Drop what this object knew of ``step`` (it left ``checkpoints/``)."""
        self.manifest_cache.pop(step_dir_name(step), None)

    # ------------------------------------------------------------ listing

    def info(self, manifest: Manifest, tags_by_step: Mapping[int, list[str]], recorded: Mapping[int, Recorded] | None = None) -> CheckpointInfo:
        extra = (recorded or {}).get(manifest.step)
        metrics = dict(manifest.metrics)
        if extra is not None and extra.created == manifest.created:  # metrics recorded after the save (ckstore.checkpoint.metrics_log)
            metrics.update(extra.metrics)
        return CheckpointInfo(
            step=manifest.step,
            metrics=metrics,
            tags=tuple(sorted(tags_by_step.get(manifest.step, ()))),
            path=self.path / CHECKPOINTS_DIR / step_dir_name(manifest.step),
            created=manifest.created,
            nbytes=manifest.nbytes,
            files=dict(manifest.files),
            format_version=manifest.format_version,
        )

    def _annotations(self, *, warn: bool) -> tuple[dict[int, list[str]], dict[int, Recorded]]:
        """Tags by step and recorded metrics; each unreadable one is left out (with a warning when ``warn``)."""
        tags_by_step: dict[int, list[str]] = {}
        try:
            tags = self.read_tags()
        except (ManifestError, IntegrityError) as exc:
            if warn:
                warnings.warn(f"{exc}; listing checkpoints without tags", CorruptStoreFileWarning, stacklevel=4)
            tags = {}
        for tag, entry in tags.items():
            tags_by_step.setdefault(entry.step, []).append(tag)
        try:
            recorded = self.read_metrics_log()
        except (ManifestError, IntegrityError) as exc:
            if warn:
                warnings.warn(f"{exc}; listing checkpoints without their recorded metrics", CorruptStoreFileWarning, stacklevel=4)
            recorded = {}
        return tags_by_step, recorded

    def listing(self, *, warn: bool = True) -> list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, ascending by step; the others are skipped (warned when ``warn``)."""
        tags_by_step, recorded = self._annotations(warn=warn)
        infos = []
        for _, name in self.step_dirs():
            try:
                manifest = self.manifest(name, full=False)
            except CheckpointNotFoundError:
                continue  # deleted between listdir and open
            except (ManifestError, IntegrityError) as exc:
                if warn:
                    warnings.warn(f"skipping {name}: {exc}", CorruptCheckpointWarning, stacklevel=3)
                continue
            infos.append(self.info(manifest, tags_by_step, recorded))
        return infos

    def best_metric(self, infos: Sequence[CheckpointInfo], policy: RetentionPolicy) -> tuple[str, str] | None:
        if policy.metric is not None:
            return policy.metric, policy.mode
        for info in reversed(infos):  # the newest manifest records the policy its writer used
            try:
                retention = self.manifest(info.path.name, full=False).retention
            except CheckpointNotFoundError:
                continue  # deleted by a writer's retention since it was listed
            if retention is not None:
                return retention["metric"], retention["mode"]
        return None

    def ranked_best(self, policy: RetentionPolicy) -> list[CheckpointInfo]:
        """Checkpoints with the metric, best first, less those this object saw fail; InvalidArgumentError if no metric is known."""
        infos = self.listing()
        chosen = self.best_metric(infos, policy)
        if chosen is None:
            if not infos:
                return []
            raise InvalidArgumentError(f"{self.root}: no metric configured; {NO_METRIC_ADVICE}")
        healthy = [info for info in infos if self.corrupt.get(info.step) != info.created]
        return rank_best(healthy, *chosen)  # type: ignore[return-value]

    def latest(self) -> CheckpointInfo | None:
        infos = self.listing()
        return commit_order(infos)[-1] if infos else None  # type: ignore[return-value]

    def resolve(self, step: int | str, policy: RetentionPolicy) -> CheckpointInfo:
        """The checkpoint named by a step, ``"latest"``, ``"best"`` or a tag."""
        if isinstance(step, str):
            if step == "latest":
                info = self.latest()
            elif step == "best":
                ranked = self.ranked_best(policy)
                info = ranked[0] if ranked else None
            else:
                check_tag_name(step)
                entry = self.read_tags().get(step)
                if entry is None:
                    raise CheckpointNotFoundError(f"{self.root}: no checkpoint is tagged {step!r}", step=step)
                return self.resolve_step(entry.step)
            if info is None:
                raise CheckpointNotFoundError(f"{self.root}: no {step} checkpoint (store is empty or no checkpoint has the metric)", step=step)
            return info
        return self.resolve_step(check_step(step))

    def resolve_step(self, step: int) -> CheckpointInfo:
        name = step_dir_name(step)
        if not os.path.isdir(os.path.join(self.ckpt_dir, name)):
            raise CheckpointNotFoundError(f"{self.root}: no checkpoint at step {step}", step=step)
        manifest = self.manifest(name, full=False)
        tags_by_step, recorded = self._annotations(warn=False)
        return self.info(manifest, tags_by_step, recorded)

    # ------------------------------------------------------------ verification

    def verify(self, step: int | str | None, policy: RetentionPolicy) -> list[Problem]:
        """Every problem of one checkpoint (or all when None), tags.json and metrics.json; see :meth:`Store.verify`."""
        problems: list[Problem] = []
        if step is None:
            try:
                targets = self.step_dirs()
            except CheckpointReadError as exc:
                problems.append(Problem(None, exc.path, str(exc), exc.expected, exc.actual))
                targets = []
        elif isinstance(step, int) and not isinstance(step, bool):
            # By number, without parsing the manifest: a corrupt manifest is a problem to report, not an error.
            number = check_step(step)
            if not os.path.isdir(os.path.join(self.ckpt_dir, step_dir_name(number))):
                raise CheckpointNotFoundError(f"{self.root}: no checkpoint at step {number}", step=number)
            targets = [(number, step_dir_name(number))]
        else:
            info = self.resolve(step, policy)
            targets = [(info.step, info.path.name)]
        for number, name in targets:
            found = self.verify_dir(number, name)
            self._note_verified(number, name, ok=not found)
            problems.extend(found)
        for read, name in ((self.read_tags, TAGS_NAME), (self.read_metrics_log, METRICS_NAME)):
            with contextlib.suppress(FileNotFoundError):
                try:
                    read()
                except (ManifestError, IntegrityError) as exc:
                    problems.append(Problem(None, os.path.join(self.root, name), str(exc)))
        return problems

    def _note_verified(self, step: int, name: str, *, ok: bool) -> None:
        """Record what verify() found, so retention neither re-hashes a sound checkpoint nor gives a corrupt one a slot."""
        with contextlib.suppress(CkstoreError):  # an unreadable manifest: not listed, so retention never sees it
            created = self.manifest(name).created
            if ok:
                self.mark_sound(step, created)
            else:
                self.corrupt[step] = created

    def mark_sound(self, step: int, created: float) -> None:
        """Every file of ``step`` just hashed right: no re-hash by retention, and a transient read error is forgotten."""
        self.verified[step] = created
        if self.corrupt.get(step) == created:
            del self.corrupt[step]

    def verify_dir(self, step: int, name: str) -> list[Problem]:
        directory = os.path.join(self.ckpt_dir, name)
        try:
            manifest = self.manifest(name)
        except CheckpointNotFoundError as exc:
            if not os.path.isdir(directory):
                return []  # deleted by a writer since it was listed
            return [Problem(step, os.path.join(directory, MANIFEST_NAME), str(exc), "manifest.json", "missing")]
        except IntegrityError as exc:
            return [Problem(step, exc.path, str(exc), exc.expected, exc.actual)]
        except ManifestError as exc:
            return [Problem(step, exc.path or directory, str(exc))]
        problems = []
        wanted: dict[str, set[str]] = {}
        for file, key in tensor_refs(manifest.state):
            wanted.setdefault(file, set()).add(key)
        for file, entry in manifest.files.items():
            path = os.path.join(directory, file)
            try:
                specs = verify_tensor_file(path, size=entry.size, expected=entry.expected)
            except IntegrityError as exc:
                problems.append(Problem(step, exc.path, str(exc), exc.expected, exc.actual))
                continue
            for key in sorted(wanted.get(file, set()) - specs.keys()):
                problems.append(Problem(step, path, f"{path}: tensor {key!r} named by the manifest is not in the file", key, "missing"))
        try:
            extra = self.unlisted(directory, manifest)
        except CkstoreError as exc:
            problems.append(Problem(step, directory, str(exc)))
            extra = set()
        for name_ in sorted(extra):
            problems.append(Problem(step, os.path.join(directory, name_), "file not listed in the manifest", None, "unlisted file"))
        if problems and not os.path.isdir(directory):
            return []  # deleted (by a writer's retention) while being checked: gone, not corrupt
        return problems

    def refuse_unlisted(self, directory: str, manifest: Manifest, step: int) -> None:
        """A file in the checkpoint that its manifest does not list (planted, or a symlink out) fails the load, as it fails verify()."""
        extra = sorted(self.unlisted(directory, manifest))
        if extra:
            path = os.path.join(directory, extra[0])
            raise IntegrityError(f"{path}: file not listed in the manifest (step {step} holds {len(extra)} such)", path=path, expected=None, actual="unlisted file")

    def unlisted(self, directory: str, manifest: Manifest) -> set[str]:
        try:
            present = os.listdir(directory)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{directory}: checkpoint was deleted while being loaded") from None
        except OSError as exc:
            raise CheckpointReadError(f"{directory}: cannot list the checkpoint: {exc.strerror or exc}", path=directory, errno=exc.errno) from None
        return set(present) - set(manifest.files) - {MANIFEST_NAME}
