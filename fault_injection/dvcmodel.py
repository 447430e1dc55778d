"""DVC write paths for the crash model (tier 2): ckstore's own durable operations of publish and pull.

The model records only ``ckstore.storage.durable`` operations, so these workloads
keep git and DVC out of the recorded window: everything they do happens in
the (unrecorded) preparation, and the recording stops before a publish hands
over to DVC.

``publish_swap``
    The store holds steps 1 and 2; the repository already holds a published
    ``models/best`` (step 1, put there by the same materialize + swap code,
    with the ``.dvc`` file a publish leaves). The window is ``run_publish``
    of step 2 up to the DVC ``add`` stage: the journal, materializing the
    checkpoint, the swap. Hard links fail with EXDEV throughout, as when the
    store and the repository sit on different filesystems, so every file is
    copied and fsynced (``_hash_file``'s copy path). When the journal moves to
    ``add`` the swap is done; that is acknowledged (``swapped``).
    Checked: after ``_dvc.recover`` (stopped where it would call DVC),
    ``models/best`` is a whole checkpoint that verifies and loads to the saved
    state, with the stable path ``model.safetensors`` (here a copy, not a
    link) equal to its merged weights file:
    step 1 or step 2, and step 2 once ``swapped`` was acknowledged
    (recovery trusts a journal past ``swap`` and drops the publish if the
    directory it names is gone); no temporary directory is left (a leftover
    ``.ckstore-old-`` directory is garbage, not checked here).

``pull_install``
    Step 2 was published into an origin repository, which was cloned and
    whose objects were fetched into the clone's DVC cache (all unrecorded).
    The window is ``ckstore.pull`` of ``models/best`` in the clone (DVC's
    fetch finds everything cached): copying each object into a temporary
    directory, fsyncing, the swap. Checked: ``models/best`` is absent or a
    whole checkpoint of step 2 that verifies; once ``pull`` returned, it is
    there.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import ckstore

from .publish import _dvc as _dvc_cli
from .publish import _sh, hermetic_env, init_dvc_repo, store_with_two_steps
from .workloads import Workload, expected_state, same_state

#: Elements per tensor row: a few KB per checkpoint.
SCALE = 8


class _Stop(Exception):
    """Raised by the stage hook to end a publish before it reaches DVC."""


def _stop_before_add(stage: str, phase: str, info: Any) -> None:
    if (stage, phase) == ("add", "before"):
        raise _Stop


def _no_link(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EXDEV, "Invalid cross-device link")


def _whole(alias: str, steps: tuple[int, ...], scale: int) -> list[str]:
    """``alias`` must be a one-checkpoint store of one of ``steps`` that verifies and loads to the saved state."""
    if not os.path.isdir(alias):
        return [f"{alias} is missing"]
    try:
        with ckstore.Store(alias, readonly=True) as store:
            problems = store.verify()
            if problems:
                return [f"published directory fails verification: {problems[0].message[:160]}"]
            have = [info.step for info in store.checkpoints()]
            if len(have) != 1 or have[0] not in steps:
                return [f"published directory holds steps {have}, expected one of {list(steps)}"]
            if not same_state(store.load(step=have[0]), expected_state(have[0], scale)):
                return [f"published step {have[0]} loads with content that differs from what was saved"]
    except ckstore.CkstoreError as exc:
        return [f"published directory does not open/load: {type(exc).__name__}: {str(exc)[:160]}"]
    return _stable_weights(alias, have[0])


def _stable_weights(alias: str, step: int) -> list[str]:
    """The stable path ``<alias>/model.safetensors`` holds the verified checkpoint's merged weights, byte for byte.

    Verification reads only ``checkpoints/step-<N>/``; where hard links fail the stable
    file is a separate copy (the staged merge), which nothing else would read back.
    """
    from ckstore.integrations.dvc.weights import WEIGHTS_FILE
    from ckstore.storage.layout import CHECKPOINTS_DIR, step_dir_name

    stable = os.path.join(alias, WEIGHTS_FILE)
    verified = os.path.join(alias, CHECKPOINTS_DIR, step_dir_name(step), WEIGHTS_FILE)
    if not os.path.isfile(verified):
        return [f"published step {step} has no merged {WEIGHTS_FILE} (the state has a 'model' entry)"]
    if not os.path.isfile(stable):
        return [f"the stable path {WEIGHTS_FILE} is missing from the published directory"]
    with open(stable, "rb") as fh, open(verified, "rb") as gh:
        if fh.read() != gh.read():
            return [f"the stable path {WEIGHTS_FILE} differs from the verified checkpoint's weights"]
    return []


# ---------------------------------------------------------------- publish until swap


def _publish_job(root: str, step: int) -> Any:
    from ckstore.integrations.dvc import publish as _dvc

    return _dvc.PublishJob(name="best", step=step, store=os.path.abspath(root), repo=os.path.join(os.path.dirname(os.path.abspath(root)), "repo"))


def _prepare_publish(root: str, scale: int) -> None:
    from ckstore.integrations.dvc import publish as _dvc

    _, repo = store_with_two_steps(root, scale)
    os.makedirs(os.path.join(repo, "models"))
    os.makedirs(_dvc._journal_dir(repo))  # the publish lock lives here (created outside _durable)
    _sh(["git", "init", "-q", "-b", "main"], repo)
    # The previous version: step 1 materialized and swapped in by ckstore's own code, with a .dvc file
    # naming it (what the DVC stages of the earlier publish left; its md5 is not looked at here).
    job = _publish_job(root, 1)
    tmp = os.path.join(job.dest_dir, ".best.ckstore-tmp-prepare")
    _dvc._materialize(job, tmp)
    _dvc._swap(job, tmp, os.path.join(job.dest_dir, ".best.ckstore-old-prepare"))
    with open(job.dvc_file, "w", encoding="utf-8") as fh:
        fh.write("outs:\n- md5: " + "0" * 32 + ".dir\n  path: best\n")


def _run_publish(root: str, ack: Any, scale: int) -> None:
    from ckstore.integrations.dvc import publish as _dvc

    def stage_hook(stage: str, phase: str, info: Any) -> None:
        if (stage, phase) == ("add", "before"):  # the journal says "add": the swap is done
            ack("swapped", 2)
            raise _Stop

    ack("base", os.path.dirname(os.path.abspath(root)))  # where the journal's absolute paths point
    previous = _dvc.set_stage_hook(stage_hook)
    real_link = os.link
    os.link = _no_link  # store and repository on different filesystems: copy + fsync every file
    try:
        _dvc.run_publish(_publish_job(root, 2))
    except _Stop:
        pass
    else:
        raise AssertionError("publish did not reach the add stage")
    finally:
        os.link = real_link
        _dvc.set_stage_hook(previous)


def _relocate_journal(repo: str, recorded_base: str) -> None:
    """The journal names absolute paths of the directory the trace was recorded in; point them at this copy."""
    from ckstore.integrations.dvc import publish as _dvc

    here = os.path.dirname(repo)
    directory = _dvc._journal_dir(repo)
    for entry in os.listdir(directory):
        if entry.startswith("publish-") and entry.endswith(".json"):
            path = os.path.join(directory, entry)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text.replace(json.dumps(recorded_base)[1:-1], json.dumps(here)[1:-1]))


def _check_publish(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    from ckstore.integrations.dvc import publish as _dvc

    job = _publish_job(str(store.path), 2)
    recorded = [value for kind, value in acks if kind == "base"]
    if recorded:
        _relocate_journal(job.repo, recorded[0])
    previous = _dvc.set_stage_hook(_stop_before_add)
    try:
        _dvc.recover(job.repo)
    except _Stop:
        pass  # recovery finished the swap and would now run DVC
    finally:
        _dvc.set_stage_hook(previous)
    out = _whole(job.alias_dir, (2,) if ("swapped", 2) in acks else (1, 2), SCALE)
    # Only the temporary directory is checked: a lost removal of the previous version's ".ckstore-old-"
    # directory once the journal is past "swap" is left behind as garbage (recovery does not retry it).
    left = [n for n in os.listdir(job.dest_dir) if ".ckstore-tmp-" in n]
    if left:
        out.append(f"temporary publish directories left after recovery: {left}")
    return out


# ---------------------------------------------------------------- pull install


def _prepare_pull(root: str, scale: int) -> None:
    from ckstore.integrations.dvc import publish as _dvc

    base = os.path.dirname(root)
    os.environ.update(hermetic_env(os.path.dirname(base)))
    with ckstore.Store(root) as store:
        store.save(expected_state(2, scale), step=2)
    origin = os.path.join(base, "origin")
    init_dvc_repo(origin)
    with ckstore.Store(root) as store:
        store.publish(2, name="best", repo=origin, wait=True)
    clone = os.path.join(base, "clone")
    _sh(["git", "clone", "-q", origin, clone], base)
    _dvc_cli(["fetch", "-q", os.path.join("models", "best.dvc")], clone)
    os.makedirs(_dvc._journal_dir(clone), exist_ok=True)  # the pull lock lives here (created outside _durable)


def _run_pull(root: str, ack: Any, scale: int) -> None:
    clone = os.path.join(os.path.dirname(root), "clone")
    from ckstore.integrations.dvc import publish as _dvc

    _dvc.pull(os.path.join(clone, "models", "best.dvc"), repo=clone)
    ack("pulled", 2)


def _check_pull(store: ckstore.Store, acks: list[tuple[str, Any]]) -> list[str]:
    alias = os.path.join(os.path.dirname(str(store.path)), "clone", "models", "best")
    if ("pulled", 2) not in acks and not os.path.exists(alias):
        return []
    return _whole(alias, (2,), SCALE)


PUBLISH_SWAP = Workload("publish_swap", _run_publish, _prepare_publish, check=_check_publish, scale=SCALE)
PULL_INSTALL = Workload("pull_install", _run_pull, _prepare_pull, check=_check_pull, scale=SCALE)
