-- shardmove registry, schema version 3: what the pre-copy verification proved.
-- Keep in step with the other backend's 0003_verified_tips.sql (identical).

-- Object ids (one per line) of the refs of B's pre-copied tree, which `git fsck
-- --connectivity-only` found complete before the repository was frozen. The frozen-window
-- verification then checks only what is reachable from the final refs but not from these,
-- as git's receive-pack does for a push.
ALTER TABLE migration_repos ADD COLUMN verified_tips TEXT;
