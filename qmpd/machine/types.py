"""The ``-machine`` types qmpd accepts (light: the command line checks them
before anything else of the machine is loaded)."""

from __future__ import annotations

__all__ = ["MACHINE_TYPES"]

#: ``-machine`` types qmpd accepts: name -> description (``-machine help``).
#: qmpd emulates none of them; the type only decides nothing but the name.
MACHINE_TYPES = {
    "none": "empty machine",
    "pc": "Standard PC (i440FX + PIIX, 1996)",
    "q35": "Standard PC (Q35 + ICH9, 2009)",
}
