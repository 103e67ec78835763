"""``apt-hal chat``: talk with a checkpoint of ``apt-hal train``, one line per turn, on stdin/stdout.

``apt-hal train`` teaches a model paragraphs: ``bos`` text ``eos``, one after another. A chat is
such a sequence: each message is a paragraph, and the reply is the paragraph the model writes next
(up to its ``eos``, or ``--max-new-tokens``), so a model trained on dialogue, one line per
paragraph, converses, and one trained on prose continues the story. When the conversation
outgrows the model's context (``max_position`` minus room for the reply) its oldest paragraphs
are dropped. Commands: ``/reset`` forgets the conversation, ``/quit`` (or end of input) leaves.
With ``--seed S`` turn ``n`` samples with seed ``S + n``, so a session replays exactly.
"""

from __future__ import annotations

import argparse
import sys

from apt_hal.cli_errors import EXIT_CODES_EPILOG
from apt_hal.models import cli

HELP = "chat with a checkpoint of apt-hal train: one message per line on stdin, replies on stdout"
EPILOG = """examples:
  apt-hal chat --checkpoint runs/tiny
  apt-hal chat --checkpoint runs/tiny --temperature 0.7 --top-k 20 --seed 0
  printf 'The river\\n/quit\\n' | apt-hal chat --checkpoint runs/tiny --greedy

Type a message and press Enter; /reset starts a new conversation, /quit or Ctrl-D leaves.

""" + EXIT_CODES_EPILOG

COMMANDS = {"/quit": "leave", "/reset": "start a new conversation"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    from apt_hal.models import generate

    try:
        model, tokenizer = cli.load(args)
        cli.generation_config(args, tokenizer)  # check the options before the first turn
    except (ValueError, OSError) as e:
        print(f"apt-hal chat: error: {e}", file=sys.stderr)
        return 2
    room = model.config.max_position - args.max_new_tokens - 1  # context tokens that leave room for the reply's bos
    if room < 3:
        print(f"apt-hal chat: error: --max-new-tokens {args.max_new_tokens} leaves no room for a message in the "
              f"model's context of {model.config.max_position} tokens", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.checkpoint}; " + ", ".join(f"{c} to {what}" for c, what in COMMANDS.items()))
    paragraphs: list[list[int]] = []  # the conversation, each paragraph as bos ... eos
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        message = line.strip()
        if not line or message == "/quit":  # end of input, or asked to leave
            return 0
        if message == "/reset":
            paragraphs = []
            print("(new conversation)", flush=True)
            continue
        if not message or message.startswith("/"):
            what = "an empty message" if not message else f"unknown command {message!r}"
            _error(f"{what}; type some text, or one of {', '.join(COMMANDS)}")
            continue
        paragraph = tokenizer.encode(message, bos=True, eos=True)
        if len(paragraph) > room:
            _error(f"the message is {len(paragraph)} tokens; the model's context leaves room for {room}")
            continue
        paragraphs.append(paragraph)
        while sum(map(len, paragraphs)) > room:
            paragraphs.pop(0)
        context = [t for p in paragraphs for t in p] + [tokenizer.bos_id]
        config = cli.generation_config(args, tokenizer, seed=None if args.seed is None else args.seed + turn)
        reply = generate(model, [context], config)[0]
        print(tokenizer.decode(reply), flush=True)
        paragraphs.append([tokenizer.bos_id, *reply, tokenizer.eos_id])
        turn += 1


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
