// POST {task_id} → 200 {predecessor_id, output_location, status} (output_location null until the
// predecessor is Complete), or 200 null when the task depends on nothing; 404 for an unknown task.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller } from "../_shared/db.ts";
import { endpoint, json, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const rows = await asCaller(caller, (tx) => tx`select * from get_predecessor_output(${taskId})`);
  if (rows.length === 0) return json(null);
  const { predecessor_id, output_location, predecessor_status } = rows[0];
  return json({ predecessor_id, output_location, status: predecessor_status });
});

if (import.meta.main) Deno.serve(handler);
