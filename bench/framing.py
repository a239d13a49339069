"""Micro benchmark of the QMP wire codec: prints messages per second.

Run: .venv/bin/python bench/framing.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qmpd.protocol import JsonStreamParser, encode

REQUEST = b'{"execute": "query-version", "id": 1}\n'
REPLY = {"return": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "id": 1}


def _rate(label: str, count: int, body: Callable[[], object]) -> None:
    start = time.perf_counter()
    for _ in range(count):
        body()
    elapsed = time.perf_counter() - start
    print(f"{label:<44} {count / elapsed:>12,.0f} /s  ({elapsed / count * 1e6:.2f} us)")


def main() -> None:
    parser = JsonStreamParser()
    exact = JsonStreamParser(fast=False)  # the exact lexer/parser path, for comparison
    pretty = b'{\n    "execute": "query-version",\n    "id": 1\n}\n'
    _rate("feed(one request) fast path", 200_000, lambda: parser.feed(REQUEST))
    _rate("feed(one request) exact path", 100_000, lambda: exact.feed(REQUEST))
    _rate("feed(pretty-printed request)", 100_000, lambda: parser.feed(pretty))
    batch = REQUEST * 100
    _rate("feed(100 requests) -> per request", 2_000, lambda: parser.feed(batch))
    print("  (per-request figure: multiply the line above by 100)")
    _rate("encode(reply)", 200_000, lambda: encode(REPLY))
    big = b'{"execute": "x", "arguments": {"data": "' + b"A" * (60 << 20) + b'"}}'
    start = time.perf_counter()
    chunked = JsonStreamParser()
    for i in range(0, len(big), 1 << 16):
        chunked.feed(big[i:i + (1 << 16)])
    print(f"60 MiB string message in 64 KiB feeds: {time.perf_counter() - start:.2f} s")
    numbers = b"[" + b"1234," * 1_000_000 + b"0]"
    start = time.perf_counter()
    JsonStreamParser().feed(numbers)
    print(f"array of 1M numbers (5 MB), one feed: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    JsonStreamParser().feed(numbers.replace(b"1234", b"'ab'"))
    print(f"array of 1M single-quoted strings (exact path): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
