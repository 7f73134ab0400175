"""schemathesis hooks for tools/fuzz-api/run: the one check the built-in
ones cannot express. A 5xx is a failure unless the contract names it: 502
response_too_large, 503 store_unavailable, 507 insufficient_storage (all in
the gateway's JSON error shape), or a stored upstream answer replayed as it
was received (a response path, or a submission answered with its response
under Prefer: respond-async, wait=N: it carries Content-Location)."""

import json

import schemathesis

DOCUMENTED = {502: "response_too_large", 503: "store_unavailable", 507: "insufficient_storage"}


def _replayed(response, case):
    path = case.operation.path
    if path == "/async_api/v2/responses/{id}.json":
        return True
    return path == "/async_api/{rest}" and "Content-Location" in response.headers


@schemathesis.check
def only_documented_server_errors(ctx, response, case):
    status = response.status_code
    if status < 500 or _replayed(response, case):
        return None
    code = None
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        pass
    if DOCUMENTED.get(status) != code:
        raise AssertionError(
            f"undocumented server error {status} (error code {code!r}): "
            f"{response.content[:300]!r}"
        )
    return None
