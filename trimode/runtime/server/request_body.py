"""ASGI middleware for request bodies: each is read up to a fixed size before the app sees
it, so no client can make the server buffer an unbounded body (413 beyond the limit), and
each is JSON whatever Content-Type the client sent (as llama-server treats them; `curl -d`
says form-urlencoded)."""
from __future__ import annotations

import json

from trimode.runtime.server.errors import error_body


class BoundedJsonBodies:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._reject(send, 413, f"request body exceeds {self.max_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(send, 413, f"request body exceeds {self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            return await self._reject(send, 400, f"request body is not valid UTF-8 (byte {err.start})")
        replayed = False

        async def replay():
            # The whole body once, then the real channel (which reports a disconnect).
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
        if body:
            headers.append((b"content-type", b"application/json"))
        await self.app({**scope, "headers": headers}, replay, send)

    async def _reject(self, send, status: int, message: str):
        body = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
