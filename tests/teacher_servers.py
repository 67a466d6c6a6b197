"""Teacher servers for tests: a real `uniopd serve-teacher` in a subprocess, and a tiny proxy in
front of it that can hang, vanish or spoil chosen answers (NaN, truncated, ids outside the
vocabulary, another tokenizer) while remembering which sequences it spoiled."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


class ServeTeacher:
    """`uniopd serve-teacher --model DIR` on a free (or given) loopback port."""

    def __init__(self, model_dir, port: int | None = None, *extra: str, threads: int = 1):
        self.model_dir, self.port, self.extra, self.threads = str(model_dir), port or free_port(), extra, threads
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ServeTeacher":
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "uniopd.cli", "serve-teacher", "--model", self.model_dir,
                                      "--port", str(self.port), "--threads", str(self.threads), *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if wait:
            wait_healthy(self.url, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a hung request finishing after its test tore the upstream down: nobody is listening


class SpoilingProxy:
    """Forwards to `upstream`; `mode` spoils answers: 'nan', 'truncated', 'oov' (a top-k id outside the
    vocabulary), 'count' (one choice missing), 'hang', 'down' (500), 'tokenizer' (another tokenisation),
    'ok'. Per-sequence modes spoil the sequences whose `spoil(ids)` is true and record them."""

    def __init__(self, upstream: str, mode: str = "ok", spoil=lambda ids: True, hang_s: float = 30.0):
        self.upstream, self.mode, self.spoil, self.hang_s = upstream, mode, spoil, hang_s
        self.spoiled: list[tuple[int, ...]] = []
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body: bytes | None):
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as reply:
                    return json.loads(reply.read())

            def _send(self, obj, code=200):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(self._forward(None))

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.requests += 1
                if proxy.mode == "hang" and self.path != "/tokenize":
                    time.sleep(proxy.hang_s)
                if proxy.mode == "down" and self.path != "/tokenize":
                    return self._send({"message": "down"}, 500)
                reply = self._forward(body)
                if self.path == "/tokenize" and proxy.mode == "tokenizer":
                    reply["tokens"] = [reply["tokens"][0]] + [t + 1 for t in reply["tokens"][1:]]
                if self.path == "/v1/completions":
                    prompts = json.loads(body)["prompt"]
                    prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
                    for choice, ids in zip(reply["choices"], prompts):
                        if proxy.spoil(ids) and proxy.mode in ("nan", "truncated", "oov"):
                            proxy.spoiled.append(tuple(ids))
                            choice["prompt_logprobs"] = proxy._spoil(choice["prompt_logprobs"])
                    if proxy.mode == "count":
                        reply["choices"] = reply["choices"][:-1]
                self._send(reply)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _spoil(self, positions):
        last = positions[-1]
        if self.mode == "truncated":
            return positions[:-1]
        if self.mode == "nan":
            key = next(iter(last))
            last[key]["logprob"] = math.nan
        elif self.mode == "oov":
            last["100000"] = {"logprob": -0.01, "rank": 1}
        return positions

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
