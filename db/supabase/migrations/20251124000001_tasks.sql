-- The tasks table: the Supabase-compatible columns of docs/compatibility.md plus ours.
CREATE TABLE IF NOT EXISTS tasks (
    id                      text PRIMARY KEY,
    task_type               text NOT NULL,
    params                  jsonb NOT NULL DEFAULT '{}'::jsonb,
    status                  text NOT NULL DEFAULT 'Queued'
                            CHECK (status IN ('Queued', 'In Progress', 'Complete', 'Failed', 'Cancelled')),
    dependant_on            text,
    project_id              text,
    priority                integer NOT NULL DEFAULT 0,
    output_location         text,
    error_message           text,
    worker_id               text,
    attempts                integer NOT NULL DEFAULT 0,
    progress                real NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    progress_message        text,
    created_at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at            timestamptz,
    generation_started_at   timestamptz,
    generation_processed_at timestamptz,
    -- Insertion order, to break created_at ties for rows inserted in one transaction.
    seq                     bigint GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX IF NOT EXISTS tasks_claim_idx ON tasks (priority DESC, created_at, seq) WHERE status = 'Queued';
CREATE INDEX IF NOT EXISTS tasks_dependant_on_idx ON tasks (dependant_on);
CREATE INDEX IF NOT EXISTS tasks_project_idx ON tasks (project_id, created_at);
CREATE INDEX IF NOT EXISTS tasks_in_progress_idx ON tasks (heartbeat_at) WHERE status = 'In Progress';

-- Wake waiting claimers (LISTEN hwgp_tasks) when a task may have become claimable:
-- a new queued task, a requeue, or a completion that unblocks dependants.
CREATE OR REPLACE FUNCTION hwgp_notify_tasks() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IN ('Queued', 'Complete') THEN
        PERFORM pg_notify('hwgp_tasks', NEW.task_type);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_notify ON tasks;
CREATE TRIGGER tasks_notify
    AFTER INSERT OR UPDATE OF status ON tasks
    FOR EACH ROW EXECUTE FUNCTION hwgp_notify_tasks();
