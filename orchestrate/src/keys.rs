//! `shardmove device rotate-key`: a device's shardrecv key replaced without a moment in which
//! a transfer to it fails (issue 15, item 2).
//!
//! The rule that makes it safe is the transfer crate's (see `transfer::identity`): a sender
//! pins several keys and asks for them by name, a receiver serves several and presents the
//! first one asked for that it holds. So a transfer fails only when the receiver holds *none*
//! of the keys the sender pins. The procedure keeps, at every step, what the registry pins
//! (what every `migrate` pass gives shardsend) within what the device's shardrecv serves:
//!
//! | step | registry pins | then on the receiver |
//! |---|---|---|
//! | `--add NEW` | OLD, NEW | serve OLD and NEW (OLD primary), reload |
//! | `--prefer` (checks NEW is served) | NEW, OLD | NEW primary, reload (for senders naming no key) |
//! | `--finish` (checks NEW is served) | NEW | drop OLD, reload |
//! | `--abort` (checks OLD is served) | OLD | drop NEW, reload |
//!
//! The checks are real handshakes from this host to the device's transfer address
//! (`transfer::quic::probe`): the receiver must *prove* it holds the key (its handshake
//! signature is verified), so the registry never comes to rely on a key shardrecv cannot
//! present. They run before the recording transaction (no host step inside a transaction);
//! the transaction then refuses if another step changed the device's keys meanwhile.
//!
//! A `migrate` batch re-reads the target's pins before every pass
//! (`migrate::ports::ControlPlane::target_pins`), so a batch running through the whole rotation
//! follows it. Transitions are the pure [`transition`]; the store only compares and sets.

use std::time::Duration;

use serde::Serialize;
use transfer::identity::Fingerprint;

use crate::error::{Error, Result};
use crate::store::{Device, DeviceKeys, KeyRotation, Registry, RotationStage};

/// How long a check waits for the device's shardrecv to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One step of a rotation (or, `Status`, none: where it stands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStep {
    Status,
    /// Pin this key (64 hex digits, lowercase) beside the device's.
    Add(String),
    Prefer,
    Finish,
    Abort,
}

impl KeyStep {
    /// `--add FP`'s fingerprint, checked and written as shardsend writes it.
    pub fn add(fingerprint: &str) -> Result<KeyStep> {
        let fp = Fingerprint::parse(fingerprint)
            .map_err(|_| Error::invalid(format!("--add {fingerprint:?}"), "expected 64 hex digits (the output of `shardrecv keygen` or `shardrecv fingerprint`)"))?;
        Ok(KeyStep::Add(fp.to_string()))
    }

    fn name(&self) -> &'static str {
        match self {
            KeyStep::Status => "status",
            KeyStep::Add(_) => "added",
            KeyStep::Prefer => "preferred",
            KeyStep::Finish => "finished",
            KeyStep::Abort => "aborted",
        }
    }
}

/// `device rotate-key DEVICE [STEP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotateKey {
    pub device: String,
    pub step: KeyStep,
}

/// What a step leads to: the device's keys after it, and its audit-log event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub keys: DeviceKeys,
    pub action: &'static str,
    pub detail: String,
    /// The key the device's shardrecv must be shown to serve before this is recorded.
    pub must_serve: Option<String>,
}

