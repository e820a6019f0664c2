"""fleet: workers on one Redis store, one SIGKILLed each round; nothing acknowledged may be lost.

The fault test of a fleet (issue #19): N `streamgemma serve` workers on one
Redis store, many sessions appending and generating, one worker killed with
SIGKILL at a random moment each round.

Every round each session's client connects to a worker picked at random
(so sessions move between live workers: hand-over), appends token ids,
waits for `appended`, and generates. A random worker is SIGKILLed during the
round; its clients reconnect to a survivor with `open(session, since=last
position seen)`. Checked: no acknowledged input or sent token is lost (the
reopened position is at least the last position the client saw, and
`missed` starts there), every session is reopened on a survivor, and at the
end every session's history (inputs, and generated tokens received or
returned as missed) is replayed on a local session of the same seed: the
generated tokens must be identical (CPU, float32). The killed worker is
restarted between rounds.

Workers run `--model` (default: demo) on the CPU in float32; Redis is
started from `redis-server` on PATH in a temporary directory unless --redis
names one. Example (about a minute): streamgemma bench fleet --sessions 12
--rounds 2. The issue's full run: streamgemma bench fleet --workers 3
--sessions 100 --rounds 20 --json fleet.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import websockets

import streamgemma as sg

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # (anyio's dependency there)

CONNECT_ERRORS = (OSError, EOFError, ConnectionError, websockets.ConnectionClosed, websockets.InvalidHandshake,
                  TimeoutError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=3, help="serve processes (default 3)")
    parser.add_argument("--sessions", type=int, default=100, help="concurrent sessions (default 100)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds, one worker killed in each (default 20)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per generation (default 24)")
    parser.add_argument("--lease-ttl", type=float, default=1.0,
                        help="workers' lease time-to-live: a dead worker's sessions wait this long (default 1)")
    parser.add_argument("--redis", metavar="URL", help="a Redis to use (default: start redis-server from PATH)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the schedule and the sessions (default 0)")
    parser.add_argument("--logs", metavar="DIR", help="keep the workers' logs in DIR")


@dataclasses.dataclass
class Tally:
    acknowledged_inputs: int = 0
    tokens_received: int = 0
    lost_acknowledged: int = 0  # positions a reopened session lacked, of those the client had seen
    history_gaps: int = 0  # `missed` not starting where the client's view ended
    missed_tokens: int = 0  # journaled but lost in flight, returned by open(since=)
    reopened: int = 0  # sessions reopened after their connection failed
    reopen_failures: int = 0
    moved: int = 0  # sessions opened on another worker than the one that held them
    recovery_s: list = dataclasses.field(default_factory=list)


class SessionClient:
    """One session as its client sees it: the history (segments of input and
    generated ids), the last position seen, and the worker last used."""

    def __init__(self, seed: int, vocab: int):
        self.seed = seed
        self.vocab = vocab
        self.id: str | None = None
        self.seen = 0
        self.history: list[tuple[str, list[int]]] = []
        self.worker: int | None = None
        self.pending: list[int] | None = None  # an append sent and not yet acknowledged

    def add(self, kind: str, ids: list[int]) -> None:
        if self.history and self.history[-1][0] == kind == "input":
            self.history[-1][1].extend(ids)
        elif ids or kind == "gen":
            self.history.append((kind, list(ids)))
        self.seen += len(ids)


class Worker:
    def __init__(self, index: int, command: list[str], log_dir: Path):
        self.index = index
        self.command = command
        self.log_dir = log_dir
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.port, self.starts = _free_port(), self.starts + 1
        log = open(self.log_dir / f"worker{self.index}-{self.starts}.log", "w")  # noqa: SIM115 - the child's
        # Workers replay each other's journals: MKL must compute the same way in each (docs/snapshots.md).
        env = {**os.environ, "MKL_CBWR": os.environ.get("MKL_CBWR", "AUTO,STRICT")}
        self.proc = subprocess.Popen(self.command + ["--port", str(self.port)], stdout=log, stderr=log, env=env)
        log.close()

    def wait_listening(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.index} exited; see its log in {self.log_dir}")
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.index} did not start in {timeout:g} s")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_prefix(url: str, prefix: str) -> None:
    """Delete a bench run's own keys (under `prefix`): a user's Redis keeps nothing of it."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


