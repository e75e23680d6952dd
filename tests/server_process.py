"""serve.py as a subprocess on a free port (it binds port 0 and prints the one it got), for the tests."""

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Optional

from conftest import ROOT
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR


class ServerProcess:
    def __init__(self, *args, timeout: float = 300):
        # one thread: on a small shared machine, OpenMP threads that wait on each other make the
        # decode loop several times slower (the answers are the same)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if "--checkpoint_dir" not in args:  # the float checkpoint the tests' reference answers come from
            args = ("--checkpoint_dir", ROOT / DEFAULT_CHECKPOINT_DIR, *args)
        self.proc = subprocess.Popen([sys.executable, "serve.py", "--port", "0", *map(str, args)], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("serve.py did not start:\n" + self.log)
        m = re.search(r"at http://([\d.]+):(\d+)", self.log)
        self.host, self.port = m.group(1), int(m.group(2))
        self.url = f"http://{self.host}:{self.port}"
        deadline = time.time() + timeout
        while True:
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("serve.py does not answer /health:\n" + self.log)
            time.sleep(0.2)

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            self.lines.append(line.decode(errors="replace"))
            if "serving " in self.lines[-1]:
                self._ready.set()
        self._ready.set()  # exited

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def request(self, method: str, path: str, body=None, headers: Optional[dict] = None, timeout: float = 300):
        """(status, parsed JSON or text) of one request; `body` may be bytes (sent as is) or an object."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            text = r.read().decode()
            try:
                return r.status, json.loads(text)
            except json.JSONDecodeError:
                return r.status, text
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
