-- Supabase mode, part 3: personal access tokens are stored as SHA-256 digests, with an optional expiry.
--
-- A leaked table no longer leaks usable tokens. The edge functions hash the presented token and
-- look the digest up; a token whose expires_at has passed is refused. Existing plain-text tokens
-- are converted in place. To issue one:
--   INSERT INTO user_api_tokens (token_sha256, user_id, label, expires_at)
--   VALUES (encode(sha256(convert_to('THE-TOKEN', 'UTF8')), 'hex'), 'USER-UUID', 'ci', now() + interval '90 days');

ALTER TABLE user_api_tokens ADD COLUMN IF NOT EXISTS token_sha256 text;
ALTER TABLE user_api_tokens ADD COLUMN IF NOT EXISTS expires_at timestamptz;

DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'user_api_tokens' AND column_name = 'token'
    ) THEN
        UPDATE user_api_tokens SET token_sha256 = encode(sha256(convert_to(token, 'UTF8')), 'hex')
            WHERE token_sha256 IS NULL;
        ALTER TABLE user_api_tokens DROP CONSTRAINT IF EXISTS user_api_tokens_pkey;
        ALTER TABLE user_api_tokens DROP COLUMN token;
    END IF;
END;
$$;

ALTER TABLE user_api_tokens ALTER COLUMN token_sha256 SET NOT NULL;
ALTER TABLE user_api_tokens DROP CONSTRAINT IF EXISTS user_api_tokens_token_sha256_key;
ALTER TABLE user_api_tokens ADD CONSTRAINT user_api_tokens_token_sha256_key UNIQUE (token_sha256);
ALTER TABLE user_api_tokens DROP CONSTRAINT IF EXISTS user_api_tokens_digest_is_hex;
ALTER TABLE user_api_tokens ADD CONSTRAINT user_api_tokens_digest_is_hex
    CHECK (token_sha256 ~ '^[0-9a-f]{64}$');
