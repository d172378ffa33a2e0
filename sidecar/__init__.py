"""kcr-trio's in-pod execution agent: KubeCodeRun's pod protocol on Trio + Hypercorn.

Standalone on purpose: it ships alone in language images, so it imports nothing from ``kcr_trio``
and needs only ``trio`` and ``hypercorn``. See ``README.md`` in this directory.
"""

__version__ = "0.1.0"
