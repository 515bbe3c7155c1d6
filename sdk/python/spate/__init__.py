"""Python guest SDK for Spate plugins.

A thin, idiomatic layer over the bindings that ``componentize-py`` generates from the
repository's ``wit/spate.wit`` (the ``spate:plugin/event-handler`` world) when a handler
is built; this package keeps no copy of the contract.

A plugin is a module with a top-level ``handle(event)`` function::

    import spate
    from spate import Event, Reject, state

    def handle(event: Event) -> None:
        order = event.json()                      # invalid JSON rejects the event
        if "order_id" not in order:
            raise Reject("order without order_id")
        key = f"count/{event.key_str}"
        n = (state.get_json(key) or 0) + 1
        state.put_json(key, n)
        spate.emit_json("counts", {"key": event.key_str, "n": n}, key=event.key)

Outcomes: returning applies the call's state writes, cache writes and emits together;
``raise Retry(reason)`` discards them and retries the event later with backoff (up to the
manifest's ``retry.max-attempts``, then the dead-letter topic); ``raise Reject(reason)``
discards them and dead-letters the event at once. Any other exception traps the
instance like a Rust panic: it counts as a retryable failure, and its traceback goes
into the dead-letter reason.

Capability checks, limits and the effect journal are the host's: an emit to a topic the
manifest does not declare aborts the call, and nothing the handler wrote is applied.

Outside a Spate sandbox (plain ``python3``, for unit tests of handler logic) the module
imports, but calling the host API raises :class:`HostUnavailable`.
"""

from __future__ import annotations

import json as _json
from typing import Any, List, NamedTuple, Optional, Tuple, Union

try:  # The bindings exist only in a component built by `componentize-py`.
    from componentize_py_types import Err as _Err
    from wit_world.imports import cache as _cache
    from wit_world.imports import emit as _emit
    from wit_world.imports import log as _log
    from wit_world.imports import state as _state
    from wit_world.imports import types as _types

    _IN_SANDBOX = True
except ImportError:  # pragma: no cover - exercised natively only
    _IN_SANDBOX = False

__all__ = [
    "ATTEMPT_HEADER",
    "Event",
    "HostUnavailable",
    "Reject",
    "Retry",
    "cache",
    "emit",
    "emit_json",
    "log",
    "start_workflow",
    "start_workflow_json",
    "state",
]

#: Header carrying the 1-based attempt number of this invocation.
ATTEMPT_HEADER = "spate-attempt"

Bytes = Union[bytes, bytearray, memoryview, str]


class Retry(Exception):
    """A transient failure: the runtime retries the event with backoff, up to the
    plugin's retry limit, then dead-letters it with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reject(Exception):
    """The event can never be handled: it goes to the dead-letter topic at once with
    ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HostUnavailable(RuntimeError):
    """The host API was called outside a Spate sandbox (e.g. in a native unit test)."""


def _host(module: str):
    if not _IN_SANDBOX:
        raise HostUnavailable(
            f"spate.{module} is only available inside a Spate sandbox; build the handler "
            "with `spate plugin build` and run it in the runtime"
        )


