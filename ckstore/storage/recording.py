"""The recording backend: the local backend, with every operation that changes the disk reported.

The crash model (``fault_injection/crashmodel.py``) runs a workload once with
this backend installed (``storage.base.using``) and turns the report into a
trace it replays onto an in-memory file system, to enumerate what a crash may
leave after each operation. Each operation is reported twice,
``record(op, "before", path, info)`` and ``record(op, "after", path, info)``,
with ``op`` one of ``durable.OPS`` and ``info`` holding ``site`` (and ``dst``
for renames and links, ``offset`` and ``data`` for writes); the "after" comes
only once the operation has taken effect. A composite operation (an atomic
replace, a tree removal) is reported as the steps it is made of.

``fsync`` is the system call the local backend fsyncs with: a recorder that
fails one (EIO, as a failing disk does) passes its own, and the failure
reaches the library's own error handling exactly where ``os.fsync`` would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from . import durable as _durable
from .base import Path
from .local import LocalStorage

Record = Callable[[str, str, str, dict[str, Any]], None]


class _RecordingWriter(_durable.FileWriter):
    """A :class:`~ckstore.storage.durable.FileWriter` that reports its writes, fsync and close."""

    __slots__ = ("_record",)

    def __init__(self, path: Path, *, record: Record, site: str, mode: int, direct: bool, fsync: Callable[[int], None]) -> None:
        self._record = record
        super().__init__(path, site=site, mode=mode, direct=direct, fsync=fsync)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        info = {"site": self.site, "offset": self.offset, "data": view}
        self._record("write", "before", self.path, info)
        super().write(view)
        self._record("write", "after", self.path, info)

    def sync(self) -> None:
        info = {"site": self.site}
        self._record("fsync", "before", self.path, info)
        super().sync()
        self._record("fsync", "after", self.path, info)

    def close(self) -> None:
        if self._fd < 0:
            return
        info = {"site": self.site}
        self._record("close", "before", self.path, info)
        super().close()
        self._record("close", "after", self.path, info)


class RecordingStorage(LocalStorage):
    """:class:`~ckstore.storage.local.LocalStorage` that reports each operation to ``record``."""

    def __init__(self, record: Record, *, fsync: Callable[[int], None] | None = None) -> None:
        super().__init__(fsync=fsync)
        self.record = record

    def _around(self, op: str, path: Path, info: dict[str, Any], run: Callable[[], Any]) -> Any:
        path = os.fspath(path)
        self.record(op, "before", path, info)
        result = run()
        self.record(op, "after", path, info)
        return result

    def create(self, path: Path, *, site: str = "file", mode: int = 0o644, direct: bool = False) -> _durable.FileWriter:
        info = {"site": site}
        return self._around(
            "create", path, info, lambda: _RecordingWriter(path, record=self.record, site=site, mode=mode, direct=direct, fsync=self.fsync)
        )

    def make_dir(self, path: Path, *, site: str, exist_ok: bool = False) -> bool:
        path = os.fspath(path)
        self.record("mkdir", "before", path, {"site": site})
        made = super().make_dir(path, site=site, exist_ok=exist_ok)
        if made:  # an existing directory (exist_ok) changed nothing on disk
            self.record("mkdir", "after", path, {"site": site})
        return made

    def link(self, src: Path, dst: Path, *, site: str) -> None:
        self._around("link", src, {"site": site, "dst": os.fspath(dst)}, lambda: super(RecordingStorage, self).link(src, dst, site=site))

    def sync_dir(self, path: Path, *, site: str) -> None:
        self._around("fsync_dir", path, {"site": site}, lambda: super(RecordingStorage, self).sync_dir(path, site=site))

    def rename(self, src: Path, dst: Path, *, site: str, replace: bool = False) -> None:
        info = {"site": site, "dst": os.fspath(dst)}
        self._around("rename", src, info, lambda: super(RecordingStorage, self).rename(src, dst, site=site, replace=replace))

    def unlink(self, path: Path, *, site: str) -> None:
        self._around("unlink", path, {"site": site}, lambda: super(RecordingStorage, self).unlink(path, site=site))

    def remove_dir(self, path: Path, *, site: str) -> None:
        self._around("rmdir", path, {"site": site}, lambda: super(RecordingStorage, self).remove_dir(path, site=site))

    def unlink_at(self, dir_fd: int, name: str, path: str, site: str) -> bool:
        return self._removed_at("unlink", path, site, lambda: super(RecordingStorage, self).unlink_at(dir_fd, name, path, site))

    def rmdir_at(self, dir_fd: int, name: str, path: str, site: str) -> bool:
        return self._removed_at("rmdir", path, site, lambda: super(RecordingStorage, self).rmdir_at(dir_fd, name, path, site))

    def _removed_at(self, op: str, path: str, site: str, run: Callable[[], bool]) -> bool:
        self.record(op, "before", path, {"site": site})
        removed = run()
        if removed:  # gone already: nothing changed
            self.record(op, "after", path, {"site": site})
        return removed
