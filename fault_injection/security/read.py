"""Security attacks of area ``read`` (see the package docstring for the contract)."""

from __future__ import annotations

from . import Ctx, attack  # noqa: F401
