-- Supabase mode: the re-created complete_task (20251130000020_thumbnail_url.sql) becomes a SECURITY
-- DEFINER function of hwgp_task_writer again, with its grants (see *_supabase_task_writer.sql).
SELECT hwgp_secure_task_writers();
