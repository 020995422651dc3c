// POST {task_id, worker_id, progress (0..1), message?} → 200 {ok} (also a heartbeat).
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller } from "../_shared/db.ts";
import { endpoint, HttpError, json, optionalNumber, optionalString, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const workerId = requireString(body, "worker_id");
  const progress = optionalNumber(body, "progress");
  if (progress === null) throw new HttpError(400, "progress: is required (a number in [0, 1])", "progress");
  const message = optionalString(body, "message");
  const [row] = await asCaller(
    caller,
    (tx) => tx`select set_task_progress(${taskId}, ${workerId}, ${progress}, ${message}) as ok`,
  );
  return json({ ok: row.ok });
});

if (import.meta.main) Deno.serve(handler);
