"""The bundled stateful sample app: an HTTP server whose state lives in memory.

    GET /            "hello from the sample app: hit N"
    GET /state       {"hits": N, "boot_id": "...", "values": {...}, "pid": P}
    GET /slow/MS     answers after MS milliseconds (a request in flight)
    GET /bulk/MIB    MIB MiB of BULK_PATTERN (a large transfer)
    PUT /values/KEY  stores the request body under KEY

`boot_id` is drawn at start: the same value after a wake proves the memory came
back from the checkpoint, a new one means a cold start.
Run: python -m activator.sampleapp --port 8080 [--hold-mib N]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What /bulk/ repeats: 1 MiB that a client can check piece by piece.
BULK_PATTERN = bytes(range(256)) * 4096


class State:
    def __init__(self, hold_mib: int) -> None:
        self.lock = threading.Lock()
        self.hits = 0
        self.boot_id = secrets.token_hex(8)
        self.values: dict[str, str] = {}
        # Memory the app holds, touched so that it is resident (and dumped).
        self.ballast = bytearray(os.urandom(1024)) * (hold_mib * 1024)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State
    verbose = False

    def do_GET(self) -> None:
        if self.path.startswith("/slow/") and self.path[6:].isdecimal():
            time.sleep(int(self.path[6:]) / 1000)
            self._send(200, "slow answer\n", "text/plain")
            return
        if self.path.startswith("/bulk/") and self.path[6:].isdecimal():
            mib = int(self.path[6:])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(mib * len(BULK_PATTERN)))
            self.end_headers()
            for _ in range(mib):
                self.wfile.write(BULK_PATTERN)
            return
        with self.state.lock:
            self.state.hits += 1
            if self.path == "/state":
                body = json.dumps(
                    {
                        "hits": self.state.hits,
                        "boot_id": self.state.boot_id,
                        "values": self.state.values,
                        "pid": os.getpid(),
                        # 127.0.0.1 through the activator; the client's own
                        # address when it came directly (the fast path).
                        "peer": self.client_address[0],
                    }
                )
                self._send(200, body, "application/json")
            elif self.path == "/":
                self._send(200, f"hello from the sample app: hit {self.state.hits}\n", "text/plain")
            else:
                self._send(404, "not found\n", "text/plain")

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        value = self.rfile.read(length).decode()
        if not self.path.startswith("/values/"):
            self._send(404, "not found\n", "text/plain")
            return
        key = self.path.removeprefix("/values/")
        with self.state.lock:
            self.state.values[key] = value
        if self.verbose:
            print(f"stored {key}={value}", flush=True)
        self._send(204, "", "text/plain")

    def _send(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the activator logs connections


class Server(ThreadingHTTPServer):
    # The default backlog of 5 drops SYNs when the activator forwards many
    # held connections at once after a wake; the kernel then retries them
    # only after a second.
    request_queue_size = socket.SOMAXCONN
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--hold-mib", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print every stored value")
    args = parser.parse_args()
    Handler.state = State(args.hold_mib)
    Handler.verbose = args.verbose
    server = Server(("0.0.0.0", args.port), Handler)
    print(f"sample app listening on :{args.port} (boot {Handler.state.boot_id})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
