// Request handling shared by every edge function: method check, JSON body, field readers, errors.
//
// Error contract (docs/compatibility.md): 400 bad body, 401 no bearer token, 403 bad token / not the owner,
// 404 no such task, 405 not POST; we add 409 for a task in the wrong state (e.g. completing a
// finished task). Error bodies are `{"error": message, "field"?: name}`.

export class HttpError extends Error {
  constructor(readonly status: number, message: string, readonly field?: string) {
    super(message);
  }
}

// Browsers may call the functions only from the origins in HWGP_CORS_ORIGINS (comma-separated, or
// "*"); with it unset no CORS headers are sent, so no other site's page can use a visitor's token.
function corsHeaders(req: Request): Record<string, string> {
  const allowed = (Deno.env.get("HWGP_CORS_ORIGINS") ?? "").split(",").map((o) => o.trim()).filter(
    Boolean,
  );
  const origin = req.headers.get("Origin");
  if (!origin || !(allowed.includes("*") || allowed.includes(origin))) return {};
  return {
    "Access-Control-Allow-Origin": allowed.includes("*") ? "*" : origin,
    "Access-Control-Allow-Headers": "authorization, x-client-info, apikey, content-type",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Vary": "Origin",
  };
}

export function json(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "Content-Type": "application/json" },
  });
}

export function noContent(): Response {
  return new Response(null, { status: 204 });
}

/** The largest JSON body a function reads (HWGP_MAX_BODY_BYTES, default 1 MiB), before decoding. */
export function maxBodyBytes(): number {
  return Number(Deno.env.get("HWGP_MAX_BODY_BYTES") ?? String(1024 * 1024));
}

export type Body = Record<string, unknown>;

/** Wraps a function body: 405 for other methods, CORS, a body size limit, JSON parsing, error mapping.
 * `bodyLimit` (bytes, default `maxBodyBytes()`) is enforced on the bytes read, before any decoding. */
export function endpoint(
  run: (req: Request, body: Body) => Promise<Response>,
  bodyLimit?: () => number,
): (req: Request) => Promise<Response> {
  return async (req: Request) => {
    const cors = corsHeaders(req);
    const answer = (response: Response) => {
      for (const [name, value] of Object.entries(cors)) response.headers.set(name, value);
      return response;
    };
    if (req.method === "OPTIONS") return answer(new Response("ok"));
    if (req.method !== "POST") {
      return answer(json({ error: `method ${req.method} not allowed; use POST` }, 405));
    }
    if (!/^Bearer\s+\S+/i.test(req.headers.get("Authorization") ?? "")) {
      // Refuse before reading the body; resolveCaller checks the token itself.
      return answer(
        json({ error: "missing Authorization: Bearer <service key | JWT | access token>" }, 401),
      );
    }
    try {
      return answer(await run(req, await readBody(req, (bodyLimit ?? maxBodyBytes)())));
    } catch (error) {
      return answer(errorResponse(error));
    }
  };
}

/** The body's bytes, refusing (413) as soon as more than `limit` arrive, whatever Content-Length says. */
async function readLimited(req: Request, limit: number): Promise<Uint8Array> {
  const declared = Number(req.headers.get("Content-Length") ?? "0");
  if (declared > limit) throw new HttpError(413, `body: ${declared} bytes; the limit is ${limit}`, "body");
  const chunks: Uint8Array[] = [];
  let size = 0;
  if (req.body) {
    for await (const chunk of req.body) {
      size += chunk.length;
      if (size > limit) throw new HttpError(413, `body: more than ${limit} bytes`, "body");
      chunks.push(chunk);
    }
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.length;
  }
  return bytes;
}

async function readBody(req: Request, limit: number): Promise<Body> {
  const text = new TextDecoder().decode(await readLimited(req, limit));
  if (text.trim() === "") return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new HttpError(400, `body: not valid JSON (${(error as Error).message})`, "body");
  }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new HttpError(400, "body: must be a JSON object", "body");
  }
  return parsed as Body;
}

interface PgError {
  code?: string;
  message: string;
  detail?: string;
}

/** Maps an HttpError or a Postgres error raised by the SQL functions to a response. */
export function errorResponse(error: unknown): Response {
  if (error instanceof HttpError) {
    return json(
      error.field ? { error: error.message, field: error.field } : { error: error.message },
      error.status,
    );
  }
  const pg = error as PgError;
  switch (pg?.code) {
    case "22023": // our functions: bad argument, field in DETAIL
      return json({ error: pg.message, field: pg.detail }, 400);
    case "22P02": // invalid text representation (e.g. a malformed JSON value)
      return json({ error: pg.message }, 400);
    case "P0002":
      return json({ error: pg.message, task_id: pg.detail }, 404);
    case "55000":
      return json({ error: pg.message }, 409);
    case "42501":
      return json({ error: pg.message, field: pg.detail }, 403);
  }
  console.error("edge function error:", error);
  return json({ error: "internal error" }, 500);
}

function bad(field: string, problem: string): HttpError {
  return new HttpError(400, `${field}: ${problem}`, field);
}

export function requireString(body: Body, field: string): string {
  const value = body[field];
  if (typeof value !== "string" || value === "") throw bad(field, "is required (a non-empty string)");
  return value;
}

export function optionalString(body: Body, field: string): string | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (typeof value !== "string") throw bad(field, `must be a string, got ${typeof value}`);
  return value;
}

export function optionalNumber(body: Body, field: string): number | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (typeof value !== "number" || !Number.isFinite(value)) throw bad(field, "must be a number");
  return value;
}

export function optionalInteger(body: Body, field: string): number | null {
  const value = optionalNumber(body, field);
  if (value !== null && !Number.isInteger(value)) throw bad(field, "must be an integer");
  return value;
}

export function optionalBoolean(body: Body, field: string): boolean | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (typeof value !== "boolean") throw bad(field, "must be true or false");
  return value;
}

export function optionalStringList(body: Body, field: string): string[] | null {
  const value = body[field];
  if (value === undefined || value === null) return null;
  if (!Array.isArray(value) || !value.every((v) => typeof v === "string")) {
    throw bad(field, "must be a list of strings");
  }
  return value as string[];
}

export function requireObject(body: Body, field: string): Record<string, unknown> {
  const value = body[field];
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw bad(field, "is required (a JSON object)");
  }
  return value as Record<string, unknown>;
}
