"""A stand-in judge: an OpenAI-compatible chat-completions server on 127.0.0.1 that judges by a
transparent rule, for demos and tests of `lol-rl judge` with no network and no API key.

    python scripts/mock_judge_server.py --port 8000     # serves http://127.0.0.1:8000/v1
    lol-rl judge a=<run dir> b=test_good judge=local    # conf/judge/local.yaml points there

The rule. It reads the query and both responses back out of the prompt lol-rl sends (the
`<query>`, `<response_a>`, `<response_b>` blocks of lol_rl.judge.pairs.JUDGE_PROMPT, so the
real prompt format is exercised) and scores each response with the embedded task's reward
(correct + polite + concise, each in [0, 1], out of 3). With d = |R(A) - R(B)|:
- d > 0.15: the higher-scoring response;
- 0.05 < d <= 0.15: always "A", a deliberate position bias like real LLM judges have on close
  calls, which asking both orders exposes (those pairs come out inconsistent);
- d <= 0.05: "tie" when both score at least 2.0, else "neither".
A query that is not a toy prompt gets "tie". The answer is one comparison sentence (both
scores) and a `Verdict:` line.

Tests script faults through `server.faults`, consumed one per request: "429" (rate limited,
Retry-After: 0), "500" (a server error), "slow" (sleeps `slow_seconds` before answering), "garbage" (an answer with no
verdict), "badjson" (a 200 whose body is not JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLEAR_MARGIN = 0.15  # above: the better response wins
TIE_MARGIN = 0.05  # at most: a tie (or neither); between the two: position bias
GOOD_ENOUGH = 2.0  # out of 3: both at least this good is a tie, else neither


def _block(prompt: str, tag: str) -> str | None:
    match = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", prompt, re.DOTALL)
    return match.group(1) if match else None


@functools.cache
def _polite():
    from lol_rl.rewards.toy import Polite

    return Polite()  # VADER's lexicon is read once, not per request


def toy_scores(query: str, responses: list[str]) -> list[dict[str, float]] | None:
    """The embedded task's reward components of each response; None for a non-toy query."""
    from lol_rl.rewards.toy import conciseness, correctness

    try:
        polite = _polite()([query] * len(responses), responses)
        return [{"correct": correctness(query, r), "polite": p, "concise": conciseness(query, r)}
                for r, p in zip(responses, polite)]
    except ValueError:
        return None


def judge_by_reward(prompt: str) -> str:
    """The answer to one judge prompt by the rule in the module docstring."""
    query, first, second = (_block(prompt, tag) for tag in ("query", "response_a", "response_b"))
    if query is None or first is None or second is None:
        return "I cannot find the query and the two responses in this prompt."
    scores = toy_scores(query, [first, second])
    if scores is None:
        return "This is not a toy prompt, so I cannot score it.\nVerdict: tie"
    total_a, total_b = (sum(s.values()) for s in scores)
    gap = abs(total_a - total_b)
    if gap > CLEAR_MARGIN:
        verdict = "A" if total_a > total_b else "B"
    elif gap > TIE_MARGIN:
        verdict = "A"  # the position bias on close calls
    else:
        verdict = "tie" if min(total_a, total_b) >= GOOD_ENOUGH else "neither"
    return (f"Response A scores {total_a:.2f} and Response B {total_b:.2f} "
            f"(correct + polite + concise).\nVerdict: {verdict}")


class JudgeHandler(BaseHTTPRequestHandler):
    server: MockJudgeServer

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps({"error": {"message": message, "type": "mock_error"}}).encode(), headers)

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route {self.path}")
        self._send(200, json.dumps({"object": "list", "data": [{"id": self.server.model, "object": "model"}]}).encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fault = self.server.next_fault()
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            return self._error(401, "invalid api key")
        if fault == "429":
            return self._error(429, "rate limited", {"Retry-After": "0"})
        if fault == "500":
            return self._error(500, "the judge fell over")
        if fault == "slow":
            time.sleep(self.server.slow_seconds)
        request = json.loads(body)
        prompt = request["messages"][-1]["content"]
        answer = "I think both have merits." if fault == "garbage" else self.server.answer(prompt)
        if fault == "badjson":
            return self._send(200, b"<html>not json</html>")
        self.server.record(prompt, answer)
        self._send(200, json.dumps({
            "id": f"chatcmpl-mock-{len(self.server.answered)}", "object": "chat.completion",
            "created": int(time.time()), "model": request.get("model", self.server.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(answer.split()),
                      "total_tokens": len(prompt.split()) + len(answer.split())},
        }).encode())


class MockJudgeServer(ThreadingHTTPServer):
    """The server; `requests` counts every POST (faults included), `answered` keeps the
    (prompt, answer) of every 200 with a verdict."""

    daemon_threads = True

    def __init__(self, port: int = 0, answer=judge_by_reward, model: str = "mock-judge",
                 api_key: str | None = None, verbose: bool = False):
        super().__init__(("127.0.0.1", port), JudgeHandler)
        self.answer, self.model, self.api_key, self.verbose = answer, model, api_key, verbose
        self.faults: list[str] = []
        self.slow_seconds = 1.0
        self.requests = 0
        self.answered: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            return self.faults.pop(0) if self.faults else None

    def record(self, prompt: str, answer: str) -> None:
        with self._lock:
            self.answered.append((prompt, answer))

    def start(self) -> MockJudgeServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    args = parser.parse_args()
    server = MockJudgeServer(args.port, verbose=not args.quiet)
    print(f"mock judge at {server.base_url} (model {server.model}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
