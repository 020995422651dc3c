"""Multi-step task types. Each orchestration module offers the same five functions, which the
ingress calls: `validate(params)` at the API, then `prepare(ctx, task)`, `execute(ctx, run)`,
`finish(ctx, run, output_location)`, or `abort(ctx, run, message, cancelled)`."""

from dag import perspective, travel

ORCHESTRATIONS = {
    "travel_orchestrator": travel,
    "different_perspective_orchestrator": perspective,
}
