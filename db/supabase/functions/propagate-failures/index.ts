// POST {} → 200 [task…]: queued tasks whose dependency failed, was cancelled or is missing, now Failed.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, json } from "../_shared/http.ts";

export const handler = endpoint(async (req, _body) => {
  const caller = await resolveCaller(req);
  const rows = await asCaller(caller, (tx) => tx`select * from propagate_task_failures()`);
  return json(rows.map(taskJson));
});

if (import.meta.main) Deno.serve(handler);
