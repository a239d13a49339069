"""A pre-imported qmpd that forks daemons on request (for crash tests).

Importing qmpd costs about half a second; a crash test that kills and
restarts the daemon a thousand times forks each one from this process
instead, which has already imported everything.  Run as
``python -m tests.support.zygote``; one JSON request per stdin line, one
JSON reply per stdout line:

    ["spawn", [ARGV...], PIDFILE]  -> {"pid": N} once the daemon listens
                                      (it runs ``--daemonize``), or {"error": ...}
    ["kill", N]                    -> {"status": S} after SIGKILL, reaped
    ["wait", N]                    -> {"status": S} once N exited by itself

This process is a child subreaper (prctl), so the daemonized grandchildren
are reaped here and a killed daemon is really gone before the reply.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

import qmpd.cli.main as cli
import qmpd.server.daemon  # noqa: F401  (import everything before forking)

_PR_SET_CHILD_SUBREAPER = 36


def _warm_up() -> None:
    """Load the schema and build the argument models the tests use, so that
    each forked daemon starts with them ready."""
    from qmpd.commands.context import DaemonConfig

    daemon = qmpd.server.daemon.Daemon(DaemonConfig(), [])
    daemon.setup()
    assert daemon.schema is not None
    for name, args in (
        ("qmp_capabilities", {}), ("query-named-block-nodes", {}),
        ("human-monitor-command", {"command-line": "info version"}),
        ("blockdev-backup", {"device": "a", "target": "b", "sync": "full"}),
        ("block-dirty-bitmap-add", {"node": "a", "name": "b"}),
        ("blockdev-add", {"driver": "raw", "node-name": "a", "file": {"driver": "file", "filename": "/x"}}),
        ("transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "a", "name": "b"}}]}),
    ):
        daemon.schema.validate_arguments(name, args)
        daemon.schema.build_arguments(name, args)


def _spawn(argv: list[str], pidfile: str) -> dict[str, object]:
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        try:
            rc = cli.main([*argv, "--daemonize", "--pidfile", pidfile])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"qmpd exited with {os.waitstatus_to_exitcode(status)}"}
    with open(pidfile, encoding="ascii") as f:
        return {"pid": int(f.read())}


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _warm_up()
    for line in sys.stdin:
        req = json.loads(line)
        if req[0] == "spawn":
            reply = _spawn(req[1], req[2])
        elif req[0] == "kill":
            os.kill(req[1], signal.SIGKILL)
            _, status = os.waitpid(req[1], 0)
            reply = {"status": os.waitstatus_to_exitcode(status)}
        else:
            _, status = os.waitpid(req[1], 0)
            reply = {"status": os.waitstatus_to_exitcode(status)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
