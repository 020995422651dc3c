// POST {task_types?} → 200 {status: count} over the tasks the caller can see.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller } from "../_shared/db.ts";
import { endpoint, json, optionalStringList } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskTypes = optionalStringList(body, "task_types");
  const rows = await asCaller(
    caller,
    (tx) => tx`select status, n from count_tasks_by_status(${taskTypes}::text[])`,
  );
  return json(Object.fromEntries(rows.map((r) => [r.status, Number(r.n)])));
});

if (import.meta.main) Deno.serve(handler);
