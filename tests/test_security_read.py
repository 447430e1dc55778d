"""Reading an untrusted store: never hang, never read without bound, never follow a link out, typed errors.

Each case runs ckstore in a real subprocess under a timeout and an address
space cap (``RLIMIT_AS``), so a hang or an unbounded read fails the test
instead of stalling or exhausting the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch

import ckstore
from ckstore.format.chunks import ChunkedHash, chunk_count
from ckstore.format.hashing import default_algorithm, hash_bytes
from conftest import PYTHON, REPO_ROOT

#: Address space allowed to a child beyond what torch needs to start (about 1.5 GiB on CPU).
_CAP_GIB = 4


def _run(code: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    prelude = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({_CAP_GIB} << 30, {_CAP_GIB} << 30))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    try:
        return subprocess.run([PYTHON, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: no result after {timeout} s")


def _ls(root) -> subprocess.CompletedProcess[str]:
    return _run(f"import sys; from ckstore.cli import main; sys.exit(main(['ls', '--json', {str(root)!r}]))")


@pytest.fixture
def two(tmp_path):
    root = tmp_path / "store"
    with ckstore.Store(root) as store:
        store.save({"w": torch.ones(4)}, step=1)
        store.save({"w": torch.full((4,), 2.0)}, step=2)
        store.tag(1, "release")
    return root


def _plant(path, kind: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


# ---------------------------------------------------------------- FIFOs and /dev/zero


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_tags_file_fifo_or_dev_zero_does_not_hang_ls(two, kind):
    _plant(two / "tags.json", kind)
    out = _ls(two)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [c["step"] for c in json.loads(out.stdout)["checkpoints"]] == [1, 2]
    assert "tags.json" in out.stderr  # reported, not silently ignored


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_manifest_fifo_or_dev_zero_is_skipped_by_ls_and_load(two, kind):
    _plant(two / "checkpoints" / "step-00000002" / "manifest.json", kind)
    out = _run(f"""
        import warnings, ckstore
        warnings.simplefilter("ignore")
        s = ckstore.Store({str(two)!r}, readonly=True)
        print([i.step for i in s.checkpoints()], float(s.load()["w"][0]), [p.step for p in s.verify()])
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[1] 1.0 [2]"


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_tensor_file_fifo_or_dev_zero_falls_back(two, kind):
    step_dir = two / "checkpoints" / "step-00000002"
    name = next(p.name for p in step_dir.iterdir() if p.name != "manifest.json")
    _plant(step_dir / name, kind)
    out = _run(f"""
        import warnings, ckstore
        warnings.simplefilter("ignore")
        s = ckstore.Store({str(two)!r}, readonly=True)
        print(float(s.load()["w"][0]), [p.step for p in s.verify()])
        try:
            s.read_tensor("w", step=2)
        except ckstore.IntegrityError as exc:
            print("typed")
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1.0", "[2]", "typed"]


@pytest.mark.parametrize("kind", ["fifo", "devzero", "control"])
def test_lock_owner_file_cannot_hang_or_inject_into_the_lock_error(two, kind):
    owner = two / ".ckstore.lock.owner"
    code = f"""
        import os, ckstore
        from ckstore.storage.lock import WriterLock
        holder = WriterLock({str(two)!r})
        holder.acquire()
        owner = {str(owner)!r}
        os.unlink(owner)
        kind = {kind!r}
        if kind == "fifo":
            os.mkfifo(owner)
        elif kind == "devzero":
            os.symlink("/dev/zero", owner)
        else:
            import json
            with open(owner, "w") as fh:
                json.dump({{"pid": 7, "host": "evil\\x1b[2J\\x1b]0;pwned\\x07\\nhost", "since": 1.0}}, fh)
        try:
            ckstore.Store({str(two)!r}).save({{"w": 1}}, step=9)
        except ckstore.StoreLockedError as exc:
            import json
            print(json.dumps([str(exc), exc.host]))
    """
    # The first writer runs in this same child: filelock is per open file description, so a second open excludes.
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    message, host = json.loads(out.stdout)
    assert "being written by" in message
    assert message.isprintable() and (host is None or host.isprintable())  # no terminal escapes, no newline
    if kind == "control":
        assert "pid 7 on evil" in message


# ---------------------------------------------------------------- symlinked tags.json


def test_readonly_store_does_not_follow_a_symlinked_tags_file(two, tmp_path):
    outside = tmp_path / "outside-tags.json"
    outside.write_bytes((two / "tags.json").read_bytes())
    os.unlink(two / "tags.json")
    os.symlink(outside, two / "tags.json")
    with ckstore.Store(two, readonly=True) as store:
        with pytest.warns(ckstore.CorruptCheckpointWarning, match="symlink"):
            infos = store.checkpoints()
        assert all(i.tags == () for i in infos)
        with pytest.raises(ckstore.ManifestError, match="symlink"):
            store.resolve("release")


# ---------------------------------------------------------------- sparse and lying files


def test_sparse_tensor_file_claiming_8_gib_is_refused_before_allocating(two):
    step_dir = two / "checkpoints" / "step-00000002"
    name = next(p.name for p in step_dir.iterdir() if p.name != "manifest.json")
    path = step_dir / name
    # A valid header for one 8 GiB tensor, then a hole: 8 GiB on paper, a few KB on disk.
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 31], "data_offsets": [0, 8 << 30]}}).encode()
    header += b" " * (-len(header) % 8)
    os.unlink(path)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + (8 << 30))
    manifest = json.loads((step_dir / "manifest.json").read_bytes())
    entry = manifest["files"][name]
    entry["size"] = os.path.getsize(path)
    # A chunk table of the right length for 8 GiB (so the manifest parses), of the old file's digest: a lie.
    entry["chunks"] = [entry["chunks"][0]] * chunk_count(entry["size"], entry["chunk_size"])
    digests = tuple(bytes.fromhex(c) for c in entry["chunks"])
    entry["hash"] = str(ChunkedHash(entry["hash"].split(":")[0], entry["size"], entry["chunk_size"], digests).root)
    manifest.pop("checksum")
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    manifest["checksum"] = str(hash_bytes(body, default_algorithm()))
    (step_dir / "manifest.json").write_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    out = _run(f"""
        import warnings, ckstore
        warnings.simplefilter("ignore")
        s = ckstore.Store({str(two)!r}, readonly=True)
        try:
            s.load(step=2)
        except ckstore.IntegrityError as exc:
            print("typed")
        print(float(s.load()["w"][0]), [p.step for p in s.verify()])
    """, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["typed", "1.0", "[2]"]


# ---------------------------------------------------------------- manifest bombs


def _bomb(directory, nbytes: int) -> None:
    """A manifest of ``nbytes`` that is all tiny JSON containers (each costs ~25x its bytes once parsed)."""
    items = (nbytes - 64) // 3
    text = b'{"state":[' + b"{}," * (items - 1) + b'{}]}'
    (directory / "manifest.json").write_bytes(text)


def test_manifest_bomb_is_refused_before_parsing(two):
    _bomb(two / "checkpoints" / "step-00000002", 60 << 20)  # under the old 256 MiB cap
    out = _run(f"""
        import resource, warnings, ckstore
        warnings.simplefilter("ignore")
        s = ckstore.Store({str(two)!r}, readonly=True)
        s.load(step=1); s.verify(1)  # everything imported and warmed up, step 2 not read yet
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print([i.step for i in s.checkpoints()], float(s.load()["w"][0]), [p.step for p in s.verify()])
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10)
    """, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    listing, grown_mib = out.stdout.strip().splitlines()
    assert listing == "[1] 1.0 [2]"
    # Reading the 60 MiB file costs about its size; parsing it would cost ~25x.
    assert int(grown_mib) < 400, f"peak memory grew by {grown_mib} MiB"


def test_many_large_manifests_do_not_accumulate_in_the_cache(tmp_path):
    """A store of many big (valid) manifests: listing keeps a bounded cache, not every parse."""
    from ckstore.checkpoint import manifest_cache as _manifest_cache

    root = tmp_path / "store"
    state = {f"t{i}": torch.zeros(1) for i in range(2000)}
    with ckstore.Store(root) as store:
        store.save(state, step=1)
    template = root / "checkpoints" / "step-00000001"
    raw = json.loads((template / "manifest.json").read_bytes())
    for step in range(2, 40):
        target = root / "checkpoints" / f"step-{step:08d}"
        target.mkdir()
        for f in template.iterdir():
            if f.name != "manifest.json":
                os.link(f, target / f.name)
        raw["step"] = step
        raw.pop("checksum", None)
        body = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        raw["checksum"] = str(hash_bytes(body, default_algorithm()))
        (target / "manifest.json").write_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    with ckstore.Store(root, readonly=True) as store:
        cache = store._catalog.manifest_cache
        cache.budget = 4 * os.path.getsize(template / "manifest.json") * _manifest_cache.COST_PER_BYTE
        assert len(store.checkpoints()) == 39
        for step in (1, 20, 39):
            assert store.tensor_keys(step)[0] == "t0"
        assert cache.cost <= cache.budget
        assert sum(1 for e in cache.entries() if e.state is not None) <= 4
