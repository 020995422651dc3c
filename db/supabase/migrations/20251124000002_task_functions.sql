-- Every task operation as one SQL function: the rules of the PostgreSQL store, written once.
--
-- `PostgresTaskStore` calls these (db/postgres.py), and so do the Supabase edge functions
-- (db/supabase/functions/), so both transports follow the same rules. SQLite's rules are in
-- db/sql_store.py; the shared behaviour suite (tests/test_store.py) holds the two to one behaviour.
-- Created SECURITY INVOKER. In Supabase mode *_supabase_task_writer.sql makes the writing ones SECURITY
-- DEFINER functions of the role hwgp_task_writer, whose row-level security limits a user's call to the
-- user's projects; called as service_role or the table owner, they see every task.
--
-- Errors carry SQLSTATEs the callers map: P0002 no such task (HTTP 404), 55000 wrong state
-- (HTTP 409), 22023 bad argument with the field name in DETAIL (HTTP 400), 42501 not the owner (403).

CREATE OR REPLACE FUNCTION hwgp_clip(message text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN length(message) <= 4000 THEN message ELSE left(message, 3999) || '…' END
$$;

CREATE OR REPLACE FUNCTION hwgp_invalid(field text, problem text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = field || ': ' || problem, DETAIL = field;
END;
$$;

-- A write matched no row: say whether the task is missing, someone else's claim, or in the wrong state.
CREATE OR REPLACE FUNCTION hwgp_raise_conflict(p_task_id text, p_action text, p_worker_id text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t tasks;
BEGIN
    SELECT * INTO t FROM tasks WHERE id = p_task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = format('no task with id %L', p_task_id),
            DETAIL = p_task_id;
    END IF;
    IF p_worker_id IS NOT NULL AND t.status = 'In Progress' AND t.worker_id IS DISTINCT FROM p_worker_id THEN
        RAISE EXCEPTION USING ERRCODE = '55000', MESSAGE = format(
            'cannot %s task %s: it is claimed by worker %L, not %L', p_action, p_task_id, t.worker_id, p_worker_id);
    END IF;
    RAISE EXCEPTION USING ERRCODE = '55000',
        MESSAGE = format('cannot %s task %s: it is %s', p_action, p_task_id, t.status);
END;
$$;

-- A UUID in canonical text form, or NULL; 22023 naming `field` when it is not a UUID.
CREATE OR REPLACE FUNCTION hwgp_uuid_text(value text, field text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF value IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN value::uuid::text;
EXCEPTION WHEN invalid_text_representation THEN
    PERFORM hwgp_invalid(field, format('%L is not a UUID', value));
    RETURN NULL;
END;
$$;

-- Queued tasks whose dependency failed, was cancelled or does not exist, and (transitively) their queued
-- dependants, fail with a message naming the dependency. The depth cap stops a cycle from looping.
CREATE OR REPLACE FUNCTION propagate_task_failures() RETURNS SETOF tasks
LANGUAGE sql VOLATILE AS $$
    WITH RECURSIVE doomed(id, task_type, message, depth) AS (
        SELECT t.id, t.task_type,
               CASE WHEN d.id IS NULL THEN 'dependency ' || t.dependant_on || ' does not exist'
                    WHEN d.status = 'Cancelled' THEN 'dependency ' || d.id || ' (' || d.task_type || ') was cancelled'
                    ELSE 'dependency ' || d.id || ' (' || d.task_type || ') failed: '
                         || coalesce(d.error_message, 'no error message')
               END,
               0
        FROM tasks t LEFT JOIN tasks d ON d.id = t.dependant_on
        WHERE t.status = 'Queued' AND t.dependant_on IS NOT NULL
          AND (d.id IS NULL OR d.status IN ('Failed', 'Cancelled'))
        UNION ALL
        SELECT t.id, t.task_type,
               substr('dependency ' || doomed.id || ' (' || doomed.task_type || ') failed: ' || doomed.message,
                      1, 4000),
               doomed.depth + 1
        FROM tasks t JOIN doomed ON t.dependant_on = doomed.id
        WHERE t.status = 'Queued' AND doomed.depth < 100
    )
    UPDATE tasks
    SET status = 'Failed', error_message = doomed.message, output_location = doomed.message,
        worker_id = NULL, generation_processed_at = clock_timestamp(), updated_at = clock_timestamp()
    FROM doomed
    WHERE tasks.id = doomed.id AND tasks.status = 'Queued'
    RETURNING tasks.*
$$;

CREATE OR REPLACE FUNCTION create_task(
    p_task_type text,
    p_params jsonb DEFAULT '{}'::jsonb,
    p_id text DEFAULT NULL,
    p_dependant_on text DEFAULT NULL,
    p_project_id text DEFAULT NULL,
    p_priority integer DEFAULT 0
) RETURNS tasks LANGUAGE plpgsql AS $$
DECLARE
    new_id text;
    dep text;
    t tasks;
BEGIN
    IF p_task_type IS NULL OR p_task_type !~ '^[A-Za-z0-9_.:-]{1,100}$' THEN
        PERFORM hwgp_invalid('task_type', 'must be 1-100 characters of letters, digits, ''_'', ''.'', '':'' or ''-''');
    END IF;
    IF p_params IS NULL OR jsonb_typeof(p_params) <> 'object' THEN
        PERFORM hwgp_invalid('params', 'must be a JSON object, got ' || coalesce(jsonb_typeof(p_params), 'null'));
    END IF;
    IF length(p_params::text) > 1000000 THEN
        PERFORM hwgp_invalid('params', format('is %s bytes of JSON; the limit is 1000000', length(p_params::text)));
    END IF;
    IF p_priority IS NULL OR p_priority NOT BETWEEN -1000000 AND 1000000 THEN
        PERFORM hwgp_invalid('priority', 'must be between -1000000 and 1000000');
    END IF;
    IF p_project_id IS NOT NULL AND length(p_project_id) NOT BETWEEN 1 AND 200 THEN
        PERFORM hwgp_invalid('project_id', 'must be 1-200 characters');
    END IF;
    new_id := coalesce(hwgp_uuid_text(p_id, 'id'), gen_random_uuid()::text);
    dep := hwgp_uuid_text(p_dependant_on, 'dependant_on');
    IF EXISTS (SELECT 1 FROM tasks WHERE id = new_id) THEN
        PERFORM hwgp_invalid('id', format('a task with id %s already exists', new_id));
    END IF;
    IF dep IS NOT NULL AND NOT EXISTS (SELECT 1 FROM tasks WHERE id = dep) THEN
        PERFORM hwgp_invalid('dependant_on', format('no task with id %L', dep));
    END IF;
    BEGIN
        INSERT INTO tasks (id, task_type, params, status, dependant_on, project_id, priority)
        VALUES (new_id, p_task_type, p_params, 'Queued', dep, p_project_id, p_priority)
        RETURNING * INTO t;
    EXCEPTION
        WHEN unique_violation THEN  -- a row this caller cannot see holds the id
            PERFORM hwgp_invalid('id', format('a task with id %s already exists', new_id));
        WHEN insufficient_privilege THEN  -- the row-level security check on project_id
            RAISE EXCEPTION USING ERRCODE = '42501', DETAIL = 'project_id',
                MESSAGE = format('project_id: %L is not one of your projects', p_project_id);
    END;
    IF dep IS NOT NULL THEN
        -- A dependency that already failed fails the new task at once.
        PERFORM 1 FROM propagate_task_failures();
        SELECT * INTO t FROM tasks WHERE id = new_id;
    END IF;
    RETURN t;
END;
$$;

CREATE OR REPLACE FUNCTION get_task(p_task_id text) RETURNS tasks
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t tasks;
BEGIN
    SELECT * INTO t FROM tasks WHERE id = p_task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = format('no task with id %L', p_task_id),
            DETAIL = p_task_id;
    END IF;
    RETURN t;
END;
$$;

-- Newest first.
CREATE OR REPLACE FUNCTION list_tasks(
    p_status text DEFAULT NULL,
    p_task_type text DEFAULT NULL,
    p_project_id text DEFAULT NULL,
    p_limit integer DEFAULT 100,
    p_offset integer DEFAULT 0
) RETURNS SETOF tasks LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        PERFORM hwgp_invalid('limit', 'must be between 1 and 10000');
    END IF;
    IF p_offset IS NULL OR p_offset < 0 THEN
        PERFORM hwgp_invalid('offset', 'must be 0 or more');
    END IF;
    RETURN QUERY
        SELECT * FROM tasks t
        WHERE (p_status IS NULL OR t.status = p_status)
          AND (p_task_type IS NULL OR t.task_type = p_task_type)
          AND (p_project_id IS NULL OR t.project_id = p_project_id)
        ORDER BY t.created_at DESC, t.seq DESC
        LIMIT p_limit OFFSET p_offset;
END;
$$;

CREATE OR REPLACE FUNCTION count_tasks_by_status(p_task_types text[] DEFAULT NULL)
RETURNS TABLE (status text, n bigint) LANGUAGE sql STABLE AS $$
    SELECT t.status, count(*) FROM tasks t
    WHERE p_task_types IS NULL OR t.task_type = ANY (p_task_types)
    GROUP BY t.status
$$;

-- The claim: one statement. The CTE is MATERIALIZED so the LIMITed, SKIP LOCKED selection is made
-- once; inlined into `IN (SELECT … LIMIT … SKIP LOCKED)` it can be re-evaluated and over-claim.
CREATE OR REPLACE FUNCTION claim_next_task(
    p_worker_id text,
    p_task_types text[] DEFAULT NULL,
    p_project_ids text[] DEFAULT NULL,
    p_limit integer DEFAULT 1
) RETURNS SETOF tasks LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF coalesce(p_worker_id, '') = '' THEN
        PERFORM hwgp_invalid('worker_id', 'must not be empty');
    END IF;
    RETURN QUERY
        WITH next AS MATERIALIZED (
            SELECT t.id FROM tasks t LEFT JOIN tasks d ON d.id = t.dependant_on
            WHERE t.status = 'Queued' AND (t.dependant_on IS NULL OR d.status = 'Complete')
              AND (p_task_types IS NULL OR t.task_type = ANY (p_task_types))
              AND (p_project_ids IS NULL OR t.project_id = ANY (p_project_ids))
            ORDER BY t.priority DESC, t.created_at ASC, t.seq ASC
            LIMIT greatest(coalesce(p_limit, 1), 0)
            FOR UPDATE OF t SKIP LOCKED
        ), claimed AS (
            UPDATE tasks
            SET status = 'In Progress', worker_id = p_worker_id, attempts = tasks.attempts + 1,
                heartbeat_at = clock_timestamp(), generation_started_at = clock_timestamp(),
                updated_at = clock_timestamp(), progress = 0, progress_message = NULL, error_message = NULL
            FROM next
            WHERE tasks.id = next.id AND tasks.status = 'Queued'
            RETURNING tasks.*
        )
        SELECT * FROM claimed c ORDER BY c.priority DESC, c.created_at, c.seq;
END;
$$;

CREATE OR REPLACE FUNCTION heartbeat_task(p_task_id text, p_worker_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks SET heartbeat_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE id = p_task_id AND worker_id = p_worker_id AND status = 'In Progress';
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION set_task_progress(
    p_task_id text, p_worker_id text, p_progress double precision, p_message text DEFAULT NULL
) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF p_progress IS NULL OR p_progress < 0 OR p_progress > 1 THEN
        PERFORM hwgp_invalid('progress', format('must be between 0 and 1, got %s', p_progress));
    END IF;
    UPDATE tasks SET progress = p_progress, progress_message = hwgp_clip(p_message),
        heartbeat_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE id = p_task_id AND worker_id = p_worker_id AND status = 'In Progress';
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION complete_task(p_task_id text, p_output_location text, p_worker_id text DEFAULT NULL)
RETURNS tasks LANGUAGE plpgsql AS $$
DECLARE
    t tasks;
BEGIN
    IF coalesce(p_output_location, '') = '' THEN
        PERFORM hwgp_invalid('output_location', 'must not be empty');
    END IF;
    UPDATE tasks SET status = 'Complete', output_location = p_output_location, error_message = NULL,
        progress = 1, generation_processed_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE id = p_task_id AND status = 'In Progress' AND (p_worker_id IS NULL OR worker_id = p_worker_id)
    RETURNING * INTO t;
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'complete', p_worker_id);
    END IF;
    RETURN t;
END;
$$;

-- `In Progress` → `Failed`, or back to `Queued` when retryable with attempts left (keeping the error).
-- The message also goes to output_location, as the original did. Queued dependants fail too.
CREATE OR REPLACE FUNCTION fail_task(
    p_task_id text,
    p_error_message text,
    p_worker_id text DEFAULT NULL,
    p_retryable boolean DEFAULT false,
    p_max_attempts integer DEFAULT 3
) RETURNS tasks LANGUAGE plpgsql AS $$
DECLARE
    message text := coalesce(nullif(hwgp_clip(p_error_message), ''), 'failed without an error message');
    t tasks;
BEGIN
    UPDATE tasks SET
        status = CASE WHEN p_retryable AND attempts < p_max_attempts THEN 'Queued' ELSE 'Failed' END,
        output_location = CASE WHEN p_retryable AND attempts < p_max_attempts THEN NULL ELSE message END,
        generation_processed_at = CASE WHEN p_retryable AND attempts < p_max_attempts
                                       THEN NULL ELSE clock_timestamp() END,
        worker_id = CASE WHEN p_retryable AND attempts < p_max_attempts THEN NULL ELSE worker_id END,
        error_message = message, updated_at = clock_timestamp()
    WHERE id = p_task_id
      AND ((p_worker_id IS NULL AND status IN ('Queued', 'In Progress'))
           OR (status = 'In Progress' AND worker_id = p_worker_id))
    RETURNING * INTO t;
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'fail', p_worker_id);
    END IF;
    IF t.status = 'Failed' THEN
        PERFORM 1 FROM propagate_task_failures();
    END IF;
    RETURN t;
END;
$$;

-- Give an unfinished claim back without spending an attempt (a worker shutting down).
CREATE OR REPLACE FUNCTION release_task(p_task_id text, p_worker_id text, p_reason text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tasks SET status = 'Queued', worker_id = NULL, heartbeat_at = NULL, progress = 0,
        attempts = greatest(attempts - 1, 0), progress_message = hwgp_clip(p_reason),
        updated_at = clock_timestamp()
    WHERE id = p_task_id AND worker_id = p_worker_id AND status = 'In Progress';
    RETURN FOUND;
END;
$$;

CREATE OR REPLACE FUNCTION cancel_task(p_task_id text) RETURNS tasks
LANGUAGE plpgsql AS $$
DECLARE
    t tasks;
BEGIN
    UPDATE tasks SET status = 'Cancelled', error_message = 'cancelled',
        generation_processed_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE id = p_task_id AND status IN ('Queued', 'In Progress')
    RETURNING * INTO t;
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'cancel');
    END IF;
    PERFORM 1 FROM propagate_task_failures();
    RETURN t;
END;
$$;

-- In Progress tasks whose heartbeat is older than p_older_than_s go back to Queued, or to Failed once
-- attempts reached p_max_attempts. Returns the tasks changed (given up, requeued, then propagated).
CREATE OR REPLACE FUNCTION requeue_stale_tasks(p_older_than_s double precision, p_max_attempts integer DEFAULT 3)
RETURNS SETOF tasks LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := clock_timestamp() - make_interval(secs => p_older_than_s);
BEGIN
    RETURN QUERY
        UPDATE tasks SET status = 'Failed',
            error_message = 'worker ' || coalesce(worker_id, '?') || ' stopped heartbeating; gave up after '
                            || attempts || ' attempts',
            output_location = 'worker ' || coalesce(worker_id, '?') || ' stopped heartbeating; gave up after '
                              || attempts || ' attempts',
            generation_processed_at = clock_timestamp(), updated_at = clock_timestamp()
        WHERE status = 'In Progress' AND coalesce(heartbeat_at, updated_at) < cutoff
          AND attempts >= p_max_attempts
        RETURNING tasks.*;
    RETURN QUERY
        UPDATE tasks SET status = 'Queued',
            progress_message = 'requeued: worker ' || coalesce(worker_id, '?') || ' stopped heartbeating',
            worker_id = NULL, heartbeat_at = NULL, progress = 0, updated_at = clock_timestamp()
        WHERE status = 'In Progress' AND coalesce(heartbeat_at, updated_at) < cutoff
        RETURNING tasks.*;
    RETURN QUERY SELECT * FROM propagate_task_failures();
END;
$$;

-- Take over one specific unfinished task (→ In Progress) whatever state it was left in: how an
-- orchestrator drives the rows that mirror its steps and resumes them after a crash. Complete → 55000.
CREATE OR REPLACE FUNCTION start_task(p_task_id text, p_worker_id text) RETURNS tasks
LANGUAGE plpgsql AS $$
DECLARE
    t tasks;
BEGIN
    IF coalesce(p_worker_id, '') = '' THEN
        PERFORM hwgp_invalid('worker_id', 'must not be empty');
    END IF;
    UPDATE tasks SET status = 'In Progress', worker_id = p_worker_id, attempts = attempts + 1,
        heartbeat_at = clock_timestamp(), generation_started_at = clock_timestamp(),
        updated_at = clock_timestamp(), progress = 0, progress_message = NULL, error_message = NULL,
        output_location = NULL, generation_processed_at = NULL
    WHERE id = p_task_id AND status <> 'Complete'
    RETURNING * INTO t;
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'start');
    END IF;
    RETURN t;
END;
$$;
