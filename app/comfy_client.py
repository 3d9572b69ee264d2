"""A running ComfyUI server as a host for headless runs: its HTTP API and websocket, nothing else.

GET /object_info for the node definitions, POST /prompt with the API prompt and a client id, the
websocket ``/ws?clientId=...`` for progress (every message nodes send to the client), and
GET /history/{prompt_id} for the result. The websocket needs ``aiohttp`` (one of ComfyUI's own
requirements); without it the run is followed by polling /history, with no progress lines.
Nothing of ComfyUI is imported: the server may run on another machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Callable

from ..training.errors import LoraWorkbenchError
from .workflow_runner import PromptInvalidError, PromptRun

log = logging.getLogger(__name__)


class ServerError(LoraWorkbenchError, RuntimeError):
    """The server could not be reached or answered something unexpected."""


class ServerHost:
    def __init__(self, url: str, *, timeout: float | None = None, poll_seconds: float = 0.5):
        url = url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        self.url = url
        self.timeout = timeout  # seconds one prompt may take (None: no limit)
        self.poll_seconds = poll_seconds
        self._object_info = None

    # ---- HTTP ----
    def _request(self, path: str, body: dict | None = None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if e.code == 400 and path == "/prompt":
                try:
                    answer = json.loads(text)
                except json.JSONDecodeError:
                    answer = {"error": {"message": text}}
                raise PromptInvalidError(answer.get("error") or {}, answer.get("node_errors") or {}) from e
            raise ServerError(f"{self.url}{path} answered {e.code}: {text[:500]}") from e
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"cannot reach ComfyUI at {self.url} ({e}); is it running? (python main.py "
                              "--listen 127.0.0.1 --port 8188)") from e

    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self._request("/object_info")
        return self._object_info

    def file_location(self, ref: dict) -> str:
        query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                        "type": ref.get("type", "output")})
        return f"{self.url}/view?{query}"

    def queue(self, prompt: dict, client_id: str) -> str:
        answer = self._request("/prompt", {"prompt": prompt, "client_id": client_id})
        if answer.get("node_errors"):
            raise PromptInvalidError({"message": "some outputs are invalid", "details": ""}, answer["node_errors"])
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self._request(f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id)

    # ---- running ----
    def run_prompt(self, prompt: dict, on_message: Callable[[str, dict], None] | None = None,
                   client_id: str | None = None) -> PromptRun:
        """Queue the prompt, follow it to the end, and return what /history reports."""
        client_id = client_id or f"lora-workbench-{uuid.uuid4().hex}"
        messages: list = []
        if importlib.util.find_spec("aiohttp") is None:  # ComfyUI's own dependency; absent elsewhere is fine
            log.info("aiohttp is not installed: following the prompt through /history, without progress")
            prompt_id = self.queue(prompt, client_id)
        else:
            try:
                prompt_id = asyncio.run(self._follow(prompt, client_id, messages, on_message))
            except KeyboardInterrupt:
                self._request("/interrupt", {})  # what the Cancel button sends
                raise
        entry = self._wait_for_history(prompt_id)
        status = entry.get("status") or {}
        status_messages = [tuple(m) for m in status.get("messages") or []]
        return PromptRun(prompt_id=prompt_id, success=status.get("status_str") == "success",
                         outputs=entry.get("outputs") or {}, history=entry, status_messages=status_messages,
                         messages=messages)

    async def _follow(self, prompt: dict, client_id: str, messages: list, on_message) -> str:
        import aiohttp

        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={urllib.parse.quote(client_id)}"
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(ws_url, heartbeat=30)
            except aiohttp.ClientError as e:
                raise ServerError(f"cannot open ComfyUI's websocket {ws_url}: {e}") from e
            async with ws:
                # Connected first, so no message of this prompt is missed.
                prompt_id = await asyncio.to_thread(self.queue, prompt, client_id)
                while True:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise ServerError(f"prompt {prompt_id} did not finish within {self.timeout:g} s")
                    try:
                        msg = await ws.receive(timeout=left)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        log.warning("ComfyUI closed the websocket; following the prompt through /history")
                        return prompt_id
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # binary preview images
                    body = json.loads(msg.data)
                    event, data = body.get("type"), body.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    messages.append((event, data))
                    if on_message is not None:
                        on_message(event, data)
                    if event == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        return prompt_id
                    if event in ("execution_error", "execution_interrupted"):
                        return prompt_id

    def _wait_for_history(self, prompt_id: str) -> dict:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            entry = self.history(prompt_id)
            if entry and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if deadline is not None and time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {self.timeout:g} s")
            time.sleep(self.poll_seconds)

    def close(self) -> None:
        pass
