"""The `streamgemma` command: generate text, chat, and describe a checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("model")
        g.add_argument("--model", default="demo", metavar="PATH",
                       help="checkpoint: a Hugging Face directory, an official .pt file, a directory "
                            "written by Model.save, or 'demo', the small model bundled with the package "
                            "(the default)")
        g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
        g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")

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

    p = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout",
                            description="Continue PROMPT and stream the generated text to stdout.")
    p.add_argument("prompt", metavar="PROMPT", help='the text to continue ("-" reads it from stdin)')
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token before the prompt")
    model_args(p)
    sampling_args(p, default_max=256)

    p = commands.add_parser("chat", help="interactive multi-turn chat (Gemma turn format)",
                            description="Chat with an instruction-tuned model. Each line read from stdin is "
                                        "one user turn; the reply is streamed to stdout. End with Ctrl-D.")
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
    g.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (default: $STREAMGEMMA_TOKEN; "
                                   "none: no authentication)")
    g.add_argument("--store", metavar="DIR", help="directory for suspended sessions (default: memory only, "
                                                 "so sessions do not survive a restart)")
    g.add_argument("--max-active", type=int, default=64, metavar="N",
                   help="sessions holding a state slot at once: the decode batch bound (default 64)")
    g.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="largest max_tokens a generation may ask for (default 4096)")

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

    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, stop=args.stop, seed=args.seed)
    SamplingParams(**kwargs)
    return kwargs


def _load(args: argparse.Namespace):
    import streamgemma

    return streamgemma.load(args.model, device=args.device, dtype=args.dtype)


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
        ("device", str(model.device)),
        ("state per session", f"{model.pool.slot_bytes() / 2**20:.2f} MiB"),
        ("tokenizer", f"{tok.vocab_size:,} pieces (bos {tok.bos_id}, eos {tok.eos_id}, chat turns "
                      f"{'yes' if tok.piece_id('<start_of_turn>') is not None else 'no'})" if tok else "none"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        out.write(f"{key + ':':<{width + 1}} {value}\n")


def _generate(args: argparse.Namespace, out: TextIO) -> None:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty")
    sampling = _sampling(args)
    model = _load(args)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.model: text generation needs one")
    with model.session(seed=args.seed) as session:
        session.feed(prompt, add_bos=not args.no_bos)
        for token in session.generate(**sampling):
            out.write(token.text)
            out.flush()
    out.write("\n")


def _chat(args: argparse.Namespace, out: TextIO, inp: TextIO) -> None:
    from .session.chat import Chat

    sampling = _sampling(args)
    model = _load(args)
    interactive = inp.isatty()
    session = model.restore_file(args.resume) if args.resume else model.session(seed=args.seed)
    with session:
        chat = Chat(session)
        if interactive:
            resumed = f" (resumed at position {session.position})" if args.resume else ""
            sys.stderr.write(f"Chatting{resumed}; each line is one turn. Ctrl-D ends.\n")
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = inp.readline()
            if not line:
                break
            if not line.strip():
                continue
            chat.user(line.rstrip("\n"))
            # The seed applies to the whole conversation, not again at each turn.
            for token in chat.reply(**{**sampling, "seed": None}):
                out.write(token.text)
                out.flush()
            out.write("\n")
            out.flush()
            if args.save:
                session.save(args.save, metadata={"kind": "chat"})


def _serve(args: argparse.Namespace) -> None:
    import gc
    import logging
    import os
    import signal

    import anyio

    from .serve.engine import Engine
    from .serve.server import Limits, Server
    from .session.store import DirectorySnapshotStore

    logging.basicConfig(level=logging.INFO, format="streamgemma serve: %(message)s")
    token = args.token if args.token is not None else os.environ.get("STREAMGEMMA_TOKEN")
    store = DirectorySnapshotStore(args.store) if args.store else None
    model = _load(args)
    log = logging.getLogger("streamgemma.serve.server")
    if model.device.type == "cuda":
        log.info("compiling kernels and capturing decode graphs for up to %d sessions ...", args.max_active)
        log.info("ready after %.1f s", model.warm_up(args.max_active))
    # What exists now lives as long as the process: frozen, the collector's full
    # passes stop walking it and stalling every stream (bench/NOTES.md).
    gc.collect()
    gc.freeze()
    server = Server(Engine(model, max_active=args.max_active, store=store), host=args.host, port=args.port,
                    token=token, limits=Limits(max_tokens=args.max_tokens))

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("%s: suspending sessions and exiting", signal.Signals(signum).name)
                        server.stop()
                        return

            tg.start_soon(stop_on_signal)
            await server.serve()
            tg.cancel_scope.cancel()

    anyio.run(run, backend="asyncio")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    from .errors import StreamgemmaError

    args = _parser().parse_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main

        bench_main(args.bench_args)
        return 0
    try:
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
