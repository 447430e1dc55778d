"""Gaps found auditing issue 11 (continuing safely after a fallback or rollback)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import ckstore
from conftest import REPO_ROOT


def test_readme_states_the_retention_rule_quarantine_strict_loads_and_read_faults():
    """Issue 11's "Done when": the README says each of these, not only docs/."""
    text = (REPO_ROOT / "README.md").read_text()
    assert "### Retention, rollback and the quarantine" in text
    assert "**Strict loads.**" in text
    assert "`.quarantine/" in text and "ckstore quarantine PATH --empty" in text
    assert "**A read fault falls back too.**" in text and "CheckpointReadError" in text
