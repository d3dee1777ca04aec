"""kill -9 of a process writing to the semantic cache's store loses no committed entry: on
SQLite, and on PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("numkong")
from wasinn.cache import open_store  # noqa: E402

WRITER = textwrap.dedent("""
    import asyncio, sys, time
    import numpy as np
    from wasinn.cache import Entry, open_store

    async def main(location):
        store = open_store(location)
        rng = np.random.default_rng(0)
        i = 0
        while True:
            vector = rng.standard_normal(16).astype(np.float32)
            vector /= np.linalg.norm(vector)
            now = time.time()
            await store.put(Entry(scope="s", text=f"question {i}", vector=vector, model="m",
                                  answer=f"answer {i}", finish_reason="stop", prompt_tokens=1,
                                  completion_tokens=1, generation_seconds=0.1, created=now,
                                  expires=now + 3600), max_entries=10**9)
            print(i, flush=True)  # committed: put() is durable when it returns
            i += 1

    asyncio.run(main(sys.argv[1]))
""")


def test_kill_9_during_writes_loses_no_committed_entry(store_location: str) -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, store_location],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    committed = -1
    deadline = time.monotonic() + 60
    while committed < 300 and time.monotonic() < deadline:
        committed = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)  # mid-write: it was writing the next entry
    writer.wait(10)
    committed = max([committed] + [int(line) for line in writer.stdout.read().split()])
    assert committed >= 300

    async def reopen() -> list[str]:
        store = open_store(store_location)
        try:
            probe = np.zeros(16, np.float32)
            probe[0] = 1.0
            matches = await store.nearest("s", probe, k=10**6, min_similarity=-1.0,
                                          now=time.time(), oldest=0.0)
            return [m.entry.answer for m in matches]
        finally:
            await store.close()

    answers = set(asyncio.run(reopen()))
    missing = [i for i in range(committed + 1) if f"answer {i}" not in answers]
    assert missing == []
