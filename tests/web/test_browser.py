"""A real browser: headless Chromium renders the dashboard during a throttled backup.

Asserted from the rendered DOM: the job's progress bar advances (pushed
updates, nobody reloads), the bitmap's heat strip shows the dirty clusters
where the guest wrote, the block graph nests a ``-device virtio-blk-pci``
over its ``-drive`` BlockBackend over the root node, and the pause button pauses the job through the
dispatcher.  The screenshot is saved as an artifact (path printed at the end
of the pytest run).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.support.cdp import Page, find_chromium, headless_chromium
from tests.support.daemon import AsyncRawClient
from qmpd.server.plan import StartupPlan
from tests.support.web import TOKEN, web_daemon
from tests.web import conftest

SIZE = 16 << 20
SPEED = 2 << 20  # 8 s for the whole disk: the test cancels it long before

CHROMIUM = find_chromium()
pytestmark = [pytest.mark.asyncio,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")]


def progress_above(job: str, floor: float) -> str:
    """JS: a promise of the job's bar value once it exceeds ``floor`` (MutationObserver, no polling)."""
    return f"""new Promise((resolve) => {{
      const check = () => {{
        const bar = document.querySelector('tr[data-job="{job}"] .bar');
        const value = bar ? parseFloat(bar.dataset.progress) : -1;
        if (value > {floor}) {{ resolve(value); return true; }}
        return false;
      }};
      if (!check()) {{
        const obs = new MutationObserver(() => {{ if (check()) obs.disconnect(); }});
        obs.observe(document.body, {{subtree: true, childList: true, attributes: true}});
      }}
    }})"""


HOT_CELLS = """new Promise((resolve) => {
  const check = () => {
    const strip = document.querySelector('[data-bitmap="src/b0"] .heat');
    if (!strip || strip.dataset.hot === "0") return false;
    resolve([...strip.children].map((c, i) => c.classList.contains("hot") ? i : -1).filter(i => i >= 0));
    return true;
  };
  if (!check()) {
    const obs = new MutationObserver(() => { if (check()) obs.disconnect(); });
    obs.observe(document.body, {subtree: true, childList: true, attributes: true});
  }
})"""


async def _qmp(client: AsyncRawClient, command: str, **arguments: object) -> dict[str, object]:
    reply, _ = await client.execute({"execute": command, "arguments": arguments})
    assert "return" in reply, reply
    return reply


async def test_dashboard_in_chromium(sock_dir: Path, tmp_path: Path, artifact_dir: Path) -> None:
    assert CHROMIUM is not None
    src = tmp_path / "src.img"
    with open(src, "wb") as f:  # all data, so every chunk is read and throttled
        f.write(bytes(range(256)) * (SIZE // 256))
    disk = tmp_path / "vda.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    # as `qmpd -drive if=none,id=drive0,... -device virtio-blk-pci,drive=drive0,id=vda`
    plan = StartupPlan(drives=[f"if=none,id=drive0,file={disk},format=raw,node-name=disk0"],
                       devices=["virtio-blk-pci,drive=drive0,id=vda"])
    async with web_daemon(sock_dir, name="browser-test", plan=plan) as wd:
        client = await AsyncRawClient.connect(wd.running.path)
        try:
            await _qmp(client, "blockdev-add", **{"driver": "raw", "node-name": "src",
                                                  "file": {"driver": "file", "filename": str(src)}})
            await _qmp(client, "blockdev-add", **{"driver": "null-co", "node-name": "dst", "size": SIZE})
            await _qmp(client, "block-dirty-bitmap-add", node="src", name="b0")
            await _qmp(client, "blockdev-backup", device="src", target="dst", sync="full",
                       speed=SPEED, **{"job-id": "job0"})
            # the guest writes 4 MiB..5 MiB while the backup runs: cells 32..39 of 128
            await _qmp(client, "human-monitor-command", **{"command-line": 'qemu-io src "write -P 9 4M 1M"'})

            async with headless_chromium(CHROMIUM) as page:
                await page.navigate(f"{wd.url}#token={TOKEN}")
                first = await page.evaluate(progress_above("job0", 0.0))
                second = await page.evaluate(progress_above("job0", first))
                assert 0 < first < second < 100
                assert await page.evaluate(HOT_CELLS) == list(range(32, 40))
                assert await page.evaluate("document.querySelector('#name').textContent") == "browser-test"
                assert await page.evaluate("document.querySelector('#conn').textContent") == "live"
                graph = await page.evaluate("[...document.querySelectorAll('#graph [data-node]')]"
                                            ".map(li => li.dataset.node)")
                assert "src" in graph and "dst" in graph
                chain = await page.evaluate("""(() => {
                    const dev = document.querySelector('#graph > li[data-device="/machine/peripheral/vda"]');
                    const be = dev && dev.querySelector(':scope > ul > li[data-backend="drive0"]');
                    const node = be && be.querySelector(':scope > ul > li[data-node="disk0"]');
                    return node ? [dev.querySelector('.device-name').textContent,
                                   be.querySelector('.backend-name').textContent,
                                   node.querySelector('.role').textContent,
                                   node.querySelector(':scope > ul > li').dataset.node] : null;
                })()""")
                assert chain is not None
                assert chain[0] == "vda" and chain[1] == "drive0" and chain[2] == "root: "
                assert chain[3].startswith("#block")      # disk0's auto-named file child
                # the drive's node sits under its device only, not again at the top
                assert await page.evaluate(
                    "document.querySelectorAll('#graph > li[data-node=\"disk0\"]').length") == 0
                png = await page.screenshot()
                shot = artifact_dir / "dashboard.png"
                shot.write_bytes(png)
                conftest.ARTIFACTS.append(shot)
                assert png.startswith(b"\x89PNG") and len(png) > 10_000

                # the pause button goes through the dispatcher: QMP clients see the job pause
                await _click(page, 'tr[data-job="job0"] button[data-verb="pause"]')
                while True:
                    msg = json.loads(await asyncio.wait_for(client.reader.readline(), 15))
                    if msg.get("data") == {"id": "job0", "status": "paused"}:
                        break
                await _click(page, 'tr[data-job="job0"] button[data-verb="cancel"]')
                while True:
                    msg = json.loads(await asyncio.wait_for(client.reader.readline(), 15))
                    if msg.get("event") == "BLOCK_JOB_CANCELLED":
                        break
        finally:
            await client.close()


async def _click(page: Page, selector: str) -> None:
    assert await page.evaluate(f"""(() => {{
        const b = document.querySelector('{selector}');
        if (!b) return false;
        b.click();
        return true;
    }})()""")
