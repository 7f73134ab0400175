#!/usr/bin/env python3
"""A batch through asyncgate, with Python's standard library only: submit
N requests, each with its own Idempotency-Key, send one of them again to
show that a repeat stores nothing, then wait for all of them with bulk
status calls held by `Prefer: wait` instead of polling each one.

    asyncgate demo                                         # in one terminal
    python3 examples/submit_batch.py http://127.0.0.1:8080 # in another

Arguments: [GATEWAY_URL] [N]. GATEWAY_URL defaults to $ASYNCGATE_URL, then
http://127.0.0.1:8080; N (the batch size) to 20. $TOKEN is the
Authorization header (default "Bearer example-token"). $TIMEOUT bounds the
wait in seconds (default 120). $RUN names the batch (default: the time and
the process id): request i has the key batch-<RUN>-<i> and a body made
from RUN and i only, so running again with the same RUN stores nothing new
and answers with the same ids (while the gateway keeps the requests).

Exit status: 0 when every request is done; 2 when some ended `unknown`
(they may have run upstream, and a person must decide; see
docs/operations.md) and none is missing; 1 on anything else (refused,
missing, not finished in time).

The endpoints used here are described in docs/api.md (Idempotency-Key,
bulk status, Prefer: wait).
"""

import json
import math
import os
import sys
import time
import urllib.error
import urllib.request

BULK = "/async_api/v2/requests.json"
BULK_MAX = 1000   # ids per bulk call
WAIT = 30         # seconds each bulk call may be held (capped by --max-wait)


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 303 from the gateway is an answer to read, not to follow."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


OPENER = urllib.request.build_opener(NoRedirects)


def call(method, url, token, body=None, headers=None, timeout=30):
    """Returns (HTTP status, headers, body bytes) for any status; a network
    error is status 0."""
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", token)
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with OPENER.open(req, timeout=timeout) as res:
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as err:  # 3xx, 4xx and 5xx land here
        return err.code, err.headers, err.read()
    except OSError as err:                 # refused, reset, timed out
        return 0, {}, str(err).encode()


def submit(url, token, key, body):
    """Submits one request with its Idempotency-Key. Sending it again with
    the same key is always safe, so a lost answer, a 429 (queue full), a
    503 or a 507 is simply retried; the gateway stores it once."""
    for attempt in range(6):
        code, headers, answer = call("POST", url, token, body, {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        })
        if code == 202:
            return json.loads(answer)["id"], headers["Location"]
        if code not in (0, 429, 503, 507) or attempt == 5:
            sys.exit(f"{key}: not accepted: HTTP {code} {answer.decode(errors='replace')}")
        retry_after = headers.get("Retry-After", "1")
        time.sleep(int(retry_after) if retry_after.isdigit() else 1)
    raise AssertionError("unreachable")


def main():
    gateway = (sys.argv[1] if len(sys.argv) > 1 else
               os.environ.get("ASYNCGATE_URL", "http://127.0.0.1:8080")).rstrip("/")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    if n < 1:
        sys.exit("N must be at least 1")
    token = os.environ.get("TOKEN", "Bearer example-token")
    timeout = float(os.environ.get("TIMEOUT", "120"))
    run = os.environ.get("RUN") or time.strftime("%Y%m%d%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    url = gateway + "/async_api/v2/campaigns.json?fields=id"

    def body(i):
        return json.dumps({"name": f"batch {run} item {i}"}).encode()

    def key(i):
        return f"batch-{run}-{i}"

    # 1. Submit the batch, one key per request. Each 202 means that request
    # is on disk: it will run.
    ids, locations = [], []
    for i in range(n):
        request_id, location = submit(url, token, key(i), body(i))
        ids.append(request_id)
        locations.append(location)
    print(f"submitted: {n} requests, keys {key(0)} .. {key(n - 1)}")

    # 2. Send one again with the same key (as a script would after a lost
    # answer): nothing new is stored, and the answer names the first id.
    i = n // 2
    again, location = submit(url, token, key(i), body(i))
    if (again, location) != (ids[i], locations[i]):
        sys.exit(f"repeat of {key(i)} answered {again} at {location}, "
                 f"not {ids[i]} at {locations[i]}")
    print(f"repeat: {key(i)} sent again, answered with the same id {again} (nothing stored)")

    # 3. Wait for all of them: bulk status calls held until every request
    # asked for is done or unknown, or WAIT seconds pass; then ask again
    # for those still waiting.
    views, missing = {}, []
    waiting = list(dict.fromkeys(ids))
    deadline = time.monotonic() + timeout
    rounds = 0
    while waiting and time.monotonic() < deadline:
        wait = max(1, min(WAIT, math.ceil(deadline - time.monotonic())))
        for start in range(0, len(waiting), BULK_MAX):
            chunk = waiting[start:start + BULK_MAX]
            code, headers, answer = call(
                "POST", gateway + BULK, token, json.dumps({"ids": chunk}).encode(),
                {"Content-Type": "application/json", "Prefer": f"wait={wait}"},
                timeout=wait + 30)
            if code != 200:
                sys.exit(f"bulk status: HTTP {code} {answer.decode(errors='replace')}")
            answer = json.loads(answer)
            for view in answer["items"]:
                views[view["id"]] = view
            missing += answer["not_found"]
        rounds += 1
        waiting = [r for r in waiting if r not in missing
                   and views[r]["status"] not in ("done", "unknown")]
        print(f"round {rounds} (Preference-Applied: {headers.get('Preference-Applied')}): "
              f"{len(ids) - len(waiting) - len(missing)} settled, {len(waiting)} waiting")

    # 4. The summary. A done request's response is at its response_url.
    counts = {"done": 0, "unknown": 0, "missing": 0, "not finished": 0}
    for i, request_id in enumerate(ids):
        view = views.get(request_id)
        if request_id in missing or view is None:
            state, detail = "missing", ""
        elif view["status"] in ("done", "unknown"):
            state = view["status"]
            detail = (f"HTTP {view['response_http_code']}, {view['exec_time']} ms"
                      if state == "done" else "may have run: ask an operator")
            detail += f", {view['attempts']} attempt(s)"
        else:
            state = "not finished"
            detail = f"still {view['status']}, {view.get('ahead', 0)} ahead"
        counts[state] += 1
        print(f"  {i:>4} {request_id} {state}: {detail}")
    print(f"batch: {n} submitted, {counts['done']} done, {counts['unknown']} unknown, "
          f"{counts['missing']} missing, {counts['not finished']} not finished "
          f"({rounds} bulk round(s))")
    if counts["done"] == n:
        return
    sys.exit(2 if counts["unknown"] and counts["done"] + counts["unknown"] == n else 1)


if __name__ == "__main__":
    main()
