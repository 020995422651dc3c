// Who is calling: `Authorization: Bearer <token>` where the token is
//  - the service key (`SUPABASE_SERVICE_ROLE_KEY`, or any HS256 JWT with role service_role signed
//    with `SUPABASE_JWT_SECRET`): sees and claims every task;
//  - a user's JWT (HS256, `SUPABASE_JWT_SECRET`, role authenticated, `sub` = user id);
//  - a personal access token, looked up in `user_api_tokens(token → user_id)`.
// A user sees only tasks of their own projects (row-level security does the filtering).

import { HttpError } from "./http.ts";
import { sql } from "./db.ts";

export interface Caller {
  role: "service_role" | "authenticated";
  userId: string | null;
  claims: Record<string, unknown>;
}

const encoder = new TextEncoder();
let hmacKey: Promise<CryptoKey> | null = null;

function jwtKey(): Promise<CryptoKey> {
  const secret = Deno.env.get("SUPABASE_JWT_SECRET");
  if (!secret) throw new HttpError(403, "JWTs are not accepted: SUPABASE_JWT_SECRET is not set");
  hmacKey ??= crypto.subtle.importKey(
    "raw",
    encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    [
      "verify",
    ],
  );
  return hmacKey;
}

function base64UrlDecode(text: string): Uint8Array<ArrayBuffer> {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
}

async function verifyJwt(token: string): Promise<Record<string, unknown>> {
  const [header, payload, signature] = token.split(".");
  let claims: Record<string, unknown>;
  try {
    const head = JSON.parse(new TextDecoder().decode(base64UrlDecode(header)));
    if (head.alg !== "HS256") throw new Error(`alg ${head.alg}`);
    claims = JSON.parse(new TextDecoder().decode(base64UrlDecode(payload)));
  } catch (_error) {
    throw new HttpError(403, "malformed JWT");
  }
  const ok = await crypto.subtle.verify(
    "HMAC",
    await jwtKey(),
    base64UrlDecode(signature),
    encoder.encode(`${header}.${payload}`),
  );
  if (!ok) throw new HttpError(403, "invalid JWT signature");
  if (typeof claims.exp === "number" && claims.exp * 1000 < Date.now()) {
    throw new HttpError(403, "JWT expired");
  }
  return claims;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export async function resolveCaller(req: Request): Promise<Caller> {
  const header = req.headers.get("Authorization") ?? "";
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (!match) throw new HttpError(401, "missing Authorization: Bearer <service key | JWT | access token>");
  const token = match[1];

  const serviceKey = Deno.env.get("SUPABASE_SERVICE_ROLE_KEY");
  if (serviceKey && token === serviceKey) {
    return { role: "service_role", userId: null, claims: { role: "service_role" } };
  }
  if (token.split(".").length === 3) {
    const claims = await verifyJwt(token);
    if (claims.role === "service_role") return { role: "service_role", userId: null, claims };
    if (claims.role === "authenticated" && typeof claims.sub === "string" && UUID.test(claims.sub)) {
      return { role: "authenticated", userId: claims.sub, claims };
    }
    throw new HttpError(403, `a JWT with role ${JSON.stringify(claims.role)} may not use this function`);
  }
  // Personal access token: looked up with the functions' own connection (users cannot read tokens).
  const rows = await sql`select user_id::text as user_id from user_api_tokens where token = ${token}`;
  if (rows.length === 0) throw new HttpError(403, "unknown access token");
  const userId = rows[0].user_id as string;
  return { role: "authenticated", userId, claims: { sub: userId, role: "authenticated" } };
}