/// What `step` does to a device's `keys` at `now` (unix seconds), or why it is refused;
/// `None` for `Status`.
pub fn transition(
    device: &str,
    keys: &DeviceKeys,
    step: &KeyStep,
    now: i64,
) -> Result<Option<Transition>> {
    let none_under_way = || {
        Error::Refused(format!(
            "no key rotation of device {device} is under way: start one with \
             `shardmove device rotate-key {device} --add NEW_FINGERPRINT`"
        ))
    };
    let to = |fingerprint: Option<String>, rotation| DeviceKeys {
        fingerprint,
        rotation,
    };
    Ok(Some(match (step, &keys.fingerprint, &keys.rotation) {
        (KeyStep::Status, _, _) => return Ok(None),
        (KeyStep::Add(_), None, _) => {
            return Err(Error::Refused(format!(
                "device {device} has no key pinned, so there is nothing to rotate (a device gets \
                 its key with `device add ... --fingerprint`)"
            )))
        }
        (KeyStep::Add(_), Some(old), Some((new, stage, _))) => {
            return Err(Error::Refused(format!(
                "a key rotation of device {device} is already under way (old {old}, new {new}, \
                 {}): finish it (--finish) or abort it (--abort) first",
                stage.as_str()
            )))
        }
        (KeyStep::Add(new), Some(old), None) if new == old => {
            return Err(Error::Refused(format!(
                "{new} is already device {device}'s key"
            )))
        }
        (KeyStep::Add(new), Some(old), None) => Transition {
            keys: to(
                Some(old.clone()),
                Some((new.clone(), RotationStage::Added, now)),
            ),
            action: "device.key.add",
            detail: format!("new={new} old={old}: both pinned, the old one preferred"),
            must_serve: None,
        },
        (KeyStep::Prefer | KeyStep::Finish | KeyStep::Abort, _, None) => {
            return Err(none_under_way())
        }
        (KeyStep::Prefer, _, Some((new, RotationStage::Preferred, _))) => {
            return Err(Error::Refused(format!(
                "the new key {new} of device {device} is already preferred: the next step is \
                 `shardmove device rotate-key {device} --finish`"
            )))
        }
        (KeyStep::Prefer, old, Some((new, RotationStage::Added, since))) => Transition {
            keys: to(
                old.clone(),
                Some((new.clone(), RotationStage::Preferred, *since)),
            ),
            action: "device.key.prefer",
            detail: format!("new={new} preferred, old={} still pinned", show(old)),
            must_serve: Some(new.clone()),
        },
        (KeyStep::Finish, old, Some((new, _, _))) => Transition {
            keys: to(Some(new.clone()), None),
            action: "device.key.finish",
            detail: format!("new={new} is the device's key; old={} unpinned", show(old)),
            must_serve: Some(new.clone()),
        },
        (KeyStep::Abort, old, Some((new, _, _))) => Transition {
            keys: to(old.clone(), None),
            action: "device.key.abort",
            detail: format!(
                "new={new} unpinned; old={} is the device's key again",
                show(old)
            ),
            must_serve: old.clone(),
        },
    }))
}

fn show(fp: &Option<String>) -> &str {
    fp.as_deref().unwrap_or("(none)")
}

/// What a check found on the device's shardrecv.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedCheck {
    /// The transfer address probed.
    pub addr: String,
    /// The key asked for (the one the step relies on).
    pub asked_for: String,
    /// The key it proved it holds when asked for it (equal to `asked_for`, or the step was
    /// refused).
    pub presented: String,
    /// What it presents to senders that name no key (its primary identity).
    pub primary: String,
}

/// What `device rotate-key` did, for the text and `--json` outputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RotationReport {
    pub device: String,
    /// `status`, `added`, `preferred`, `finished` or `aborted`.
    pub step: &'static str,
    /// The device's key (the old one while a rotation is under way).
    pub fingerprint: Option<String>,
    /// What senders pin now, preferred first.
    pub fingerprints: Vec<String>,
    pub rotation: Option<KeyRotation>,
    /// The check of the device's shardrecv, for the steps that make one.
    pub check: Option<ServedCheck>,
    /// The key this step took out of the registry (`--finish`: the old one; `--abort`: the
    /// new one), which shardrecv may now stop serving.
    pub unpinned: Option<String>,
    /// What the operator does next.
    pub next: String,
}

/// Runs one step (or reports where the rotation stands): checks, records, says what next.
pub async fn rotate_key(registry: &Registry, request: &RotateKey) -> Result<RotationReport> {
    let device = registry.device(&request.device).await?;
    let from = device.keys();
    let now = crate::store::now();
    let Some(step) = transition(&device.name, &from, &request.step, now)? else {
        return Ok(report(&device, "status", None, None));
    };
    let check = match &step.must_serve {
        Some(key) => Some(check_serves(&device, key).await?),
        None => None,
    };
    let unpinned = from
        .pins()
        .into_iter()
        .find(|k| !step.keys.pins().contains(k));
    let after = registry
        .set_device_keys(&device.name, &from, &step.keys, step.action, &step.detail)
        .await?;
    Ok(report(&after, request.step.name(), check, unpinned))
}

