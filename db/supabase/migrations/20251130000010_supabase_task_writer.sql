-- Supabase mode: users change tasks only through the task functions (issue 16 item 9).
--
-- `authenticated` keeps SELECT on tasks (row-level security shows a user their own projects' tasks) but
-- loses INSERT and UPDATE, so a user cannot write a row that skips create_task's checks nor move a task's
-- state by hand. The functions that write tasks run as `hwgp_task_writer` (SECURITY DEFINER): a NOLOGIN
-- role holding exactly the table privileges they need, without BYPASSRLS. Its row-level security policy
-- reads the caller from the request, as Supabase's own policies do:
--   * a user's request (role `authenticated` / `anon`, set by PostgREST or our edge functions, or JWT
--     claims of that role): only tasks of projects the user (`auth.uid()`) owns;
--   * anything else (service_role, or a direct connection with no request role at all, such as the table
--     owner the direct store uses): every task.
-- Every definer function gets a fixed search_path, so a caller's objects cannot stand in for ours.
--
-- `hwgp_secure_task_writers()` does the conversion and is idempotent: a later migration that re-creates
-- one of these functions (CREATE OR REPLACE resets SECURITY DEFINER and search_path, so until then a user
-- is refused, never let through) or adds an overload calls it again.

DO $$
BEGIN
    CREATE ROLE hwgp_task_writer NOLOGIN NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN  -- roles are cluster-wide
    NULL;
END;
$$;

-- Whoever runs the migrations must be able to hand functions to the role (PostgreSQL 16+ asks for
-- membership; a superuser already has it).
DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'hwgp_task_writer', 'MEMBER') THEN
        EXECUTE format('GRANT hwgp_task_writer TO %I', current_user);
    END IF;
END;
$$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO hwgp_task_writer', current_schema());
END;
$$;
GRANT SELECT, INSERT, UPDATE ON tasks TO hwgp_task_writer;
GRANT SELECT ON projects TO hwgp_task_writer;

-- Users read tasks and projects; they no longer write tasks directly. Supabase's default privileges
-- grant anon and authenticated everything on new tables in `public`: take it all back and grant reads.
REVOKE ALL ON tasks, projects, user_api_tokens FROM anon, authenticated;
GRANT SELECT ON tasks, projects TO authenticated;
DROP POLICY IF EXISTS tasks_owner_insert ON tasks;
DROP POLICY IF EXISTS tasks_owner_update ON tasks;

-- Who the current request is for. `hwgp_request_is_users()`: the request role (SET ROLE, which a SECURITY
-- DEFINER call leaves as it was) or the JWT claims say `authenticated` or `anon`; either one suffices,
-- so a user's session without claims is still a user's (and owns nothing). Both run as the migrating
-- role, which may read Supabase's `auth` schema (hwgp_task_writer may not).
CREATE OR REPLACE FUNCTION hwgp_request_is_users() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT current_setting('role') IN ('authenticated', 'anon')
        OR coalesce(auth.role(), '') IN ('authenticated', 'anon')
$$;
CREATE OR REPLACE FUNCTION hwgp_request_user_id() RETURNS uuid
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT auth.uid()
$$;

-- The writer looks projects up to check ownership; the tasks policy below picks the user's own.
DROP POLICY IF EXISTS projects_task_writer ON projects;
CREATE POLICY projects_task_writer ON projects FOR SELECT TO hwgp_task_writer USING (true);

DROP POLICY IF EXISTS tasks_writer ON tasks;
CREATE POLICY tasks_writer ON tasks FOR ALL TO hwgp_task_writer
    USING (
        NOT (SELECT hwgp_request_is_users())
        OR project_id IN (SELECT p.id FROM projects p WHERE p.user_id = (SELECT hwgp_request_user_id()))
    )
    WITH CHECK (
        NOT (SELECT hwgp_request_is_users())
        OR project_id IN (SELECT p.id FROM projects p WHERE p.user_id = (SELECT hwgp_request_user_id()))
    );

-- The writing functions as SECURITY DEFINER owned by hwgp_task_writer, every overload of each name.
-- `service_only` ones drive a task's lifecycle directly: workers holding the service key only (as the
-- edge functions already insist).
CREATE OR REPLACE FUNCTION hwgp_secure_task_writers() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    writers text[] := ARRAY['create_task', 'claim_next_task', 'heartbeat_task', 'set_task_progress',
                            'complete_task', 'fail_task', 'release_task', 'cancel_task',
                            'propagate_task_failures'];
    service_only text[] := ARRAY['requeue_stale_tasks', 'start_task', 'update_task_status'];
    fn regprocedure;
    name text;
BEGIN
    -- A new owner needs CREATE on the schema at the moment it takes a function over (a superuser skips
    -- this check; a hosted project's postgres does not): granted for the hand-over only.
    EXECUTE format('GRANT CREATE ON SCHEMA %I TO hwgp_task_writer', current_schema());
    FOR fn, name IN
        SELECT p.oid::regprocedure, p.proname FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace AND p.proname = ANY (writers || service_only)
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO hwgp_task_writer', fn);
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %I, pg_temp', fn, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', fn);
        IF name = ANY (writers) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO authenticated', fn);
        END IF;
    END LOOP;
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM hwgp_task_writer', current_schema());
END;
$$;
REVOKE ALL ON FUNCTION hwgp_secure_task_writers() FROM PUBLIC, anon, authenticated;

SELECT hwgp_secure_task_writers();
