-- What a finished task reports about itself (model, seed, settings as applied, timings): a JSON object,
-- written by complete_task together with the output.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS result jsonb;

-- complete_task gains an optional result; the three-argument form is dropped so calls stay unambiguous.
DROP FUNCTION IF EXISTS complete_task(text, text, text);

CREATE OR REPLACE FUNCTION complete_task(
    p_task_id text,
    p_output_location text,
    p_worker_id text DEFAULT NULL,
    p_result jsonb DEFAULT NULL
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
    UPDATE tasks SET status = 'Complete', output_location = p_output_location, error_message = NULL,
        progress = 1, result = p_result, generation_processed_at = clock_timestamp(),
        updated_at = clock_timestamp()
    WHERE id = p_task_id AND status = 'In Progress' AND (p_worker_id IS NULL OR worker_id = p_worker_id)
    RETURNING * INTO t;
    IF NOT FOUND THEN
        PERFORM hwgp_raise_conflict(p_task_id, 'complete', p_worker_id);
    END IF;
    RETURN t;
END;
$$;
