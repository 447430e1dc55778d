"""Adapters that meet users where they train (Lightning, Hugging Face, Accelerate), import and
export of other checkpoint formats, and DVC versioning.

Every module here uses only ckstore's public API, so each one is an example of what a user could
have written, and none of the heavy frameworks is imported until its adapter is.
"""
