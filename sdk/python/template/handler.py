"""{{name}}: a Spate plugin. Counts the events of each key in state, emits the running
count to ``counts``, and starts the ``milestone`` workflow every 100th event of a key.

Build with ``spate plugin build``, deploy with ``spate plugin deploy``.
"""

import spate
from spate import Event, Reject, state


def handle(event: Event) -> None:
    key = event.key_str
    if key is None:
        raise Reject("events must be keyed")
    # Reads see this call's own writes; every write applies only if we return normally.
    n = (state.get_json(f"count/{key}") or 0) + 1
    state.put_json(f"count/{key}", n)
    spate.emit_json("counts", {"key": key, "count": n}, key=key)
    if n % 100 == 0:
        # The run id names this milestone: a retried event never starts it twice.
        spate.start_workflow_json("milestone", f"{key}/{n}", n)
