"""The web chat page at /, in headless Chromium (Debian's `chromium`), driven over the DevTools
protocol: it sends a message, shows the answer as it streams (several partial texts before the end)
and the final text is the model's greedy answer; its Stop button cancels the request on the server."""

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from server_process import ServerProcess

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                         "(apt-get install chromium); .ci/run installs it")


class Browser:
    """Headless Chromium and one page, over the DevTools protocol (a websocket)."""

    def __init__(self):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="lit_llama-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "--window-size=1000,800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(expression):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(default_checkpoint):
    s = ServerProcess()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    b = Browser()
    try:
        b.call("Page.enable")
        b.call("Page.navigate", url=server.url + "/")
        b.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent.length > 0")
        yield b
    finally:
        b.close()


LAST = "[...document.querySelectorAll('.msg.assistant')].pop()"
STATE = f"JSON.stringify({{text: {LAST}.querySelector('.text').textContent, state: {LAST}.dataset.state, " \
        f"chunks: Number({LAST}.dataset.chunks)}})"


def send(page, text, temperature=0, max_tokens=12):
    page.js(f"document.getElementById('temperature').value = '{temperature}';"
            f"document.getElementById('max_tokens').value = '{max_tokens}';"
            f"document.getElementById('input').value = {json.dumps(text)};"
            "document.getElementById('form').requestSubmit(); true")


def test_page_sends_a_message_and_streams_the_answer(page, server, tmp_path):
    question = "What is the capital of France?"
    send(page, question)
    seen, state = [], None
    deadline = time.time() + 180
    while time.time() < deadline:
        state = json.loads(page.js(STATE))
        if state["state"] == "streaming" and state["text"] and (not seen or seen[-1] != state["text"]):
            seen.append(state["text"])
        if state["state"] != "streaming":
            break
        time.sleep(0.02)
    page.screenshot(tmp_path / "chat.png")
    assert state["state"] == "done", state
    # shown piece by piece: several growing partial texts before the end
    assert len(seen) >= 2 and all(a != b and b.startswith(a) for a, b in zip(seen, seen[1:])), seen
    assert state["chunks"] >= 3
    # the final text is the model's greedy answer to the same conversation
    status, body = server.request("POST", "/v1/chat/completions", {
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": 12})
    assert status == 200 and state["text"] == body["choices"][0]["message"]["content"], (state, body)
    assert page.js("document.querySelector('.msg.user .text').textContent") == question


def test_stop_button_cancels_the_request(page, server):
    before = server.request("GET", "/health")[1]
    send(page, "Write a very long story about a lighthouse.", max_tokens=1000)
    page.wait_for(f"{LAST}.dataset.chunks >= 3")
    page.js("document.getElementById('form').requestSubmit(); true")  # the Send button is Stop now
    page.wait_for(f"{LAST}.dataset.state === 'stopped'")
    deadline = time.time() + 60
    while time.time() < deadline:
        h = server.request("GET", "/health")[1]
        if h["cancelled"] > before["cancelled"] and not h["busy"]:
            break
        time.sleep(0.1)
    assert h["cancelled"] == before["cancelled"] + 1 and h["tokens"] - before["tokens"] < 300, (before, h)
    # the conversation goes on in the page
    send(page, "Say hi.", max_tokens=4)
    page.wait_for(f"{LAST}.dataset.state === 'done'")