fn report(
    device: &Device,
    step: &'static str,
    check: Option<ServedCheck>,
    unpinned: Option<String>,
) -> RotationReport {
    RotationReport {
        device: device.name.clone(),
        step,
        fingerprint: device.fingerprint.clone(),
        fingerprints: device.pins(),
        rotation: device.rotation.clone(),
        check,
        next: next_step(device, step, unpinned.as_deref()),
        unpinned,
    }
}

/// The operator's next move, from where the device's keys stand after `step`.
pub fn next_step(device: &Device, step: &str, unpinned: Option<&str>) -> String {
    let name = &device.name;
    let cmd = format!("shardmove device rotate-key {name}");
    let reload = "reload it (`systemctl reload shardrecv`, or kill -HUP its pid)";
    match (&device.rotation, step) {
        (None, "finished") => format!(
            "drop the old key {} from {name}'s shardrecv (its config: identity = \"NEW.key\") \
             and {reload}; transfers that pinned the old key and are still running keep going, \
             and every `migrate` pass from now on pins only the new key",
            unpinned.unwrap_or("(none)")
        ),
        (None, "aborted") => format!(
            "drop the new key {} from {name}'s shardrecv (its config: identity = \"OLD.key\") \
             and {reload}",
            unpinned.unwrap_or("(none)")
        ),
        (None, _) => format!(
            "no key rotation under way; to replace {name}'s key, make one with `shardrecv \
             keygen --out NEW.key` on its host, then `{cmd} --add NEW_FINGERPRINT`"
        ),
        (Some(r), _) if r.stage == RotationStage::Added => format!(
            "give {name}'s shardrecv both keys, the old one first (its config: identity = \
             [\"OLD.key\", \"NEW.key\"], or --identity OLD.key --identity NEW.key) and {reload}; \
             then `{cmd} --prefer`, which checks that it serves {}",
            r.new
        ),
        (Some(r), _) => format!(
            "make the new key {name}'s shardrecv's primary (identity = [\"NEW.key\", \
             \"OLD.key\"]) and {reload}, so senders that name no key (older shardsend) get it \
             too; then `{cmd} --finish`, which checks that it serves {} and unpins {}",
            r.new, r.old
        ),
    }
}

