// POST {worker_id?, task_types?, project_id?, limit?} → 200 task {task_id, params, task_type, project_id, …}
// or 204 when nothing is claimable. With `limit`, 200 {tasks: [...]} (possibly empty).
// One SQL statement claims (FOR UPDATE SKIP LOCKED, dependency check inside); RLS scopes a user's claim.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import {
  endpoint,
  json,
  noContent,
  optionalInteger,
  optionalString,
  optionalStringList,
} from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const workerId = optionalString(body, "worker_id") ||
    (caller.userId ? `user:${caller.userId}` : "edge-function");
  const taskTypes = optionalStringList(body, "task_types");
  const projectId = optionalString(body, "project_id");
  const limit = optionalInteger(body, "limit");
  const batch = limit !== null;
  if ((taskTypes !== null && taskTypes.length === 0) || (batch && limit < 1)) {
    return batch ? json({ tasks: [] }) : noContent();
  }
  const rows = await asCaller(
    caller,
    (tx) =>
      tx`select * from claim_next_task(${workerId}, ${taskTypes}::text[],
                                     ${projectId === null ? null : [projectId]}::text[], ${limit ?? 1})`,
  );
  if (batch) return json({ tasks: rows.map(taskJson) });
  return rows.length ? json(taskJson(rows[0])) : noContent();
});

if (import.meta.main) Deno.serve(handler);
