//! Transfer tickets: the orchestrator's signed permission for one transfer (issue 15).
//!
//! **Why.** A receiver's allow-list says who may *connect*, not what they may *write*: any
//! sender on it could replace any repository under the receiver's root. With tickets on
//! (`shardrecv --ticket-signer FINGERPRINT`), every transfer must also carry a ticket that
//! the orchestrator signed with its own key, naming:
//! - the destination;
//! - the grant: `create` (nothing may be installed there) or `replace` (what is installed
//!   there must be the tree whose root hash the ticket names, as recorded by the install);
//! - the expected manifest hash, when the orchestrator knows it;
//! - the sender's fingerprint (the TLS-authenticated peer must be that key);
//! - an expiry, and a nonce.
//!
//! A compromised shard host keeps its own key, so it can still connect; without the
//! orchestrator's key it can only ask for what a ticket it was given allows, before it
//! expires. The allow-list alone stays available for standalone `shardsend` use.
//!
//! **Format.** `smt1.PAYLOAD.SIGNER.SIGNATURE`, each part base64url without padding:
//! `PAYLOAD` is the [`Ticket`] as JSON; `SIGNER` the DER `SubjectPublicKeyInfo` of the
//! orchestrator's key (an identity made by `keygen`, ECDSA P-256, so the fingerprint is
//! BLAKE3 of these bytes, exactly as for TLS identities); `SIGNATURE` ECDSA P-256 SHA-256
//! (ASN.1) over [`SIGNED_CONTEXT`] followed by `PAYLOAD`'s bytes. Text, so it passes through
//! a command line or an ssh session unchanged. Carrying the signer's key in the ticket lets a
//! receiver trust several signers by fingerprint, which is what a key rotation needs.
//!
//! **Replay.** A transfer may reconnect and resume with the same ticket until it installs;
//! from then on the ticket's nonce is spent ([`SpentNonces`]), until it expires. A receiver
//! restarted within a ticket's lifetime forgets what it spent; the grant still stands in the
//! way (a `create` finds the tree installed, a `replace` finds a different root).
//!
//! This module is sans-io: parsing, signature and field checks. The receiver's session asks
//! it at `Hello` and before installing; signing is [`sign`], used by `shardmove`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::identity::{Fingerprint, Identity};

/// The first part of every ticket's text.
pub const PREFIX: &str = "smt1";
/// What the signature covers before the payload, so that no other signed message of the
/// same key can pass for a ticket.
pub const SIGNED_CONTEXT: &[u8] = b"shardxfer transfer ticket v1\0";
/// Longest ticket text accepted (a real one is well under 1 KiB).
pub const MAX_TICKET_LEN: usize = 4096;
/// Clock difference between orchestrator and receiver tolerated at the expiry.
pub const CLOCK_SKEW_SECS: u64 = 30;
/// The DER prefix of every ECDSA P-256 `SubjectPublicKeyInfo` (algorithm id-ecPublicKey,
/// curve prime256v1, a 66-byte bit string); the 65-byte uncompressed point follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// What a ticket allows at its destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Grant {
    /// Nothing may be installed at the destination yet.
    Create,
    /// The tree installed at the destination must have this root hash (hex), as the
    /// receiver recorded it when it installed that tree.
    Replace { root: String },
}

/// The signed content of a ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ticket {
    /// The destination, exactly as the sender's `Hello` names it.
    pub destination: String,
    pub grant: Grant,
    /// The manifest hash (hex) the transfer must announce, when the orchestrator knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Fingerprint (hex) of the only sender that may use it.
    pub sender: String,
    /// Unix seconds after which it is refused.
    pub expires_at: u64,
    /// Random, unique per ticket: what [`SpentNonces`] remembers.
    pub nonce: String,
}

/// A ticket whose signature checked out, and who signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub ticket: Ticket,
    pub signer: Fingerprint,
}

