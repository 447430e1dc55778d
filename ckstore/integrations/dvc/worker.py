"""The publish worker: one background thread per store runs its publishes in order.

A training loop calls ``store.publish("best", name="best")`` whenever the best
moves, so publishes of one name pile up while DVC works. Rules:

* **Pins.** ``publish()`` tags the checkpoint ``published.<name>`` before it
  is queued, so retention keeps it. While a publish *runs*, its checkpoint is
  also pinned in memory (the store's retention in this process keeps it),
  so the tag may move on to a newer best without the running publish losing
  its checkpoint. In memory, because a crash must leave no pin behind. A
  checkpoint is released when its publish is done and goes at the next
  save's retention. (Another process's retention honours only the tag.)
* **Supersede.** A newer publish of the same name, dest and repository
  replaces one that is still *queued*: the queued one never runs, and its
  :meth:`Publication.result` returns the newer one's result. Nothing fails
  because the best moved (the queued checkpoint, no longer pinned, may well
  have been deleted by retention already).
* **Failures** are raised by :meth:`Publication.result`, by the next
  ``publish`` on that store, by ``wait``/``close``, and printed at exit when
  nobody collected them.
* **Exit.** The thread (a ``ckstore.engine.worker.SerialWorker``) is not a
  daemon; at interpreter exit queued publishes finish before
  ``concurrent.futures`` closes its door (DVC's push needs it; see
  ``ckstore.engine.worker.before_thread_shutdown``).
* **Fork.** A child made with ``os.fork()`` while a publish is in flight gets a
  copy of the queue but not the thread: an ``os.register_at_fork`` handler
  empties every publisher in the child (``ckstore.engine.worker`` resets the
  thread and the failure record), so its exit waits for nothing. The
  publish belongs to the parent, which finishes and reports it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import warnings
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING

from ...engine.worker import SerialWorker, UnseenFailures, before_thread_shutdown
from .ops import _check_installed
from .publish import (
    DEFAULT_DEST,
    TAG_PREFIX,
    PublishJob,
    PublishResult,
    check_dest,
    check_name,
    check_remote,
    resolve_repo,
    run_publish,
)
from ...errors import CheckpointNotFoundError, CkstoreError, DvcError, InvalidArgumentError

if TYPE_CHECKING:
    from ...store import Store

_RESOLVE_TRIES = 5


class Publication:
    """A queued publish. :meth:`result` waits for it and raises its failure."""

    def __init__(self, job: PublishJob, future: Future[PublishResult], publisher: _Publisher) -> None:
        self.job = job
        self._future = future
        self._publisher = publisher

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def step(self) -> int:
        return self.job.step

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> PublishResult:
        """Wait (up to ``timeout`` seconds) and return the result; raises DvcError (or the CkstoreError) on failure.

        A publish superseded while queued returns the result of the one that superseded it.
        """
        try:
            return self._future.result(timeout)
        except BaseException:
            self._publisher.reported(self._future)
            raise

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"Publication(name={self.name!r}, step={self.step}, {state})"


def _same_target(a: PublishJob, b: PublishJob) -> bool:
    return (a.repo, a.dest, a.name) == (b.repo, b.dest, b.name)


def _forward(source: Future[PublishResult], target: Future[PublishResult]) -> None:
    """When ``source`` is done, give ``target`` its outcome (``target`` was superseded by it)."""

    def done(f: Future[PublishResult]) -> None:
        if target.done():
            return
        exc = f.exception()
        if exc is not None:
            target.set_exception(exc)
        else:
            target.set_result(f.result())

    source.add_done_callback(done)


class _Publisher:
    """One worker thread per store: runs publishes in submission order."""

    def __init__(self, store: Store) -> None:
        self._store = weakref.ref(store)
        # Not a daemon: a script that ends right after publish() still finishes publishing.
        # Stops when idle, so a store with nothing queued never holds the interpreter's exit.
        self._worker = SerialWorker("ckstore-publish", daemon=False, stop_when_idle=True)
        self._unreported: UnseenFailures[Future[PublishResult]] = UnseenFailures()
        self._reset()
        _all_publishers.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[tuple[PublishJob, Future[PublishResult]]] = []
        self._working = False  # a _work loop is queued or running on self._worker
        self._futures: list[Future[PublishResult]] = []
        self._running: PublishJob | None = None

    def submit(self, job: PublishJob) -> Future[PublishResult]:
        """Pin ``job``'s checkpoint and queue it, superseding a queued publish of the same target.

        Pinning happens under the queue's lock, so the worker's decisions (what
        runs, what is pinned while running) never interleave with a tag move.
        """
        future: Future[PublishResult] = Future()
        store = self._store()
        with self._lock:
            if store is not None:
                store.tag(job.step, TAG_PREFIX + job.name)  # pins it: never removed by retention while named
            for queued in [q for q in self._queue if _same_target(q[0], job)]:
                self._queue.remove(queued)
                self._futures.remove(queued[1])
                _forward(future, queued[1])
            self._queue.append((job, future))
            self._futures.append(future)
            if not self._working:
                self._working = True
                self._worker.submit(self._work)
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._working = False
                    return
                job, future = self._queue.pop(0)
                self._running = job
                # Still named by its tag here (a move would have superseded it under this lock):
                # pinned in memory from now on, whatever the tag does.
                self._pin({job.step})
            if not future.set_running_or_notify_cancel():
                self._unpin()
                continue
            result: PublishResult | None = None
            error: BaseException | None = None
            try:
                result = run_publish(job)
            except BaseException as exc:
                error = exc
                if not isinstance(exc, CkstoreError):
                    error = DvcError(f"publishing {job.name!r} (step {job.step}) failed: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
            self._unpin()
            # Before the result is out: whoever waits on it (close() included) finds retention
            # already applied to what this publish and the tags it saw move no longer pin.
            self._retain()
            if error is not None:
                self._unreported.add(future)
                future.set_exception(error)
            else:
                future.set_result(result)

    def _pin(self, steps: set[int]) -> None:
        store = self._store()
        if store is not None:
            store._publish_reading = frozenset(steps)  # one assignment: retention reads it whole

    def _unpin(self) -> None:
        with self._lock:
            self._running = None
            self._pin(set())

    def _retain(self) -> None:
        """Apply the store's retention now that a pin is gone (only where this process is its writer)."""
        store = self._store()
        if store is None:
            return
        try:
            store._retain_after_publish()
        except (CkstoreError, OSError) as exc:
            # Nothing is lost: the checkpoint stays until the next save's retention retries.
            warnings.warn(f"retention after a publish failed (the next save retries it): {exc}", RuntimeWarning, stacklevel=2)

    def reported(self, future: Future[PublishResult]) -> None:
        self._unreported.seen(future)

    def raise_unreported(self) -> None:
        """Raise the oldest failure nobody has seen yet (as DvcError, cause chained)."""
        future = self._unreported.pop()
        if future is None:
            return
        exc = future.exception()
        assert exc is not None
        raise DvcError(f"an earlier publish failed: {exc}") from exc

    def wait(self, timeout: float | None = None) -> None:
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            with contextlib.suppress(BaseException):
                future.result(timeout)
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()]
        self.raise_unreported()

    def drain(self) -> None:
        """Wait until the queue is empty and the worker has stopped (failures stay recorded)."""
        self._worker.join()

    def unreported_messages(self) -> list[str]:
        return [str(f.exception()) for f in self._unreported.peek_all()]


