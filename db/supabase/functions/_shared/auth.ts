// Who is calling: `Authorization: Bearer <token>` where the token is
//  - the service key (`SUPABASE_SERVICE_ROLE_KEY`, or any HS256 JWT with role service_role signed
//    with `HWGP_JWT_SECRET`): sees and claims every task;
//  - a user's JWT (HS256, `HWGP_JWT_SECRET`, role authenticated, `sub` = user id);
//  - a personal access token, looked up by its SHA-256 in `user_api_tokens(token_sha256 → user_id)`,
//    unless its `expires_at` has passed.
// A user sees only tasks of their own projects (row-level security does the filtering).
// Every JWT needs `exp`; a user's needs `aud: authenticated` too (Supabase Auth issues both). Secrets
// are compared through their SHA-256 digests in constant time.

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
  // The project's JWT secret, set as a function secret (`supabase secrets set HWGP_JWT_SECRET=…`:
  // names starting with SUPABASE_ are reserved for the platform's own).
  const secret = Deno.env.get("HWGP_JWT_SECRET");
  if (!secret) throw new HttpError(403, "JWTs are not accepted: HWGP_JWT_SECRET is not set");
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

async function sha256(text: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(text)));
}

/** Constant-time equality of two secrets (their digests have the same length whatever the input). */
async function sameSecret(a: string, b: string): Promise<boolean> {
  const [x, y] = await Promise.all([sha256(a), sha256(b)]);
  let difference = 0;
  for (let i = 0; i < x.length; i++) difference |= x[i] ^ y[i];
  return difference === 0;
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** What `user_api_tokens.token_sha256` holds for a personal access token. */
export async function tokenDigest(token: string): Promise<string> {
  return hex(await sha256(token));
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
  if (typeof claims.exp !== "number") throw new HttpError(403, "JWT has no exp (expiry) claim");
  if (claims.exp * 1000 < Date.now()) throw new HttpError(403, "JWT expired");
  if (typeof claims.nbf === "number" && claims.nbf * 1000 > Date.now()) {
    throw new HttpError(403, "JWT not valid yet (nbf)");
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
  if (serviceKey && await sameSecret(token, serviceKey)) {
    return { role: "service_role", userId: null, claims: { role: "service_role" } };
  }
  if (token.split(".").length === 3) {
    const claims = await verifyJwt(token);
    if (claims.role === "service_role") return { role: "service_role", userId: null, claims };
    if (claims.role === "authenticated" && typeof claims.sub === "string" && UUID.test(claims.sub)) {
      const audience = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
      if (!audience.includes("authenticated")) {
        throw new HttpError(403, 'a user JWT needs aud "authenticated"');
      }
      return { role: "authenticated", userId: claims.sub, claims };
    }
    throw new HttpError(403, `a JWT with role ${JSON.stringify(claims.role)} may not use this function`);
  }
  // Personal access token: looked up with the functions' own connection (users cannot read tokens).
  const digest = await tokenDigest(token);
  const rows = await sql`select user_id::text as user_id from user_api_tokens
                         where token_sha256 = ${digest} and (expires_at is null or expires_at > now())`;
  if (rows.length === 0) throw new HttpError(403, "unknown or expired access token");
  const userId = rows[0].user_id as string;
  return { role: "authenticated", userId, claims: { sub: userId, role: "authenticated" } };
}

/** Functions that drive a task's lifecycle directly are for workers holding the service key only. */
export function requireServiceRole(caller: Caller, fn: string): void {
  if (caller.role !== "service_role") {
    throw new HttpError(403, `${fn} is for workers holding the service key`);
  }
}
