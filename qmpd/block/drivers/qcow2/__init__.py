"""The qcow2 format (QEMU's docs/interop/qcow2.txt).

Pure parts over bytes: :mod:`.header` (header, feature bits, extensions),
:mod:`.tables` (L1/L2 entries), :mod:`.refcount` (refcount blocks of any
width), :mod:`.alloc` (cluster allocation), :mod:`.layout` (new images),
:mod:`.l2cache`.  Stateful parts: :mod:`.image` (requests over the metadata)
and :mod:`.driver` (the ``BlockDriver`` and its opener).
"""
