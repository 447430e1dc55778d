"""Checkpoints as units: the commit protocol, the catalog (listing, resolving, verifying), retention, background saves, quarantine."""
