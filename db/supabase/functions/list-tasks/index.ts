// POST {status?, task_type?, project_id?, limit?, offset?} → 200 [task…], newest first.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, json, optionalInteger, optionalString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const status = optionalString(body, "status");
  const taskType = optionalString(body, "task_type");
  const projectId = optionalString(body, "project_id");
  const limit = optionalInteger(body, "limit") ?? 100;
  const offset = optionalInteger(body, "offset") ?? 0;
  const rows = await asCaller(
    caller,
    (tx) => tx`select * from list_tasks(${status}, ${taskType}, ${projectId}, ${limit}, ${offset})`,
  );
  return json(rows.map(taskJson));
});

if (import.meta.main) Deno.serve(handler);
