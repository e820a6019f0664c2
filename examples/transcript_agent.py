"""An always-on agent over a live transcript: stream a transcript file into one
server session line by line, and every N lines ask for a running summary,
printing its tokens as they arrive.

    python examples/transcript_agent.py                      # the bundled demo model, in-process server
    python examples/transcript_agent.py --model tiny          # a tiny random model: noise, fastest
    python examples/transcript_agent.py --model ./recurrentgemma-2b-it
    python examples/transcript_agent.py --url ws://127.0.0.1:8765/v1/stream --token "$STREAMGEMMA_TOKEN"

Without --url it starts a server in this process on a free loopback port,
by default on the small demo model bundled with streamgemma (it runs in
seconds on a CPU; it writes English in the style of the Python docs and is
not instruction-tuned, so its "summaries" are only continuations). With a
real instruction-tuned checkpoint they are summaries.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

import anyio

import streamgemma as sg

HERE = Path(__file__).parent
SUMMARY_REQUEST = ("<start_of_turn>user\nSummarize the meeting so far in two sentences.<end_of_turn>\n"
                   "<start_of_turn>model\n")
END_OF_SUMMARY = "<end_of_turn>\n"


def tiny_model_for(text: str) -> sg.Model:
    """A tiny random model with a SentencePiece tokenizer trained on `text`."""
    import sentencepiece as spm
    import torch

    # Each op of a tiny model takes microseconds: extra threads only add
    # synchronisation (about 10x slower on a small machine).
    torch.set_num_threads(1)

    proto = io.BytesIO()
    lines = [line for line in text.splitlines() if line.strip()] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, vocab_size=400, model_type="bpe", character_coverage=0.99,
        byte_fallback=True, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, minloglevel=2)
    tokenizer = sg.Tokenizer(proto.getvalue(), source="trained on the transcript")
    config = sg.GriffinConfig.preset("tiny", vocab_size=512)
    return sg.Model.random(config, seed=0, device="cpu", dtype="float32", tokenizer=tokenizer)


async def follow(url: str, token: str | None, lines: list[str], every: int, max_tokens: int) -> None:
    """Append each line to one session; every `every` lines, stream a summary."""
    async with sg.Client(url, token=token) as client:
        session = await client.open(seed=0)
        print(f"[session {session.id}]")
        for n, line in enumerate(lines, start=1):
            await session.append(line + "\n")
            print(f"> {line}")
            if n % every == 0 or n == len(lines):
                await session.append(SUMMARY_REQUEST)
                print(f"[summary after {n} lines] ", end="", flush=True)
                async for tok in session.generate(max_tokens=max_tokens, temperature=0.7, top_p=0.95):
                    print(tok.text, end="", flush=True)
                done = session.last_done
                print(f"\n[{done['reason']}, position {done['position']}]")
                # Close the model's turn so the transcript continues as user input.
                await session.append(END_OF_SUMMARY if done["reason"] != "stop" else "\n")
        position = await session.snapshot()
        print(f"[stored at position {position}; resume with open(session={session.id!r})]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("transcript", nargs="?", default=str(HERE / "transcript.txt"), help="a text file")
    parser.add_argument("--every", type=int, default=5, metavar="N", help="summarize every N lines (default 5)")
    parser.add_argument("--max-tokens", type=int, default=40, help="tokens per summary (default 40)")
    parser.add_argument("--url", help="a running server (default: start one in this process)")
    parser.add_argument("--token", default=os.environ.get("STREAMGEMMA_TOKEN"), help="bearer token")
    parser.add_argument("--model", default="demo",
                        help="checkpoint for the in-process server: a path, 'demo' (default), or 'tiny' "
                             "(random weights, a tokenizer trained on the transcript)")
    args = parser.parse_args(argv)
    if args.every < 1 or args.max_tokens < 1:
        parser.error("--every and --max-tokens must be at least 1")
    text = Path(args.transcript).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            model = tiny_model_for(text) if args.model == "tiny" else sg.load(args.model)
            server = sg.Server(sg.Engine(model, max_active=4), port=0, token=args.token)
            url = stack.enter_context(sg.serve_in_thread(server))
        anyio.run(follow, url, args.token, lines, args.every, args.max_tokens, backend="asyncio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
