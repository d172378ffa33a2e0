"""kcr-trio's in-pod execution agent: KubeCodeRun's pod protocol on Trio + h11.

Standalone on purpose: it ships alone in language images, so it imports nothing from ``kcr_trio``
and needs only ``trio`` and ``h11``. See ``README.md`` in this directory.
"""

__version__ = "0.1.0"
