"""Loaded by schemathesis (SCHEMATHESIS_HOOKS) in test_schemathesis.py."""

import schemathesis


@schemathesis.check
def no_unplanned_server_error(ctx, response, case):
    """Any 5xx fails, except the 504 a client asks for by giving a deadline too short to meet."""
    if response.status_code < 500:
        return
    asked_for_deadline = "x-request-timeout" in {k.lower() for k in (case.headers or {})}
    if response.status_code == 504 and asked_for_deadline and response.json().get("error_type") == "deadline_exceeded":
        return
    raise AssertionError(f"server error {response.status_code}: {response.text[:300]}")
