// POST {task_id, worker_id} → 200 {ok}: false when the task is no longer this worker's to run.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller } from "../_shared/db.ts";
import { endpoint, json, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const workerId = requireString(body, "worker_id");
  const [row] = await asCaller(caller, (tx) => tx`select heartbeat_task(${taskId}, ${workerId}) as ok`);
  return json({ ok: row.ok });
});

if (import.meta.main) Deno.serve(handler);
