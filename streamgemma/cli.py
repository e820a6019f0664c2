"""The `streamgemma` command: generate text, chat, and describe a checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

MAX_THREADS = 1024  # --threads: torch crashes (SIGSEGV) with 100,000

EPILOG = """examples:
  streamgemma generate "The tide" --max-tokens 50      # the bundled demo model
  streamgemma info --model ./recurrentgemma-2b-it
  streamgemma generate --model ./recurrentgemma-2b-it "The tide" --max-tokens 50 --temperature 0.7
  echo "Tell me a joke" | streamgemma chat --model ./recurrentgemma-2b-it
  streamgemma serve --model ./recurrentgemma-2b-it --port 8765 --store ./sessions --token "$TOKEN"
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgemma", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Streaming, stateful text generation with RecurrentGemma / Griffin models.")
    parser.add_argument("--version", action="version", version=f"streamgemma {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("model")
        g.add_argument("--model", default="demo", metavar="PATH",
                       help="checkpoint: a Hugging Face directory, an official .pt file, a directory "
                            "written by Model.save, a Hugging Face Hub id (owner/name, with huggingface_hub "
                            "installed), or 'demo', the small model bundled with the package (the default)")
        g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
        g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="weights dtype (default: bfloat16 on cuda, float32 on cpu); with --quantize, "
                            "the activations' dtype")
        g.add_argument("--quantize", choices=("int8", "fp8", "int4"),
                       help="weight-only quantization at load time: int8 / fp8 with per-channel scales, "
                            "int4 with a scale per 128 weights of a row "
                            "(docs/quantization.md); a directory saved quantized loads as saved")
        _threads_arg(g)

    def sampling_args(p: argparse.ArgumentParser, default_max: int) -> None:
        g = p.add_argument_group("sampling")
        g.add_argument("--max-tokens", type=int, default=default_max, metavar="N",
                       help=f"most tokens to generate (default {default_max})")
        g.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 is greedy (default 1.0)")
        g.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K likeliest tokens (0: off)")
        g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
        g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                       help="drop tokens below P x the top probability (0: off)")
        g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="(1: off)")
        g.add_argument("--presence-penalty", type=float, default=0.0, metavar="A", help="(0: off)")
        g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when TEXT appears (not printed); repeatable")
        g.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")

    def stats_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stats", "--verbose", action="store_true", dest="stats",
                       help="print timings to stderr: prompt tokens, time to first token, tokens/s")

    p = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout",
                            description="Continue PROMPT and stream the generated text to stdout.")
    p.add_argument("prompt", metavar="PROMPT", help='the text to continue ("-" reads it from stdin, without its '
                                                    'trailing newline; "" generates from BOS alone)')
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token before the prompt")
    stats_arg(p)
    model_args(p)
    sampling_args(p, default_max=256)

    p = commands.add_parser("chat", help="interactive multi-turn chat (Gemma turn format)",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Chat in Gemma's turn format; replies stream to stdout.\n"
                                        "Without --model this is the bundled demo model, which is not\n"
                                        "instruction-tuned: for real replies use an -it checkpoint, e.g.\n"
                                        "--model google/recurrentgemma-2b-it.\n\n" + _chat_help())
    p.add_argument("--system", metavar="TEXT", help="a system prompt, put at the top of the first user turn "
                                                   "(Gemma has no system role)")
    stats_arg(p)
    model_args(p)
    sampling_args(p, default_max=1024)
    g = p.add_argument_group("snapshots")
    g.add_argument("--resume", metavar="FILE", help="continue the conversation saved in FILE")
    g.add_argument("--save", metavar="FILE", help="save the conversation to FILE after every reply "
                   "(atomically: a crash leaves the previous complete file)")

    p = commands.add_parser("serve", help="serve sessions over a websocket (docs/protocol.md)",
                            description="Serve streaming sessions at ws://HOST:PORT/v1/stream. SIGTERM or "
                                        "Ctrl-C snapshots every live session to the store, then exits.")
    model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    g.add_argument("--token", help="require the bearer token TOKEN (default: $STREAMGEMMA_TOKEN; "
                                   "none: no authentication)")
    g.add_argument("--store", metavar="DIR|URL", help="where sessions and their journals live: a directory, or "
                   "redis://[user:password@]HOST:PORT/DB (rediss:// for TLS) shared by a fleet of servers "
                   "(docs/deploy.md); default: memory only, so sessions do not survive a restart")
    g.add_argument("--store-prefix", default="streamgemma", metavar="P", help="key prefix in a Redis store")
    g.add_argument("--lease-ttl", type=float, default=10.0, metavar="S",
                   help="seconds after which a dead worker's sessions may be taken over (Redis store; default 10)")
    g.add_argument("--max-active", type=int, default=64, metavar="N",
                   help="sessions holding a state slot at once: the decode batch bound (default 64)")
    g.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="largest max_tokens a generation may ask for (default 4096)")
    g.add_argument("--no-page", action="store_true",
                   help="do not serve the web page at http://HOST:PORT/ (docs/browser.md)")
    _serve_http_args(p)
    _serve_limit_args(p)

    p = commands.add_parser("info", help="describe a checkpoint", description="Describe a checkpoint: "
                            "architecture preset, parameter count, dtype, tokenizer, state per session.")
    model_args(p)

    p = commands.add_parser("bench", help="benchmarks: decode, prefill, serve, resume, snapshot",
                            add_help=False, prefix_chars="\0")  # every argument goes to `streamgemma.bench`
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _sampling(args: argparse.Namespace) -> dict:
    """Generation keyword arguments from the flags, validated (before the slow model load)."""
    from .sampling.params import SamplingParams

    if args.max_tokens < 1:  # SamplingParams also allows None, which no flag can give
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, stop=args.stop, seed=args.seed)
    SamplingParams(**kwargs)
    return kwargs


