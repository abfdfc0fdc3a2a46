"""A Feishu webhook stand-in for the tests: an http.server on 127.0.0.1 (a free port) that records the
JSON body of every POST and answers as Feishu does ({"code": 0, "msg": "success"})."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Webhook:
    def __init__(self, answer: dict | None = None):
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.answer = answer if answer is not None else {"code": 0, "msg": "success", "data": {}}
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                hook.headers.append(dict(self.headers))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                reply = json.dumps(hook.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/open-apis/bot/v2/hook/test-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Webhook":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def texts(self) -> list[str]:
        """The text of each message received, in order."""
        return [b["content"]["post"]["zh_cn"]["content"][0][0]["text"] for b in self.bodies]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[str]:
        deadline = time.time() + timeout
        while len(self.bodies) < count and time.time() < deadline:
            time.sleep(0.02)
        return self.texts()
