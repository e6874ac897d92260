-- shardmove registry, schema version 4: the batch journal, independent of the catalog.
-- Keep in step with ../postgres/0004_batch_journal.sql; only id generation differs (a test
-- compares the two).
--
-- A batch's repositories are named as its control plane names them (the built-in registry's
-- INSTANCE/NAME, or a Phorge repository), so one journal serves both planes. Each row fixes
-- the repository's two devices when the batch is created: a resumed driver never derives
-- them again from the control plane, which names B as the home once clusterized (issue 10,
-- item 1). The owner is two columns, not a "pid N on HOST" string to parse back.

CREATE TABLE batches (
    id            INTEGER PRIMARY KEY,
    plane         TEXT NOT NULL,
    instance      TEXT NOT NULL,
    from_service  TEXT NOT NULL,
    to_service    TEXT NOT NULL,
    message       TEXT NOT NULL,
    parallel      BIGINT NOT NULL,
    state         TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    finished_at   BIGINT,
    owner_pid     BIGINT,
    owner_host    TEXT
);

CREATE TABLE batch_repos (
    batch_id       BIGINT NOT NULL REFERENCES batches(id),
    repository     TEXT NOT NULL,
    position       BIGINT NOT NULL,
    path           TEXT NOT NULL,
    source_device  TEXT NOT NULL,
    target_device  TEXT NOT NULL,
    state          TEXT NOT NULL,
    step           TEXT,
    error          TEXT,
    bytes          BIGINT NOT NULL DEFAULT 0,
    sent_bytes     BIGINT NOT NULL DEFAULT 0,
    frozen_at_ms   BIGINT,
    thawed_at_ms   BIGINT,
    verified_tips  TEXT,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (batch_id, repository)
);

-- Earlier batches, kept for `migrate status`: their devices are recovered the way the
-- old driver chose them (A's device with the newest copy, B's first device); states renamed
-- (thawed -> promoted; a repository failed after clusterize goes on from clusterized, every
-- later step being idempotent); a batch that ended with failures is incomplete.
INSERT INTO batches (id, plane, instance, from_service, to_service, message, parallel, state,
                     created_at, updated_at, finished_at, owner_pid, owner_host)
SELECT m.id, 'builtin', i.name, a.name, b.name, m.message, m.parallel,
       CASE m.state WHEN 'failed' THEN 'incomplete' ELSE m.state END,
       m.created_at, m.updated_at, m.finished_at, NULL, NULL
FROM migrations m
JOIN instances i ON i.id = m.instance_id
JOIN services a ON a.id = m.from_service_id
JOIN services b ON b.id = m.to_service_id;

INSERT INTO batch_repos (batch_id, repository, position, path, source_device, target_device,
                         state, step, error, bytes, sent_bytes, frozen_at_ms, thawed_at_ms,
                         verified_tips, updated_at)
SELECT mr.migration_id, i.name || '/' || r.name, mr.position, r.path,
       COALESCE((SELECT d.name FROM working_copies w JOIN devices d ON d.id = w.device_id
                 WHERE w.repository_id = r.id AND d.service_id = m.from_service_id
                 ORDER BY w.version DESC, d.id LIMIT 1), ''),
       COALESCE((SELECT d.name FROM devices d WHERE d.service_id = m.to_service_id
                 ORDER BY d.id LIMIT 1), ''),
       CASE mr.state WHEN 'thawed' THEN 'promoted' WHEN 'failed' THEN 'clusterized'
                     ELSE mr.state END,
       mr.step, mr.error, mr.bytes, mr.sent_bytes, mr.frozen_at_ms, mr.thawed_at_ms,
       mr.verified_tips, mr.updated_at
FROM migration_repos mr
JOIN migrations m ON m.id = mr.migration_id
JOIN repositories r ON r.id = mr.repository_id
JOIN instances i ON i.id = r.instance_id;

DROP TABLE migration_repos;
DROP TABLE migrations;