def _threads_arg(group) -> None:
    """The --threads option, for every command that loads a model."""
    group.add_argument("--threads", type=int, metavar="N",
                       help="torch CPU threads (default: OMP_NUM_THREADS if set, else one per 10M parameters "
                            "and at most all CPUs but one, so a busy neighbour or the server's event loop "
                            "does not stall every op)")


def _load(args: argparse.Namespace):
    import streamgemma

    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:  # (torch crashes far above the cores)
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    return streamgemma.load(args.model, device=args.device, dtype=args.dtype, threads=args.threads,
                            quantize=args.quantize)


def _version() -> str:
    from . import __version__

    return __version__


def _chat_help() -> str:
    from .console import CHAT_HELP

    return CHAT_HELP


def _info(args: argparse.Namespace, out: TextIO) -> None:
    model = _load(args)
    cfg, tok = model.config, model.tokenizer
    attention = len(cfg.attention_layers)
    lines = [
        ("model", args.model),
        ("architecture", cfg.matching_preset() or "custom (no preset matches)"),
        ("layers", f"{cfg.num_layers} ({cfg.num_layers - attention} recurrent, {attention} local attention)"),
        ("width", f"{cfg.width} (lru {cfg.lru_width}, {cfg.num_heads} heads, window {cfg.attention_window})"),
        ("vocabulary", f"{cfg.vocab_size:,}"),
        ("parameters", f"{model.num_parameters():,}"),
        ("dtype", str(model.dtype).removeprefix("torch.")),
        ("weights", _weights_line(model.quantization)),
        ("weight memory", f"{model.weight_bytes() / 2**20:,.1f} MiB"),
        ("device", str(model.device)),
        ("state per session", f"{model.pool.slot_bytes() / 2**20:.2f} MiB"),
        ("tokenizer", f"{tok.vocab_size:,} pieces (bos {tok.bos_id}, eos {tok.eos_id}, chat turns "
                      f"{'yes' if tok.piece_id('<start_of_turn>') is not None else 'no'})" if tok else "none"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        out.write(f"{key + ':':<{width + 1}} {value}\n")


def _weights_line(quantization: str | None) -> str:
    if quantization is None:
        return "unquantized"
    return f"{quantization}, {'group-wise' if quantization == 'int4' else 'per-channel'} scales"


def _generate(args: argparse.Namespace, out: TextIO) -> None:
    from .console import Stats

    prompt = _stdin_prompt(sys.stdin.read()) if args.prompt == "-" else args.prompt
    if not prompt and args.no_bos:
        raise ValueError("the prompt is empty and --no-bos leaves out BOS: there is nothing to continue")
    sampling = _sampling(args)
    model = _load(args)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer.model: text generation needs one")
    if not prompt and tok.bos_id < 0:
        raise ValueError(f"the prompt is empty and {args.model}'s tokenizer has no BOS token to start from")
    with model.session(seed=args.seed) as session:
        stats = Stats(session.position)
        if prompt:
            session.feed(prompt, add_bos=not args.no_bos)
        else:  # the text starts from BOS alone
            session.feed([tok.bos_id])
        stats.prompt_read(session.position)
        for token in stats.count(session.generate(**sampling)):
            out.write(token.text)
            out.flush()
    out.write("\n")
    if args.stats:
        out.flush()
        sys.stderr.write(stats.summary())


def _stdin_prompt(text: str) -> str:
    """`echo text |` ends the prompt with a newline nobody meant as part of it; more
    blank lines than that were meant."""
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _check_utf8(value: str | None, what: str) -> None:
    """A byte of argv or the environment that is not UTF-8 (Python keeps it as a surrogate)."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (at character {e.start})") from None


def _chat(args: argparse.Namespace, out: TextIO, inp: TextIO) -> None:
    from .console import chat_loop

    sampling = _sampling(args)
    _check_utf8(args.system, "--system")
    for flag, value in (("--resume", args.resume), ("--save", args.save)):
        if value is not None and not value.strip():  # (e.g. --save "$FILE" with FILE unset)
            raise ValueError(f"{flag} is empty: name a file (or leave {flag} out)")
    if args.save:  # found before the model loads, not after the first reply
        target = Path(args.save).resolve()
        if not target.parent.is_dir():
            raise OSError(f"--save {args.save}: no such directory {str(target.parent)!r}")
        if target.is_dir():
            raise OSError(f"--save {args.save}: is a directory; name a file in it")
    model = _load(args)
    session = model.restore_file(args.resume) if args.resume else model.session(seed=args.seed)
    if args.system and session.position:
        sys.stderr.write("streamgemma chat: --system is ignored: the resumed conversation has its first turn\n")
    with session:
        chat_loop(session, out, inp, sys.stderr, sampling=sampling, system=args.system, save=args.save,
                  stats=args.stats)


def _serve_http_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("OpenAI-compatible HTTP API (docs/openai.md)")
    g.add_argument("--http-port", type=int, metavar="PORT",
                   help="also serve /v1/models, /v1/completions, /v1/chat/completions, /health and /metrics on "
                        "this port, same host, token and engine (default: off; 0 picks a free one)")
    g.add_argument("--model-name", metavar="NAME",
                   help="the model id the HTTP API lists and requests name (default: the --model path's last part)")
    g.add_argument("--prefix-cache-bytes", type=int, metavar="N",
                   help="bytes of cached conversation states kept in the store (default: 4 GiB with --store, "
                        "else 0); 0: off")
    g.add_argument("--prefix-cache-memory-bytes", type=int, default=1 << 30, metavar="N",
                   help="bytes of cached conversation states kept decoded in host memory (default 1 GiB); 0: off")
    g.add_argument("--prefix-cache-sessions", type=int, metavar="N",
                   help="finished requests' sessions kept open for their conversation's next turn (default: an "
                        "eighth of --max-active, 1 to 8); 0: off")
    g.add_argument("--http-max-requests", type=int, default=256, metavar="N",
                   help="HTTP requests generating at once; more get HTTP 429 (default 256)")


def _http_config(args: argparse.Namespace):
    """The HTTP API's settings from the command line, or None (off); checked before the model loads."""
    from .errors import ServeError
    from .serve.http import HttpConfig

    if args.http_port is None:
        given = [flag for flag, value, default in (
            ("--model-name", args.model_name, None), ("--prefix-cache-bytes", args.prefix_cache_bytes, None),
            ("--prefix-cache-memory-bytes", args.prefix_cache_memory_bytes, 1 << 30),
            ("--prefix-cache-sessions", args.prefix_cache_sessions, None),
            ("--http-max-requests", args.http_max_requests, 256)) if value != default]
        if given:  # (they were ignored)
            raise ServeError(f"{', '.join(given)} set(s) the HTTP API, which is off: add --http-port")
        return None
    if not 0 <= args.http_port <= 65535 or (args.http_port == args.port and args.port != 0):
        raise ServeError(f"--http-port must be in 0..65535 and differ from --port, got {args.http_port}")
    if min(args.prefix_cache_bytes or 0, args.prefix_cache_memory_bytes, args.prefix_cache_sessions or 0) < 0 \
            or args.http_max_requests < 1:
        raise ServeError("--prefix-cache-bytes, --prefix-cache-memory-bytes and --prefix-cache-sessions must be "
                         ">= 0, --http-max-requests >= 1")
    name = args.model_name or args.model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "streamgemma"
    return HttpConfig(port=args.http_port, model_name=name, prefix_cache_bytes=args.prefix_cache_bytes,
                      prefix_cache_memory_bytes=args.prefix_cache_memory_bytes,
                      held_sessions=args.prefix_cache_sessions, max_requests=args.http_max_requests)


def _serve_limit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (docs/serving.md#limits)")
    g.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="connections at once; more get HTTP 503 (default 1024)")
    g.add_argument("--max-sessions", type=int, default=4096, metavar="N",
                   help="sessions held by all connections at once (default 4096)")
    g.add_argument("--rate", type=float, default=200.0, metavar="N",
                   help="frames a second one connection may send before the server reads it more slowly "
                        "(default 200)")
    g.add_argument("--max-queued-tokens", type=int, default=1 << 22, metavar="N",
                   help="input tokens waiting to be consumed, all sessions together (default 4194304)")
    g.add_argument("--max-queued-bytes", type=int, default=1 << 24, metavar="N",
                   help="bytes of text waiting to be tokenized, all sessions together (default 16 MiB)")
    g.add_argument("--input-share", type=float, default=0.15, metavar="F",
                   help="most of the time input may take while sessions generate (default 0.15)")
    g.add_argument("--session-ttl", type=float, metavar="SECONDS",
                   help="delete sessions no connection holds and nobody used for this long, snapshot "
                        "included (default: keep them)")
    g = p.add_argument_group("logging")
    loud = g.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="log warnings, errors and the addresses listened on only")
    loud.add_argument("-v", "--verbose", action="store_true", help="log debugging detail too")


def _serve(args: argparse.Namespace) -> None:
    import gc
    import logging
    import os
    import signal

    import anyio

    from .errors import ServeError, StreamgemmaError
    from .serve.engine import Engine
    from .serve.server import Limits, Server
    from .session import snapshot as snapshot_format
    from .session.stores import open_store

    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="streamgemma serve: %(message)s")
    if args.quiet:  # (with --port 0 the log is where the port is found)
        logging.getLogger("streamgemma.serve.address").setLevel(logging.INFO)
    if args.verbose:
        logging.getLogger("streamgemma").setLevel(logging.DEBUG)
    else:  # our own line per connection says it better
        logging.getLogger("websockets").setLevel(logging.WARNING)
    # Every option is checked before the (slow) model load; a failure is one line.
    token = args.token if args.token is not None else os.environ.get("STREAMGEMMA_TOKEN")
    if token is not None and not token.strip():
        raise ServeError("the token is empty (--token or STREAMGEMMA_TOKEN): set a token, or unset both to "
                         "run without authentication")
    _check_utf8(token, "the token (--token or STREAMGEMMA_TOKEN)")
    _check_utf8(args.model_name, "--model-name")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    limits = Limits(max_tokens=args.max_tokens, max_connections=args.max_connections,
                    max_sessions=args.max_sessions, messages_per_second=args.rate)
    if not 0 < args.input_share <= 1:
        raise ServeError(f"--input-share must be in (0, 1], got {args.input_share}")
    if args.session_ttl is not None and not args.session_ttl > 0:
        raise ServeError(f"--session-ttl must be > 0 seconds, got {args.session_ttl}")
    for flag in ("max_queued_tokens", "max_queued_bytes", "max_active"):
        if getattr(args, flag) < 1:
            raise ServeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    http = _http_config(args)
    if not args.lease_ttl > 0:
        raise ServeError(f"--lease-ttl must be > 0 seconds, got {args.lease_ttl}")

    def store_of(max_bytes=None):
        try:
            return open_store(args.store, args.store_prefix, args.lease_ttl, max_bytes) if args.store else None
        except ValueError as e:
            raise ServeError(f"--store: {e}") from None

    if args.store is not None and not args.store.strip():  # (e.g. --store "$DIR" with DIR unset)
        raise ServeError("--store is empty: name a directory or redis:// URL (or leave --store out)")
    if args.store:
        store_of().prepare()  # writable, reachable? (before the load, to fail fast)
    model = _load(args)
    store = store_of(snapshot_format.max_file_bytes(model.config))
    log = logging.getLogger("streamgemma.serve.server")
    if model.device.type == "cuda":
        log.info("compiling kernels and capturing decode graphs for up to %d sessions ...", args.max_active)
        log.info("ready after %.1f s", model.warm_up(args.max_active))
    # What exists now lives as long as the process: frozen, the collector's full
    # passes stop walking it and stalling every stream (bench/NOTES.md).
    gc.collect()
    gc.freeze()
    engine = Engine(model, max_active=args.max_active, store=store, max_queued_tokens=args.max_queued_tokens,
                    max_queued_text_bytes=args.max_queued_bytes, input_share=args.input_share,
                    session_ttl=args.session_ttl)
    server = Server(engine, host=args.host, port=args.port, token=token, limits=limits, http=http,
                    web_page=not args.no_page)

    failed: list[BaseException] = []

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        if server.stopping:
                            log.warning("%s: still saving sessions (SIGKILL abandons them)",
                                        signal.Signals(signum).name)
                        else:
                            log.info("%s: saving sessions and exiting", signal.Signals(signum).name)
                            server.stop()

            tg.start_soon(stop_on_signal)
            try:
                await server.serve()
            except (StreamgemmaError, OSError) as e:  # raised below, not wrapped by the task group
                failed.append(e)
            finally:
                tg.cancel_scope.cancel()

    anyio.run(run, backend="asyncio")
    if failed:
        raise failed[0]
    if server.lost and engine.store.durable:
        raise ServeError(f"{len(server.lost)} sessions could not be saved to {engine.store.describe()}: "
                         f"{', '.join(server.lost)}")


def _bench(argv: Sequence[str]) -> int:
    """`streamgemma bench ...`: 1 when the benchmark says it failed (fuzz failures, a fleet
    run that lost data), so scripts and CI can tell."""
    from .bench import failed
    from .bench import main as bench_main

    if failed(bench_main(argv)):
        sys.stderr.write("streamgemma bench: the run failed (see its output)\n")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    from .errors import StreamgemmaError

    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args.bench_args)
        if args.command == "info":
            _info(args, sys.stdout)
        elif args.command == "generate":
            _generate(args, sys.stdout)
        elif args.command == "serve":
            _serve(args)
        else:
            _chat(args, sys.stdout, sys.stdin)
    except (StreamgemmaError, ValueError, TypeError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # the reader went away (e.g. `| head`): not an error
            return 0
        sys.stdout.flush()
        sys.stderr.write(f"streamgemma {args.command}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
