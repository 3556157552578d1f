"""A local stand-in for an OpenAI-compatible judge server (tests, the offline sample, benchmarks).

Speaks enough of the Chat Completions protocol for the ``openai`` client (``POST
/v1/chat/completions``, ``GET /v1/models``) and answers with a deterministic policy:

* ``score`` (default): for each entity it accepts the candidate with the highest ``det_score``
  (every candidate whose score is within ``plural_margin`` of the best, for a plural phrase) and
  rejects the others. It never looks at anything; it only lets the pipeline run end to end.
* ``colour``: a stand-in for what a visual judge sees (``adjudicate.visual: true`` sends the image
  with the boxes drawn). For a phrase with a colour word of the generated scenes (red, blue, ...),
  each candidate's box is looked into: the colour names of the pixels of its inner part (the
  middle 50%, clear of the drawn outline and label), and a candidate is accepted when the phrase's
  colour covers at least ``COLOUR_SHARE`` of them (the best-scoring such candidate for a singular
  phrase, all of them for a plural one). A phrase without a colour word, or a request without an
  image, falls back to ``score``. It is not a model: it knows eleven colour names and nothing else.

    python -m devkit.fake_judge_server --port 8011 --latency-ms 50
    lookandlearn build manifests/sample.yaml --set adjudicate.judge=openai \\
        --set adjudicate.model=fake-judge --set adjudicate.base_url=http://127.0.0.1:8011/v1

Tests script faults through ``handler`` (see :class:`FakeJudgeServer`): any status code with
headers (429 + Retry-After), slow replies, raw text instead of JSON, replies with wrong ids.
Binds to 127.0.0.1 by default; ``--max-seconds`` / ``--max-requests`` bound its life.

Every request is kept with the time it arrived and the tokens the server counted for it (its
reply's ``usage``: the prompt counted as the judge's limiter estimates it, characters / 4 and
a fixed count per image, plus the reply; 0 for an error reply), so tests can check the
requests and tokens in every time window (:meth:`FakeJudgeServer.window_peaks`).
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from stages.judges.limits import estimate_prompt_tokens

_DATA = re.compile(r"<data>\s*(\{.*\})\s*</data>", re.S)


def user_text(body: dict) -> str:
    """The text of the last user message (string content or the text parts of a content list)."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")
    return ""


def extract_payload(body: dict) -> dict | None:
    """The sample JSON the judge was shown (between <data> and </data>), or None."""
    match = _DATA.search(user_text(body))
    if not match:
        return None
    try:
        return json.loads(match.group(1))
    except json.JSONDecodeError:
        return None


def policy_reply(payload: dict, plural_margin: float = 0.05) -> dict:
    """The deterministic verdicts: the best-scoring candidate of each entity is accepted."""
    entities = []
    for entity in payload.get("entities", []):
        candidates = entity.get("candidates", [])
        best = max((c["det_score"] for c in candidates), default=0.0)
        winner = min((c["id"] for c in candidates if c["det_score"] == best), default=None)
        answers = []
        for cand in candidates:
            if entity.get("plural"):
                accept = cand["det_score"] >= best - plural_margin
            else:
                accept = cand["id"] == winner
            reason = ("highest detector score" if cand["id"] == winner else
                      "close to the best score, another instance" if accept else
                      f"lower detector score than candidate {winner}")
            answers.append({"id": cand["id"], "accept": accept, "reason": reason})
        entities.append({"id": entity["id"], "visual": True, "candidates": answers})
    return {"entities": entities}


COLOUR_SHARE = 0.25    # of the box's inner pixels named the phrase's colour: enough to say "that is red"


