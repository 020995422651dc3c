// Uploads for complete-task's `file_data`: Supabase Storage's object API
// (`POST {storage}/object/image_uploads/{task_id}/{filename}` with the service key), public URL
// `{SUPABASE_URL}/storage/v1/object/public/image_uploads/{task_id}/{filename}` as the original.
// `{storage}` is HWGP_STORAGE_URL when set, else `{SUPABASE_URL}/storage/v1`; the bucket HWGP_VIDEO_BUCKET.
// (Function secrets may not start with SUPABASE_: that prefix is the platform's.)

import { HttpError } from "./http.ts";
import { decodesAsJpeg } from "./thumbnails.ts";

const BUCKET = Deno.env.get("HWGP_VIDEO_BUCKET") ?? "image_uploads";
const MAX_UPLOAD_BYTES = Number(Deno.env.get("HWGP_MAX_UPLOAD_BYTES") ?? String(200 * 1024 * 1024));

// A first frame (complete-task's first_frame_data) is a thumbnail, not an output: a smaller cap.
const MAX_THUMBNAIL_BYTES = Number(Deno.env.get("HWGP_MAX_THUMBNAIL_BYTES") ?? String(10 * 1024 * 1024));

/** The largest complete-task body: a base64 file of MAX_UPLOAD_BYTES and a base64 first frame of
 * MAX_THUMBNAIL_BYTES (each 4/3 larger), and their fields. */
export function maxUploadBodyBytes(): number {
  return Math.ceil((MAX_UPLOAD_BYTES + MAX_THUMBNAIL_BYTES) * 4 / 3) + 64 * 1024;
}

const CONTENT_TYPES: Record<string, string> = {
  mp4: "video/mp4",
  webm: "video/webm",
  mov: "video/quicktime",
  png: "image/png",
  jpg: "image/jpeg",
  jpeg: "image/jpeg",
  webp: "image/webp",
  gif: "image/gif",
  json: "application/json",
};

/** Keeps letters, digits, '.', '_' and '-'; no path parts, no leading dots. */
export function sanitizeFilename(name: string): string {
  const base = name.split(/[\\/]/).pop() ?? "";
  const clean = base.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^[._]+/, "").slice(0, 200);
  if (clean === "" || !/[A-Za-z0-9]/.test(clean)) {
    throw new HttpError(400, `filename: ${JSON.stringify(name)} has no usable characters`, "filename");
  }
  return clean;
}

/** The bytes of a base64 field (`file_data`, `first_frame_data`); 400 naming it when it is not base64,
 * empty, or over `maxBytes` (checked on the text's length before anything is decoded). */
export function decodeBase64File(
  data: string,
  field = "file_data",
  maxBytes = MAX_UPLOAD_BYTES,
): Uint8Array<ArrayBuffer> {
  const text = data.replace(/\s+/g, "");
  if (Math.floor(text.length / 4) * 3 > maxBytes + 2) {
    throw new HttpError(
      400,
      `${field}: about ${Math.floor(text.length / 4) * 3} bytes; the limit is ${maxBytes}`,
      field,
    );
  }
  let binary: string;
  try {
    binary = atob(text);
  } catch (_error) {
    throw new HttpError(400, `${field}: is not valid base64`, field);
  }
  if (binary.length === 0) throw new HttpError(400, `${field}: is empty`, field);
  if (binary.length > maxBytes) {
    throw new HttpError(400, `${field}: ${binary.length} bytes; the limit is ${maxBytes}`, field);
  }
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

/** A first frame from complete-task's `first_frame_data`: base64 of a JPEG (the original worker sends
 * `thumb_{id8}.jpg`), at most HWGP_MAX_THUMBNAIL_BYTES. 400 naming the field otherwise. */
export function decodeFirstFrame(data: string): Uint8Array<ArrayBuffer> {
  const bytes = decodeBase64File(data, "first_frame_data", MAX_THUMBNAIL_BYTES);
  if (!decodesAsJpeg(bytes)) {
    throw new HttpError(
      400,
      "first_frame_data: is not a JPEG image (it does not decode as one)",
      "first_frame_data",
    );
  }
  return bytes;
}

export async function uploadToStorage(objectPath: string, bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const projectUrl = (Deno.env.get("SUPABASE_URL") ?? "").replace(/\/+$/, "");
  const serviceKey = Deno.env.get("SUPABASE_SERVICE_ROLE_KEY");
  if (!projectUrl || !serviceKey) throw new Error("uploads need SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY");
  const storageUrl = (Deno.env.get("HWGP_STORAGE_URL") ?? `${projectUrl}/storage/v1`).replace(/\/+$/, "");
  const ext = objectPath.split(".").pop()?.toLowerCase() ?? "";
  const encoded = objectPath.split("/").map(encodeURIComponent).join("/");
  const response = await fetch(`${storageUrl}/object/${BUCKET}/${encoded}`, {
    method: "POST",
    headers: {
      Authorization: `Bearer ${serviceKey}`,
      apikey: serviceKey,
      "Content-Type": CONTENT_TYPES[ext] ?? "application/octet-stream",
      "x-upsert": "true",
    },
    body: bytes,
  });
  if (!response.ok) {
    throw new HttpError(
      502,
      `storage upload of ${objectPath} failed: HTTP ${response.status} ${await response.text()}`,
    );
  }
  return `${projectUrl}/storage/v1/object/public/${BUCKET}/${encoded}`;
}