/// Why a ticket was refused. Each says what to do about it: the text reaches the sender's
/// error message and the receiver's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Tickets are required and the transfer carries none.
    Missing,
    /// Not a ticket's text (the detail says which part).
    Malformed(String),
    /// Signed by a key the receiver does not trust (its fingerprint).
    UnknownSigner(String),
    /// The signature does not match the payload.
    BadSignature,
    /// Expired at this unix time.
    Expired(u64),
    /// Issued for another destination (the ticket's).
    WrongDestination(String),
    /// Issued for another sender (the ticket's sender fingerprint).
    WrongSender(String),
    /// Its nonce was spent by a transfer that installed.
    Replayed,
    /// A `create` ticket, and a tree is installed at the destination.
    DestinationExists,
    /// A `replace` ticket, and what is installed differs (`None`: nothing recorded there).
    WrongRoot {
        expected: String,
        found: Option<String>,
    },
    /// The transfer's manifest is not the one the ticket names.
    WrongManifest { expected: String, found: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Missing => write!(
                f,
                "this receiver requires a transfer ticket (shardsend --ticket) signed by the \
                 orchestrator"
            ),
            Refusal::Malformed(why) => write!(f, "the transfer ticket is malformed: {why}"),
            Refusal::UnknownSigner(fp) => write!(
                f,
                "the transfer ticket is signed by {fp}, which this receiver does not trust \
                 (--ticket-signer)"
            ),
            Refusal::BadSignature => write!(f, "the transfer ticket's signature is invalid"),
            Refusal::Expired(at) => write!(
                f,
                "the transfer ticket expired at {at} (unix time); ask the orchestrator for a \
                 new one"
            ),
            Refusal::WrongDestination(d) => {
                write!(
                    f,
                    "the transfer ticket is for destination {d:?}, not this one"
                )
            }
            Refusal::WrongSender(fp) => {
                write!(f, "the transfer ticket is for sender {fp}, not this one")
            }
            Refusal::Replayed => write!(
                f,
                "the transfer ticket was already used by a transfer that installed"
            ),
            Refusal::DestinationExists => write!(
                f,
                "the transfer ticket allows creating the destination, and it exists"
            ),
            Refusal::WrongRoot { expected, found } => match found {
                Some(found) => write!(
                    f,
                    "the transfer ticket allows replacing the tree {expected}, and the \
                     installed one is {found}"
                ),
                None => write!(
                    f,
                    "the transfer ticket allows replacing the tree {expected}, and this \
                     receiver has no record of what is installed there"
                ),
            },
            Refusal::WrongManifest { expected, found } => write!(
                f,
                "the transfer ticket is for manifest {expected}, and the transfer sent {found}"
            ),
        }
    }
}

/// A fresh random nonce (128 bits, hex), from the kernel.
pub fn nonce() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn getrandom(buf: &mut [u8]) -> Result<(), Error> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| Error::Other(format!("cannot read /dev/urandom: {e}")))
}

