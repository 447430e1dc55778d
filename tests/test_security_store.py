"""An untrusted store never makes ckstore touch anything outside it (issue 16, the store side).

Each test plants a *victim* (a file and a tree outside the store) and a crafted
store beside it, runs ckstore, and checks the victim is untouched and the
error, if any, is a typed :class:`ckstore.CkstoreError`. The cross-user cases
run a real second uid (``nobody``) through ``setpriv``, since the suite runs as
root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, subprocess_env

import ckstore
from ckstore.storage import durable as _durable
from ckstore.format.manifest import MANIFEST_NAME
from ckstore.format.tags import check_tag_name
from ckstore.cli import main

NOBODY = 65534


def _snapshot(top: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            out[os.path.relpath(path, top)] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_mode & 0o7777, digest)
    return out


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    top = tmp_path / "victim"
    (top / "tree" / "deep").mkdir(parents=True)
    (top / "secret.txt").write_text("do not touch\n")
    (top / "tree" / "deep" / "file.bin").write_bytes(os.urandom(256))
    before = _snapshot(top)
    yield top
    assert _snapshot(top) == before, "the victim outside the store was touched"


def _saved(path: Path, *steps: int) -> Path:
    with ckstore.Store(path) as store:
        for step in steps:
            store.save({"w": torch.full((4,), float(step))}, step=step, metrics={"loss": 1.0 / (step + 1)})
    return path


# ---------------------------------------------------------------- removal never follows a symlink


def test_remove_tree_unlinks_a_symlink_at_the_top_and_never_enters_it(tmp_path, victim):
    link = tmp_path / "link"
    link.symlink_to(victim)
    _durable.remove_tree(link, site="t")
    assert not os.path.lexists(link)


def test_remove_tree_unlinks_symlinks_inside_and_removes_the_rest(tmp_path, victim):
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_bytes(b"x")
    (top / "a" / "to_tree").symlink_to(victim / "tree")
    (top / "to_file").symlink_to(victim / "secret.txt")
    _durable.remove_tree(top, site="t")
    assert not os.path.lexists(top)


def test_remove_tree_reports_each_op_with_its_site(tmp_path):
    top = tmp_path / "top"
    (top / "d").mkdir(parents=True)
    (top / "d" / "f").write_bytes(b"x")
    seen = []
    with _durable.hooked(lambda op, phase, path, info: seen.append((op, phase, os.path.relpath(path, tmp_path), info["site"]))):
        _durable.remove_tree(top, site="recover_staging")
    assert seen == [
        ("unlink", "before", "top/d/f", "recover_staging"),
        ("unlink", "after", "top/d/f", "recover_staging"),
        ("rmdir", "before", "top/d", "recover_staging"),
        ("rmdir", "after", "top/d", "recover_staging"),
        ("rmdir", "before", "top", "recover_staging"),
        ("rmdir", "after", "top", "recover_staging"),
    ]


def test_remove_tree_does_not_enter_a_directory_swapped_for_a_symlink_mid_removal(tmp_path, victim):
    """Another user replaces a subdirectory by a symlink after it was listed: the link is removed, not followed."""
    top = tmp_path / "top"
    for sub in ("a", "z"):
        (top / sub).mkdir(parents=True)
        (top / sub / "f").write_bytes(b"x")
    swapped = []

    def swap(op, phase, path, info):
        if op == "unlink" and phase == "before" and not swapped:
            other = top / ("z" if "/a/" in path else "a")
            shutil.rmtree(other)
            other.symlink_to(victim / "tree")
            swapped.append(other)

    with _durable.hooked(swap):
        _durable.remove_tree(top, site="t")
    assert swapped and not os.path.lexists(top)


def test_remove_tree_refuses_a_tree_deeper_than_its_cap_with_a_typed_error_from_recovery(store_path):
    _saved(store_path, 1)
    deep = store_path / ".staging" / "step-00000002.deadbeef"
    path = deep
    for _ in range(_durable.MAX_TREE_DEPTH + 2):
        path = path / "d"
    path.mkdir(parents=True)
    with pytest.raises(ckstore.StorageError, match="deeper than"):
        with ckstore.Store(store_path) as store:
            store.save({}, step=2)
    assert path.is_dir()  # nothing half-removed: removal is bottom-up, and it never got to the bottom


# ---------------------------------------------------------------- recovery


@pytest.mark.parametrize("sub", [".staging", ".trash"])
def test_recovery_removes_a_planted_symlink_not_its_target(store_path, victim, sub):
    _saved(store_path, 1)
    (store_path / sub / "step-00000002.deadbeef").symlink_to(victim)
    (store_path / sub / "step-00000003.deadbeef").symlink_to(victim / "secret.txt")
    with ckstore.Store(store_path) as store:
        store.save({}, step=2)  # the first write recovers
    assert os.listdir(store_path / sub) == []


def test_emptying_a_symlinked_quarantine_never_moves_what_it_points_to(store_path, victim):
    _saved(store_path, 1)
    (victim / "step-00000001.20261202T061502Z.3fa9c2d1").mkdir()  # looks like a quarantined checkpoint
    (store_path / ".quarantine").symlink_to(victim)
    try:
        with pytest.raises(ckstore.UnsafeStoreError, match=".quarantine"):
            with ckstore.Store(store_path) as store:
                store.empty_quarantine()
    finally:
        (victim / "step-00000001.20261202T061502Z.3fa9c2d1").rmdir()  # so the victim check sees what it had


@pytest.mark.parametrize("sub", [".staging", ".trash", "checkpoints", ".quarantine"])
def test_a_symlinked_layout_directory_is_refused_by_writes(store_path, victim, sub):
    _saved(store_path, 1)
    shutil.rmtree(store_path / sub, ignore_errors=True)
    (store_path / sub).symlink_to(victim / "tree")
    with pytest.raises(ckstore.UnsafeStoreError, match=sub):
        with ckstore.Store(store_path) as store:
            store.save({}, step=2)


def test_a_temp_named_directory_at_the_root_does_not_block_recovery(store_path):
    _saved(store_path, 1)
    (store_path / ".tags.json.tmp-0123456789ab").mkdir()
    with ckstore.Store(store_path) as store:
        store.save({}, step=2)
    assert [i.step for i in ckstore.Store(store_path, readonly=True).checkpoints()] == [1, 2]


# ---------------------------------------------------------------- delete


def test_delete_of_a_symlinked_step_is_refused_and_its_target_untouched(store_path, victim):
    _saved(store_path, 1, 2)
    (store_path / "checkpoints" / "step-00000005").symlink_to(victim)
    with ckstore.Store(store_path) as store:
        with pytest.raises(ckstore.UnsafeStoreError, match="step-00000005"):
            store.delete(5)
        with pytest.warns(ckstore.CorruptCheckpointWarning, match="symlink"):
            assert [i.step for i in store.checkpoints()] == [1, 2]


def test_retention_never_follows_a_symlinked_step(store_path, victim):
    _saved(store_path, 1)
    (store_path / "checkpoints" / "step-00000000").symlink_to(victim)
    with ckstore.Store(store_path, keep_last=1) as store:
        store.save({}, step=2)
        store.save({}, step=3)
    assert os.path.islink(store_path / "checkpoints" / "step-00000000")


# ---------------------------------------------------------------- loading never writes


def _planted(store_path: Path) -> None:
    (store_path / ".staging" / "step-00000009.deadbeef").mkdir()
    (store_path / ".staging" / "step-00000009.deadbeef" / "model.safetensors").write_bytes(b"\0" * 10)
    (store_path / ".trash" / "step-00000001.cafebabe").mkdir()
    (store_path / ".tags.json.tmp-0123456789ab").write_bytes(b"partial")


@pytest.mark.guarantee("G13")
def test_a_plain_open_that_only_reads_writes_nothing(store_path):
    _saved(store_path, 1, 2)
    _planted(store_path)
    os.unlink(store_path / ".ckstore.lock")
    os.unlink(store_path / ".ckstore.lock.owner")
    before = _snapshot(store_path)
    with ckstore.Store(store_path) as store:
        assert store.load()["w"][0] == 2.0
        assert [i.step for i in store.checkpoints()] == [1, 2]
        assert store.verify() == []
        store.read_tensor("w", step=1)
    assert _snapshot(store_path) == before


@pytest.mark.guarantee("G13")
def test_a_plain_open_of_a_new_path_creates_nothing_until_the_first_save(tmp_path):
    path = tmp_path / "a" / "b" / "store"
    with ckstore.Store(path) as store:
        assert store.checkpoints() == [] and store.latest() is None
    assert not (tmp_path / "a").exists()
    with ckstore.Store(path) as store:
        store.save({}, step=1)
    assert [i.step for i in ckstore.Store(path, readonly=True).checkpoints()] == [1]


def test_recover_is_an_explicit_write(store_path):
    _saved(store_path, 1)
    _planted(store_path)
    with ckstore.Store(store_path) as store:
        store.recover()
    assert os.listdir(store_path / ".staging") == os.listdir(store_path / ".trash") == []
    assert not any(".tmp-" in n for n in os.listdir(store_path))
    with pytest.raises(ckstore.ReadOnlyStoreError):
        ckstore.Store(store_path, readonly=True).recover()


@pytest.mark.guarantee("G1")
def test_parent_directories_are_made_one_by_one_and_each_parent_fsynced(tmp_path):
    path = tmp_path / "a" / "b" / "store"
    seen = []
    def record(op, phase, p, info):
        if phase == "after":
            seen.append((op, os.path.relpath(p, tmp_path), info["site"]))

    with _durable.hooked(record):
        with ckstore.Store(path) as store:
            store.save({}, step=1)
    made = [(op, p, site) for op, p, site in seen if op in ("mkdir", "fsync_dir") and site.startswith("store_")]
    assert made[:7] == [
        ("mkdir", "a", "store_parents"),
        ("fsync_dir", ".", "store_parents_dir"),
        ("mkdir", "a/b", "store_parents"),
        ("fsync_dir", "a", "store_parents_dir"),
        ("mkdir", "a/b/store", "store_root"),
        ("fsync_dir", "a/b", "store_parent_dir"),
        ("mkdir", "a/b/store/checkpoints", "store_layout"),
    ]


# ---------------------------------------------------------------- ownership and permissions


def _shared_dir() -> Path:
    """A directory a second uid can reach (pytest's tmp_path is root-only)."""
    top = Path(tempfile.mkdtemp(prefix="ckstore-sec-", dir="/tmp"))
    os.chmod(top, 0o1777)
    return top


@pytest.fixture
def shared() -> Iterator[Path]:
    top = _shared_dir()
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv], capture_output=True, text=True, timeout=120
    )


