"""Who may write a store, and when: the checks at open, the writer lock, recovery under it.

A store opened only to load is never modified ("loading never writes"): the
open only looks (lstat). The directories, the writer lock and recovery of
what an interrupted save or delete left behind all wait for the first write,
and the lock is then held for the store's life. A writable open still refuses
at once, rather than at the first save, a store another user controls, so
nothing of it is loaded and trained on first (see docs/security.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..errors import InvalidArgumentError, ReadOnlyStoreError
from ..storage.layout import check_layout, require_store
from ..storage.lock import WriterLock


def check_lock_timeout(timeout: Any) -> None:
    # The same rule WriterLock.acquire applies (a negative timeout would make filelock wait forever).
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0):
        raise InvalidArgumentError(f"lock_timeout must be None (wait forever) or a number of seconds >= 0, got {timeout!r}")


def check_store_path(path: Any) -> str:
    """The store path as text; InvalidArgumentError for bytes, a non-path or a NUL byte (os raises untyped errors)."""
    try:
        raw = os.fspath(path)
    except TypeError:
        raise InvalidArgumentError(f"store path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(raw, str):
        raise InvalidArgumentError(f"store path must be text, not {type(raw).__name__}")
    if "\0" in raw:
        raise InvalidArgumentError(f"store path holds a NUL byte: {raw!r}")
    return raw


class WriterAccess:
    """The open-time checks, then the writer lock taken at the first write (with recovery) and held until release."""

    def __init__(self, root: str, *, readonly: bool, trust_foreign: bool, lock_timeout: float | None) -> None:
        """``lock_timeout`` as checked by :func:`check_lock_timeout`."""
        self.root = root
        self.readonly = readonly
        self.trust_foreign = trust_foreign
        self.lock_timeout = lock_timeout
        self.lock: WriterLock | None
        if readonly:
            require_store(root)
            self.lock = None
        else:
            check_layout(root, write=True, trust_foreign=trust_foreign)
            self.lock = WriterLock(root)  # creates nothing until acquired

    def check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyStoreError(f"{self.root}: store is open readonly")
        # Writes that skip the writer lock (tags, recorded metrics) still never write a store another user
        # controls: the path may have been created by someone else since the store was opened.
        check_layout(self.root, write=True, trust_foreign=self.trust_foreign)

    def acquire(self, *, create_layout: Callable[[], None], recover: Callable[[], None]) -> bool:
        """Check, create and lock the store (first write only) and recover; True if this call took the lock."""
        if self.readonly or self.lock is None:
            raise ReadOnlyStoreError(f"{self.root}: store is open readonly")
        if self.lock.held:
            return False
        # Checked again at the first write: the store may have been created or changed since the open.
        check_layout(self.root, write=True, trust_foreign=self.trust_foreign)
        create_layout()
        self.lock.acquire(timeout=self.lock_timeout)
        try:
            # Checked once more under the lock: the layout directories it just made or found are
            # the ones recovery is about to empty.
            check_layout(self.root, write=True, trust_foreign=self.trust_foreign)
            recover()
        except BaseException:
            self.lock.release()
            raise
        return True

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
