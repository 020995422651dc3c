-- The output's thumbnail in the task's params, written by complete_task with the output (issue 20).
--
-- The original's complete-task writes the thumbnail's URL into params as `thumbnail_url`: under
-- `full_orchestrator_payload` for travel_stitch (setting `accelerated` false there too, as it always
-- does for that type), under `orchestrator_details` for wan_2_2_i2v, at the top level otherwise. A URL
-- already there is replaced; every other key stays. The same rule in Python: db/thumbnails.py (SQLite).

CREATE OR REPLACE FUNCTION hwgp_params_with_thumbnail_url(p_task_type text, p_params jsonb, p_thumbnail_url text)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    WITH base AS (
        SELECT CASE WHEN jsonb_typeof(p_params) = 'object' THEN p_params ELSE '{}'::jsonb END AS params,
               CASE p_task_type WHEN 'travel_stitch' THEN 'full_orchestrator_payload'
                                WHEN 'wan_2_2_i2v' THEN 'orchestrator_details' END AS parent
    )
    SELECT CASE
        WHEN parent IS NULL THEN params || jsonb_build_object('thumbnail_url', p_thumbnail_url)
        ELSE params || jsonb_build_object(parent,
            CASE WHEN jsonb_typeof(params -> parent) = 'object' THEN params -> parent ELSE '{}'::jsonb END
            || jsonb_build_object('thumbnail_url', p_thumbnail_url)
            || CASE WHEN p_task_type = 'travel_stitch' THEN '{"accelerated": false}'::jsonb
                    ELSE '{}'::jsonb END)
    END
    FROM base
$$;

-- complete_task gains an optional thumbnail URL; the four-argument form is dropped so calls stay
-- unambiguous. One UPDATE sets the status, the output, the result and the params' thumbnail_url.
DROP FUNCTION IF EXISTS complete_task(text, text, text, jsonb);

CREATE OR REPLACE FUNCTION complete_task(
    p_task_id text,
    p_output_location text,
    p_worker_id text DEFAULT NULL,
    p_result jsonb DEFAULT NULL,
    p_thumbnail_url text DEFAULT NULL
) RETURNS tasks LANGUAGE plpgsql AS $$
DECLARE
    t tasks;
BEGIN
    IF coalesce(p_output_location, '') = '' THEN
        PERFORM hwgp_invalid('output_location', 'must not be empty');
    END IF;
    IF p_result IS NOT NULL AND jsonb_typeof(p_result) <> 'object' THEN
        PERFORM hwgp_invalid('result', 'must be a JSON object, got ' || jsonb_typeof(p_result));
    END IF;
    IF p_thumbnail_url IS NOT NULL AND (p_thumbnail_url = '' OR length(p_thumbnail_url) > 4096) THEN
        PERFORM hwgp_invalid('thumbnail_url', 'must be 1-4096 characters');
    END IF;
    UPDATE tasks SET status = 'Complete', output_location = p_output_location, error_message = NULL,
        progress = 1, result = p_result, generation_processed_at = clock_timestamp(),
        updated_at = clock_timestamp(),
        params = CASE WHEN p_thumbnail_url IS NULL THEN params
                      ELSE hwgp_params_with_thumbnail_url(task_type, params, p_thumbnail_url) END
    WHERE id = p_task_id AND status = 'In Progress' AND (p_worker_id IS NULL OR worker_id = p_worker_id)
    RETURNING * INTO t;
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'complete', p_worker_id);
    END IF;
    RETURN t;
END;
$$;
