-- What a finished task reports about itself (model, seed, settings as applied, timings): a JSON object.
ALTER TABLE tasks ADD COLUMN result TEXT;
