"""kcr-trio: the LibreChat Code Interpreter API on Trio, wire-compatible with KubeCodeRun.

The package is laid out like hypercorn: ``core`` knows the domain and no I/O, ``backends`` adapt the
core's small interfaces to real systems (each with an in-process twin), ``api`` is the HTTP edge, and
``app`` composes them.
"""

__version__ = "0.1.0"
