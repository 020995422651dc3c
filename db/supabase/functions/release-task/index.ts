// POST {task_id, worker_id, reason} → 200 {ok}: the claim goes back to the queue without spending an attempt.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller } from "../_shared/db.ts";
import { endpoint, json, optionalString, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const workerId = requireString(body, "worker_id");
  const reason = optionalString(body, "reason");
  const [row] = await asCaller(
    caller,
    (tx) => tx`select release_task(${taskId}, ${workerId}, ${reason}) as ok`,
  );
  return json({ ok: row.ok });
});

if (import.meta.main) Deno.serve(handler);
