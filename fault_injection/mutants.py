"""Realistic bugs for the mutation tier, each a small patch to a copy of the ckstore package.

A patch is a list of line edits anchored on a *stripped* source line that
must occur exactly once in its file (site names and short statements that
other edits of the library leave alone); indentation is taken from the
anchor, so re-indented code still matches. :func:`apply` refuses loudly
(:class:`PatchError`) when an anchor is missing or ambiguous, or when the
patched file no longer compiles: a mutant that silently does not apply would
report a bug as caught that was never there.

Kinds: ordering, retention arithmetic, recovery, error handling, incremental
links, tags and pins, background saves. Each mutant names the workloads that
reach its code; the tier runs the tiers of :data:`TIER_ORDER` on them.
"""

from __future__ import annotations

import os
import py_compile
import shutil
from dataclasses import dataclass, field


class PatchError(RuntimeError):
    """A mutant's patch does not apply to the package as it is now."""


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the package
    anchor: str  # a stripped source line; must occur exactly once
    action: str  # "replace" | "after" | "before"
    lines: tuple[str, ...]  # new lines, indented relative to the anchor
    dedent: int = 0  # levels (4 spaces) to remove from the anchor's indentation for the new lines


@dataclass(frozen=True)
class Mutant:
    name: str
    kind: str
    what: str
    edits: tuple[Edit, ...]
    workloads: tuple[str, ...]
    badfiles: bool = False  # also open every crafted bad file writable
    tiers: tuple[str, ...] = field(default=("kill", "model", "fsyncgate", "errors", "badfiles"))
    #: Tiers to try first when the run stops at the first catch (ci): the one meant to catch it.
    first: tuple[str, ...] = ()


#: The order tiers run in for a mutant (cheapest first); in the ci profile the first catch ends it.
TIER_ORDER = ("kill", "model", "fsyncgate", "errors", "badfiles", "power")

