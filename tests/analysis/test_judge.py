"""The LLM judge against an honest stub of an OpenAI-compatible server on loopback: the prompts it builds, the
requests it sends, how it parses answers, and the one-sentence errors for each way an endpoint can fail."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from darkmatter.analysis.detection import Example, Judge
from darkmatter.analysis.judge import (
    ChatJudge,
    JudgeError,
    detection_messages,
    explanation_messages,
    parse_detection,
    parse_explanation,
)


def ex(*pairs: tuple[str, float]) -> Example:
    return Example(tuple(t for t, _ in pairs), tuple(a for _, a in pairs))


def plain(text: str) -> Example:
    tokens = tuple(re.findall(r"\s*\S+", text))
    return Example(tokens, (0.0,) * len(tokens))


@dataclass
class Stub:
    """The stub server's base URL, what it received, and how it answers (``mode``)."""

    url: str
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    mode: str = "honest"


def honest_answer(body: dict) -> str:
    """What a perfect judge of the latent "fires on cat" answers: an explanation, or 1 exactly for the numbered
    excerpts that contain "cat" (read back from the prompt, so a client that numbers or batches wrongly fails)."""
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    if "[EXPLANATION]" in system:
        return "The marked tokens are all the same word.\n[EXPLANATION]: the token cat"
    lines = re.findall(r"^Example (\d+): (.*)$", user, flags=re.M)
    assert [int(i) for i, _ in lines] == list(range(1, len(lines) + 1))
    return "Here is my answer: " + json.dumps([int("cat" in text) for _, text in lines])


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that timed out and left is expected here
        pass


@pytest.fixture
def stub():
    state = Stub(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw)
            state.bodies.append(body)
            state.headers.append(dict(self.headers.items()))
            state.paths.append(self.path)
            if self.path != "/v1/chat/completions":
                return self._send(404, b'{"error": "not found"}')
            if state.mode == "error500":
                return self._send(500, b'{"error": {"message": "model exploded"}}')
            if state.mode == "nonjson":
                return self._send(200, b"<html>\n<body>I am a web page</body></html>", "text/html")
            if state.mode == "nochoices":
                return self._send(200, b'{"object": "chat.completion", "choices": []}')
            if state.mode == "slow":
                time.sleep(1.0)
            content = "I cannot tell, sorry." if state.mode == "garbage" else honest_answer(body)
            reply = {"object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}
            self._send(200, json.dumps(reply).encode())

    server = _QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=2)


CAT_WINDOWS = [
    "the cat sat on the mat", "a dog barked loudly", "my cat is asleep", "nothing to see here",
    "cats and more cats", "the weather is fine", "a cat, a hat", "we went home early", "bird song", "the cat",
    "concatenate the strings", "zero",
]


def test_chat_judge_satisfies_the_judge_protocol():
    judge: Judge = ChatJudge("http://127.0.0.1:1/v1", "qwen")
    assert judge.name == "llm:qwen"


def test_round_trip_explains_and_detects_across_batches(stub):
    judge = ChatJudge(stub.url + "/", "tiny-model", temperature=0.25, max_tokens=77, batch_size=5)
    top = [ex(("the", 0.0), (" cat", 3.0), (" sat", 0.0)), ex(("a", 0.0), (" black", 1.0), (" cat", 2.0))]
    assert judge.explain(top) == "the token cat"

    windows = [plain(t) for t in CAT_WINDOWS]
    verdicts = judge.detect("the token cat", windows)
    assert verdicts == ["cat" in t for t in CAT_WINDOWS]
    assert len(stub.bodies) == 1 + 3  # one explanation, then 12 windows in batches of 5, 5, 2
    assert stub.paths == ["/v1/chat/completions"] * 4
    for body in stub.bodies:
        assert body["model"] == "tiny-model"
        assert body["temperature"] == 0.25
        assert body["max_tokens"] == 77
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    sizes = [len(re.findall(r"^Example \d+: ", b["messages"][1]["content"], flags=re.M)) for b in stub.bodies[1:]]
    assert sizes == [5, 5, 2]
    assert "Example 1: the <<cat>> sat\nExample 2: a <<black cat>>\n" in stub.bodies[0]["messages"][1]["content"]
    assert all("<<" not in b["messages"][1]["content"] for b in stub.bodies[1:])
    assert all("Authorization" not in h for h in stub.headers)


