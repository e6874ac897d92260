-- shardmove registry, schema version 1 (SQLite). Keep in step with ../postgres/0001_registry.sql:
-- the same tables, columns and constraints; only id generation differs.
-- Times are unix seconds (BIGINT); flags are text properties ('true'/'false').

CREATE TABLE services (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE devices (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    service_id    BIGINT NOT NULL REFERENCES services(id),
    host          TEXT NOT NULL,
    transfer_addr TEXT NOT NULL,
    root_path     TEXT NOT NULL,
    fingerprint   TEXT,
    created_at    BIGINT NOT NULL
);

CREATE TABLE instances (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- Central definitions: which services an instance may use, with the authoritative flags.
CREATE TABLE bindings (
    id          INTEGER PRIMARY KEY,
    instance_id BIGINT NOT NULL REFERENCES instances(id),
    service_id  BIGINT NOT NULL REFERENCES services(id),
    created_at  BIGINT NOT NULL,
    UNIQUE (instance_id, service_id)
);

CREATE TABLE binding_properties (
    binding_id BIGINT NOT NULL REFERENCES bindings(id),
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (binding_id, key)
);

-- The instance's view: a copy of the central definitions written only by `sync`.
CREATE TABLE instance_view (
    instance_id BIGINT NOT NULL REFERENCES instances(id),
    service_id  BIGINT NOT NULL REFERENCES services(id),
    synced_at   BIGINT NOT NULL,
    PRIMARY KEY (instance_id, service_id)
);

CREATE TABLE instance_view_properties (
    instance_id BIGINT NOT NULL REFERENCES instances(id),
    service_id  BIGINT NOT NULL REFERENCES services(id),
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (instance_id, service_id, key)
);

CREATE TABLE repositories (
    id                  INTEGER PRIMARY KEY,
    instance_id         BIGINT NOT NULL REFERENCES instances(id),
    name                TEXT NOT NULL,
    service_id          BIGINT NOT NULL REFERENCES services(id),
    path                TEXT NOT NULL,
    upstream_url        TEXT,
    maintenance         BIGINT NOT NULL DEFAULT 0,
    maintenance_message TEXT,
    maintenance_since   BIGINT,
    created_at          BIGINT NOT NULL,
    UNIQUE (instance_id, name)
);

CREATE TABLE working_copies (
    repository_id BIGINT NOT NULL REFERENCES repositories(id),
    device_id     BIGINT NOT NULL REFERENCES devices(id),
    version       BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (repository_id, device_id)
);

CREATE TABLE events (
    id      INTEGER PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX events_subject ON events (subject);
