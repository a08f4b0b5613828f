"""An LLM judge for detection scoring, behind any OpenAI-compatible chat endpoint (a local vLLM or llama.cpp
server, or a hosted API), spoken to over plain HTTP with the standard library so the package gains no dependency.

The protocol is the one Paulo et al. ("Automatically interpreting millions of features in large language models",
2024; EleutherAI's delphi) scored latents with, in two steps, each one chat request (a system message that states
the task and the answer format, a user message that holds the examples):

1. *Explain.* The judge sees windows of text around a latent's top activations, with the tokens where it fires
   (activation > 0) delimited like ``<<this>>`` (a run of consecutive firing tokens is one ``<<span>>``), and
   ends its answer with a line ``[EXPLANATION]: <one short description>``.
2. *Detect.* Given only that explanation, the judge sees numbered windows *without* highlights — some where the
   latent fires, some where it never does — and answers a Python-style list of 0/1, one per window in order,
   like ``[1, 0, 0, 1, 1]``. Windows are sent ``batch_size`` at a time, as in delphi, so that a long list does not
   drift out of step with the examples.

The judge is optional and off by default: nothing here runs unless an analysis is configured with a judge endpoint,
and the offline token-identity proxy (:mod:`darkmatter.analysis.interpretability`) stands in otherwise. Every
failure — an endpoint that cannot be reached, an HTTP error, a reply that is not a chat completion, an answer that
is not the list asked for — raises :class:`JudgeError` with one sentence naming the endpoint and what was expected,
so a misconfigured run stops with a message rather than scoring latents on garbage.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from darkmatter.analysis.detection import Example

__all__ = [
    "ChatJudge",
    "JudgeError",
    "detection_messages",
    "explanation_messages",
    "parse_detection",
    "parse_explanation",
]

EXPLANATION_MARKER = "[EXPLANATION]:"
SNIPPET_CHARS = 80  # how much of a bad answer an error message quotes
_CONFIG_HINT = "check the judge endpoint in the analysis config"

EXPLAIN_SYSTEM = (
    "You are a careful researcher studying what a single internal feature of a language model responds to.\n"
    "You will read several short text excerpts. In each one, the tokens where the feature is active are wrapped "
    "in double angle brackets, <<like this>>; when several consecutive tokens are active they share one pair of "
    "brackets, <<like this one here>>. Excerpts without brackets were included for context only.\n"
    "Your job is to describe, as specifically and briefly as you can, the pattern that makes the feature active: "
    "the marked tokens themselves, and the surrounding context when it matters.\n"
    "Guidelines:\n"
    "- Give one concise description, not a list of alternatives.\n"
    "- Summarise the pattern instead of enumerating the marked tokens.\n"
    "- Do not refer to the << >> markers in the description.\n"
    f"- You may reason first, but the last line of your reply must be {EXPLANATION_MARKER} followed by the "
    "description."
)

DETECT_SYSTEM = (
    "You are a careful researcher testing a description of an internal feature of a language model.\n"
    "You will be given the description and a numbered list of short text excerpts. The feature is active "
    "somewhere in some excerpts and nowhere in the others; nothing in the text marks which.\n"
    "For each excerpt, in order, decide whether the feature, as described, would be active anywhere in it: "
    "write 1 if it would and 0 if it would not.\n"
    "Reply with only a Python list holding exactly one 0 or 1 per excerpt, in the order given, for example "
    "[1, 0, 0, 1, 1] for five excerpts."
)


class JudgeError(RuntimeError):
    """The judge could not give a usable answer; the message is one sentence naming the endpoint and what was
    expected, so a run configured with a wrong endpoint or an unsuitable model stops with a readable reason."""


def _window_text(text: str) -> str:
    """One excerpt per line: the numbered format is how the judge (and its answer) stay aligned with the windows,
    so line breaks inside a window are shown escaped rather than breaking the list."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def highlighted(example: Example) -> str:
    """The window's text with each run of consecutive firing tokens (activation > 0) wrapped in one ``<<...>>``;
    whitespace at the edges of a run stays outside the brackets (``the <<cat>>``, not ``the<< cat>>``) unless
    the run is nothing but whitespace, so the judge reads words, not tokenizer artefacts."""
    parts: list[str] = []
    run: list[str] = []

    def close() -> None:
        text = "".join(run)
        core = text.strip()
        if core:
            start = text.index(core)
            parts.append(f"{text[:start]}<<{core}>>{text[start + len(core):]}")
        else:
            parts.append(f"<<{text}>>")
        run.clear()

    for token, activation in zip(example.tokens, example.activations, strict=True):
        if activation > 0:
            run.append(token)
            continue
        if run:
            close()
        parts.append(token)
    if run:
        close()
    return _window_text("".join(parts))


def _plain(example: Example) -> str:
    return _window_text("".join(example.tokens))


def _numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"Example {i}: {line}" for i, line in enumerate(lines, start=1))


def explanation_messages(examples: Sequence[Example]) -> list[dict[str, str]]:
    """The chat messages that ask for an explanation: the task in the system message, the numbered excerpts with
    their firing tokens highlighted in the user message."""
    user = (
        "Text excerpts:\n\n"
        f"{_numbered([highlighted(e) for e in examples])}\n\n"
        f"Describe the pattern, ending with a line that starts with {EXPLANATION_MARKER}"
    )
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def detection_messages(explanation: str, examples: Sequence[Example]) -> list[dict[str, str]]:
    """The chat messages that ask which excerpts the explanation predicts the latent fires in. No highlights: the
    judge must find the latent from the explanation alone, which is what the score measures."""
    n = len(examples)
    user = (
        f"Feature description: {explanation.strip()}\n\n"
        "Text excerpts:\n\n"
        f"{_numbered([_plain(e) for e in examples])}\n\n"
        f"Answer with a list of exactly {n} value{'' if n == 1 else 's'} (0 or 1), one per excerpt."
    )
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


