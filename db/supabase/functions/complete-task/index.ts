// POST {task_id, output_location} or {task_id, file_data (base64), filename} [, worker_id] [, result]
// → 200 the task. `result` (a JSON object: model, seed, timings…) is stored with the row.
// With file_data the file goes to Supabase Storage (bucket image_uploads, object {task_id}/{filename})
// and output_location becomes its public URL. Only a task In Progress (and, with worker_id, that
// worker's claim) completes: 409 otherwise; 404 when the caller cannot see the task.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, HttpError, json, optionalString, requireString } from "../_shared/http.ts";
import {
  decodeBase64File,
  maxUploadBodyBytes,
  sanitizeFilename,
  uploadToStorage,
} from "../_shared/storage.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const workerId = optionalString(body, "worker_id");
  let outputLocation = optionalString(body, "output_location");
  const fileData = optionalString(body, "file_data");
  const result = body.result ?? null;
  if (result !== null && (typeof result !== "object" || Array.isArray(result))) {
    throw new HttpError(400, "result: must be a JSON object", "result");
  }
  if (outputLocation === null && fileData === null) {
    throw new HttpError(
      400,
      "file_data: give file_data (base64) and filename, or output_location",
      "file_data",
    );
  }
  if (fileData !== null) {
    const filename = sanitizeFilename(requireString(body, "filename"));
    const bytes = decodeBase64File(fileData);
    // Check the caller may complete this task before uploading anything.
    await asCaller(caller, (tx) => tx`select hwgp_check_completable(${taskId}, ${workerId})`);
    outputLocation = await uploadToStorage(`${taskId}/${filename}`, bytes);
  }
  const [row] = await asCaller(
    caller,
    (tx) => tx`select * from complete_task(${taskId}, ${outputLocation}, ${workerId}, ${result}::jsonb)`,
  );
  return json(taskJson(row));
}, maxUploadBodyBytes);

if (import.meta.main) Deno.serve(handler);