@contextlib.contextmanager
def redis_at(url: str | None, directory: Path):
    """`url`, or a redis-server started in `directory` (append-only, fsync always)."""
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("streamgemma bench fleet: redis-server is not on PATH (install the redis-server "
                         "package) and no --redis URL was given")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                             "--logfile", str(directory / "redis.log")])
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(20)


async def session_round(client: SessionClient, workers: list[Worker], rng: random.Random, tokens: int,
                        tally: Tally) -> None:
    """One round of one session: connect to a random live worker, append,
    generate; on a failed connection, reopen on another and finish the round."""
    appended = False
    generated = False
    failed_at: float | None = None
    for _attempt in range(20):
        choices = [w for w in workers if w.alive] or workers
        worker = rng.choice(choices)
        try:
            async with sg.Client(worker.url, timeout=30) as conn:
                if client.id is None:
                    s = await conn.open(seed=client.seed)
                    client.id = s.id
                else:
                    s = await conn.open(client.id, since=client.seen)
                    _check_reopen(client, s, tally)
                    if client.worker is not None and client.worker != worker.index:
                        tally.moved += 1
                if failed_at is not None:
                    tally.reopened += 1
                    tally.recovery_s.append(time.monotonic() - failed_at)
                    failed_at = None
                client.worker = worker.index
                if not appended:
                    ids = client.pending or [rng.randrange(3, client.vocab) for _ in range(rng.randint(2, 12))]
                    client.pending = ids
                    position = await s.append(ids)
                    client.pending = None
                    client.add("input", ids)
                    assert position == client.seen, (position, client.seen)
                    tally.acknowledged_inputs += 1
                    appended = True
                if not generated:
                    client.add("gen", [])
                    async for token in s.generate(max_tokens=tokens, stop_token_ids=[]):
                        client.history[-1][1].append(token.id)
                        client.seen += 1
                        tally.tokens_received += 1
                    generated = True
                return
        except Exception as e:  # noqa: BLE001 - a connection failure is retried elsewhere, anything else raised
            if not _connection_failure(e):
                raise
            failed_at = failed_at or time.monotonic()
            await anyio.sleep(0.05)
    tally.reopen_failures += 1


def _connection_failure(e: BaseException) -> bool:
    """Whether `e` (or every exception of its group) is a dead worker or a
    refused request (session_busy, store_unavailable) that another try may pass."""
    if isinstance(e, BaseExceptionGroup):
        return all(_connection_failure(x) for x in e.exceptions)
    return isinstance(e, CONNECT_ERRORS + (sg.ServerError,))


def _check_reopen(client: SessionClient, s, tally: Tally) -> None:
    """The reopened session holds everything the client saw; what it missed comes back."""
    if s.position < client.seen:
        tally.lost_acknowledged += client.seen - s.position
        raise RuntimeError(f"session {client.id[:8]}... lost {client.seen - s.position} positions")
    missed = s.missed or {"from": client.seen, "ids": []}
    if missed["from"] != client.seen:
        tally.history_gaps += 1
    extra = missed["ids"][client.seen - missed["from"]:] if missed["from"] <= client.seen else []
    if extra:
        tally.missed_tokens += len(extra)
        if client.pending is not None:  # (part of) an append whose acknowledgement was lost; sent again
            if extra != client.pending[:len(extra)]:
                tally.history_gaps += 1
            client.add("input", extra)
        else:  # tokens of the generation that the connection lost
            client.history[-1][1].extend(extra)
            client.seen += len(extra)