/// The ticket's text, signed with `signer` (the orchestrator's identity).
pub fn sign(ticket: &Ticket, signer: &Identity) -> Result<String, Error> {
    let payload = serde_json::to_vec(ticket).map_err(|e| Error::Other(e.to_string()))?;
    let mut message = SIGNED_CONTEXT.to_vec();
    message.extend_from_slice(&payload);
    let signature = signer.sign(&message)?;
    Ok(format!(
        "{PREFIX}.{}.{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(signer.public_key_info()),
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// Parses `text` and checks its signature against the trusted signers; says nothing yet
/// about what it allows ([`check`]).
pub fn open(text: &str, trusted: &HashSet<Fingerprint>) -> Result<Signed, Refusal> {
    if text.len() > MAX_TICKET_LEN {
        return Err(Refusal::Malformed(format!(
            "{} bytes, more than {MAX_TICKET_LEN}",
            text.len()
        )));
    }
    let parts: Vec<&str> = text.trim().split('.').collect();
    let &[prefix, payload, signer, signature] = parts.as_slice() else {
        return Err(Refusal::Malformed(format!(
            "{} dot-separated parts, expected 4",
            parts.len()
        )));
    };
    if prefix != PREFIX {
        return Err(Refusal::Malformed(format!(
            "starts with {prefix:?}, expected {PREFIX:?}"
        )));
    }
    let decode = |what: &str, part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| Refusal::Malformed(format!("its {what} is not base64url: {e}")))
    };
    let (payload, spki, signature) = (
        decode("payload", payload)?,
        decode("signer", signer)?,
        decode("signature", signature)?,
    );
    let signer = Fingerprint(*blake3::hash(&spki).as_bytes());
    if !trusted.contains(&signer) {
        return Err(Refusal::UnknownSigner(signer.to_string()));
    }
    let point = spki
        .strip_prefix(&P256_SPKI_PREFIX[..])
        .filter(|p| p.len() == 65)
        .ok_or_else(|| Refusal::Malformed("its signer is not an ECDSA P-256 key".into()))?;
    let mut message = SIGNED_CONTEXT.to_vec();
    message.extend_from_slice(&payload);
    webpki::ring::ECDSA_P256_SHA256
        .verify_signature(point, &message, &signature)
        .map_err(|_| Refusal::BadSignature)?;
    let ticket: Ticket = serde_json::from_slice(&payload)
        .map_err(|e| Refusal::Malformed(format!("its payload: {e}")))?;
    Ok(Signed { ticket, signer })
}

/// Checks what a signed ticket says against the transfer asking with it: at unix time `now`,
/// to `destination`, from the authenticated `sender`.
pub fn check(
    ticket: &Ticket,
    now: u64,
    destination: &[u8],
    sender: &Fingerprint,
) -> Result<(), Refusal> {
    if now > ticket.expires_at.saturating_add(CLOCK_SKEW_SECS) {
        return Err(Refusal::Expired(ticket.expires_at));
    }
    if ticket.destination.as_bytes() != destination {
        return Err(Refusal::WrongDestination(ticket.destination.clone()));
    }
    let sender_ok = Fingerprint::parse(&ticket.sender).is_ok_and(|fp| fp == *sender);
    if !sender_ok {
        return Err(Refusal::WrongSender(ticket.sender.clone()));
    }
    Ok(())
}

/// Checks the grant against what is installed at the destination: `installed_root` is the
/// recorded root hash (hex) of the tree there, `exists` whether anything is there at all.
pub fn check_grant(
    grant: &Grant,
    exists: bool,
    installed_root: Option<&str>,
) -> Result<(), Refusal> {
    match grant {
        Grant::Create if exists => Err(Refusal::DestinationExists),
        Grant::Create => Ok(()),
        Grant::Replace { root } if exists && installed_root == Some(root.as_str()) => Ok(()),
        Grant::Replace { root } => Err(Refusal::WrongRoot {
            expected: root.clone(),
            found: installed_root.filter(|_| exists).map(str::to_string),
        }),
    }
}

/// Checks the manifest hash the transfer announced against the ticket's, if it names one.
pub fn check_manifest(ticket: &Ticket, manifest_hash: &[u8; 32]) -> Result<(), Refusal> {
    match &ticket.manifest {
        Some(expected) if !expected.eq_ignore_ascii_case(&crate::wire::hex(manifest_hash)) => {
            Err(Refusal::WrongManifest {
                expected: expected.clone(),
                found: crate::wire::hex(manifest_hash),
            })
        }
        _ => Ok(()),
    }
}

/// Nonces of tickets whose transfer installed, kept until the ticket expires (bounded: at
/// most [`SpentNonces::CAPACITY`], the soonest to expire forgotten first).
#[derive(Debug, Default)]
pub struct SpentNonces {
    /// nonce -> expiry (unix seconds, skew included).
    spent: BTreeMap<String, u64>,
}

impl SpentNonces {
    pub const CAPACITY: usize = 1 << 16;

    /// Whether `ticket`'s nonce was spent (at unix time `now`).
    pub fn is_spent(&mut self, ticket: &Ticket, now: u64) -> bool {
        self.prune(now);
        self.spent.contains_key(&ticket.nonce)
    }

    /// Records `ticket`'s nonce as spent by an install.
    pub fn spend(&mut self, ticket: &Ticket, now: u64) {
        self.prune(now);
        if self.spent.len() >= Self::CAPACITY {
            if let Some(soonest) = self
                .spent
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(n, _)| n.clone())
            {
                self.spent.remove(&soonest);
            }
        }
        self.spent.insert(
            ticket.nonce.clone(),
            ticket.expires_at.saturating_add(CLOCK_SKEW_SECS),
        );
    }

    fn prune(&mut self, now: u64) {
        self.spent.retain(|_, until| *until >= now);
    }

    pub fn len(&self) -> usize {
        self.spent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dir: &std::path::Path, name: &str) -> Identity {
        Identity::generate(&dir.join(name)).expect("key")
    }

    fn ticket(sender: &Fingerprint, expires_at: u64) -> Ticket {
        Ticket {
            destination: "t/r1.git".into(),
            grant: Grant::Create,
            manifest: None,
            sender: sender.to_string(),
            expires_at,
            nonce: nonce().expect("nonce"),
        }
    }

    /// The orchestrator's key, a sender's and another one.
    fn three_identities(dir: &std::path::Path) -> (Identity, Identity, Identity) {
        (
            identity(dir, "orch"),
            identity(dir, "send"),
            identity(dir, "other"),
        )
    }

    fn trusted(id: &Identity) -> HashSet<Fingerprint> {
        [id.fingerprint].into_iter().collect()
    }

    #[test]
    fn a_signed_ticket_opens_and_checks_for_its_transfer_only() {
        let dir = tempfile::tempdir().expect("dir");
        let (orch, sender, other) = three_identities(dir.path());
        let t = ticket(&sender.fingerprint, 1_000);
        let text = sign(&t, &orch).expect("sign");
        assert!(text.starts_with("smt1.") && text.len() < 1024, "{text}");
        let signed = open(&text, &trusted(&orch)).expect("opens");
        assert_eq!(signed.ticket, t);
        assert_eq!(signed.signer, orch.fingerprint);
        assert_eq!(check(&t, 900, b"t/r1.git", &sender.fingerprint), Ok(()));
        // Expired (past the skew allowance), wrong destination, wrong sender.
        assert_eq!(
            check(
                &t,
                1_000 + CLOCK_SKEW_SECS + 1,
                b"t/r1.git",
                &sender.fingerprint
            ),
            Err(Refusal::Expired(1_000))
        );
        assert_eq!(
            check(
                &t,
                1_000 + CLOCK_SKEW_SECS,
                b"t/r1.git",
                &sender.fingerprint
            ),
            Ok(())
        );
        assert_eq!(
            check(&t, 900, b"t/r2.git", &sender.fingerprint),
            Err(Refusal::WrongDestination("t/r1.git".into()))
        );
        assert!(matches!(
            check(&t, 900, b"t/r1.git", &other.fingerprint),
            Err(Refusal::WrongSender(_))
        ));
        // Signed by a key not trusted here.
        let rogue = sign(&t, &other).expect("sign");
        assert_eq!(
            open(&rogue, &trusted(&orch)),
            Err(Refusal::UnknownSigner(other.fingerprint.to_string()))
        );
        // Two trusted signers (a rotation): either opens.
        let both: HashSet<_> = [orch.fingerprint, other.fingerprint].into_iter().collect();
        assert!(open(&rogue, &both).is_ok() && open(&text, &both).is_ok());
    }

    #[test]
    fn a_tampered_ticket_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let (orch, sender, other) = three_identities(dir.path());
        let t = ticket(&sender.fingerprint, 1_000);
        let text = sign(&t, &orch).expect("sign");
        let parts: Vec<&str> = text.split('.').collect();
        // Another payload under the same signature: a longer expiry, another destination.
        for changed in [
            Ticket {
                expires_at: u64::MAX,
                ..t.clone()
            },
            Ticket {
                destination: "t/other.git".into(),
                ..t.clone()
            },
        ] {
            let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&changed).expect("json"));
            let forged = format!("{}.{payload}.{}.{}", parts[0], parts[2], parts[3]);
            assert_eq!(open(&forged, &trusted(&orch)), Err(Refusal::BadSignature));
        }
        // The same payload and signature presented with another (trusted) key.
        let other_key = URL_SAFE_NO_PAD.encode(other.public_key_info());
        let swapped = format!("{}.{}.{other_key}.{}", parts[0], parts[1], parts[3]);
        let both: HashSet<_> = [orch.fingerprint, other.fingerprint].into_iter().collect();
        assert_eq!(open(&swapped, &both), Err(Refusal::BadSignature));
        // A flipped signature bit; junk in every position.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[3]).expect("b64");
        let last = sig.len() - 1;
        sig[last] ^= 1;
        let flipped = format!(
            "{}.{}.{}.{}",
            parts[0],
            parts[1],
            parts[2],
            URL_SAFE_NO_PAD.encode(&sig)
        );
        assert_eq!(open(&flipped, &trusted(&orch)), Err(Refusal::BadSignature));
        for junk in [
            "",
            "smt1",
            "smt2.a.b.c",
            "smt1.!!.b.c",
            &format!("{}.{}.{}", parts[0], parts[1], parts[2]),
            &"x".repeat(MAX_TICKET_LEN + 1),
        ] {
            assert!(
                matches!(open(junk, &trusted(&orch)), Err(Refusal::Malformed(_))),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn grants_manifests_and_spent_nonces() {
        let root = "ab".repeat(32);
        assert_eq!(check_grant(&Grant::Create, false, None), Ok(()));
        assert_eq!(
            check_grant(&Grant::Create, true, Some(&root)),
            Err(Refusal::DestinationExists)
        );
        let replace = Grant::Replace { root: root.clone() };
        assert_eq!(check_grant(&replace, true, Some(&root)), Ok(()));
        assert_eq!(
            check_grant(&replace, true, Some("cd")),
            Err(Refusal::WrongRoot {
                expected: root.clone(),
                found: Some("cd".into())
            })
        );
        assert_eq!(
            check_grant(&replace, true, None),
            Err(Refusal::WrongRoot {
                expected: root.clone(),
                found: None
            })
        );
        assert!(check_grant(&replace, false, Some(&root)).is_err());

        let dir = tempfile::tempdir().expect("dir");
        let sender = identity(dir.path(), "send");
        let mut t = ticket(&sender.fingerprint, 1_000);
        assert_eq!(check_manifest(&t, &[7; 32]), Ok(()));
        t.manifest = Some("07".repeat(32));
        assert_eq!(check_manifest(&t, &[7; 32]), Ok(()));
        assert!(check_manifest(&t, &[8; 32]).is_err());

        let mut spent = SpentNonces::default();
        assert!(!spent.is_spent(&t, 500));
        spent.spend(&t, 500);
        assert!(spent.is_spent(&t, 900));
        // Forgotten once the ticket could not be used anyway.
        assert!(!spent.is_spent(&t, 1_000 + CLOCK_SKEW_SECS + 1));
        assert!(spent.is_empty());
    }
}