def test_a_store_precreated_by_another_user_is_refused_for_writing(shared):
    path = shared / "run"
    made = _as_nobody("mkdir", "-m", "0777", str(path))
    assert made.returncode == 0, made.stderr
    assert os.stat(path).st_uid == NOBODY
    with pytest.raises(ckstore.UnsafeStoreError, match="owned by uid 65534") as info:
        ckstore.Store(path)
    assert isinstance(info.value, PermissionError) and info.value.path == str(path)
    assert os.listdir(path) == []  # nothing written into it
    with ckstore.Store(path, trust_foreign=True) as store:
        store.save({}, step=1)


def test_a_look_alike_store_of_another_user_is_refused_by_a_plain_open(shared):
    """Another user puts a valid store where yours is expected: a plain (writable) open refuses it."""
    original = _saved(shared / "original", 7)
    subprocess.run(["chmod", "-R", "a+rX", str(original)], check=True)
    path = shared / "run"
    copied = _as_nobody("cp", "-r", str(original), str(path))  # the other user's own copy, owned by them
    assert copied.returncode == 0, copied.stderr
    assert os.stat(path / "checkpoints").st_uid == NOBODY
    with pytest.raises(ckstore.UnsafeStoreError, match="owned by uid 65534"):
        ckstore.Store(path)
    with ckstore.Store(path, readonly=True) as reader:  # reading someone else's store stays possible, on purpose
        assert reader.latest().step == 7


