"""qmpd: a QMP daemon that does, for real, what QEMU's block layer does for backups.

Layers (imports only go downward; ``tests/unit/test_layers.py`` enforces it)::

    L0  errors
    L1  protocol (sans-I/O wire), qapi (schema pipeline), bitmap
    L2  block, events, jobs
    L3  commands
    L4  server
    L5  cli
"""

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger("qmpd").addHandler(logging.NullHandler())