def test_bearer_header_only_with_an_api_key(stub):
    ChatJudge(stub.url, "m", api_key="sk-test").explain([plain("the cat")])
    ChatJudge(stub.url, "m").explain([plain("the cat")])
    assert stub.headers[0]["Authorization"] == "Bearer sk-test"
    assert "Authorization" not in stub.headers[1]
    assert "sk-test" not in repr(ChatJudge(stub.url, "m", api_key="sk-test"))


def test_detect_of_no_examples_sends_nothing(stub):
    assert ChatJudge(stub.url, "m").detect("anything", []) == []
    assert stub.bodies == []


def test_explanation_prompt_highlights_firing_runs_as_one_span():
    examples = [
        ex(("the", 0.0), (" big", 0.5), (" cat", 2.0), (" sat", 0.0), (" on", 0.0), (" a", 1.0), (" cat", 0.1)),
        ex(("no", 0.0), (" firing", 0.0)),
        ex(("line", 0.0), ("\n", 0.0), ("cat", 1.0)),
        ex(("x", 0.0), ("\n", 3.0), ("y", 0.0)),
    ]
    system, user = explanation_messages(examples)
    assert system["role"] == "system" and user["role"] == "user"
    assert "[EXPLANATION]:" in system["content"] and "<<" in system["content"]
    lines = user["content"].splitlines()
    assert "Example 1: the <<big cat>> sat on <<a cat>>" in lines
    assert "Example 2: no firing" in lines
    assert "Example 3: line\\n<<cat>>" in lines  # a newline inside a window cannot break the numbering
    assert "Example 4: x<<\\n>>y" in lines  # a run of whitespace alone is still marked


def test_detection_prompt_numbers_plain_excerpts():
    examples = [ex(("the", 0.0), (" cat", 5.0)), plain("a dog"), plain("one more")]
    system, user = detection_messages("  the token cat ", examples)
    assert system["role"] == "system" and user["role"] == "user"
    assert "[1, 0, 0, 1, 1]" in system["content"]
    assert "<<" not in user["content"] and ">>" not in user["content"]
    assert "the token cat\n" in user["content"]
    numbered = re.findall(r"^Example (\d+): (.*)$", user["content"], flags=re.M)
    assert numbered == [("1", "the cat"), ("2", "a dog"), ("3", "one more")]
    assert "exactly 3 values" in user["content"]


@pytest.mark.parametrize(("text", "n", "expected"), [
    ("[1, 0, 1]", 3, [True, False, True]),
    ("[0,0]", 2, [False, False]),
    ("[1]", 1, [True]),
    ("Excerpts 1 and 3 mention it.\nFinal answer: [1, 0, 1, 0]\nHope this helps.", 4, [True, False, True, False]),
    ("<think>maybe [0, 0, 0]? no.</think> [1, 1, 0]", 3, [True, True, False]),  # the last list wins
    ("[1, 0, 1] [EXPLANATION] (ignored: not 0/1)", 3, [True, False, True]),
    ("```python\n[ 1 , 0 , 1 , ]\n```", 3, [True, False, True]),
])
def test_parse_detection_accepts_lists_of_0_1(text, n, expected):
    assert parse_detection(text, n) == expected


