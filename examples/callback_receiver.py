#!/usr/bin/env python3
"""A small asyncgate callback receiver (Python 3 standard library only).

It checks every callback the way a Standard Webhooks 1.0 library does, with
the secret the gateway was given in --callback-secret-file, dedupes by
webhook-id, and prints what it got:

    python3 examples/callback_receiver.py --secret-file ./callback.secret \
        --listen 127.0.0.1:8099

then submit with `X-Callback-Location: http://127.0.0.1:8099/callback` (and
`X-Callback-Method: GET` if you like). Each callback is answered:

- 401 when its signature does not verify (or is missing, or its timestamp
  is more than --tolerance seconds from now): the gateway retries it, so a
  receiver given the wrong secret shows up in the gateway's log and metrics;
- 200 otherwise; a webhook-id seen before (a retry the gateway sent because
  our first 2xx did not reach it) is answered 200 and not handled again.

What is signed: "{webhook-id}.{webhook-timestamp}.{payload}", the payload
being the form body of a POST, or the whole raw query string of a GET
(without the `?`, the callback URL's own parameters included).
"""

import argparse
import base64
import hashlib
import hmac
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

PREFIX = "whsec_"


def load_secret(path):
    """The key bytes of a `whsec_<base64>` secret file."""
    with open(path, encoding="ascii") as f:
        text = f.read().strip()
    if not text.startswith(PREFIX):
        raise ValueError(f"{path} does not hold a whsec_ secret")
    encoded = text[len(PREFIX):]
    key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    if not key:
        raise ValueError(f"{path} holds an empty secret")
    return key


def verify(key, headers, payload, tolerance, now=None):
    """None when the callback verifies, else why not (Standard Webhooks 1.0)."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return "missing webhook-id, webhook-timestamp or webhook-signature"
    try:
        ts = int(timestamp)
    except ValueError:
        return f"bad timestamp {timestamp!r}"
    now = int(time.time()) if now is None else now
    if abs(now - ts) > tolerance:
        return f"timestamp {ts} is more than {tolerance}s from now ({now})"
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for entry in signatures.split(" "):
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return None
    return "no v1 signature matches"


class Receiver(BaseHTTPRequestHandler):
    key = b""
    tolerance = 300
    seen = set()
    lock = threading.Lock()

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.handle_callback(self.rfile.read(length) if length else b"")

    def do_GET(self):
        _, _, query = self.path.partition("?")
        self.handle_callback(query.encode("latin-1"))

    def handle_callback(self, payload):
        why = verify(self.key, self.headers, payload, self.tolerance)
        msg_id = self.headers.get("webhook-id", "-")
        if why is not None:
            print(f"REJECTED {self.command} webhook-id={msg_id}: {why}", flush=True)
            self.answer(401)
            return
        with self.lock:
            duplicate = msg_id in self.seen
            self.seen.add(msg_id)
        if duplicate:
            print(f"duplicate webhook-id={msg_id} (already handled)", flush=True)
        else:
            params = dict(parse_qsl(payload.decode("latin-1"), keep_blank_values=True))
            print(
                f"verified callback webhook-id={msg_id} method={self.command} "
                f"status={params.get('status', '?')} params={params}",
                flush=True,
            )
        self.answer(200)

    def answer(self, code):
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, fmt, *args):
        pass  # one line per callback is printed above


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--secret-file", required=True, help="the gateway's --callback-secret-file")
    p.add_argument("--listen", default="127.0.0.1:8099", help="host:port (port 0 picks one)")
    p.add_argument("--tolerance", type=int, default=300, help="seconds a timestamp may be off")
    args = p.parse_args()
    try:
        Receiver.key = load_secret(args.secret_file)
    except (OSError, ValueError) as e:
        sys.exit(f"callback_receiver: {e}")
    Receiver.tolerance = args.tolerance
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Receiver)
    print(f"listening on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
