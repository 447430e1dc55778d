"""Security attacks of area ``store`` (see the package docstring for the contract)."""

from __future__ import annotations

from . import Ctx, attack  # noqa: F401