@pytest.mark.parametrize("sub", ["", "checkpoints", ".staging", ".trash"])
def test_a_store_writable_by_others_is_refused_unless_sticky(store_path, sub):
    _saved(store_path, 1)
    os.chmod(store_path / sub, 0o777)
    with pytest.raises(ckstore.UnsafeStoreError, match="writable by"):
        ckstore.Store(store_path)
    with ckstore.Store(store_path, trust_foreign=True) as store:
        store.save({}, step=2)
    os.chmod(store_path / sub, 0o1777)
    with ckstore.Store(store_path) as store:
        store.save({}, step=3)


def test_tagging_a_store_of_another_user_is_refused(shared):
    """tag/untag/record_metrics take only the metadata lock, not the writer lock: they must check the store too."""
    original = _saved(shared / "original", 7)
    with ckstore.Store(original) as store:
        store.tag(7, "old")
    subprocess.run(["chmod", "-R", "a+rX", str(original)], check=True)
    path = shared / "run"
    store = ckstore.Store(path)  # names a new store: nothing there yet, so nothing to refuse
    copied = _as_nobody("cp", "-r", str(original), str(path))  # another user gets there before the first write
    assert copied.returncode == 0, copied.stderr
    before = _snapshot(path)
    for call in (lambda: store.tag(7, "mine"), lambda: store.untag("old"), lambda: store.record_metrics(7, {"acc": 0.5})):
        with pytest.raises(ckstore.UnsafeStoreError):
            call()
    store.close()
    assert _snapshot(path) == before
    assert main(["tag", str(path), "pinned", "7"]) == 2


