// POST {older_than_s, max_attempts?} → 200 [task…] changed: stale claims requeued, or failed once
// their attempts ran out, then their queued dependants failed.
import { requireServiceRole, resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, HttpError, json, optionalInteger, optionalNumber } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  requireServiceRole(caller, "requeue-stale-tasks");
  const olderThan = optionalNumber(body, "older_than_s");
  if (olderThan === null || olderThan < 0) {
    throw new HttpError(400, "older_than_s: is required (seconds, 0 or more)", "older_than_s");
  }
  const maxAttempts = optionalInteger(body, "max_attempts") ?? 3;
  const rows = await asCaller(
    caller,
    (tx) => tx`select * from requeue_stale_tasks(${olderThan}, ${maxAttempts})`,
  );
  return json(rows.map(taskJson));
});

if (import.meta.main) Deno.serve(handler);