async def fleet_rounds(workers: list[Worker], clients: list[SessionClient], rounds: int, tokens: int,
                       seed: int) -> tuple[Tally, list[dict]]:
    tally, kills, rng = Tally(), [], random.Random(seed)
    for rnd in range(rounds):
        started = time.monotonic()
        victim = rng.choice(workers)
        delay = rng.uniform(0.05, 0.6)

        async def kill_later(victim=victim, delay=delay, rnd=rnd):
            await anyio.sleep(delay)
            held = sum(1 for c in clients if c.worker == victim.index)
            victim.kill()
            kills.append({"round": rnd, "worker": victim.index, "after_s": round(delay, 3),
                          "sessions_seen_there": held})

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_later)
            for k, client in enumerate(clients):
                tg.start_soon(session_round, client, workers, random.Random(seed * 1_000_003 + rnd * 1009 + k),
                              tokens, tally)
        for worker in workers:  # the killed one comes back for the next round
            if not worker.alive:
                worker.start()
                await anyio.to_thread.run_sync(worker.wait_listening)
        kills[-1]["round_s"] = round(time.monotonic() - started, 2)
    return tally, kills


def verify(model: sg.Model, clients: list[SessionClient]) -> dict:
    """Replay each session's history on a local session of its seed."""
    mismatches, checked = [], 0
    for client in clients:
        local = model.session(seed=client.seed)
        for kind, ids in client.history:
            if kind == "input":
                local.feed(ids)
            elif ids:
                got = [t.id for t in local.generate(max_tokens=len(ids), stop_token_ids=[])]
                checked += len(ids)
                if got != ids:
                    mismatches.append({"session": client.id[:8], "at": local.position - len(ids)})
                    break
        local.close()
    return {"generated_tokens_checked": checked, "sessions_mismatched": len(mismatches),
            "mismatches": mismatches[:10]}


def run(args: argparse.Namespace) -> dict:
    if args.workers < 2 or args.sessions < 1 or args.rounds < 1:
        raise SystemExit("streamgemma bench fleet: needs --workers >= 2, --sessions >= 1, --rounds >= 1")
    model_spec = args.model or "demo"
    model = sg.load(model_spec, device="cpu", dtype="float32", progress=False)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sg-fleet-") as tmp:
        tmp = Path(tmp)
        log_dir = Path(args.logs) if args.logs else tmp
        log_dir.mkdir(parents=True, exist_ok=True)
        with redis_at(args.redis, tmp) as url:
            prefix = f"fleet-{os.getpid()}-{int(time.time())}"
            command = [sys.executable, "-m", "streamgemma.cli", "serve", "--model", model_spec, "--device", "cpu",
                       "--dtype", "float32", "--store", url, "--store-prefix", prefix, "--lease-ttl",
                       str(args.lease_ttl), "--max-active", str(max(64, args.sessions)), "--threads", "1"]
            workers = [Worker(i, command, log_dir) for i in range(args.workers)]
            try:
                for w in workers:
                    w.start()
                for w in workers:
                    w.wait_listening()
                clients = [SessionClient(args.seed * 7919 + k, model.config.vocab_size) for k in range(args.sessions)]
                tally, kills = anyio.run(fleet_rounds, workers, clients, args.rounds, args.tokens, args.seed,
                                         backend="asyncio")
            finally:
                for w in workers:
                    w.stop()
                remove_prefix(url, prefix)
    check = verify(model, clients)
    recovery = tally.recovery_s
    out = {"model": {"spec": model_spec, "device": "cpu", "dtype": "float32"},
           "workers": args.workers, "sessions": args.sessions, "rounds": args.rounds, "kills": kills,
           **{k: v for k, v in dataclasses.asdict(tally).items() if k != "recovery_s"},
           "recovery_s": {"median": round(statistics.median(recovery), 3) if recovery else None,
                          "max": round(max(recovery), 3) if recovery else None},
           **check, "wall_s": round(time.monotonic() - started, 1)}
    ok = (out["lost_acknowledged"] == out["history_gaps"] == out["reopen_failures"] == 0
          and out["sessions_mismatched"] == 0)
    out["passed"] = ok
    print(f"{args.workers} workers, {args.sessions} sessions, {args.rounds} rounds (one SIGKILL each): "
          f"{tally.acknowledged_inputs} inputs acknowledged, {tally.tokens_received} tokens received, "
          f"{out['lost_acknowledged']} lost, {tally.missed_tokens} returned as missed, {tally.reopened} reopened "
          f"after a failure ({tally.reopen_failures} failed), {tally.moved} moved between workers, "
          f"{check['sessions_mismatched']} continuations differ: {'PASSED' if ok else 'FAILED'}")
    return out
