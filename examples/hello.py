#!/usr/bin/env python3
"""Connect to qmpd with qemu.qmp, print the version and the command list.

    python examples/hello.py ./qmpd.sock
"""

import asyncio
import sys

from qemu.qmp import QMPClient


async def main(path: str) -> None:
    qmp = QMPClient("hello")
    await qmp.connect(path)
    try:
        version = await qmp.execute("query-version")
        qemu = version["qemu"]
        print(f"QEMU {qemu['major']}.{qemu['minor']}.{qemu['micro']} ({version['package']})")
        commands = await qmp.execute("query-commands")
        for name in sorted(c["name"] for c in commands):
            print(name)
    finally:
        await qmp.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "./qmpd.sock"))
