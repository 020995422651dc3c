// POST {task_id, output_location} or {task_id, file_data (base64), filename} [, worker_id] [, result]
//      [, first_frame_data (base64 JPEG), first_frame_filename] [, thumbnail_url]
// → 200 the task, plus `public_url` (its output_location) and `thumbnail_url` as the original answered.
// `result` (a JSON object: model, seed, timings…) is stored with the row.
// With file_data the file goes to Supabase Storage (bucket image_uploads, object {task_id}/{filename})
// and output_location becomes its public URL. The original worker's first frame (first_frame_data /
// first_frame_filename, both or neither) goes to {task_id}/thumbnails/{first_frame_filename}; an image
// sent as file_data without one gets a third-size JPEG (quality 80) made here, as the original's
// complete-task does. The thumbnail's URL (or `thumbnail_url`, given by a worker that stored its own)
// is written into the task's params by the same statement that completes it (complete_task: under
// full_orchestrator_payload for travel_stitch, orchestrator_details for wan_2_2_i2v, else top level).
// Only a task In Progress (and, with worker_id, that worker's claim) completes: 409 otherwise; 404 when
// the caller cannot see the task. Nothing is uploaded before the body is checked and the task completable.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller, taskJson } from "../_shared/db.ts";
import { endpoint, HttpError, json, optionalString, requireString } from "../_shared/http.ts";
import {
  decodeBase64File,
  decodeFirstFrame,
  maxUploadBodyBytes,
  sanitizeFilename,
  uploadToStorage,
} from "../_shared/storage.ts";
import { imageThumbnail } from "../_shared/thumbnails.ts";

const IMAGE_EXTENSIONS = new Set(["png", "jpg", "jpeg", "webp", "gif"]);

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const taskId = requireString(body, "task_id");
  const workerId = optionalString(body, "worker_id");
  let outputLocation = optionalString(body, "output_location");
  const fileData = optionalString(body, "file_data");
  let thumbnailUrl = optionalString(body, "thumbnail_url");
  const firstFrameData = optionalString(body, "first_frame_data");
  const firstFrameName = optionalString(body, "first_frame_filename");
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
  // The original's pairing rule: a first frame comes with its name and a name with its frame.
  if (firstFrameData !== null && firstFrameName === null) {
    throw new HttpError(
      400,
      "first_frame_filename: is required with first_frame_data",
      "first_frame_filename",
    );
  }
  if (firstFrameName !== null && firstFrameData === null) {
    throw new HttpError(400, "first_frame_data: is required with first_frame_filename", "first_frame_data");
  }
  if (firstFrameData !== null && thumbnailUrl !== null) {
    throw new HttpError(
      400,
      "thumbnail_url: give first_frame_data or thumbnail_url, not both",
      "thumbnail_url",
    );
  }
  if (thumbnailUrl === "") throw new HttpError(400, "thumbnail_url: must not be empty", "thumbnail_url");

  // Decode and check everything before uploading anything.
  const filename = fileData !== null ? sanitizeFilename(requireString(body, "filename")) : null;
  const bytes = fileData !== null ? decodeBase64File(fileData) : null;
  let frameName: string | null = null;
  let frame: Uint8Array<ArrayBuffer> | null = null;
  if (firstFrameData !== null && firstFrameName !== null) {
    frameName = sanitizeFilename(firstFrameName);
    if (!/\.jpe?g$/i.test(frameName)) {
      throw new HttpError(
        400,
        `first_frame_filename: ${
          JSON.stringify(firstFrameName)
        } must end in .jpg or .jpeg (the frame is a JPEG)`,
        "first_frame_filename",
      );
    }
    frame = decodeFirstFrame(firstFrameData);
  }
  if (bytes !== null || frame !== null) {
    // Check the caller may complete this task before uploading anything.
    await asCaller(caller, (tx) => tx`select hwgp_check_completable(${taskId}, ${workerId})`);
  }
  if (bytes !== null && filename !== null) {
    outputLocation = await uploadToStorage(`${taskId}/${filename}`, bytes);
    const extension = filename.split(".").pop()?.toLowerCase() ?? "";
    if (frame === null && thumbnailUrl === null && IMAGE_EXTENSIONS.has(extension)) {
      // The original's image thumbnail; when it cannot be made, the image itself stands in (as there).
      const thumbnail = imageThumbnail(bytes);
      thumbnailUrl = thumbnail === null
        ? outputLocation
        : await uploadToStorage(`${taskId}/thumbnails/thumb_${taskId.slice(0, 8)}.jpg`, thumbnail);
    }
  }
  if (frame !== null && frameName !== null) {
    thumbnailUrl = await uploadToStorage(`${taskId}/thumbnails/${frameName}`, frame);
  }
  const [row] = await asCaller(
    caller,
    (tx) =>
      tx`select * from complete_task(${taskId}, ${outputLocation}, ${workerId}, ${result}::jsonb, ${thumbnailUrl})`,
  );
  return json({ ...taskJson(row), public_url: row.output_location, thumbnail_url: thumbnailUrl });
}, maxUploadBodyBytes);

if (import.meta.main) Deno.serve(handler);
