"""`behaviorc chat URL [--steer happy:2] [PROMPT]`: talk to a served model, steered per
request by the server's named vectors, and compare with the unsteered answer."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

from behaviorc.core.diagnostics import BehaviorError

DESCRIPTION = """\
Chat with a model served by `behaviorc serve`. --steer picks named steering vectors the
server holds (`behaviorc steer push URL FILE --name happy`) and their strengths, for
this conversation's requests only: other clients of the server are not steered. Each
vector steers the positions its file said when it was pushed (its behavior's
`steer { positions }`: every token, or only the tokens that choose the reply;
`behaviorc steer list URL` shows them). With a
PROMPT it answers once and exits; without one it reads your messages line by line.

In a conversation:
  /steer happy:2,concise:-1    steer from now on (`/steer` alone: stop steering)
  /compare                     also show the unsteered answer to each message (toggle)
  /reset                       forget the conversation
  /quit                        leave (or Ctrl-D)

A model without a chat template (the tiny built-ins) is sent the plain text instead.
"""

EPILOG = """\
examples:
  behaviorc chat http://127.0.0.1:8000 --steer happy:2
  behaviorc chat http://127.0.0.1:8000 "How was your day?" --steer happy:4 --compare
  curl URL/v1/chat/completions -d '{"model": M, "messages": [...], "vllm_xargs": {"steer": "happy:2"}}'
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat", help="talk to a served model, steered per request",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("prompt", nargs="?", default=None,
                        help="answer this one message and exit (default: a conversation); "
                             "it follows the URL, before any option")
    parser.add_argument("--steer", default="",
                        help="named vectors and strengths, e.g. happy:2,concise:-1")
    parser.add_argument("--compare", action="store_true",
                        help="also print the unsteered answer to each message")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="longest answer in tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0: greedy, repeatable)")
    parser.set_defaults(run=run_chat)


@dataclass
class Conversation:
    """One conversation with a server; `ask` sends a message and keeps the history."""

    client: Any  # ServerClient
    steer: str = ""
    max_tokens: int = 128
    temperature: float = 0.0
    messages: list[dict[str, str]] = field(default_factory=list)
    chat_template: bool = True  # cleared when the server's model has none
    model: str = ""  # the served model's name, asked once

    def ask(self, text: str, compare: bool = False) -> tuple[str, str | None]:
        """The steered answer, and the unsteered one to the same history when `compare`."""
        from behaviorc.engine.vllm.inside.steer_spec import format_steer, parse_steer

        try:
            steer = format_steer(parse_steer(self.steer))
        except ValueError as err:
            raise BehaviorError(f"--steer: {err}") from None
        history = [*self.messages, {"role": "user", "content": text}]
        answer = self._answer(history, steer)
        plain = self._answer(history, "") if compare and steer else None
        self.messages = [*history, {"role": "assistant", "content": answer}]
        return answer, plain

    def _answer(self, history: list[dict[str, str]], steer: str) -> str:
        body: dict[str, Any] = {"model": self._served_model(), "max_tokens": self.max_tokens,
                                "temperature": self.temperature}
        if steer:
            body["vllm_xargs"] = {"steer": steer}
        doing = f"answering{' steered by ' + steer if steer else ''}"
        if self.chat_template:
            try:
                answer = self.client.request("POST", "/v1/chat/completions", doing,
                                             {**body, "messages": history})
                return answer["choices"][0]["message"]["content"] or ""
            except BehaviorError as err:
                if "chat template" not in str(err):
                    raise
                self.chat_template = False
        answer = self.client.request("POST", "/v1/completions", doing,
                                     {**body, "prompt": _as_text(history)})
        return answer["choices"][0]["text"]

    def _served_model(self) -> str:
        if not self.model:
            models = self.client.request("GET", "/v1/models", "listing served models")
            self.model = models["data"][0]["id"]
        return self.model


def _as_text(history: list[dict[str, str]]) -> str:
    """A conversation as plain text for a model without a chat template: the turns
    joined, so each answer continues the text it follows."""
    return "".join(message["content"] for message in history)


def run_chat(args: argparse.Namespace) -> int:
    from behaviorc.engine.vllm.http import ServerClient

    client = ServerClient(args.url)  # the key, if any, from the environment: never argv
    chat = Conversation(client, args.steer, args.max_tokens, args.temperature)
    try:
        client.require_answer("chatting")
        if args.prompt is not None:
            _show(*chat.ask(args.prompt, args.compare), chat.steer)
            return 0
        return _converse(chat, args.compare)
    finally:
        client.close()


def _converse(chat: Conversation, compare: bool) -> int:
    print(f"talking to {chat.client.url}"
          + (f", steered by {chat.steer}" if chat.steer else ", unsteered")
          + "; /steer NAME:STRENGTH, /compare, /reset, /quit", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return 0
        if command == "/reset":
            chat.messages = []
            print("(conversation forgotten)")
        elif command == "/compare":
            compare = not compare
            print(f"(comparing with the unsteered answer: {'on' if compare else 'off'})")
        elif command == "/steer":
            chat.steer = rest.strip()
            print(f"(steering: {chat.steer or 'off'})")
        else:
            try:
                _show(*chat.ask(line, compare), chat.steer)
            except BehaviorError as err:  # a refused steer or a bad message: keep talking
                print(err.render(), file=sys.stderr)


def _show(answer: str, plain: str | None, steer: str) -> None:
    if plain is None:
        print(answer.strip(), flush=True)
        return
    print(f"[steered {steer}] {answer.strip()}")
    print(f"[unsteered] {plain.strip()}", flush=True)