def test_a_new_store_in_a_sticky_world_writable_directory_is_fine(shared):
    with ckstore.Store(shared / "mine" / "store") as store:
        store.save({}, step=1)
    assert stat.S_IMODE(os.stat(shared / "mine" / "store").st_mode) & 0o022 == 0


# ---------------------------------------------------------------- odd layouts


@pytest.mark.parametrize("readonly", [True, False])
def test_checkpoints_as_a_file_is_a_typed_error(store_path, readonly):
    store_path.mkdir()
    (store_path / "checkpoints").write_bytes(b"not a directory")
    with pytest.raises(ckstore.CkstoreError, match="checkpoints"):
        with ckstore.Store(store_path, readonly=readonly) as store:
            store.checkpoints()
            store.save({}, step=1)


def test_readonly_open_never_follows_a_symlinked_checkpoints_dir(store_path, tmp_path):
    elsewhere = _saved(tmp_path / "elsewhere", 3)
    store_path.mkdir()
    (store_path / "checkpoints").symlink_to(elsewhere / "checkpoints")
    with pytest.raises(ckstore.UnsafeStoreError, match="symlink"):
        ckstore.Store(store_path, readonly=True)


def test_a_step_directory_with_non_ascii_digits_is_not_a_checkpoint(store_path):
    _saved(store_path, 1)
    shutil.copytree(store_path / "checkpoints" / "step-00000001", store_path / "checkpoints" / "step-\u0661")
    with ckstore.Store(store_path, readonly=True) as reader:
        assert [i.path.name for i in reader.checkpoints()] == ["step-00000001"]


@pytest.mark.parametrize("name", ["best\n", "a\n", "", "a\x1b[2J", "a\u0661", "release\r"])
def test_tag_names_with_control_or_non_ascii_characters_are_refused(name):
    with pytest.raises(ckstore.InvalidArgumentError):
        check_tag_name(name)


@pytest.mark.parametrize("name", ["loss\x1b[31m", "a\nb", "a\x00", "\u202eevil"])
def test_metric_names_with_control_characters_are_refused_on_save(store, name):
    with pytest.raises(ckstore.InvalidArgumentError, match="metric name"):
        store.save({}, step=1, metrics={name: 1.0})


# ---------------------------------------------------------------- the CLI


def test_cli_untag_of_an_empty_name_exits_2(store_path, capsys):
    _saved(store_path, 1)
    assert main(["tag", str(store_path), "-d", ""]) == 2
    assert "invalid tag" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["ls", "verify", "show", "tag"])
