"""`qkv chat`: talk with a fine-tuned model in the terminal (interactive, piped, or -p)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from qkv.cli.options import (
    add_command,
    add_device,
    add_dtype,
    add_model,
    add_sampling,
    sampling,
    warnings_to_stderr,
)
from qkv.config import CHAT
from qkv.errors import QkvError

EXAMPLES = """examples:
  qkv chat --model runs/qa                            interactive: /reset, /exit, Ctrl-D
  qkv chat --model runs/qa -p "What does json.dumps do?"    one question, one answer
  printf 'hello\\nwhat next?\\n' | qkv chat --model runs/qa   one reply per input line
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    chat = add_command(
        commands,
        "chat",
        "chat with a fine-tuned model in the terminal",
        "Chat with a model fine-tuned by `qkv finetune`. Replies stream as they are\n"
        "generated; the conversation so far is part of each prompt, the oldest exchanges\n"
        "dropped when it outgrows the context window. /reset forgets the history, /exit or\n"
        "Ctrl-D ends, Ctrl-C stops a reply. With piped input every line is a message, and\n"
        "one that cannot be answered (not UTF-8, too long, refused by the model's chat\n"
        "template) gets one error line on stderr in its place: the other lines are answered,\n"
        "and the exit status is then 1.",
        EXAMPLES,
    )
    add_model(chat)
    chat.add_argument("-p", "--prompt", help="answer this one message and exit")
    chat.add_argument("--system", help="a system message kept at the start of the conversation")
    chat.add_argument(
        "--special-tokens-in-content",
        action="store_true",
        help="read special tokens written in messages (as <|im_end|>) as the model's own, as "
        "transformers does; by default a message's text is plain text, so that it cannot forge "
        "a turn of the model's chat template",
    )
    add_sampling(chat, CHAT)
    add_device(chat)
    add_dtype(chat)


class UnansweredLines(QkvError):
    """Piped lines that got an error instead of a reply: exit status 1, after the others."""

    exit_code = 1


def input_lines(interactive: bool) -> Iterator[str | UnicodeDecodeError]:
    """Standard input line by line, each line decoded on its own (a line that is not UTF-8
    comes as its UnicodeDecodeError); at the terminal, read with the prompt "you> "."""
    if not interactive:
        for line in sys.stdin.buffer:
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield err
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
            print(file=sys.stderr)
        except UnicodeDecodeError as err:
            yield err


def run(args: argparse.Namespace) -> None:
    from qkv.chat import Chat

    chat = Chat.load(args.model, args.device, args.system, args.dtype,
                     args.special_tokens_in_content, **sampling(args))  # fmt: skip
    print(chat.generator.summary, file=sys.stderr)
    interactive = sys.stdin.isatty() and args.prompt is None

    def dropped(count: int) -> None:
        print(
            f"(the {count} oldest exchange(s) no longer fit the context window of "
            f"{chat.window} tokens and were left out)",
            file=sys.stderr,
        )

    def reply(message: str) -> None:
        if interactive:
            print("assistant> ", end="", flush=True)
        with warnings_to_stderr("chat"):
            chat.reply(message, lambda text: print(text, end="", flush=True), dropped)
        print(flush=True)

    if args.prompt is not None:
        if not args.prompt.strip():
            raise QkvError("the message (-p) is empty")
        reply(args.prompt)
        return
    if interactive:
        print(
            f"chatting with {args.model} ({chat.window}-token context). /reset forgets the "
            "conversation, /exit or Ctrl-D ends, Ctrl-C stops a reply.",
            file=sys.stderr,
        )
    unanswered = []
    for number, line in enumerate(input_lines(interactive), 1):
        if isinstance(line, UnicodeDecodeError):
            byte, offset = line.object[line.start], line.start
            print(
                f"qkv chat: error: input line {number} is not UTF-8 text (byte 0x{byte:02x} at "
                f"offset {offset}); skipped",
                file=sys.stderr,
            )
            unanswered.append(number)
            continue
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            chat.conversation.reset()
            print("(the conversation is forgotten)", file=sys.stderr)
        elif message.startswith("/"):
            print(
                f"unknown command {message}: /reset forgets the conversation, /exit ends",
                file=sys.stderr,
            )
        else:
            try:
                reply(message)
            except KeyboardInterrupt:
                print("\n(reply stopped)", file=sys.stderr)
            except QkvError as err:  # this message only: the conversation goes on
                where = "" if interactive else f"input line {number}: "
                print(f"qkv chat: error: {where}{err}", file=sys.stderr)
                unanswered.append(number)
    if unanswered and not interactive:
        lines = ", ".join(map(str, unanswered))
        raise UnansweredLines(
            f"no reply to input line{'s' if len(unanswered) > 1 else ''} {lines} (see above); "
            "the other lines were answered"
        )
