// POST {timeout_s} → 200 {woke}: long-polls the `hwgp_tasks` notification (a task may have become
// claimable) for up to timeout_s seconds (at most 60), so HTTP workers need not poll the table.
import { resolveCaller } from "../_shared/auth.ts";
import { sql } from "../_shared/db.ts";
import { endpoint, HttpError, json, optionalNumber } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  await resolveCaller(req);
  const timeout = optionalNumber(body, "timeout_s") ?? 10;
  if (timeout < 0 || timeout > 60) {
    throw new HttpError(400, "timeout_s: must be between 0 and 60", "timeout_s");
  }
  let wake: () => void = () => {};
  const woken = new Promise<boolean>((resolve) => (wake = () => resolve(true)));
  const listener = await sql.listen("hwgp_tasks", () => wake());
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timedOut = new Promise<boolean>((
    resolve,
  ) => (timer = setTimeout(() => resolve(false), timeout * 1000)));
  try {
    return json({ woke: await Promise.race([woken, timedOut]) });
  } finally {
    clearTimeout(timer);
    await listener.unlisten();
  }
});

if (import.meta.main) Deno.serve(handler);
