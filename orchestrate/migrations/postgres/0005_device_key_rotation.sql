-- shardmove registry, schema version 5: a device's shardrecv key rotated with overlap (issue
-- 15, item 2). Keep in step with ../sqlite/0005_device_key_rotation.sql (a test compares the
-- two).
--
-- `fingerprint` stays the key a device is known by. While its key changes, the device's
-- shardrecv holds two, and senders pin both: `next_fingerprint` is the key coming in and
-- `rotation_stage` how far the rotation went: 'added' (both pinned, the old key preferred)
-- or 'preferred' (both pinned, the new key preferred); `rotation_since` when it began.
-- `device rotate-key --finish` makes the new key `fingerprint` and clears the three.
-- Existing rows need no copy: they have no rotation under way (all three NULL).
ALTER TABLE devices ADD COLUMN next_fingerprint TEXT;
ALTER TABLE devices ADD COLUMN rotation_stage TEXT;
ALTER TABLE devices ADD COLUMN rotation_since BIGINT;
