"""Security attacks of area ``dvc`` (see the package docstring for the contract)."""

from __future__ import annotations

from . import Ctx, attack  # noqa: F401
