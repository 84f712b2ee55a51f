"""A stand-in OpenAI-compatible LLM server for the sharding tests (stdlib only; 127.0.0.1 only).

    python tests/fake_llm_server.py --port P [--model m] [--delay 0.01] [--die-after K]

Answers ``GET /v1/models``, ``POST /v1/chat/completions`` (the label is a deterministic function of the
transcript: "good" -> Positive., "bad" -> negative, otherwise neutral, so any server labels a row alike) and
``GET /stats`` (``{"chat": requests answered}``). ``--die-after K`` ends the process (``os._exit``) when the
K+1-th chat request arrives, without answering it: an endpoint dying mid-job.
"""

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(model: str, delay: float, die_after: int | None):
    lock = threading.Lock()
    stats = {"chat": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model}]})
            elif self.path == "/stats":
                with lock:
                    self._send(200, dict(stats))
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path != "/v1/chat/completions":
                self._send(404, {"detail": "Not Found"})
                return
            with lock:
                if die_after is not None and stats["chat"] >= die_after:
                    os._exit(0)  # the server dies mid-job: this request gets no answer
                stats["chat"] += 1
            time.sleep(delay)
            text = body["messages"][-1]["content"].lower()
            reply = "Positive." if "good" in text else "negative" if "bad" in text else "neutral"
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    return Handler


def serve(port: int, model: str = "m", delay: float = 0.0, die_after: int | None = None) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(model, delay, die_after))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="m")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--die-after", type=int, default=None)
    args = parser.parse_args()
    serve(args.port, args.model, args.delay, args.die_after)
