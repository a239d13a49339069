"""Transaction actions: the protocol every ``transaction`` kind implements.

``transaction`` (and the single-action commands that are "literally
one-action transactions", such as ``blockdev-backup``) drive actions in
QEMU's order (spec §2.6): ``prepare`` each in list order, performing the
change at once and remembering how to undo it; if one fails, ``abort`` every
prepared action in reverse order; otherwise ``commit`` them in reverse
order; finally ``clean`` every prepared action.

Modules register a factory per action kind in :data:`ACTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qmpd.commands.context import CommandContext
    from qmpd.jobs import JobTxn

__all__ = ["Action", "ActionFactory", "BaseAction", "TxnContext", "ACTIONS", "action", "freeze_actions",
           "run_actions"]


class Action(Protocol):
    """One prepared-or-not change of a transaction."""

    async def prepare(self) -> None:
        """Perform the change; :raise QMPError: to fail the transaction."""

    def commit(self) -> None:
        """Make the change final (e.g. start a backup job)."""

    async def abort(self) -> None:
        """Undo a prepared change."""

    def clean(self) -> None:
        """Release what prepare held, after commit or abort."""


class BaseAction:
    """Defaults for :class:`Action`: nothing to commit, undo or clean up.
    Subclasses implement :meth:`prepare` and override what they need."""

    async def prepare(self) -> None:
        """Perform the change; :raise QMPError: to fail the transaction."""
        raise NotImplementedError

    def commit(self) -> None:
        """Nothing to make final."""

    async def abort(self) -> None:
        """Nothing to undo."""

    def clean(self) -> None:
        """Nothing to release."""


@dataclass
class TxnContext:
    """What the actions of one transaction share."""

    #: ``completion-mode: grouped``: the job transaction all backups join.
    job_txn: JobTxn | None = None
    #: Free-form per-transaction state (e.g. bitmaps made by earlier actions).
    extra: dict[str, Any] = field(default_factory=dict)


ActionFactory = Callable[["CommandContext", Any, TxnContext], Action]

#: kind (QAPI ``TransactionActionKind`` value) -> factory(ctx, data model, txn)
ACTIONS: dict[str, ActionFactory] = {}
_frozen = False


def freeze_actions() -> None:
    """No more :func:`action` registrations (the daemon calls this in setup)."""
    global _frozen
    _frozen = True


def action(kind: str) -> Callable[[ActionFactory], ActionFactory]:
    """Decorator registering the factory of transaction action ``kind``."""

    def register(factory: ActionFactory) -> ActionFactory:
        if _frozen:
            raise RuntimeError(f"action table frozen; cannot register {kind!r}")
        if kind in ACTIONS:
            raise RuntimeError(f"transaction action {kind!r} registered twice")
        ACTIONS[kind] = factory
        return factory

    return register


async def run_actions(actions: list[Action]) -> None:
    """Prepare in order; on failure abort the prepared ones in reverse.

    :raise QMPError: the first failure, after the rollback.
    """
    prepared: list[Action] = []
    try:
        for act in actions:
            await act.prepare()
            prepared.append(act)
    except BaseException:
        for act in reversed(prepared):
            await act.abort()
        for act in prepared:
            act.clean()
        raise
    for act in reversed(prepared):
        act.commit()
    for act in prepared:
        act.clean()
