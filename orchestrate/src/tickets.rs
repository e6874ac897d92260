//! Transfer tickets the orchestrator signs for each `shardsend` pass (issue 15; the format
//! and the receiver's checks are `transfer::ticket`).
//!
//! With `migrate --ticket-key KEY`, every pass carries a ticket naming the repository's path
//! as destination, the source device's sender key, an expiry (`--ticket-ttl`) and a grant:
//! `create` when nothing is at the destination on B, else `replace` of the tree B recorded
//! there when its shardrecv installed it. B's shardrecv, run with `--ticket-signer` set to
//! this key's fingerprint, refuses a pass without such a ticket. A compromised shard host
//! keeps its own key, so it can still connect; it can no longer write where the orchestrator
//! did not send it.
//!
//! The sender's fingerprint is asked once per source device (`shardsend fingerprint` on its
//! host) and the grant once per repository and run, during the pre-copy: outside the
//! read-only window, so the final pass costs no extra round trip.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use transfer::identity::{Fingerprint, Identity};
use transfer::ticket::{Grant, Ticket};

use crate::error::{Error, Result};
use crate::executor::{self, Executor};
use crate::migrate::ports::RepoPlan;
use crate::scripts::Script;

/// Default of `migrate --ticket-ttl`: long enough for a slow pre-copy's reconnects, short
/// enough that a leaked ticket is soon useless (it is bound to one sender key anyway).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// The orchestrator's signing key, and what it learnt about senders and destinations.
pub struct TicketSigner {
    key: Identity,
    ttl: Duration,
    /// Source device -> its shardsend key's fingerprint.
    senders: Mutex<HashMap<String, Fingerprint>>,
    /// Repository -> the grant found during its pre-copy.
    grants: Mutex<HashMap<String, Grant>>,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketSigner")
            .field("fingerprint", &self.key.fingerprint)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl TicketSigner {
    /// Loads the orchestrator key (made by `shardsend keygen`).
    pub fn load(path: &Path, ttl: Duration) -> Result<TicketSigner> {
        let key =
            Identity::load(path).map_err(|e| Error::invalid("--ticket-key", e.to_string()))?;
        Ok(TicketSigner {
            key,
            ttl,
            senders: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
        })
    }

    /// The ticket for one pass of `repo` from `source` (running `shardsend` with `identity`)
    /// to `target`. `fresh`: look at B's destination again (the pre-copy), else reuse what
    /// this run found there.
    pub async fn ticket_for(
        &self,
        repo: &RepoPlan,
        (source, target): (&dyn Executor, &dyn Executor),
        (shardsend, identity): (&str, &str),
        fresh: bool,
    ) -> Result<String> {
        let sender = self.sender(repo, source, shardsend, identity).await?;
        let known = match fresh {
            true => None,
            false => self
                .grants
                .lock()
                .ok()
                .and_then(|g| g.get(&repo.repository).cloned()),
        };
        let grant = match known {
            Some(grant) => grant,
            None => {
                let grant = grant_at(repo, target).await?;
                if let Ok(mut g) = self.grants.lock() {
                    g.insert(repo.repository.clone(), grant.clone());
                }
                grant
            }
        };
        let ticket = Ticket {
            destination: repo.path.clone(),
            grant,
            manifest: None,
            sender: sender.to_string(),
            expires_at: (crate::registry::now().max(0) as u64).saturating_add(self.ttl.as_secs()),
            nonce: transfer::ticket::nonce().map_err(|e| Error::Refused(e.to_string()))?,
        };
        transfer::ticket::sign(&ticket, &self.key)
            .map_err(|e| Error::Refused(format!("cannot sign a transfer ticket: {e}")))
    }

    async fn sender(
        &self,
        repo: &RepoPlan,
        source: &dyn Executor,
        shardsend: &str,
        identity: &str,
    ) -> Result<Fingerprint> {
        let device = &repo.source.device;
        if let Some(fp) = self
            .senders
            .lock()
            .ok()
            .and_then(|s| s.get(device).copied())
        {
            return Ok(fp);
        }
        let out =
            executor::run(source, &[shardsend, "fingerprint", "--identity", identity]).await?;
        let fp = Fingerprint::parse(out.stdout.trim()).map_err(|e| {
            Error::Refused(format!(
                "`{shardsend} fingerprint --identity {identity}` on device {device} printed no \
                 fingerprint: {e}"
            ))
        })?;
        if let Ok(mut s) = self.senders.lock() {
            s.insert(device.clone(), fp);
        }
        Ok(fp)
    }
}

/// What B's destination allows: `create` when nothing is there, else `replace` of the tree
/// B's shardrecv recorded installing there (none recorded: `create`, which B refuses with a
/// message saying what is in the way).
async fn grant_at(repo: &RepoPlan, target: &dyn Executor) -> Result<Grant> {
    let dst = repo.target.path(&repo.path);
    let record =
        transfer::staging::installed_root_file(Path::new(&repo.target.root), repo.path.as_bytes());
    let record = record.to_string_lossy();
    let out = Script::InstalledRoot
        .run_ok(target, &[dst.as_str(), record.as_ref()])
        .await?;
    Ok(match out.stdout.trim() {
        "" | "absent" | "unrecorded" => Grant::Create,
        root => Grant::Replace {
            root: root.to_string(),
        },
    })
}
