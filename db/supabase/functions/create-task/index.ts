// POST {task_id?, params, task_type, project_id?, dependant_on?, priority?} → 200 the new task.
// A user may create tasks only in their own projects (403 otherwise).
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import {
  endpoint,
  HttpError,
  json,
  optionalInteger,
  optionalString,
  requireString,
} from "../_shared/http.ts";

function readParams(value: unknown): Record<string, unknown> {
  // Clients send an object; some send the params as a JSON string.
  let params = value ?? {};
  if (typeof params === "string") {
    try {
      params = JSON.parse(params);
    } catch (error) {
      throw new HttpError(400, `params: is not valid JSON: ${(error as Error).message}`, "params");
    }
  }
  if (params === null || typeof params !== "object" || Array.isArray(params)) {
    throw new HttpError(400, "params: must be a JSON object", "params");
  }
  return params as Record<string, unknown>;
}

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskType = requireString(body, "task_type");
  const params = readParams(body.params);
  const taskId = optionalString(body, "task_id") ?? optionalString(body, "id");
  const dependantOn = optionalString(body, "dependant_on");
  const projectId = optionalString(body, "project_id");
  const priority = optionalInteger(body, "priority") ?? 0;
  if (caller.role === "authenticated" && projectId === null) {
    throw new HttpError(
      400,
      "project_id: is required with a user token (one of your projects)",
      "project_id",
    );
  }
  const [row] = await asCaller(
    caller,
    (tx) =>
      tx`select * from create_task(${taskType}, ${tx.json(params)}::jsonb, ${taskId}, ${dependantOn},
                                 ${projectId}, ${priority})`,
  );
  return json(taskJson(row));
});

if (import.meta.main) Deno.serve(handler);
