// POST {task_id, worker_id} → 200 the task, now In Progress for worker_id whatever state it was left
// in (an orchestrator driving or resuming its steps); 409 when it is Complete.
import { requireServiceRole, resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, json, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  requireServiceRole(caller, "start-task");
  const taskId = requireString(body, "task_id");
  const workerId = requireString(body, "worker_id");
  const [row] = await asCaller(caller, (tx) => tx`select * from start_task(${taskId}, ${workerId})`);
  return json(taskJson(row));
});

if (import.meta.main) Deno.serve(handler);
