"""One writer per store, many readers: real second processes, real locks."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import ckstore

@pytest.mark.guarantee("G12")
def test_second_writer_process_is_refused_naming_the_holder(store_path, peer):
    with ckstore.Store(store_path) as store:
        store.save({}, step=1)
        report = peer.call(op="save", path=store_path, step=99)
        assert report["error"] == "StoreLockedError"
        assert report["pid"] == os.getpid() and report["host"] == socket.gethostname()
        assert str(os.getpid()) in report["message"]
        assert [i.step for i in store.checkpoints()] == [1]
        # a timeout shorter than the holder's hold expires with the same error
        report = peer.call(op="save", path=store_path, step=99, timeout=0.3)
        assert report["error"] == "StoreLockedError" and report["pid"] == os.getpid()
    # Once the first writer has closed, a second one can write.
    assert peer.call(op="save", path=store_path, step=99) == {"ok": True}
    with ckstore.Store(store_path, readonly=True) as reader:
        assert [i.step for i in reader.checkpoints()] == [1, 99]


@pytest.mark.guarantee("G12")
def test_second_writer_in_the_same_process_is_refused(store_path):
    with ckstore.Store(store_path) as first:
        first.save({}, step=1)
        second = ckstore.Store(store_path)
        with pytest.raises(ckstore.StoreLockedError) as excinfo:
            second.save({}, step=2)
        assert excinfo.value.pid == os.getpid()
        assert isinstance(excinfo.value, TimeoutError)
        for call in (lambda: second.delete(1), second.gc, second.empty_quarantine):
            with pytest.raises(ckstore.StoreLockedError):
                call()
        assert "x" in second.tag(1, "x").tags  # metadata needs only the short metadata lock
        second.untag("x")
        second.close()
    with ckstore.Store(store_path) as again:
        again.save({}, step=2)


@pytest.mark.guarantee("G12")
def test_lock_is_taken_at_first_write_and_held_until_close(store_path, peer):
    store = ckstore.Store(store_path)
    try:
        # Opening takes no lasting lock: another writer may still write.
        assert peer.call(op="save", path=store_path, step=1) == {"ok": True}
        store.save({}, step=2)
        assert peer.call(op="save", path=store_path, step=3)["error"] == "StoreLockedError"
    finally:
        store.close()
    assert peer.call(op="save", path=store_path, step=3) == {"ok": True}


@pytest.mark.guarantee("G12")
def test_writer_with_a_timeout_waits_for_the_lock(store_path, peer):
    with ckstore.Store(store_path) as store:
        store.save({"who": "first"}, step=1)
        peer.send(op="save", path=os.fspath(store_path), step=2, timeout=120, state={"who": "second"})
        assert peer.reply(timeout=1.0) is None, "the second writer did not wait for the lock"
        assert [i.step for i in store.checkpoints()] == [1]
    assert peer.reply(timeout=120) == {"ok": True}
    with ckstore.Store(store_path, readonly=True) as reader:
        assert reader.load(step=2) == {"who": "second"}


@pytest.mark.guarantee("G2")
def test_readers_never_see_a_partial_checkpoint(store_path, peer):
    """A reader process lists and loads 300 times while this process saves (and prunes) in a loop."""
    rounds = 300
    with ckstore.Store(store_path, keep_last=2) as writer:
        writer.save({"w": torch.zeros(4096), "step": 0, "meta": {"step": 0, "tag": ""}}, step=0)
        peer.send(op="read_loop", path=os.fspath(store_path), rounds=rounds)
        report, step = None, 0
        while report is None and step < 20_000:
            step += 1
            writer.save({"w": torch.full((4096,), float(step)), "step": step, "meta": {"step": step, "tag": "x" * (step % 7)}}, step=step)
            report = peer.reply(timeout=0)
        if report is None:
            report = peer.reply(timeout=300)
    assert report.get("ok"), report
    assert report["rounds"] == rounds
    assert report["distinct"] > 1, "the writer never overlapped the readers"


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5", True])
def test_bad_lock_timeouts_are_refused(store_path, timeout):
    # When the store is opened, not at its first write (see also tests/test_audit_issue11.py).
    with pytest.raises(ckstore.InvalidArgumentError, match="lock_timeout"):
        ckstore.Store(store_path, lock_timeout=timeout)
