"""Cost of one group commit of the Redis journal: `RedisJournal.append` of
one record for each of N sessions (one engine tick of N generating
sessions), against a real Redis.

Reports the wall time per commit (median, best, p90) and the calling
thread's CPU time (what the commit takes from the GIL while the engine's
next tick runs beside it).

    python bench/dev/journal_append.py                          # starts redis-server from PATH
    python bench/dev/journal_append.py --redis redis://127.0.0.1:6399/3 --sessions 256

On the 2-core CPU VM (redis-server 7.0.15, AOF everysec, 256 sessions),
before -> after the one-argument script: client CPU 1.27-1.37 -> 0.25-0.35
ms per commit, best wall time 1.66-1.72 -> 0.79-0.80 ms (medians are noisy
there).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import streamgemma as sg
from streamgemma.bench.fleet import redis_at
from streamgemma.session.journal import encode_record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", help="a Redis URL (default: start redis-server from PATH, AOF fsync always)")
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--commits", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, redis_at(args.redis, Path(tmp)) as url:
        store = sg.RedisSnapshotStore(url, prefix=f"journal-append-{time.time_ns()}")
        ids = [secrets.token_urlsafe(16) for _ in range(args.sessions)]
        for sid in ids:
            store.claim(sid)
        journal, rng = store.journal(), b"PHX1" + bytes(16)
        wall, cpu = [], []
        for i in range(args.commits + 20):
            batch = {sid: [encode_record(i, "step", [1234], rng, None)] for sid in ids}
            started, started_cpu = time.perf_counter(), time.thread_time()
            assert journal.append(batch) == set()
            if i >= 20:  # (warm-up)
                cpu.append(time.thread_time() - started_cpu)
                wall.append(time.perf_counter() - started)
        for sid in ids:  # (no snapshot: SnapshotNotFound, after deleting the journal and the lease)
            with contextlib.suppress(sg.SnapshotNotFound):
                store.delete(sid)
        store.close()
    wall.sort()
    print(f"{args.sessions} sessions, {args.commits} commits: wall median {1e3 * statistics.median(wall):.3f} ms, "
          f"best {1e3 * wall[0]:.3f}, p90 {1e3 * wall[int(0.9 * len(wall))]:.3f}; "
          f"client CPU median {1e3 * statistics.median(cpu):.3f} ms")


if __name__ == "__main__":
    main()
