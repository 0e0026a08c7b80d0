"""uvicorn's httptools protocol, answering a request it cannot parse in the service's JSON error shape.

Malformed HTTP (two different Content-Lengths, Content-Length beside Transfer-Encoding, a bad
chunk) never reaches the app: the parser refuses it first. uvicorn's own answer to that is a
plain-text 400; this one is `{"error": ..., "error_type": "bad_request"}` like every other error.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class JsonErrorHttpProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"malformed HTTP request: {msg}", "error_type": "bad_request"}).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
