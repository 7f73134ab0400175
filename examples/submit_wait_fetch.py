#!/usr/bin/env python3
"""A client's whole job against asyncgate, with Python's standard library
only: submit a request, poll its status until it is done, fetch the stored
response.

    asyncgate demo                                            # in one terminal
    python3 examples/submit_wait_fetch.py http://127.0.0.1:8080   # in another

Arguments: [GATEWAY_URL] [PATH]. GATEWAY_URL defaults to $ASYNCGATE_URL,
then http://127.0.0.1:8080; PATH to /async_api/v2/campaigns.json?fields=id.
$TOKEN is the Authorization header (default "Bearer example-token"): only
the credential that submitted a request can see it. $TIMEOUT bounds the
wait in seconds (default 60).

Exit status: 0 with the response printed; 2 when the request ended
`unknown` (it may have run upstream, and a person must decide; see
docs/operations.md); 1 on anything else.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """The 303 of a done request is an answer to read, not to follow."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


OPENER = urllib.request.build_opener(NoRedirects)


def call(method, url, token, body=None, content_type=None):
    """Returns (HTTP status, headers, body bytes) for any status."""
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", token)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with OPENER.open(req, timeout=30) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as err:  # 3xx, 4xx and 5xx land here
        return err.code, err.headers, err.read()


def absolute(gateway, url):
    """A path the gateway gave, under the gateway's URL (as in the bash
    script); an absolute URL (from --public-url) as it is."""
    return url if url.startswith(("http://", "https://")) else gateway + url


def main():
    gateway = (sys.argv[1] if len(sys.argv) > 1 else
               os.environ.get("ASYNCGATE_URL", "http://127.0.0.1:8080")).rstrip("/")
    path = sys.argv[2] if len(sys.argv) > 2 else "/async_api/v2/campaigns.json?fields=id"
    token = os.environ.get("TOKEN", "Bearer example-token")
    timeout = float(os.environ.get("TIMEOUT", "60"))

    # 1. Submit. 202 means the request is on disk: it will run.
    code, headers, body = call("POST", gateway + path, token,
                               json.dumps({"name": "example"}).encode(), "application/json")
    if code != 202:
        sys.exit(f"not accepted: HTTP {code} {body.decode(errors='replace')}")
    print("accepted:", body.decode())
    status_url = absolute(gateway, headers["Location"])

    # 2. Poll the status: 200 while enqueued or started, 303 once done.
    deadline = time.monotonic() + timeout
    while True:
        code, headers, body = call("GET", status_url, token)
        view = json.loads(body) if body else {}
        state = view.get("status")
        if code == 303 and state == "done":
            break
        if code == 200 and state == "unknown":
            print("unknown: the gateway lost track after sending; ask an operator:",
                  body.decode(), file=sys.stderr)
            sys.exit(2)
        if code != 200 or state not in ("enqueued", "started"):
            sys.exit(f"unexpected status answer: HTTP {code} {body.decode(errors='replace')}")
        if time.monotonic() >= deadline:
            sys.exit(f"not done after {timeout:g}s: {body.decode()}")
        time.sleep(0.5)
    print("done:", body.decode())

    # 3. Fetch the stored response: the upstream's status, headers and body.
    # response_url is a path, or an absolute URL under --public-url.
    response_url = absolute(gateway, view["response_url"])
    code, headers, body = call("GET", response_url, token)
    print(f"response: HTTP {code}, {headers.get('Content-Type')}")
    print(body.decode(errors="replace"))


if __name__ == "__main__":
    main()
