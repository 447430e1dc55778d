"""Fault-injection harness for ckstore: kills, a crash-state model, power cuts, disk errors, bad files.

Run ``python -m fault_injection run --profile ci`` (see ``__main__``).
"""
