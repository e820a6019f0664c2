"""The terminal side of `streamgemma generate` and `streamgemma chat`: the
chat loop (in-chat commands, multi-line input, Ctrl-C that stops only the
reply) and the `--stats` timing summary."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TextIO

from .types import Token

if TYPE_CHECKING:  # imported when a chat starts: `streamgemma --help` needs no torch
    from .session.chat import Chat
    from .session.session import Session

CHAT_HELP = """\
Each line is one turn. Ctrl-C stops a reply (the conversation goes on);
Ctrl-D ends the chat. A line ending in \\ continues on the next line; a
block between two unindented lines of \"\"\" alone is one turn.
  /reset       start the conversation again (with the --system prompt)
  /save PATH   save the conversation (continue it later with --resume PATH)
  /help        this text
A turn that starts with // is sent as text that starts with /.
"""


class Stats:
    """What --stats prints to stderr after a reply, like `ollama run --verbose`:
    the prompt's tokens and time, the time to the first token (counted from
    the start of the prompt) and the generation's speed."""

    def __init__(self, position: int):
        self.start = time.perf_counter()
        self.position = position
        self.prompt_tokens = 0
        self.prompt_end = self.first = self.last = self.start
        self.tokens = 0

    def prompt_read(self, position: int) -> None:
        self.prompt_tokens = position - self.position
        self.prompt_end = time.perf_counter()

    def count(self, tokens: Iterable[Token]) -> Iterator[Token]:
        """`tokens`, timed."""
        for token in tokens:
            self.last = time.perf_counter()
            if self.tokens == 0:
                self.first = self.last
            self.tokens += 1
            yield token

    def summary(self) -> str:
        prompt_s = self.prompt_end - self.start
        gen_s = self.last - self.prompt_end
        lines = [("prompt", f"{self.prompt_tokens} tokens in {prompt_s * 1e3:.1f} ms"
                            f"{_rate(self.prompt_tokens, prompt_s)}"),
                 ("time to first token", f"{(self.first - self.start) * 1e3:.1f} ms" if self.tokens else "-"),
                 ("generated", f"{self.tokens} tokens in {gen_s:.3f} s{_rate(self.tokens, gen_s)}" if self.tokens
                  else "0 tokens")]
        return "".join(f"{key + ':':<21}{value}\n" for key, value in lines)


def _rate(tokens: int, seconds: float) -> str:
    return f" ({tokens / seconds:,.1f} tokens/s)" if tokens and seconds > 0 else ""


@contextlib.contextmanager
def ctrl_c_sets(flag: threading.Event) -> Iterator[None]:
    """While inside, Ctrl-C (SIGINT) sets `flag` instead of raising
    KeyboardInterrupt: a KeyboardInterrupt in the middle of a step could
    leave a session's state half-written; the flag is read between tokens."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def read_turn(inp: TextIO, prompt: TextIO | None) -> str | None:
    """The next turn's text: one line; lines joined while one ends with a
    backslash; or a block between lines starting and ending with three
    double quotes. None at the end of input (Ctrl-D). `prompt`: where to
    show "> " and "... " (None when the input is not a terminal). A block
    opened by a line of three quotes alone ends at such a line only (not
    indented), so pasted code with docstrings stays one turn."""
    lines: list[str] = []
    block = closing = None  # in a block: whether a line must be the quotes alone to close it
    while True:
        if prompt is not None:
            prompt.write("... " if lines or block else "> ")
            prompt.flush()
        line = inp.readline()
        if not line:  # the end of input ends the turn being written too
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if block:
            if line.rstrip() == '"""' if closing else line.rstrip().endswith('"""'):
                tail = "" if closing else line.rstrip()[:-3]
                if tail:
                    lines.append(tail)
                return "\n".join(lines)
            lines.append(line)
        elif not lines and line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""'):  # """one line"""
                return rest.rstrip()[:-3]
            block, closing = True, not rest.strip()
            if rest:
                lines.append(rest)
        elif line.endswith("\\"):
            lines.append(line[:-1])
        else:
            lines.append(line)
            return "\n".join(lines)


def chat_loop(session: Session, out: TextIO, inp: TextIO, err: TextIO, *, sampling: dict,
              system: str | None = None, save: str | None = None, stats: bool = False) -> None:
    """Converse on `session` until the input ends: read a turn (or a
    command), stream the reply to `out`. Messages go to `err`."""
    from .session.chat import Chat

    interactive = inp.isatty()
    chat = Chat(session, system=system)
    if interactive:
        resumed = f" (resumed at position {session.position})" if session.position else ""
        err.write(f"Chatting{resumed}. Ctrl-C stops a reply, Ctrl-D ends, /help lists commands.\n")
    while True:
        try:
            text = read_turn(inp, err if interactive else None)
        except KeyboardInterrupt:
            if not interactive:
                raise
            err.write("\n(Ctrl-D ends the chat)\n")
            continue
        if text is None:
            return
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            if _command(text, session, err):
                chat = Chat(session, system=system)  # a fresh conversation
            continue
        try:
            _reply(chat, text.removeprefix("/"), out, err, sampling, stats)
        except ValueError as e:  # (e.g. a line that is not valid UTF-8): the conversation goes on
            err.write(f"(not sent: {e})\n")
            continue
        if save:
            try:
                session.save(save, metadata={"kind": "chat"})
            except OSError as e:  # (a full disk): the conversation goes on, as after a failed /save
                err.write(f"(not saved to {save}: {e})\n")


def _command(text: str, session: Session, err: TextIO) -> bool:
    """Run an in-chat command; True if it reset the conversation."""
    name, _, arg = text.strip().partition(" ")
    if name == "/reset":
        session.reset()
        err.write("(a new conversation)\n")
        return True
    if name == "/save" and arg.strip():
        try:
            session.save(arg.strip(), metadata={"kind": "chat"})
        except OSError as e:
            err.write(f"(not saved: {e})\n")
        else:
            err.write(f"(saved at position {session.position} to {arg.strip()}; continue with --resume)\n")
        return False
    if name == "/help":
        err.write(CHAT_HELP)
    else:
        usage = "/save needs a PATH" if name == "/save" else f"unknown command {name}"
        err.write(f"({usage}; /help lists the commands)\n")
    return False


def _reply(chat: Chat, text: str, out: TextIO, err: TextIO, sampling: dict, stats: bool) -> None:
    """Feed the user turn and stream the reply; Ctrl-C stops it after the
    token being computed, and the conversation goes on."""
    stop = threading.Event()
    timing = Stats(chat.session.position)
    with ctrl_c_sets(stop):
        chat.user(text)
        timing.prompt_read(chat.session.position)
        if not stop.is_set():
            # The seed applies to the whole conversation, not again at each turn.
            tokens = chat.reply(**{**sampling, "seed": None})
            for token in timing.count(tokens):
                out.write(token.text)
                out.flush()
                if stop.is_set():
                    out.write(tokens.close())  # the text a stop string held back
                    break
    out.write("\n")
    out.flush()
    if stop.is_set():
        err.write("(reply stopped)\n")
    if stats:
        err.write(timing.summary())