def _bytes(value: Bytes, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


def _opt_bytes(value: Optional[Bytes], what: str) -> Optional[bytes]:
    return None if value is None else _bytes(value, what)


def _to_json(value: Any) -> bytes:
    return _json.dumps(value, separators=(",", ":")).encode("utf-8")


class Event:
    """One input event, as read from its topic."""

    __slots__ = ("topic", "partition", "offset", "key", "payload", "headers", "timestamp_ms")

    def __init__(
        self,
        topic: str,
        payload: Bytes = b"",
        *,
        key: Optional[Bytes] = None,
        partition: int = 0,
        offset: int = 0,
        headers: Optional[List[Tuple[str, Bytes]]] = None,
        timestamp_ms: int = 0,
    ) -> None:
        #: Topic the event was read from.
        self.topic: str = topic
        #: Partition of the topic.
        self.partition: int = partition
        #: Offset within the partition.
        self.offset: int = offset
        #: Partition key bytes, or ``None``.
        self.key: Optional[bytes] = _opt_bytes(key, "key")
        #: Event body.
        self.payload: bytes = _bytes(payload, "payload")
        #: ``(name, value)`` pairs in the order they were written.
        self.headers: List[Tuple[str, bytes]] = [
            (n, _bytes(v, "header value")) for n, v in (headers or [])
        ]
        #: Append time, milliseconds since the Unix epoch.
        self.timestamp_ms: int = timestamp_ms

    @classmethod
    def _from_raw(cls, raw: Any) -> "Event":
        return cls(
            raw.topic,
            raw.payload,
            key=raw.key,
            partition=raw.partition,
            offset=raw.offset,
            headers=[(h.name, h.value) for h in raw.headers],
            timestamp_ms=raw.timestamp_ms,
        )

    @property
    def key_str(self) -> Optional[str]:
        """The key as text, or ``None`` if absent or not UTF-8."""
        if self.key is None:
            return None
        try:
            return self.key.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def text(self) -> str:
        """The payload as text; rejects the event if it is not UTF-8."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Reject(f"invalid UTF-8: {e}") from None

    def json(self) -> Any:
        """The payload parsed as JSON; rejects the event if it does not parse (a retry
        would read the same bytes)."""
        try:
            return _json.loads(self.payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise Reject(f"invalid JSON: {e}") from None

    def header(self, name: str) -> Optional[bytes]:
        """The first header named ``name`` (ASCII case-insensitive), or ``None``."""
        lower = name.lower()
        for n, v in self.headers:
            if n.lower() == lower:
                return v
        return None

    def header_str(self, name: str) -> Optional[str]:
        """The first header named ``name`` as text, or ``None`` if absent or not UTF-8."""
        v = self.header(name)
        if v is None:
            return None
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return None

    @property
    def attempt(self) -> int:
        """The 1-based attempt number of this invocation (the ``spate-attempt`` header)."""
        try:
            return max(1, int(self.header_str(ATTEMPT_HEADER) or "1"))
        except ValueError:
            return 1

    def __repr__(self) -> str:
        return (
            f"Event(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"key={self.key!r}, payload={self.payload[:64]!r})"
        )


class Entry(NamedTuple):
    """One key and its value, as returned by :func:`state.scan`."""

    key: str
    value: bytes

    def json(self) -> Any:
        """The value parsed as JSON; rejects the event if it does not parse."""
        return _decode(self.key, self.value)


def _decode(key: str, value: bytes) -> Any:
    try:
        return _json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise Reject(f"state value at `{key}` is not valid JSON: {e}") from None


class _State:
    """Durable key-value state, private to the plugin (the WIT ``state`` interface).

    Keys live in the plugin's own namespace. Writes are journaled and applied only when
    the handler returns; reads in the same call see the call's earlier writes.
    """

    Entry = Entry

    def get(self, key: str) -> Optional[bytes]:
        """The value stored under ``key``, or ``None`` if there is none (or it expired)."""
        _host("state")
        return _state.get(key)

    def get_str(self, key: str) -> Optional[str]:
        """The value under ``key`` as text (lossy UTF-8), or ``None``."""
        v = self.get(key)
        return None if v is None else v.decode("utf-8", "replace")

    def get_json(self, key: str, default: Any = None) -> Any:
        """The value under ``key`` parsed as JSON, or ``default`` if there is none.

        A stored value that is not JSON rejects the event: a retry would read the
        same bytes."""
        v = self.get(key)
        return default if v is None else _decode(key, v)

    def put(self, key: str, value: Bytes, ttl_ms: Optional[int] = None) -> None:
        """Store ``value`` under ``key``; with ``ttl_ms`` it expires after that many ms."""
        _host("state")
        _state.put(key, _bytes(value, "value"), ttl_ms)

    def put_json(self, key: str, value: Any, ttl_ms: Optional[int] = None) -> None:
        """Store ``value`` as JSON under ``key``."""
        self.put(key, _to_json(value), ttl_ms)

    def delete(self, key: str) -> None:
        """Remove ``key``. Removing a missing key is not an error."""
        _host("state")
        _state.delete(key)

    def compare_and_swap(
        self,
        key: str,
        expected: Optional[Bytes],
        new: Optional[Bytes],
        ttl_ms: Optional[int] = None,
    ) -> bool:
        """Replace the value of ``key`` with ``new`` (remove it when ``None``) only if
        its current value equals ``expected`` (``None``: the key must be absent).
        Returns whether the swap happened; the host re-checks the condition when it
        applies the journal and retries the event if it no longer holds."""
        _host("state")
        return _state.compare_and_swap(
            key, _opt_bytes(expected, "expected"), _opt_bytes(new, "new"), ttl_ms
        )

    def scan(self, prefix: str, limit: int = 100) -> List[Entry]:
        """Up to ``limit`` entries whose keys start with ``prefix``, in key order."""
        _host("state")
        return [Entry(e.key, e.value) for e in _state.scan(prefix, limit)]


class _Cache:
    """A fast cache with expiry, private to the plugin (the WIT ``cache`` interface).

    Writes are journaled like state writes. A cache may forget anything at any time:
    keep the source of truth in :data:`state`."""

    def get(self, key: str) -> Optional[bytes]:
        """The cached value of ``key``, or ``None`` if absent or expired."""
        _host("cache")
        return _cache.get(key)

    def get_json(self, key: str) -> Any:
        """The cached value parsed as JSON, or ``None`` if absent, expired or unreadable
        (an unreadable entry is logged at warn and treated as a miss)."""
        v = self.get(key)
        if v is None:
            return None
        try:
            return _json.loads(v)
        except (ValueError, UnicodeDecodeError) as e:
            log.warn(f"cache value at `{key}` is not valid JSON, treating as a miss: {e}")
            return None

    def set(self, key: str, value: Bytes, ttl_ms: int) -> None:
        """Cache ``value`` under ``key`` for ``ttl_ms`` milliseconds."""
        _host("cache")
        _cache.set(key, _bytes(value, "value"), ttl_ms)

    def set_json(self, key: str, value: Any, ttl_ms: int) -> None:
        """Cache ``value`` as JSON under ``key`` for ``ttl_ms`` milliseconds."""
        self.set(key, _to_json(value), ttl_ms)

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        _host("cache")
        _cache.delete(key)

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the counter at ``key`` (missing counts as 0); the new value."""
        _host("cache")
        return _cache.incr(key, delta)


class _Log:
    """Log lines into the runtime's log, tagged with the plugin (the WIT ``log``
    interface). Unlike effects, log lines are written even when the handler fails."""

    def _write(self, level: str, message: str) -> None:
        _host("log")
        _log.log(getattr(_types.Level, level), str(message))

    def trace(self, message: str) -> None:
        """Very detailed diagnostics."""
        self._write("TRACE", message)

    def debug(self, message: str) -> None:
        """Diagnostics while developing a handler."""
        self._write("DEBUG", message)

    def info(self, message: str) -> None:
        """Normal operation."""
        self._write("INFO", message)

    def warn(self, message: str) -> None:
        """Something unexpected the handler recovered from."""
        self._write("WARN", message)

    def error(self, message: str) -> None:
        """Something failed."""
        self._write("ERROR", message)


#: Durable state: ``state.get(key)``, ``state.put_json(key, value)``, ...
state = _State()
#: The cache: ``cache.get_json(key)``, ``cache.set_json(key, value, ttl_ms)``, ...
cache = _Cache()
#: Logging: ``log.info("...")``.
log = _Log()


def _headers(headers: Optional[List[Tuple[str, Bytes]]]) -> list:
    return [_types.Header(name, _bytes(v, "header value")) for name, v in (headers or [])]


def emit(
    topic: str,
    payload: Bytes,
    *,
    key: Optional[Bytes] = None,
    headers: Optional[List[Tuple[str, Bytes]]] = None,
) -> None:
    """Publish ``payload`` on ``topic``, partitioned by ``key``, when the handler returns.

    The topic must be in the manifest's ``capabilities.emit-topics``."""
    _host("emit")
    _emit.emit(topic, _opt_bytes(key, "key"), _bytes(payload, "payload"), _headers(headers))


def emit_json(
    topic: str,
    value: Any,
    *,
    key: Optional[Bytes] = None,
    headers: Optional[List[Tuple[str, Bytes]]] = None,
) -> None:
    """Publish ``value`` serialized as JSON on ``topic``."""
    emit(topic, _to_json(value), key=key, headers=headers)


def start_workflow(name: str, id: str, input: Bytes) -> None:  # noqa: A002 - WIT names
    """Start the workflow ``name`` for run ``id`` with ``input``.

    Starting the same ``id`` twice is one run, so a retried event never starts a
    duplicate: derive ``id`` from the input (an order id), not from a counter."""
    _host("emit")
    _emit.start_workflow(name, id, _bytes(input, "input"))


def start_workflow_json(name: str, id: str, value: Any) -> None:  # noqa: A002
    """Start the workflow ``name`` for run ``id`` with ``value`` serialized as JSON."""
    start_workflow(name, id, _to_json(value))


def _export(handle: Any) -> type:
    """The class ``componentize-py`` exports as ``spate:plugin/handler``, calling the
    plugin module's ``handle(event)``. Used by the generated build entry module."""
    if not callable(handle):
        raise TypeError("the handler module must define a function `handle(event)`")

    class Handler:
        def handle(self, raw: Any) -> None:
            try:
                handle(Event._from_raw(raw))
            except Retry as e:
                raise _Err(_types.HandleError_Retry(e.reason)) from None
            except Reject as e:
                raise _Err(_types.HandleError_Reject(e.reason)) from None

    return Handler
