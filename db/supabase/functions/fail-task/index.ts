// POST {task_id, error_message, worker_id?, retryable?, max_attempts?} → 200 the task (Failed, or
// Queued again when retryable with attempts left). Queued dependants fail naming it.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import {
  endpoint,
  json,
  optionalBoolean,
  optionalInteger,
  optionalString,
  requireString,
} from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const message = optionalString(body, "error_message") ?? "";
  const workerId = optionalString(body, "worker_id");
  const retryable = optionalBoolean(body, "retryable") ?? false;
  const maxAttempts = optionalInteger(body, "max_attempts") ?? 3;
  const [row] = await asCaller(
    caller,
    (tx) => tx`select * from fail_task(${taskId}, ${message}, ${workerId}, ${retryable}, ${maxAttempts})`,
  );
  return json(taskJson(row));
});

if (import.meta.main) Deno.serve(handler);