@pytest.mark.parametrize("where", ["parent", "checkpoints", "root"])
def test_cli_on_a_path_that_is_not_a_store_exits_2(store_path, capsys, command, where):
    _saved(store_path, 1)
    path = {"parent": store_path.parent, "checkpoints": store_path / "checkpoints", "root": Path("/")}[where]
    argv = [command, str(path)] + (["latest"] if command == "show" else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "not a ckstore store" in err and "OK" not in out


def _plant_evil_checkpoint(store_path: Path) -> None:
    """A checkpoint written by hand, as an attacker would: valid manifest and files, a metric name with escapes."""
    _saved(store_path, 1)
    good = ckstore.Store(store_path, readonly=True)._catalog.manifest("step-00000001")
    evil = dataclasses.replace(good, step=2, metrics={"loss\x1b]0;pwned\x07\x1b[2J\nFAKE": 0.5})
    target = store_path / "checkpoints" / "step-00000002"
    shutil.copytree(store_path / "checkpoints" / "step-00000001", target)
    (target / MANIFEST_NAME).unlink()
    (target / MANIFEST_NAME).write_bytes(evil.to_json())


@pytest.mark.parametrize("argv", [["ls"], ["show", "2"], ["verify"], ["show", "latest"], ["ls", "--json"]])
def test_cli_output_carries_no_control_characters_from_the_store(store_path, argv):
    _plant_evil_checkpoint(store_path)
    done = subprocess.run(
        [PYTHON, "-m", "ckstore", argv[0], str(store_path), *argv[1:]], capture_output=True, timeout=120, env=subprocess_env()
    )
    for stream in (done.stdout, done.stderr):
        bad = sorted({chr(b) for b in stream if b < 0x20 and b not in (0x0A,) or b == 0x7F})
        assert bad == [], f"{argv}: raw control characters reached the terminal: {bad!r}"
        assert b"\nFAKE" not in stream
    assert done.returncode in (0, 1)


@pytest.mark.parametrize(
    "name",
    [
        "step-\u0661.20261202T061502Z.3fa9c2d1",
        "step-00000001.\u0662\u0660\u0662\u0666\u0661\u0662\u0660\u0662T061502Z.3fa9c2d1",
        "step-00000001.99999999T999999Z.3fa9c2d1",
    ],
)
def test_a_quarantine_entry_with_non_ascii_digits_or_a_bad_date_is_ignored(store_path, capsys, name):
    _saved(store_path, 1)
    (store_path / ".quarantine" / name).mkdir(parents=True)
    with ckstore.Store(store_path, readonly=True) as reader:
        assert reader.quarantine() == []
    assert main(["ls", str(store_path)]) == 0


@pytest.mark.parametrize("metric", ["loss\x1b[31m", "loss\n", "\u202eloss"])
def test_a_retention_metric_with_control_characters_is_refused(store_path, metric):
    """It is written into every manifest (``retention``) and later ranks ``best``: refused like a metric name."""
    with pytest.raises(ckstore.InvalidArgumentError, match="metric"):
        ckstore.Store(store_path, keep_best=1, metric=metric)


@pytest.mark.parametrize("argv", [["gc"], ["tag", "pinned", "7"], ["tag", "-d", "old"], ["quarantine", "--empty"]])
def test_cli_writes_refuse_a_store_of_another_user_unless_trust_foreign(shared, capsys, argv):
    original = _saved(shared / "original", 7)
    with ckstore.Store(original) as store:
        store.tag(7, "old")
    subprocess.run(["chmod", "-R", "a+rX", str(original)], check=True)
    path = shared / "run"
    assert _as_nobody("cp", "-r", str(original), str(path)).returncode == 0
    assert main([argv[0], str(path), *argv[1:]]) == 2
    assert "--trust-foreign" in capsys.readouterr().err
    assert main([argv[0], str(path), *argv[1:], "--trust-foreign"]) == 0


def test_unsafe_store_error_is_a_permission_error_that_survives_a_process_boundary():
    import pickle

    err = ckstore.UnsafeStoreError("m", path="/s")
    again = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own object, as a multiprocessing pool sends it
    assert isinstance(again, PermissionError) and isinstance(again, ckstore.CkstoreError)
    assert (again.path, again.filename, str(again)) == ("/s", "/s", "m")
