-- shardmove registry, schema version 2: batch migrations and their per-repository journal.
-- Keep in step with the other backend's 0002_migrations.sql; only id generation differs.

CREATE TABLE migrations (
    id              INTEGER PRIMARY KEY,
    instance_id     BIGINT NOT NULL REFERENCES instances(id),
    from_service_id BIGINT NOT NULL REFERENCES services(id),
    to_service_id   BIGINT NOT NULL REFERENCES services(id),
    message         TEXT NOT NULL,
    parallel        BIGINT NOT NULL,
    state           TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    finished_at     BIGINT,
    owner           TEXT
);

-- One row per repository of a migration: the journal of its state machine. A step's effect
-- and the state it leads to are recorded here; a resumed driver re-runs the step of the
-- recorded state (every step is idempotent).
CREATE TABLE migration_repos (
    migration_id  BIGINT NOT NULL REFERENCES migrations(id),
    repository_id BIGINT NOT NULL REFERENCES repositories(id),
    position      BIGINT NOT NULL,
    state         TEXT NOT NULL,
    step          TEXT,
    error         TEXT,
    bytes         BIGINT NOT NULL DEFAULT 0,
    sent_bytes    BIGINT NOT NULL DEFAULT 0,
    frozen_at_ms  BIGINT,
    thawed_at_ms  BIGINT,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (migration_id, repository_id)
);
