"""Extensions found by entry point (publishers, the multi-rank implementation), so that the layers below never import them."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ..errors import DvcError, InvalidArgumentError

#: Entry-point group of the publish functions ``Store.publish`` calls (``dvc`` is declared in pyproject.toml).
PUBLISHERS = "ckstore.publishers"


def find_publisher(name: str) -> Callable[..., Any]:
    """The publish function registered under ``name`` in the ``ckstore.publishers`` entry-point group.

    Store sits below the integrations, and the DVC integration imports Store. Importing the
    integration from Store made a cycle, hidden behind a function-level import; an entry point
    keeps the import graph pointing one way.
    """
    found = entry_points(group=PUBLISHERS, name=name)
    if not found:
        raise DvcError(f"no {name!r} publisher is installed (entry-point group {PUBLISHERS}): reinstall ckstore with pip ('ckstore[dvc]')")
    return next(iter(found)).load()


#: Entry-point group of the multi-rank implementation ``Store(process_group=...)`` attaches (``torch`` is declared in pyproject.toml).
COLLECTIVES = "ckstore.collectives"


def find_collective(name: str) -> Callable[..., Any]:
    """The ``attach(store, process_group)`` function registered under ``name`` in the ``ckstore.collectives`` group.

    The multi-rank save and load (``ckstore.distributed.ranks``) sit above Store and import it; Store
    finds them here, as it finds publishers, so the import graph keeps pointing one way.
    """
    found = entry_points(group=COLLECTIVES, name=name)
    if not found:
        raise InvalidArgumentError(
            f"process_group= needs the {name!r} multi-rank implementation (entry-point group {COLLECTIVES}), "
            "which is not installed: reinstall ckstore with pip"
        )
    return next(iter(found)).load()