def request_image(body: dict):
    """The first image of the last user message as an RGB numpy array, or None."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    for message in reversed(body.get("messages") or []):
        if message.get("role") != "user" or isinstance(message.get("content"), str):
            continue
        for part in message.get("content") or []:
            url = (part.get("image_url") or {}).get("url", "") if part.get("type") == "image_url" else ""
            if url.startswith("data:") and "," in url:
                try:
                    raw = base64.b64decode(url.split(",", 1)[1])
                    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
                except Exception:
                    return None
        return None
    return None


def _colour_word(phrase: str) -> str | None:
    from devkit.scenes import COLOURS

    words = re.findall(r"[a-z]+", phrase.lower().replace("grey", "gray"))
    return next((w for w in words if w in COLOURS), None)


def colour_shares(image, box: list[float]) -> dict[str, float]:
    """Share of each colour name among the pixels of the inner half of a normalised box."""
    import numpy as np

    from devkit.scenes import COLOURS

    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    cx0, cx1 = x0 + (x1 - x0) * 0.25, x1 - (x1 - x0) * 0.25
    cy0, cy1 = y0 + (y1 - y0) * 0.25, y1 - (y1 - y0) * 0.25
    patch = image[max(0, int(cy0 * h)):max(int(cy0 * h) + 1, int(round(cy1 * h))),
                  max(0, int(cx0 * w)):max(int(cx0 * w) + 1, int(round(cx1 * w)))].reshape(-1, 3).astype(np.float32)
    if patch.size == 0:
        return {}
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((patch[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(names)) / len(nearest)
    return {names[i]: float(counts[i]) for i in range(len(names)) if counts[i] > 0}


def colour_policy_reply(payload: dict, image, plural_margin: float = 0.05) -> dict:
    """``colour``: accept the candidates whose box shows the phrase's colour (see the module doc)."""
    fallback = policy_reply(payload, plural_margin)
    if image is None:
        return fallback
    entities = []
    for entity, scored in zip(payload.get("entities", []), fallback["entities"]):
        colour = _colour_word(entity.get("phrase", ""))
        if colour is None:
            entities.append(scored)
            continue
        shares = {c["id"]: colour_shares(image, c["box"]) for c in entity.get("candidates", [])}
        matching = sorted((c for c in entity.get("candidates", []) if shares[c["id"]].get(colour, 0.0) >= COLOUR_SHARE),
                          key=lambda c: (-c["det_score"], c["id"]))
        accepted = {c["id"] for c in matching} if entity.get("plural") else {c["id"] for c in matching[:1]}
        answers = []
        for cand in entity.get("candidates", []):
            seen = max(shares[cand["id"]].items(), key=lambda kv: kv[1])[0] if shares[cand["id"]] else "nothing"
            if cand["id"] in accepted:
                reason = f"{colour} inside the box"
            elif shares[cand["id"]].get(colour, 0.0) >= COLOUR_SHARE:
                reason = f"{colour} too, but candidate {matching[0]['id']} scores higher"
            else:
                reason = f"mostly {seen} inside the box, not {colour}"
            answers.append({"id": cand["id"], "accept": cand["id"] in accepted, "reason": reason})
        entities.append({"id": entity["id"], "visual": True, "candidates": answers})
    return {"entities": entities}


POLICIES = ("score", "colour")


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # many clients connect at once (the default backlog of 5 drops SYNs: 1 s stalls)
    daemon_threads = True


@dataclass
class FakeRequest:
    body: dict
    headers: dict     # lower-case names
    payload: dict | None
    n: int            # 1-based number of this request at the server
    attempt: int      # 1-based: how many times this same question (payload) has been asked
    received: float = 0.0  # time.monotonic() when it arrived
    tokens: int = 0        # the tokens counted for it (its reply's usage; 0 for an error reply)


@dataclass
class FakeReply:
    status: int = 200
    content: str | None = None      # assistant message text; None = the policy's JSON
    body: str | None = None         # whole raw HTTP body (overrides everything, e.g. broken JSON)
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0            # extra delay before answering (slow replies / timeouts)
    finish_reason: str = "stop"


