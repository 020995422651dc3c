-- The tasks table (docs/compatibility.md columns plus ours). Timestamps are UTC ISO-8601 text so they sort as text.
CREATE TABLE IF NOT EXISTS tasks (
    id                      TEXT PRIMARY KEY,
    task_type               TEXT NOT NULL,
    params                  TEXT NOT NULL DEFAULT '{}',
    status                  TEXT NOT NULL DEFAULT 'Queued'
                            CHECK (status IN ('Queued', 'In Progress', 'Complete', 'Failed', 'Cancelled')),
    dependant_on            TEXT,
    project_id              TEXT,
    priority                INTEGER NOT NULL DEFAULT 0,
    output_location         TEXT,
    error_message           TEXT,
    worker_id               TEXT,
    attempts                INTEGER NOT NULL DEFAULT 0,
    progress                REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    progress_message        TEXT,
    created_at              TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at              TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    heartbeat_at            TEXT,
    generation_started_at   TEXT,
    generation_processed_at TEXT
);

-- The claim path: queued rows in priority/age order.
CREATE INDEX IF NOT EXISTS tasks_claim_idx ON tasks (status, priority DESC, created_at);
CREATE INDEX IF NOT EXISTS tasks_dependant_on_idx ON tasks (dependant_on);
CREATE INDEX IF NOT EXISTS tasks_project_idx ON tasks (project_id, created_at);
