// POST {task_id, status, output_location?} → 200 the task. `Failed` takes its message from
// output_location (as the original stored it) and fails queued dependants; finished tasks: 409.
import { requireServiceRole, resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, json, optionalString, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  requireServiceRole(caller, "update-task-status");
  const taskId = requireString(body, "task_id");
  const status = requireString(body, "status");
  const outputLocation = optionalString(body, "output_location");
  const [row] = await asCaller(
    caller,
    (tx) => tx`select * from update_task_status(${taskId}, ${status}, ${outputLocation})`,
  );
  return json(taskJson(row));
});

if (import.meta.main) Deno.serve(handler);
