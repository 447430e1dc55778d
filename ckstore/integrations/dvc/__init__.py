"""Versioning checkpoints with DVC: publish, pull, the journal that makes a publish resumable, git helpers."""