@pytest.mark.parametrize(("text", "match"), [
    ("[1, 0]", r"answered 2 values for 3 excerpts .*expected a list of exactly 3 0/1 values"),
    ("[1, 0, 1, 1]", r"answered 4 values for 3 excerpts"),
    ("I think the first one.", r"no list of 0/1 values"),
    ("[yes, no, yes]", r"no list of 0/1 values"),
    ("[1, 2, 0]", r"no list of 0/1 values"),
    ("", r"no list of 0/1 values"),
])
def test_parse_detection_rejects_anything_else(text, match):
    with pytest.raises(JudgeError, match=match):
        parse_detection(text, 3)


def test_parse_detection_quotes_at_most_80_chars_on_one_line():
    with pytest.raises(JudgeError) as info:
        parse_detection("no\nlist\n" + "x" * 500, 2)
    message = str(info.value)
    assert "\n" not in message and "x" * 80 not in message and "x" * 60 in message


@pytest.mark.parametrize(("text", "expected"), [
    ("Step 1: ...\n[EXPLANATION]: the token cat", "the token cat"),
    ("[EXPLANATION]: first\nmore thought\n**[EXPLANATION]:** second  \n", "second"),
    ("[EXPLANATION]:\n  the token cat\n", "the token cat"),
    ("no marker here\nthe token cat\n\n", "the token cat"),
])
def test_parse_explanation(text, expected):
    assert parse_explanation(text) == expected


def test_parse_explanation_of_nothing_is_an_error():
    with pytest.raises(JudgeError, match="empty explanation"):
        parse_explanation(" \n\n")


def _one_sentence(err: JudgeError, url: str) -> str:
    message = str(err)
    assert "\n" not in message
    assert url in message
    assert message.count(". ") == 0  # one sentence: clauses are joined by ';'
    return message


def test_unreachable_endpoint():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(JudgeError, match=r"could not reach the judge at " + re.escape(url)) as info:
        ChatJudge(url, "m", timeout_s=1.0).explain([plain("the cat")])
    message = _one_sentence(info.value, url)
    assert "expected an OpenAI-compatible server" in message


def test_timeout(stub):
    stub.mode = "slow"
    with pytest.raises(JudgeError, match=r"could not reach the judge at .*timed out after 0\.2 s") as info:
        ChatJudge(stub.url, "m", timeout_s=0.2).detect("the token cat", [plain("the cat")])
    _one_sentence(info.value, stub.url)


def test_http_500(stub):
    stub.mode = "error500"
    with pytest.raises(JudgeError, match=r"answered HTTP 500 .*model exploded.*expected 200") as info:
        ChatJudge(stub.url, "m").explain([plain("the cat")])
    _one_sentence(info.value, stub.url)


def test_wrong_path_is_an_http_error(stub):
    with pytest.raises(JudgeError, match=r"HTTP 404"):
        ChatJudge(stub.url.removesuffix("/v1"), "m").explain([plain("the cat")])


def test_non_json_reply(stub):
    stub.mode = "nonjson"
    with pytest.raises(JudgeError, match=r"not JSON .*web page.*expected an OpenAI-compatible chat completion") as info:
        ChatJudge(stub.url, "m").detect("the token cat", [plain("the cat")])
    _one_sentence(info.value, stub.url)


def test_json_without_content(stub):
    stub.mode = "nochoices"
    with pytest.raises(JudgeError, match=re.escape("without choices[0].message.content")) as info:
        ChatJudge(stub.url, "m").explain([plain("the cat")])
    _one_sentence(info.value, stub.url)


def test_garbage_detection_answer(stub):
    stub.mode = "garbage"
    with pytest.raises(JudgeError, match=r"no list of 0/1 values \('I cannot tell, sorry\.'\)") as info:
        ChatJudge(stub.url, "m").detect("the token cat", [plain("the cat"), plain("a dog")])
    _one_sentence(info.value, stub.url)


def test_endpoint_must_be_http():
    with pytest.raises(JudgeError, match="not an http"):
        ChatJudge("127.0.0.1:8000/v1", "m")