/// Asks the device's shardrecv for `key` and refuses unless it proves it holds it; also
/// reads its primary, for the report.
async fn check_serves(device: &Device, key: &str) -> Result<ServedCheck> {
    let want = Fingerprint::parse(key).map_err(|e| {
        Error::Refused(format!(
            "device {}: the registry's key {key:?} is not a fingerprint shardsend accepts ({e})",
            device.name
        ))
    })?;
    let cannot = |e: &dyn std::fmt::Display| {
        Error::Refused(format!(
            "cannot check which key device {}'s shardrecv at {} serves: {e}; nothing changed",
            device.name, device.transfer_addr
        ))
    };
    let addr = tokio::net::lookup_host(&device.transfer_addr)
        .await
        .map_err(|e| cannot(&e))?
        .next()
        .ok_or_else(|| cannot(&"its transfer address resolves to nothing"))?;
    let presented = transfer::quic::probe(addr, &[want], PROBE_TIMEOUT)
        .await
        .map_err(|e| cannot(&e))?;
    let primary = transfer::quic::probe(addr, &[], PROBE_TIMEOUT)
        .await
        .map_err(|e| cannot(&e))?;
    if presented != want {
        return Err(Error::Refused(format!(
            "device {}'s shardrecv at {addr} does not serve the key {want}: asked for it, it \
             presented {presented}; give it that key (its config's identity list) and reload \
             it (SIGHUP), then run this step again; nothing changed",
            device.name
        )));
    }
    Ok(ServedCheck {
        addr: addr.to_string(),
        asked_for: want.to_string(),
        presented: presented.to_string(),
        primary: primary.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(fp: Option<&str>, rotation: Option<(&str, RotationStage)>) -> DeviceKeys {
        DeviceKeys {
            fingerprint: fp.map(str::to_string),
            rotation: rotation.map(|(n, s)| (n.to_string(), s, 100)),
        }
    }

    #[test]
    fn the_steps_keep_both_keys_pinned_until_the_finish() {
        let (old, new) = ("aa".repeat(32), "bb".repeat(32));
        let start = keys(Some(&old), None);
        assert_eq!(start.pins(), vec![old.clone()]);
        assert_eq!(transition("d", &start, &KeyStep::Status, 5).unwrap(), None);

        let added = transition("d", &start, &KeyStep::Add(new.clone()), 100)
            .unwrap()
            .unwrap();
        assert_eq!(
            added.keys,
            keys(Some(&old), Some((&new, RotationStage::Added)))
        );
        assert_eq!(added.keys.pins(), vec![old.clone(), new.clone()]);
        assert_eq!(
            added.must_serve, None,
            "the receiver gets the new key after this step"
        );
        assert_eq!(added.action, "device.key.add");

        let preferred = transition("d", &added.keys, &KeyStep::Prefer, 200)
            .unwrap()
            .unwrap();
        assert_eq!(preferred.keys.pins(), vec![new.clone(), old.clone()]);
        assert_eq!(preferred.must_serve.as_deref(), Some(new.as_str()));
        // `since` stays when the rotation began.
        assert_eq!(preferred.keys.rotation.as_ref().map(|r| r.2), Some(100));

        for from in [&added.keys, &preferred.keys] {
            let finished = transition("d", from, &KeyStep::Finish, 300)
                .unwrap()
                .unwrap();
            assert_eq!(finished.keys, keys(Some(&new), None));
            assert_eq!(finished.must_serve.as_deref(), Some(new.as_str()));
            let aborted = transition("d", from, &KeyStep::Abort, 300)
                .unwrap()
                .unwrap();
            assert_eq!(aborted.keys, start);
            assert_eq!(aborted.must_serve.as_deref(), Some(old.as_str()));
        }
    }

    #[test]
    fn steps_out_of_order_are_refused_saying_what_to_do() {
        let (old, new, other) = ("aa".repeat(32), "bb".repeat(32), "cc".repeat(32));
        let start = keys(Some(&old), None);
        for step in [KeyStep::Prefer, KeyStep::Finish, KeyStep::Abort] {
            let err = transition("d", &start, &step, 1).unwrap_err().to_string();
            assert!(
                err.contains("no key rotation") && err.contains("--add"),
                "{err}"
            );
        }
        let err = transition("d", &keys(None, None), &KeyStep::Add(new.clone()), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no key pinned"), "{err}");
        let err = transition("d", &start, &KeyStep::Add(old.clone()), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already device d's key"), "{err}");
        let under_way = keys(Some(&old), Some((&new, RotationStage::Added)));
        let err = transition("d", &under_way, &KeyStep::Add(other), 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already under way") && err.contains("--abort"),
            "{err}"
        );
        let preferred = keys(Some(&old), Some((&new, RotationStage::Preferred)));
        let err = transition("d", &preferred, &KeyStep::Prefer, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already preferred") && err.contains("--finish"),
            "{err}"
        );
    }

    #[test]
    fn fingerprints_to_add_are_checked_and_written_as_shardsend_does() {
        let upper = "AB".repeat(32);
        assert_eq!(
            KeyStep::add(&format!(" b3:{upper}")).unwrap(),
            KeyStep::Add("ab".repeat(32))
        );
        for bad in ["", "abc", &"zz".repeat(32), &"ab".repeat(33)] {
            let err = KeyStep::add(bad).unwrap_err();
            assert_eq!(err.exit_code(), crate::error::exit_code::INVALID, "{bad:?}");
            assert!(err.to_string().contains("64 hex digits"), "{err}");
        }
    }
}
