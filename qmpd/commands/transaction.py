"""``transaction``: several actions, all or nothing (spec §2.6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpd.commands.actions import ACTIONS, Action, BaseAction, TxnContext, action, run_actions
from qmpd.commands.bitmap import sync_persistent
from qmpd.commands.context import CommandContext
from qmpd.commands.registry import command
from qmpd.errors import GenericError
from qmpd.jobs import JobTxn

if TYPE_CHECKING:
    # Annotations only: the registry resolves each command's model by name
    # at dispatch time (qmpd.qapi.validate), so importing this module
    # creates no model.
    from qmpd.qapi.models import Abort, TransactionArgs

__all__: list[str] = []

#: Action kinds that accept ``completion-mode`` other than ``individual``.
_GROUPABLE = frozenset({"blockdev-backup", "drive-backup"})


class AbortAction(BaseAction):
    """The ``abort`` action: always fails, rolling back what came before."""

    def __init__(self, ctx: CommandContext, data: Abort, txn: TxnContext) -> None:
        pass

    async def prepare(self) -> None:
        raise GenericError("Transaction aborted using Abort action")


action("abort")(AbortAction)


@command("transaction")
async def transaction(ctx: CommandContext, args: TransactionArgs) -> None:
    """Prepare every action in order; commit all in reverse, or undo all."""
    mode = "individual"
    if args.properties is not None and args.properties.completion_mode is not None:
        mode = str(args.properties.completion_mode)
    kinds = [str(a.type) for a in args.actions]
    if mode != "individual":
        for kind in kinds:
            if kind not in _GROUPABLE:
                raise GenericError(
                    f"Action '{kind}' does not support transaction property completion-mode = {mode}")
    txn = TxnContext(job_txn=JobTxn() if mode == "grouped" else None)
    actions: list[Action] = [ACTIONS[kind](ctx, a.data, txn) for kind, a in zip(kinds, args.actions)]
    await run_actions(actions)
    await sync_persistent(ctx, actions)
