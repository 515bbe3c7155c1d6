// {{name}}: a Spate plugin. Counts the events of each key in state, emits the running
// count to `counts`, and starts the `milestone` workflow every 100th event of a key.
//
// Build with `spate plugin build`, deploy with `spate plugin deploy`.

import { Reject, emitJson, startWorkflowJson, state } from "spate";

export function handle(event) {
  const key = event.keyString;
  if (key === undefined) throw new Reject("events must be keyed");
  // Reads see this call's own writes; every write applies only if we return normally.
  const n = (state.getJson(`count/${key}`) ?? 0) + 1;
  state.putJson(`count/${key}`, n);
  emitJson("counts", { key, count: n }, { key });
  if (n % 100 === 0) {
    // The run id names this milestone: a retried event never starts it twice.
    startWorkflowJson("milestone", `${key}/${n}`, n);
  }
}