class FakeJudgeServer:
    """``with FakeJudgeServer(latency_ms=20, handler=fn) as server: ... server.url ...``

    ``handler(request: FakeRequest) -> FakeReply | None`` scripts the replies (None = the
    policy's normal answer). ``requests`` keeps every request seen; ``max_in_flight`` the most
    requests handled at once.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0, handler=None,
                 plural_margin: float = 0.05, max_requests: int | None = None, policy: str = "score"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.latency_s = latency_ms / 1000.0
        self.handler = handler
        self.plural_margin = plural_margin
        self.max_requests = max_requests
        self.requests: list[FakeRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._asked: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _Server((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> "FakeJudgeServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-judge-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes handlers sleeping on a delay
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeJudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def window_peaks(self, window_s: float) -> tuple[int, int]:
        """The most requests and the most tokens that arrived within any ``window_s`` seconds."""
        with self._lock:
            seen = sorted((r.received, r.tokens) for r in self.requests)
        most_requests = most_tokens = tokens = 0
        first = 0
        for last, (at, count) in enumerate(seen):  # windows that end at each arrival
            tokens += count
            while seen[first][0] <= at - window_s:
                tokens -= seen[first][1]
                first += 1
            most_requests, most_tokens = max(most_requests, last - first + 1), max(most_tokens, tokens)
        return most_requests, most_tokens

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)

    # -- request handling --
    def _register(self, body: dict, headers: dict) -> FakeRequest:
        payload = extract_payload(body)
        question = json.dumps(payload, sort_keys=True) if payload is not None else user_text(body)
        with self._lock:
            self._asked[question] = self._asked.get(question, 0) + 1
            request = FakeRequest(body=body, headers=headers, payload=payload, n=len(self.requests) + 1,
                                  attempt=self._asked[question], received=time.monotonic())
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return request

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def answer(self, request: FakeRequest) -> tuple[int, dict, bytes, float]:
        reply = (self.handler(request) if self.handler else None) or FakeReply()
        delay = self.latency_s + reply.delay_s
        if reply.body is not None:
            return reply.status, reply.headers, reply.body.encode("utf-8"), delay
        if reply.status != 200:
            error = {"error": {"message": f"fake error {reply.status}", "type": "fake", "code": reply.status}}
            return reply.status, reply.headers, json.dumps(error).encode(), delay
        content = reply.content
        if content is None:
            if request.payload is None:
                content = "I cannot find the sample."
            elif self.policy == "colour":
                content = json.dumps(colour_policy_reply(request.payload, request_image(request.body), self.plural_margin))
            else:
                content = json.dumps(policy_reply(request.payload, self.plural_margin))
        prompt_tokens = estimate_prompt_tokens(request.body.get("messages", []))
        completion_tokens = max(1, len(content) // 4)
        request.tokens = prompt_tokens + completion_tokens
        body = {
            "id": f"chatcmpl-fake-{request.n}", "object": "chat.completion", "created": int(time.time()),
            "model": request.body.get("model", "fake-judge"),
            "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": None}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        return 200, reply.headers, json.dumps(body).encode("utf-8"), delay

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            timeout = 30  # an idle client connection is dropped after this

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _send(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, str(value))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    data = json.dumps({"object": "list", "data": [
                        {"id": "fake-judge", "object": "model", "created": 0, "owned_by": "lookandlearn"}]})
                    self._send(200, {}, data.encode())
                else:
                    self._send(404, {}, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {}, b'{"error": {"message": "not found"}}')
                    return
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send(400, {}, b'{"error": {"message": "request body is not JSON"}}')
                    return
                request = server._register(body, {k.lower(): v for k, v in self.headers.items()})
                try:
                    status, headers, data, delay = server.answer(request)
                    server.sleep(delay)
                    self._send(status, headers, data)
                finally:
                    server._done()
                if server.max_requests and len(server.requests) >= server.max_requests:
                    threading.Thread(target=server._httpd.shutdown, daemon=True).start()

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    pass  # the client gave up (e.g. its timeout): nothing to answer

        return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.fake_judge_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8011, help="port (0 = any free port; the URL is printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fixed delay before every reply")
    parser.add_argument("--error-every", type=int, default=0, metavar="N",
                        help="answer every Nth request with HTTP 500 (0 = never)")
    parser.add_argument("--rate-limit-every", type=int, default=0, metavar="N",
                        help="answer every Nth request with HTTP 429 and Retry-After: 0.2 (0 = never)")
    parser.add_argument("--policy", choices=POLICIES, default="score",
                        help="score: accept the best detector score; colour: look for the phrase's colour inside "
                             "each box (needs adjudicate.visual=true; a stand-in, not a model)")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after this many seconds")
    args = parser.parse_args(argv)

    def handler(request: FakeRequest) -> FakeReply | None:
        if args.error_every and request.n % args.error_every == 0:
            return FakeReply(status=500)
        if args.rate_limit_every and request.n % args.rate_limit_every == 0:
            return FakeReply(status=429, headers={"Retry-After": "0.2"})
        return None

    server = FakeJudgeServer(args.host, args.port, args.latency_ms, handler, max_requests=args.max_requests,
                             policy=args.policy)
    print(f"fake judge server on {server.url} (policy {args.policy}, latency {args.latency_ms:g} ms)", flush=True)
    if args.max_seconds:
        threading.Timer(args.max_seconds, server._httpd.shutdown).start()
    try:
        server._httpd.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server._stop.set()
        server._httpd.server_close()
    print(f"served {len(server.requests)} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
