"""Parts of the ``ckstore`` command (``ckstore/cli.py`` holds the parser, ``main`` and the first commands).

``progress``: bars on stderr, only on a terminal; ``inspect``: ``diff`` and ``plot``; ``transfer``: ``import``
and ``export``. Everything here uses the public API (``import ckstore``).
"""
