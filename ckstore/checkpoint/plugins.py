"""Extensions found by entry point, so that the layers below the integrations never import them."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ..errors import DvcError

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
