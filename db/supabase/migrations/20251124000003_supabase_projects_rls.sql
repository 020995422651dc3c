-- Supabase mode, part 1: ownership tables, grants and row-level security.
--
-- Applied after the tasks table and task functions (the migrations before it). Expects what every Supabase project
-- has: the roles anon / authenticated / service_role and auth.uid() reading request.jwt.claims.
-- A user owns projects; a user's requests (JWT or personal access token) see, create, claim and
-- complete only tasks of those projects. service_role has BYPASSRLS and also gets explicit policies.

CREATE TABLE IF NOT EXISTS projects (
    id         text PRIMARY KEY,
    user_id    uuid NOT NULL,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS projects_user_idx ON projects (user_id);

-- Personal access tokens, as the original stored them (token → user_id).
CREATE TABLE IF NOT EXISTS user_api_tokens (
    token      text PRIMARY KEY,
    user_id    uuid NOT NULL,
    label      text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_api_tokens_user_idx ON user_api_tokens (user_id);

-- Completed segments of a travel run are looked up by run id.
CREATE INDEX IF NOT EXISTS tasks_segment_run_idx
    ON tasks ((coalesce(params ->> 'orchestrator_run_id', params ->> 'run_id')))
    WHERE task_type = 'travel_segment';

-- Grants: Supabase grants table privileges broadly and lets RLS decide; we grant only what is used.
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO anon, authenticated, service_role', current_schema());
END;
$$;
GRANT SELECT, INSERT, UPDATE ON tasks TO authenticated;
GRANT SELECT ON projects TO authenticated;
GRANT ALL ON tasks, projects, user_api_tokens TO service_role;

ALTER TABLE tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE user_api_tokens ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS tasks_service_role ON tasks;
CREATE POLICY tasks_service_role ON tasks FOR ALL TO service_role USING (true) WITH CHECK (true);

-- `(SELECT auth.uid())` is evaluated once per statement, not once per row.
DROP POLICY IF EXISTS tasks_owner_select ON tasks;
CREATE POLICY tasks_owner_select ON tasks FOR SELECT TO authenticated
    USING (project_id IN (SELECT p.id FROM projects p WHERE p.user_id = (SELECT auth.uid())));
DROP POLICY IF EXISTS tasks_owner_insert ON tasks;
CREATE POLICY tasks_owner_insert ON tasks FOR INSERT TO authenticated
    WITH CHECK (project_id IN (SELECT p.id FROM projects p WHERE p.user_id = (SELECT auth.uid())));
DROP POLICY IF EXISTS tasks_owner_update ON tasks;
CREATE POLICY tasks_owner_update ON tasks FOR UPDATE TO authenticated
    USING (project_id IN (SELECT p.id FROM projects p WHERE p.user_id = (SELECT auth.uid())))
    WITH CHECK (project_id IN (SELECT p.id FROM projects p WHERE p.user_id = (SELECT auth.uid())));

DROP POLICY IF EXISTS projects_service_role ON projects;
CREATE POLICY projects_service_role ON projects FOR ALL TO service_role USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS projects_owner_select ON projects;
CREATE POLICY projects_owner_select ON projects FOR SELECT TO authenticated
    USING (user_id = (SELECT auth.uid()));

-- Tokens are read only by the edge functions' own connection and service_role; users never list them.
DROP POLICY IF EXISTS user_api_tokens_service_role ON user_api_tokens;
CREATE POLICY user_api_tokens_service_role ON user_api_tokens FOR ALL TO service_role
    USING (true) WITH CHECK (true);
