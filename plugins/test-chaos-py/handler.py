"""Test plugin for the end-to-end tests of Python guests: each event's JSON payload
``{"op": ...}`` picks what it does (the ops table is in README.md)."""

import spate
from spate import Event, Reject, Retry, state


def handle(event: Event) -> None:
    req = event.json()
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise Reject("test-chaos-py payload must be an object with a string `op`")
    op = req["op"]
    topic = req.get("topic", "out")
    ident = req.get("id") or event.key_str or f"{event.partition}-{event.offset}"

    def out(value):
        if "seq" in req:
            value["seq"] = req["seq"]
        spate.emit_json(topic, value, key=event.key)

    if op == "emit":
        out({"n": req.get("n", 0), "lang": "python"})
    elif op == "flaky":
        succeed_on = int(req.get("succeed-on", 2))
        attempt = event.attempt
        # Made on every attempt; only the successful attempt's may be applied.
        state.put(f"flaky/{ident}", str(attempt))
        out({"attempt": attempt})
        if attempt < succeed_on:
            raise Retry(f"flaky: attempt {attempt}, succeeds on {succeed_on}")
    elif op == "get":
        out({"key": req["key"], "value": state.get_str(req["key"])})
    elif op == "retry":
        raise Retry(req.get("reason", "retry requested by test-chaos-py"))
    elif op == "reject":
        raise Reject(req.get("reason", "rejected by test-chaos-py"))
    elif op == "raise":
        raise ValueError("test-chaos-py: exception requested")
    elif op == "loop":
        n = 0
        while True:
            n += 1
    elif op == "membomb":
        chunks = []
        limit = req.get("alloc-mb")
        while limit is None or len(chunks) < limit:
            chunks.append(bytearray(1 << 20))
        out({"allocated_mb": len(chunks)})
    elif op == "wasi":
        out({"file": _try(lambda: open("/etc/passwd").read(16)),
             "listdir": _try(lambda: __import__("os").listdir("/")),
             "env": dict(__import__("os").environ),
             "socket": _try(_connect)})
    elif op == "fetch":
        # There is no network: the socket module is not even built in, so this raises
        # (and traps, as any uncaught exception does).
        _connect()
        out({"fetched": True})
    else:
        raise Reject(f"test-chaos-py: unknown op `{op}`")


def _connect():
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", 9))
    return "connected"


def _try(f):
    """``{"ok": value}`` or ``{"error": "<type>: <message>"}``."""
    try:
        return {"ok": f()}
    except BaseException as e:  # noqa: BLE001 - the test wants whatever was raised
        return {"error": f"{type(e).__name__}: {e}"}
