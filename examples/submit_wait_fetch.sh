#!/usr/bin/env bash
# A client's whole job against asyncgate, with bash and curl only: submit a
# request, poll its status until it is done, fetch the stored response.
#
#     asyncgate demo                                   # in one terminal
#     examples/submit_wait_fetch.sh http://127.0.0.1:8080    # in another
#
# Arguments: [GATEWAY_URL] [PATH]. GATEWAY_URL defaults to $ASYNCGATE_URL,
# then http://127.0.0.1:8080; PATH to /async_api/v2/campaigns.json?fields=id.
# $TOKEN is the Authorization header (default "Bearer example-token"):
# only the credential that submitted a request can see it. $TIMEOUT bounds
# the wait in seconds (default 60).
#
# Exit status: 0 with the response printed; 2 when the request ended
# `unknown` (it may have run upstream, and a person must decide; see
# docs/operations.md); 1 on anything else.
set -euo pipefail

gateway=${1:-${ASYNCGATE_URL:-http://127.0.0.1:8080}}
gateway=${gateway%/}
path=${2:-/async_api/v2/campaigns.json?fields=id}
token=${TOKEN:-Bearer example-token}
timeout=${TIMEOUT:-60}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The value of header $1 in the header dump $2 (the last one, if repeated).
header() { tr -d '\r' <"$2" | sed -n "s/^$1: *//Ip" | tail -n1; }
# The string field $1 of the JSON object in file $2 (a top-level field
# whose name appears once: good enough for the gateway's status views).
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" "$2"; }

# 1. Submit. 202 means the request is on disk: it will run.
code=$(curl -sS -o "$scratch/body" -D "$scratch/head" -w '%{http_code}' \
    -X POST "$gateway$path" \
    -H "Authorization: $token" \
    -H 'Content-Type: application/json' \
    -d '{"name": "example"}')
if [ "$code" != 202 ]; then
    echo "not accepted: HTTP $code $(cat "$scratch/body")" >&2
    exit 1
fi
status_path=$(header location "$scratch/head")
echo "accepted: $(cat "$scratch/body")"

# 2. Poll the status: 200 while enqueued or started, 303 once done.
deadline=$((SECONDS + timeout))
while :; do
    code=$(curl -sS -o "$scratch/body" -D "$scratch/head" -w '%{http_code}' \
        -H "Authorization: $token" "$gateway$status_path")
    status=$(field status "$scratch/body")
    case "$code/$status" in
    303/done) break ;;
    200/enqueued | 200/started) ;;
    200/unknown)
        echo "unknown: the gateway lost track after sending; ask an operator: $(cat "$scratch/body")" >&2
        exit 2
        ;;
    *)
        echo "unexpected status answer: HTTP $code $(cat "$scratch/body")" >&2
        exit 1
        ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "not done after ${timeout}s: $(cat "$scratch/body")" >&2
        exit 1
    fi
    sleep 0.5
done
echo "done: $(cat "$scratch/body")"

# 3. Fetch the stored response: the upstream's status, headers and body.
# The 303's Location is its path, or an absolute URL under --public-url.
response=$(header location "$scratch/head")
case "$response" in
http://* | https://*) ;;
*) response="$gateway$response" ;;
esac
code=$(curl -sS -o "$scratch/body" -D "$scratch/head" -w '%{http_code}' \
    -H "Authorization: $token" "$response")
echo "response: HTTP $code, $(header content-type "$scratch/head")"
cat "$scratch/body"
echo
