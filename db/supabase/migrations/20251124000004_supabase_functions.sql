-- Supabase mode, part 2: the operations only Supabase clients use, on top of the task functions of
-- 20251124000002_task_functions.sql (applied before these). SECURITY INVOKER, like those:
-- row-level security applies to a user's calls.

-- What existing clients send to `update-task-status`: a status with its output (or failure message).
-- Finished tasks (Complete, Cancelled) do not change any more.
CREATE OR REPLACE FUNCTION update_task_status(p_task_id text, p_status text, p_output_location text DEFAULT NULL)
RETURNS tasks LANGUAGE plpgsql AS $$
DECLARE
    t tasks;
    message text;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('Queued', 'In Progress', 'Complete', 'Failed', 'Cancelled') THEN
        PERFORM hwgp_invalid('status', format(
            '%L is not one of ''Queued'', ''In Progress'', ''Complete'', ''Failed'', ''Cancelled''', p_status));
    END IF;
    IF p_status = 'Complete' THEN
        IF coalesce(p_output_location, '') = '' THEN
            PERFORM hwgp_invalid('output_location', 'is required with status Complete');
        END IF;
        UPDATE tasks SET status = 'Complete', output_location = p_output_location, error_message = NULL,
            progress = 1, generation_processed_at = clock_timestamp(), updated_at = clock_timestamp()
        WHERE id = p_task_id AND status IN ('Queued', 'In Progress')
        RETURNING * INTO t;
    ELSIF p_status = 'Failed' THEN
        message := coalesce(nullif(hwgp_clip(p_output_location), ''), 'failed without an error message');
        UPDATE tasks SET status = 'Failed', output_location = message, error_message = message,
            generation_processed_at = clock_timestamp(), updated_at = clock_timestamp()
        WHERE id = p_task_id AND status IN ('Queued', 'In Progress')
        RETURNING * INTO t;
    ELSIF p_status = 'In Progress' THEN
        UPDATE tasks SET status = 'In Progress', attempts = attempts + 1, heartbeat_at = clock_timestamp(),
            generation_started_at = clock_timestamp(), updated_at = clock_timestamp()
        WHERE id = p_task_id AND status = 'Queued'
        RETURNING * INTO t;
    ELSIF p_status = 'Queued' THEN
        -- A client retrying a failed or abandoned task.
        UPDATE tasks SET status = 'Queued', worker_id = NULL, heartbeat_at = NULL, progress = 0,
            output_location = NULL, generation_processed_at = NULL, updated_at = clock_timestamp()
        WHERE id = p_task_id AND status IN ('In Progress', 'Failed')
        RETURNING * INTO t;
    ELSE
        RETURN cancel_task(p_task_id);
    END IF;
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'set status ' || p_status || ' on');
    END IF;
    IF t.status = 'Failed' THEN
        PERFORM 1 FROM propagate_task_failures();
    END IF;
    RETURN t;
END;
$$;

-- The task this one depends on and its output (NULL output while it is not Complete); no row when
-- the task has no dependency.
CREATE OR REPLACE FUNCTION get_predecessor_output(p_task_id text)
RETURNS TABLE (predecessor_id text, output_location text, predecessor_status text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    dep text;
BEGIN
    SELECT t.dependant_on INTO dep FROM tasks t WHERE t.id = p_task_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = format('no task with id %L', p_task_id),
            DETAIL = p_task_id;
    END IF;
    IF dep IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT dep, CASE WHEN d.status = 'Complete' THEN d.output_location END, d.status
        FROM (SELECT 1) one LEFT JOIN tasks d ON d.id = dep;
END;
$$;

-- Completed travel_segment outputs of a run, by segment index (the latest completion per index).
CREATE OR REPLACE FUNCTION get_completed_segments(p_run_id text, p_project_id text DEFAULT NULL)
RETURNS TABLE (segment_index integer, output_location text)
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT ON (1) (t.params ->> 'segment_index')::integer, t.output_location
    FROM tasks t
    WHERE t.task_type = 'travel_segment' AND t.status = 'Complete'
      AND coalesce(t.params ->> 'orchestrator_run_id', t.params ->> 'run_id') = p_run_id
      AND (p_project_id IS NULL OR t.project_id = p_project_id)
      AND (t.params ->> 'segment_index') ~ '^[0-9]{1,9}$'
    ORDER BY 1, t.generation_processed_at DESC
$$;

-- Raises (404 / 409) unless the caller may complete the task now; complete-task checks before uploading.
CREATE OR REPLACE FUNCTION hwgp_check_completable(p_task_id text, p_worker_id text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM 1 FROM tasks
    WHERE id = p_task_id AND status = 'In Progress' AND (p_worker_id IS NULL OR worker_id = p_worker_id);
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'complete', p_worker_id);
    END IF;
    RETURN true;
END;
$$;
