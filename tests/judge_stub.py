"""A stub OpenAI-compatible chat server on 127.0.0.1 for judge tests (test-only).

``StubServer(responder)`` serves POST /chat/completions in a thread; ``responder(body) -> (status, payload,
delay_seconds)`` decides each reply (payload: a dict sent as JSON, or bytes sent as is). Every request's body and
headers are recorded in ``requests``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_reply(text: str, model: str = "stub-judge") -> dict:
  return {"id": "x", "object": "chat.completion", "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class StubServer:
  def __init__(self, responder):
    self.responder = responder
    self.requests: list[dict] = []
    stub = self

    class Handler(BaseHTTPRequestHandler):
      def do_POST(self):  # noqa: N802 -- http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        stub.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
        status, payload, delay = stub.responder(body)
        if delay:
          time.sleep(delay)
        if status is None:  # hang up without an answer (the client sees RemoteDisconnected)
          self.close_connection = True
          return
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (timeout test)

      def log_message(self, *args):  # quiet
        pass

    self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()