def _snippet(text: str) -> str:
    """At most ~80 characters of an answer, on one line, quoted: enough to see what the model did instead."""
    flat = " ".join(text.split())
    if len(flat) > SNIPPET_CHARS:
        flat = flat[: SNIPPET_CHARS - 1] + "…"
    return repr(flat)


def parse_explanation(text: str, *, source: str = "the judge") -> str:
    """The explanation in an answer: what follows the last ``[EXPLANATION]:`` (on the next non-empty line if that
    one is empty), else the last non-empty line — small models often drop the marker but still end on the answer.
    Markdown emphasis around it is stripped."""
    lines = [line.strip() for line in text.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        at = lines[i].find(EXPLANATION_MARKER)
        if at < 0:
            continue
        found = lines[i][at + len(EXPLANATION_MARKER):].strip(" *_`")
        if not found:
            found = next((line.strip(" *_`") for line in lines[i + 1:] if line.strip(" *_`")), "")
        if found:
            return found
        break
    rest = [line.strip(" *_`") for line in lines if line.strip(" *_`")]
    if not rest:
        raise JudgeError(f"{source} gave an empty explanation ({_snippet(text)}); expected text ending with a line "
                         f"'{EXPLANATION_MARKER} <description>'")
    return rest[-1]


_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
_BINARY = re.compile(r"^\s*[01](?:\s*,\s*[01])*\s*,?\s*$")


def parse_detection(text: str, n: int, *, source: str = "the judge") -> list[bool]:
    """The judge's verdicts: the last bracketed list of 0/1 integers in the answer (prose or reasoning around it
    is ignored), which must hold exactly ``n`` entries — a list of another length cannot be matched to the
    excerpts, so it is an error rather than a guess."""
    for match in reversed(list(_BRACKETED.finditer(text))):
        body = match.group(1)
        if _BINARY.match(body):
            values = [v.strip() == "1" for v in body.split(",") if v.strip()]
            if len(values) != n:
                raise JudgeError(f"{source} answered {len(values)} values for {n} excerpts ({_snippet(text)}); "
                                 f"expected a list of exactly {n} 0/1 values")
            return values
    raise JudgeError(f"{source} answered no list of 0/1 values ({_snippet(text)}); expected a list of exactly "
                     f"{n} 0/1 values like [1, 0, 1]")


class ChatJudge:
    """A :class:`~darkmatter.analysis.detection.Judge` backed by an OpenAI-compatible ``/chat/completions``
    endpoint. Requests are synchronous and sequential: scoring is a batch job, and a local server is usually busy
    enough with one request at a time."""

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 temperature: float = 0.0, max_tokens: int = 512, batch_size: int = 5) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise JudgeError(f"the judge endpoint {endpoint!r} is not an http(s) URL; expected the base URL of an "
                             f"OpenAI-compatible server such as http://127.0.0.1:8000/v1 ({_CONFIG_HINT})")
        if batch_size < 1:
            raise JudgeError(f"the judge at {endpoint} was given batch_size={batch_size}; expected at least 1")
        self.endpoint = endpoint
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"llm:{model}"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def __repr__(self) -> str:  # never shows the key
        return f"ChatJudge({self.endpoint!r}, {self.model!r}, batch_size={self.batch_size})"

    def explain(self, examples: Sequence[Example]) -> str:
        return parse_explanation(self._complete(explanation_messages(examples)), source=f"the judge at {self.url}")

    def detect(self, explanation: str, examples: Sequence[Example]) -> list[bool]:
        verdicts: list[bool] = []
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start:start + self.batch_size]
            answer = self._complete(detection_messages(explanation, batch))
            verdicts.extend(parse_detection(answer, len(batch), source=f"the judge at {self.url}"))
        return verdicts

    def _complete(self, messages: list[dict[str, str]]) -> str:
        """One chat completion: POST the messages, return the first choice's content."""
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens, "stream": False}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            try:
                detail = err.read().decode(errors="replace")
            except (OSError, http.client.HTTPException):
                detail = ""
            raise JudgeError(f"the judge at {self.url} answered HTTP {err.code} {err.reason} ({_snippet(detail)}); "
                             f"expected 200 from an OpenAI-compatible server serving model {self.model!r} "
                             f"({_CONFIG_HINT})") from err
        except urllib.error.URLError as err:
            raise self._unreachable(err.reason) from err
        except (OSError, http.client.HTTPException) as err:  # timeouts while reading, resets, bad status lines
            raise self._unreachable(err) from err
        return self._content(raw)

    def _unreachable(self, reason: Any) -> JudgeError:
        text = " ".join(str(reason).split()) or type(reason).__name__
        if isinstance(reason, TimeoutError) or "timed out" in text:
            text = f"timed out after {self.timeout_s:g} s ({text})"
        return JudgeError(f"could not reach the judge at {self.url}: {text}; expected an OpenAI-compatible server "
                          f"({_CONFIG_HINT})")

    def _content(self, raw: bytes) -> str:
        """``choices[0].message.content`` of a chat completion, or a JudgeError saying what came instead."""
        text = raw.decode(errors="replace")
        try:
            reply = json.loads(text)
        except json.JSONDecodeError as err:
            raise JudgeError(f"the judge at {self.url} answered something that is not JSON ({_snippet(text)}); "
                             f"expected an OpenAI-compatible chat completion ({_CONFIG_HINT})") from err
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeError(f"the judge at {self.url} answered JSON without choices[0].message.content "
                             f"({_snippet(text)}); expected an OpenAI-compatible chat completion")
        return content