_S = "store.py"
_D = "storage/durable.py"
_R = "checkpoint/retention.py"
_W = "engine/write.py"
_C = "checkpoint/commit.py"
_A = "checkpoint/background.py"
#: The commit call of a save, in Store._persist.
_COMMIT = "self._committer.commit(request, retention=self._retention_note(), check=self._saver.check_abandoned)"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "tags_fsync_after_rename",
        "ordering",
        "write_file_atomic renames the temp file over tags.json before fsyncing it",
        (
            Edit(_D, "writer.sync()", "replace", ("pass  # mutant: the fsync moved after the rename",)),
            Edit(
                _D,
                "rename(tmp, path, site=site, replace=True)",
                "after",
                (
                    "if durable:",
                    "    _fd = os.open(path, os.O_RDONLY)",
                    "    try:",
                    '        _emit("fsync", "before", path, {"site": site})',
                    "        os.fsync(_fd)",
                    '        _emit("fsync", "after", path, {"site": site})',
                    "    finally:",
                    "        os.close(_fd)",
                ),
            ),
        ),
        ("tag_update", "tags_race"),
        first=('model',),
    ),
    Mutant(
        "tensor_fsync_after_commit",
        "ordering",
        "tensor files are fsynced (through duplicated descriptors) only after the commit rename",
        (
            Edit(_C, "def finish_files(batch: list[tuple[Future | None, _durable.FileWriter]]) -> None:", "before", ("DEFERRED: list = []  # mutant",)),
            Edit(
                _C,
                "tensor_file.sync()",
                "replace",
                ("DEFERRED.append((tensor_file.path, os.dup(tensor_file._fd)))  # mutant: fsync later",),
            ),
            Edit(
                _C,
                "renamed.append(True)",
                "after",
                (
                    "for _p, _fd in DEFERRED:",
                    '    _durable._emit("fsync", "before", _p, {"site": "tensor_file"})',
                    "    os.fsync(_fd)",
                    '    _durable._emit("fsync", "after", _p, {"site": "tensor_file"})',
                    "    os.close(_fd)",
                    "DEFERRED.clear()",
                ),
            ),
        ),
        ("next_save",),
        first=('model',),
    ),
    Mutant(
        "retention_before_durable",
        "ordering",
        "retention runs after the commit rename but before the checkpoints directory is fsynced",
        (
            Edit(_C, '_durable.sync_dir(self.ckpt_dir, site="checkpoints_dir")', "replace", ("pass  # mutant: moved after retention",)),
            Edit(
                _S,
                'self.stats["saves"] += 1',
                "before",
                ("from .storage import durable as _durable", '_durable.sync_dir(self._committer.ckpt_dir, site="checkpoints_dir")'),
            ),
        ),
        ("many_files", "retention"),  # keep_last=1: the deleted predecessor was the only one kept
        first=('model',),
    ),
    Mutant(
        "retention_before_save",
        "ordering",
        "retention 'makes room' before the new checkpoint is written",
        (
            Edit(_S, "prune=lambda: self._apply_retention(protect=step),", "replace", ("prune=lambda: None,  # mutant: moved before the commit",)),
            Edit(_S, _COMMIT, "before", ("self._apply_retention()",)),
        ),
        ("retention",),
    ),
    Mutant(
        "dir_fsync_before_files",
        "ordering",
        "the staging directory is fsynced right after mkdir, before its files exist (entries never durable)",
        (
            Edit(_C, '_durable.sync_dir(staging, site="staging_dir")', "replace", ("pass  # mutant: moved before the writes",)),
            Edit(_C, '_durable.make_dir(staging, site="staging")', "after", ('_durable.sync_dir(staging, site="staging_dir")',)),
        ),
        ("next_save",),
        first=('model',),
    ),
    Mutant(
        "keep_last_too_many",
        "retention",
        "keep_last keeps one checkpoint too many",
        (Edit(_R, "keep.update(c.step for c in items[-policy.keep_last :])", "replace", ("keep.update(c.step for c in items[-(policy.keep_last + 1) :])",)),),
        ("retention", "async_retention"),
    ),
    Mutant(
        "keep_last_too_few",
        "retention",
        "keep_last keeps one checkpoint too few (off by one)",
        (Edit(_R, "keep.update(c.step for c in items[-policy.keep_last :])", "replace", ("keep.update(c.step for c in items[len(items) - policy.keep_last + 1 :])",)),),
        ("retention", "incremental"),
    ),
    Mutant(
        "keep_best_inverted",
        "retention",
        "keep_best ranks the metric the wrong way round (keeps the worst)",
        (Edit(_R, 'sign = 1 if mode == "min" else -1', "replace", ('sign = -1 if mode == "min" else 1',)),),
        ("async_retention", "gc_delete"),
    ),
    Mutant(
        "tags_do_not_pin",
        "tags",
        "retention forgets that tagged checkpoints are pinned",
        (Edit(_R, "keep.update(c.step for c in items if c.tags)", "replace", ("pass  # mutant: tags no longer pin",)),),
        ("tags_race",),
    ),
    Mutant(
        "tags_before_commit",
        "tags",
        "a save's tags are written before its checkpoint is committed",
        (
            Edit(_S, "tag=(lambda: self._annotations.tag_new(step, tag_names)) if tag_names else None,", "replace", ("tag=None,",)),
            Edit(_S, _COMMIT, "before", ("if request.tags:  # mutant: tagged before the commit", "    self._annotations.tag_new(request.step, request.tags)")),
        ),
        ("tags_race", "tag_update"),
    ),
    Mutant(
        "recovery_deletes_unparseable",
        "recovery",
        "recovery deletes a committed checkpoint whose manifest it cannot parse (instead of keeping it)",
        (
            Edit(
                _C,
                "for name in os.listdir(self.root):",
                "before",
                (
                    "for _step, _name in self.catalog.step_dirs():  # mutant",
                    "    try:",
                    "        self.catalog.manifest(_name)",
                    "    except (ManifestError, IntegrityError):",
                    '        _durable.remove_tree(os.path.join(self.ckpt_dir, _name), site="recover_staging")',
                ),
            ),
        ),
        ("recover_crash",),
        badfiles=True,
        first=('badfiles',),
    ),
    Mutant(
        "fsync_error_ignored",
        "errors",
        "FileWriter.sync ignores the result of fsync",
        (
            Edit(_D, '_emit("fsync", "before", self.path, info)', "replace", ("pass  # mutant",)),
            Edit(
                _D,
                "(self._fsync or os.fsync)(self._fd)",
                "replace",
                (
                    "try:",
                    '    _emit("fsync", "before", self.path, info)',
                    "    (self._fsync or os.fsync)(self._fd)",
                    "except OSError:",
                    "    pass  # mutant: the fsync result is ignored",
                ),
            ),
        ),
        ("next_save",),
        first=('fsyncgate',),
    ),
    Mutant(
        "earlier_batch_error_ignored",
        "errors",
        "a failed fsync in an earlier batch is ignored when the last batch succeeds",
        (Edit(_W, "for batch in batches:", "replace", ("for batch in batches[-1:]:  # mutant: only the last batch is checked",)),),
        ("model_sized",),
        first=('fsyncgate',),
    ),
    Mutant(
        "dir_fsync_eio_swallowed",
        "errors",
        "EIO from a directory fsync is swallowed",
        (Edit(_D, "(fsync or os.fsync)(fd)", "replace", ("try:", "    (fsync or os.fsync)(fd)", "except OSError:", "    pass  # mutant: EIO swallowed")),),
        ("next_save",),
        first=('fsyncgate',),
    ),
    Mutant(
        "incremental_skips_dir_fsync",
        "incremental",
        "an incremental save skips the staging directory fsync when every tensor file is hard-linked",
        (
            Edit(
                _C,
                '_durable.sync_dir(staging, site="staging_dir")',
                "replace",
                ("if self.stats.get('files_written', 1):  # mutant: 'nothing was written, nothing to sync'", '    _durable.sync_dir(staging, site="staging_dir")'),
            ),
        ),
        ("incremental",),
        first=('model',),
    ),
    Mutant(
        "async_failure_lost",
        "background",
        "a background save's failure is reported as success",
        (
            Edit(_A, "self._unseen.add(handle)", "replace", ("pass  # mutant",)),
            Edit(_A, "handle._future.set_exception(exc)", "replace", ("handle._future.set_result(None)  # mutant: the failure is lost",)),
        ),
        ("async_save", "async_retention"),
    ),
    Mutant(
        "async_no_wait",
        "background",
        "a new save does not wait for the background save in flight",
        (Edit(_S, "waited = self._saver.wait()", "replace", ("waited = 0.0  # mutant: no wait for the save in flight",)),),
        ("async_save",),
    ),
)