_publishers: weakref.WeakKeyDictionary[Store, _Publisher] = weakref.WeakKeyDictionary()
_all_publishers: weakref.WeakSet[_Publisher] = weakref.WeakSet()
_publishers_lock = threading.Lock()


def _drain_at_exit() -> None:
    # When the main thread ends, concurrent.futures refuses new work ("cannot schedule new
    # futures after interpreter shutdown"), which DVC's push needs. Threading's own exit
    # callbacks run last-registered first, so this one (registered after concurrent.futures
    # was imported) lets queued publishes finish before that door closes.
    for publisher in list(_all_publishers):
        with contextlib.suppress(BaseException):
            publisher.drain()


@atexit.register
def _report_at_exit() -> None:
    # Runs after the publish threads have finished: print what nobody collected.
    for publisher in list(_all_publishers):
        for message in publisher.unreported_messages():
            print(f"ckstore: publish failed and nobody collected the error: {message}", file=sys.stderr)


def _reset_in_child() -> None:
    # The child has the queue but not the thread: without this, its exit (and any close of the
    # store) would wait forever on the parent's publishes.
    global _publishers_lock
    _publishers_lock = threading.Lock()
    for publisher in list(_all_publishers):
        publisher._reset()


os.register_at_fork(after_in_child=_reset_in_child)
before_thread_shutdown(_drain_at_exit)


def _publisher_for(store: Store) -> _Publisher:
    with _publishers_lock:
        publisher = _publishers.get(store)
        if publisher is None:
            publisher = _publishers[store] = _Publisher(store)
            # close() waits for this store's publishes and raises a failure nobody collected.
            store.add_close_hook(wait)
        return publisher


def wait(store: Store, timeout: float | None = None) -> None:
    """Wait for every publish queued on ``store``; raise the first failure nobody has collected."""
    publisher = _publishers.get(store)
    if publisher is not None:
        publisher.wait(timeout)


def publish(
    store: Store,
    step_or_name: int | str,
    *,
    name: str,
    repo: str | os.PathLike[str] | None = None,
    dest: str = DEFAULT_DEST,
    remote: str | None = None,
    wait: bool = False,
    weights_only: bool = False,
) -> Publication:
    """Queue the publish of a committed checkpoint under ``name`` (see the module docstrings).

    Synchronous part (cheap): resolve the checkpoint, pin it with the store tag
    ``published.<name>`` so retention keeps it, raise any earlier publish
    failure. Needs no writer lock: the pin is a tag, set under the store's
    short metadata lock, so a shell may publish while a training process holds
    the store. The rest runs on the store's publish thread. ``wait=True`` waits
    for this and every earlier publish and raises the first failure.
    ``weights_only=True`` publishes ``state["model"]`` without the optimizer and
    other tensor state (see :mod:`ckstore.integrations.dvc.weights`).
    """
    check_name(name)
    if not isinstance(weights_only, bool):
        raise InvalidArgumentError(f"weights_only must be True or False, got {weights_only!r}")
    dest = check_dest(dest)
    remote = check_remote(remote)
    _check_installed()  # cheaply here; the import itself (about 0.5 s) happens on the publish thread
    root = resolve_repo(repo, store.path, os.getcwd())
    publisher = _publisher_for(store)
    publisher.raise_unreported()
    for attempt in range(_RESOLVE_TRIES):
        info = store.resolve(step_or_name)
        job = PublishJob(name=name, step=info.step, store=str(store.path), repo=root, dest=dest, remote=remote, metrics=dict(info.metrics),
                         weights_only=weights_only)
        try:
            future = publisher.submit(job)
            break
        except CheckpointNotFoundError:
            # "best"/"latest" resolved to a checkpoint another process's retention removed before
            # the pin landed: resolve again. A step number asked for by name is not retried.
            if not isinstance(step_or_name, str) or attempt == _RESOLVE_TRIES - 1:
                raise
    publication = Publication(job, future, publisher)
    if wait:
        publication.result()
        publisher.wait()
    return publication
