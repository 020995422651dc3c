// POST {task_id} → 200 the cancelled task; 409 when it already finished.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, json, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const [row] = await asCaller(caller, (tx) => tx`select * from cancel_task(${taskId})`);
  return json(taskJson(row));
});

if (import.meta.main) Deno.serve(handler);