def by_name(name: str) -> Mutant:
    for mutant in MUTANTS:
        if mutant.name == name:
            return mutant
    raise KeyError(name)


def _apply_edit(lines: list[str], edit: Edit, where: str) -> list[str]:
    hits = [n for n, line in enumerate(lines) if line.strip() == edit.anchor]
    if len(hits) != 1:
        raise PatchError(f"{where}: anchor {edit.anchor!r} found {len(hits)} times in {edit.file} (needs exactly one); update the mutant")
    n = hits[0]
    line = lines[n]
    indent = line[: len(line) - len(line.lstrip())]
    if edit.dedent:
        indent = indent[: max(0, len(indent) - 4 * edit.dedent)]
    new = [indent + text for text in edit.lines]
    if edit.action == "replace":
        return lines[:n] + new + lines[n + 1 :]
    if edit.action == "after":
        return lines[: n + 1] + new + lines[n + 1 :]
    if edit.action == "before":
        return lines[:n] + new + lines[n:]
    raise PatchError(f"{where}: unknown action {edit.action!r}")


def apply(package_dir: str, mutant: Mutant, target: str) -> str:
    """Copy the package under ``target`` with ``mutant``'s edits; return the PYTHONPATH entry. Raises PatchError."""
    shutil.rmtree(target, ignore_errors=True)
    dest = os.path.join(target, "ckstore")
    shutil.copytree(package_dir, dest, ignore=shutil.ignore_patterns("__pycache__"))
    touched: dict[str, list[str]] = {}
    for edit in mutant.edits:
        if edit.file not in touched:
            with open(os.path.join(dest, edit.file), encoding="utf-8") as fh:
                touched[edit.file] = fh.read().split("\n")
        touched[edit.file] = _apply_edit(touched[edit.file], edit, mutant.name)
    for name, lines in touched.items():
        path = os.path.join(dest, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
        try:
            py_compile.compile(path, doraise=True)
        except py_compile.PyCompileError as exc:
            raise PatchError(f"{mutant.name}: the patched {name} does not compile: {exc.msg[:300]}") from exc
    return target
