// Serves every edge function from one Deno process, as Supabase's edge runtime does:
// `POST /functions/v1/<name>` → functions/<name>/index.ts's handler.
//   deno run --allow-net --allow-env --allow-read main.ts [--port 54321] [--hostname 127.0.0.1]

import { handler as cancelTask } from "./cancel-task/index.ts";
import { handler as claimNextTask } from "./claim-next-task/index.ts";
import { handler as completeTask } from "./complete-task/index.ts";
import { handler as countTasks } from "./count-tasks/index.ts";
import { handler as createTask } from "./create-task/index.ts";
import { handler as failTask } from "./fail-task/index.ts";
import { handler as getCompletedSegments } from "./get-completed-segments/index.ts";
import { handler as getPredecessorOutput } from "./get-predecessor-output/index.ts";
import { handler as getTask } from "./get-task/index.ts";
import { handler as heartbeatTask } from "./heartbeat-task/index.ts";
import { handler as listTasks } from "./list-tasks/index.ts";
import { handler as propagateFailures } from "./propagate-failures/index.ts";
import { handler as releaseTask } from "./release-task/index.ts";
import { handler as requeueStaleTasks } from "./requeue-stale-tasks/index.ts";
import { handler as setTaskProgress } from "./set-task-progress/index.ts";
import { handler as startTask } from "./start-task/index.ts";
import { handler as updateTaskStatus } from "./update-task-status/index.ts";
import { handler as waitForWork } from "./wait-for-work/index.ts";
import { json } from "./_shared/http.ts";

const FUNCTIONS: Record<string, (req: Request) => Promise<Response>> = {
  "cancel-task": cancelTask,
  "claim-next-task": claimNextTask,
  "complete-task": completeTask,
  "count-tasks": countTasks,
  "create-task": createTask,
  "fail-task": failTask,
  "get-completed-segments": getCompletedSegments,
  "get-predecessor-output": getPredecessorOutput,
  "get-task": getTask,
  "heartbeat-task": heartbeatTask,
  "list-tasks": listTasks,
  "propagate-failures": propagateFailures,
  "release-task": releaseTask,
  "requeue-stale-tasks": requeueStaleTasks,
  "set-task-progress": setTaskProgress,
  "start-task": startTask,
  "update-task-status": updateTaskStatus,
  "wait-for-work": waitForWork,
};

function option(name: string, fallback: string): string {
  const at = Deno.args.indexOf(`--${name}`);
  return at >= 0 && at + 1 < Deno.args.length ? Deno.args[at + 1] : fallback;
}

export function route(req: Request): Promise<Response> | Response {
  const match = /^\/functions\/v1\/([a-z-]+)\/?$/.exec(new URL(req.url).pathname);
  const handler = match ? FUNCTIONS[match[1]] : undefined;
  if (!handler) return json({ error: `no function at ${new URL(req.url).pathname}` }, 404);
  return handler(req);
}

if (import.meta.main) {
  const port = Number(option("port", Deno.env.get("PORT") ?? "54321"));
  const hostname = option("hostname", "127.0.0.1");
  Deno.serve({
    port,
    hostname,
    onListen: ({ port }) => console.log(`edge functions listening on ${hostname}:${port}`),
  }, route);
}
