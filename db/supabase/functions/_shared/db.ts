// The database connection of the edge functions (`SUPABASE_DB_URL`, which Supabase provides to
// functions) and `asCaller`, which runs SQL as the caller's Postgres role so row-level security
// applies: `service_role` for the service key, `authenticated` with the user's JWT claims otherwise.

import postgres from "npm:postgres@3.4.5";
import type { Caller } from "./auth.ts";

const TIMESTAMP_OIDS = [1114, 1184];

function databaseUrl(): string {
  const url = Deno.env.get("SUPABASE_DB_URL");
  if (!url) throw new Error("SUPABASE_DB_URL is not set");
  return url;
}

// Timestamps stay text (microseconds intact), rewritten to ISO 8601 for clients.
export const sql = postgres(databaseUrl(), {
  max: Number(Deno.env.get("HWGP_DB_POOL_SIZE") ?? "10"),
  onnotice: () => {},
  types: {
    timestamp: {
      to: 1184,
      from: TIMESTAMP_OIDS,
      serialize: (value: unknown) => (value instanceof Date ? value.toISOString() : String(value)),
      parse: (value: string) => value.replace(" ", "T").replace(/([+-]\d\d)$/, "$1:00"),
    },
  },
});

// deno-lint-ignore no-explicit-any
export type Tx = any;

// deno-lint-ignore no-explicit-any
export type Row = Record<string, any>;

/** Runs `work` in a transaction under the caller's role and JWT claims (both reset at commit). */
export async function asCaller(caller: Caller, work: (tx: Tx) => Promise<Row[]>): Promise<Row[]> {
  return await sql.begin(async (tx: Tx) => {
    await tx`select set_config('role', ${caller.role}, true),
                    set_config('request.jwt.claims', ${JSON.stringify(caller.claims)}, true)`;
    return [...(await work(tx))];
  }) as Row[];
}

/** A tasks row as JSON for clients: the fields of docs/compatibility.md plus every column. */
export function taskJson(row: Row): Row {
  const { seq: _seq, ...task } = row;
  return { task_id: task.id, ...task };
}
