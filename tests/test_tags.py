"""tags.json: round trip, tamper detection, tag names; store-level tagging, moving, pinning and untagging."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckstore
from ckstore.format.hashing import hash_bytes
from ckstore.format.tags import TagEntry, check_tag_name, dump_tags, parse_tags

tag_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.@+:=-]{0,30}\Z").filter(lambda n: n not in ("latest", "best"))
tag_maps = st.dictionaries(tag_names, st.builds(TagEntry, st.integers(0, 2**63 - 1), st.floats(0, 4e9)), max_size=6)


def _signed(raw: dict) -> bytes:
    body = {k: v for k, v in raw.items() if k != "checksum"}
    canonical = lambda obj: json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()  # noqa: E731
    body["checksum"] = str(hash_bytes(canonical(body)))
    return canonical(body)


@given(tags=tag_maps)
def test_round_trip_is_identity_and_canonical(tags):
    data = dump_tags(tags)
    assert parse_tags(data) == tags
    assert dump_tags(parse_tags(data)) == data
    raw = json.loads(data)
    assert data == json.dumps(raw, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda raw: raw.update(format_version=2),
        lambda raw: raw.update(format="ckstore.checkpoint"),
        lambda raw: raw.update(extra=1),
        lambda raw: raw.update(tags=[]),
        lambda raw: raw["tags"].update({"latest": {"step": 1, "time": 0.0}}),
        lambda raw: raw["tags"].update({"9lives": {"step": 1, "time": 0.0}}),
        lambda raw: raw["tags"].update({"x": {"step": -1, "time": 0.0}}),
        lambda raw: raw["tags"].update({"x": {"step": 1.0, "time": 0.0}}),
        lambda raw: raw["tags"].update({"x": {"step": 1, "time": "now"}}),
        lambda raw: raw["tags"].update({"x": {"step": 1, "time": 10**400}}),
        lambda raw: raw["tags"].update({"x": {"step": 1}}),
    ],
)
def test_malformed_tags_files_are_refused(mutate):
    raw = json.loads(dump_tags({"ok": TagEntry(1, 1.0)}))
    mutate(raw)
    with pytest.raises(ckstore.ManifestError):
        parse_tags(_signed(raw))


def test_nan_and_garbage_are_manifest_errors():
    data = dump_tags({"ok": TagEntry(1, 1.0)})
    for junk in (data.replace(b"1.0", b"NaN"), b"", b"\xff", b"[]", b"{}", b"[" * 100_000):
        with pytest.raises((ckstore.ManifestError, ckstore.IntegrityError)):
            parse_tags(junk)


@pytest.mark.parametrize("name", ["", "latest", "best", "1abc", "-x", "a b", "a/b", "../x", "x" * 129, "é", None, 3, "a\n"])
def test_bad_tag_names_are_refused(name):
    with pytest.raises(ckstore.InvalidArgumentError):
        check_tag_name(name)


@pytest.mark.parametrize("name", ["release", "v1.0", "exp@2025-11-25", "a:b+c_d", "x" * 128, "published.model"])
def test_good_tag_names(name):
    assert check_tag_name(name) == name


# ---------------------------------------------------------------- in a store


def test_tag_move_untag_and_listing(store):
    for step in (1, 2, 3):
        store.save({"w": torch.full((2,), float(step))}, step=step, tags=["first"] if step == 1 else ())
    assert store.resolve("first").step == 1
    store.tag(2, "release")
    store.tag(3, "release")  # moves
    assert store.resolve("release").step == 3
    assert [i.tags for i in store.checkpoints()] == [("first",), (), ("release",)]
    assert torch.equal(store.load(step="release")["w"], torch.full((2,), 3.0))
    store.untag("release")
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.resolve("release")
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.untag("release")
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.tag(99, "x")
    with pytest.raises(ckstore.InvalidArgumentError):
        store.tag(1, "latest")
    with pytest.raises(ckstore.InvalidArgumentError):
        store.save({}, step=4, tags=["bad name"])
    assert store.latest().step == 3  # the refused save left nothing behind


def test_tags_file_is_replaced_atomically(store):
    """Moving a tag is one rename of a complete new tags.json: every intermediate state parses."""
    store.save({}, step=1)
    store.save({}, step=2)
    store.tag(1, "release")
    seen = []
    from ckstore.storage import durable as _durable

    def hook(op, phase, path, info):
        if os.path.basename(path) == "tags.json" or (op == "rename" and info.get("dst", "").endswith("tags.json")):
            seen.append((op, phase))
        if op == "rename" and phase == "before" and info.get("dst", "").endswith("tags.json"):
            # Just before the switch the old file is intact and the new one is complete and synced.
            assert parse_tags((store.path / "tags.json").read_bytes())["release"].step == 1
            assert parse_tags(open(path, "rb").read())["release"].step == 2

    with _durable.hooked(hook):
        store.tag(2, "release")
    assert ("rename", "before") in seen
    assert parse_tags((store.path / "tags.json").read_bytes())["release"].step == 2


@pytest.mark.guarantee("G10")
def test_tags_pin_against_retention(store_path):
    with ckstore.Store(store_path, keep_last=1) as store:
        store.save({}, step=1, tags=["keep"])
        store.save({}, step=2)
        store.save({}, step=3)
        assert [i.step for i in store.checkpoints()] == [1, 3]
        store.untag("keep")
        store.save({}, step=4)
        assert [i.step for i in store.checkpoints()] == [4]


@pytest.mark.guarantee("G10")
def test_delete_tagged_needs_force(store):
    store.save({}, step=1, tags=["release", "v1"])
    store.save({}, step=2)
    with pytest.raises(ckstore.InvalidArgumentError):
        store.delete(1)
    assert [i.step for i in store.checkpoints()] == [1, 2]
    store.delete(1, force=True)
    assert [i.step for i in store.checkpoints()] == [2]
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.resolve("release")
    assert parse_tags((store.path / "tags.json").read_bytes()) == {}
    with pytest.raises(ckstore.CheckpointNotFoundError):
        store.delete(1)


def test_corrupt_tags_file_is_reported_and_blocks_retention(store_path):
    with ckstore.Store(store_path, keep_last=1) as store:
        store.save({}, step=1, tags=["keep"])
        store.save({}, step=2)
        (store_path / "tags.json").write_bytes(b"garbage")
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            store.save({}, step=3)  # retention skipped: it cannot know what is pinned
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert [i.step for i in store.checkpoints()] == [1, 2, 3]
        problems = store.verify()
        assert [p.path for p in problems] == [str(store_path / "tags.json")]


@pytest.mark.guarantee("G5")
def test_a_tags_file_one_byte_from_an_out_of_range_time_is_reported_not_raised(store_path):
    """A time of 1764100001.875 with its '.' changed to 'e' reads as 1764100001e875, past the largest float: JSON
    parses it as inf. The store still lists, loads and verifies, and says tags.json is bad (it raised a raw
    ValueError from every read: checking the checksum re-encoded the parsed file, and inf is not JSON)."""
    with ckstore.Store(store_path) as store:
        store.save({"w": torch.ones(2)}, step=1)
    entry = {"step": 1, "time": 1764100001.875}
    data = dump_tags({"keep": TagEntry(**entry)})
    assert b"1764100001.875" in data
    (store_path / "tags.json").write_bytes(data.replace(b"1764100001.875", b"1764100001e875"))
    with ckstore.Store(store_path, readonly=True) as store:
        with pytest.warns(ckstore.CorruptCheckpointWarning, match="tags.json"):
            assert [(i.step, i.tags) for i in store.checkpoints()] == [(1, ())]
        with pytest.warns(ckstore.CorruptCheckpointWarning):
            assert torch.equal(store.load()["w"], torch.ones(2))
        assert [p.path for p in store.verify()] == [str(store_path / "tags.json")]
    with pytest.raises(ckstore.ManifestError, match="tags.json"):
        parse_tags(data.replace(b"1764100001.875", b"1764100001e875"), path=str(store_path / "tags.json"))


def test_a_bad_tags_file_warns_as_a_store_file_not_as_a_checkpoint(store_path):
    """tags.json is not a checkpoint: its warning is CorruptStoreFileWarning (a CorruptCheckpointWarning
    subclass, so existing filters still see it) naming the file, at listing, save-time retention and recovery."""
    with ckstore.Store(store_path, keep_last=1) as store:
        store.save({}, step=1)
        (store_path / "tags.json").write_bytes(b"garbage")
        with pytest.warns(ckstore.CorruptStoreFileWarning, match="tags.json") as listed:
            store.checkpoints()
        with pytest.warns(ckstore.CorruptStoreFileWarning, match="retention skipped"):
            store.save({}, step=2)
    assert all(type(w.message) is ckstore.CorruptStoreFileWarning for w in listed)
    assert issubclass(ckstore.CorruptStoreFileWarning, ckstore.CorruptCheckpointWarning)
    with pytest.warns(ckstore.CorruptStoreFileWarning, match="tags are unavailable"), ckstore.Store(store_path) as store:
        store.recover()
