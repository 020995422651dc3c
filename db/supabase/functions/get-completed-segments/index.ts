// POST {run_id, project_id?} → 200 [{segment_index, output_location}] of the run's completed
// travel_segment tasks (params.orchestrator_run_id or params.run_id), by segment index.
import { resolveCaller } from "../_shared/auth.ts";
import { asCaller } from "../_shared/db.ts";
import { endpoint, json, optionalString, requireString } from "../_shared/http.ts";

export const handler = endpoint(async (req, body) => {
  const caller = await resolveCaller(req);
  const runId = requireString(body, "run_id");
  const projectId = optionalString(body, "project_id");
  const rows = await asCaller(
    caller,
    (tx) => tx`select segment_index, output_location from get_completed_segments(${runId}, ${projectId})`,
  );
  return json(rows.map((r) => ({ segment_index: r.segment_index, output_location: r.output_location })));
});

if (import.meta.main) Deno.serve(handler);
