"""Every registration table is closed once a daemon is set up (issue 8, part 4)."""

from __future__ import annotations

import pytest

from qmpd.block.drivers import DRIVERS, register_driver
from qmpd.commands.actions import action
from qmpd.commands.context import DaemonConfig
from qmpd.server.daemon import Daemon


def test_tables_are_frozen_after_setup() -> None:
    Daemon(DaemonConfig(), []).setup()
    with pytest.raises(RuntimeError, match="frozen"):
        register_driver("late", DRIVERS["file"])
    with pytest.raises(RuntimeError, match="frozen"):
        action("late")(lambda ctx, data, txn: None)  # type: ignore[arg-type,return-value]
    assert "late" not in DRIVERS
