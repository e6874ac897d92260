//! Issue 15, item 1: a receiver run with `--ticket-signer` writes only what a ticket signed
//! by that key allows: this destination, from this sender, before it expires, once; created
//! where nothing is, or replacing the very tree it recorded installing.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use transfer::identity::{Fingerprint, Identity};
use transfer::ticket::{self, Grant, Ticket};

use super::util::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn signed(
    by: &Identity,
    dest: &str,
    grant: Grant,
    sender: &Fingerprint,
    expires_at: u64,
) -> String {
    let t = Ticket {
        destination: dest.into(),
        grant,
        manifest: None,
        sender: sender.to_string(),
        expires_at,
        nonce: ticket::nonce().expect("nonce"),
    };
    ticket::sign(&t, by).expect("sign")
}

/// Sends `src` to `dest` with `ticket` (none: no `--ticket`); asserts it was refused with
/// a message containing `why`, and that nothing was installed by it.
#[track_caller]
fn refused(keys: &Keys, d: &Daemon, src: &Path, dest: &str, ticket: Option<&str>, why: &str) {
    let existed = d.root.join(dest).exists();
    let extra: Vec<&str> = ticket.map(|t| vec!["--ticket", t]).unwrap_or_default();
    let out = send(keys, src, &d.addr, dest, &extra);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(why),
        "expected {why:?} in: {}",
        stderr(&out)
    );
    assert_eq!(d.root.join(dest).exists(), existed, "{dest} changed");
}

#[test]
fn tickets_allow_only_the_transfer_they_name() {
    let keys = Keys::new();
    let orch = Identity::generate(&keys.path("orchestrator.key")).expect("key");
    let rogue = Identity::generate(&keys.path("rogue.key")).expect("key");
    let root = keys.path("root");
    let signer = orch.fingerprint.to_string();
    let d = Daemon::start_with(
        &keys,
        &root,
        "127.0.0.1:0",
        &[],
        &["--ticket-signer", &signer],
    );
    let src = keys.path("src");
    std::fs::create_dir_all(src.join("refs")).unwrap();
    write_random(&src.join("pack"), 300_000, 7);
    std::fs::write(src.join("refs/main"), "one\n").unwrap();
    let me = keys.send_fp;
    let later = now() + 600;

    // No ticket: refused, whoever asks (the sender is on the allow-list).
    refused(&keys, &d, &src, "a.git", None, "requires a transfer ticket");

    // A create ticket: installed; the same ticket again is spent.
    let create_a = signed(&orch, "a.git", Grant::Create, &me, later);
    assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "a.git",
        &["--ticket", &create_a],
    ));
    assert_same_tree(&src, &root.join("a.git"));
    refused(&keys, &d, &src, "a.git", Some(&create_a), "already used");

    // Another destination, another sender, past its expiry, signed by an untrusted key.
    let for_b = signed(&orch, "b.git", Grant::Create, &me, later);
    refused(
        &keys,
        &d,
        &src,
        "c.git",
        Some(&for_b),
        "is for destination \"b.git\"",
    );
    let for_rogue = signed(&orch, "c.git", Grant::Create, &rogue.fingerprint, later);
    refused(&keys, &d, &src, "c.git", Some(&for_rogue), "is for sender");
    let expired = signed(&orch, "c.git", Grant::Create, &me, now() - 3600);
    refused(&keys, &d, &src, "c.git", Some(&expired), "expired");
    let untrusted = signed(&rogue, "c.git", Grant::Create, &me, later);
    refused(&keys, &d, &src, "c.git", Some(&untrusted), "does not trust");

    // Tampered: the payload of a ticket for c.git under the signature of one for b.git.
    let for_c = signed(&orch, "c.git", Grant::Create, &me, later);
    let (b, c): (Vec<&str>, Vec<&str>) = (for_b.split('.').collect(), for_c.split('.').collect());
    let tampered = format!("{}.{}.{}.{}", c[0], c[1], b[2], b[3]);
    refused(
        &keys,
        &d,
        &src,
        "c.git",
        Some(&tampered),
        "signature is invalid",
    );
    refused(&keys, &d, &src, "c.git", Some("smt1.garbage"), "malformed");
    // The untampered one still works.
    assert_ok(&send(&keys, &src, &d.addr, "c.git", &["--ticket", &for_c]));

    // Creating over an installed tree is refused; replacing it needs its recorded root.
    let create_again = signed(&orch, "a.git", Grant::Create, &me, later);
    refused(&keys, &d, &src, "a.git", Some(&create_again), "it exists");
    let wrong_root = Grant::Replace {
        root: "00".repeat(32),
    };
    let wrong = signed(&orch, "a.git", wrong_root, &me, later);
    refused(
        &keys,
        &d,
        &src,
        "a.git",
        Some(&wrong),
        "allows replacing the tree",
    );
    let recorded =
        std::fs::read_to_string(transfer::staging::installed_root_file(&d.root, b"a.git"))
            .expect("the install recorded its root");
    std::fs::write(src.join("refs/main"), "two\n").unwrap();
    let replace_recorded = || {
        let root = recorded.trim().to_string();
        signed(&orch, "a.git", Grant::Replace { root }, &me, later)
    };
    let replace = replace_recorded();
    assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "a.git",
        &["--ticket", &replace],
    ));
    assert_eq!(
        std::fs::read_to_string(root.join("a.git/refs/main")).unwrap(),
        "two\n"
    );
    // The record follows the new tree: the old root no longer replaces it.
    let stale = replace_recorded();
    refused(
        &keys,
        &d,
        &src,
        "a.git",
        Some(&stale),
        "allows replacing the tree",
    );
    assert!(d.log().contains("refusing transfer"), "{}", d.log());
}

#[test]
fn a_receiver_without_tickets_ignores_one_and_the_allow_list_decides() {
    let keys = Keys::new();
    let orch = Identity::generate(&keys.path("orchestrator.key")).expect("key");
    let d = Daemon::start(&keys, &keys.path("root"));
    let src = keys.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    assert_ok(&send(&keys, &src, &d.addr, "plain", &[]));
    let t = signed(&orch, "other", Grant::Create, &keys.send_fp, now() + 60);
    assert_ok(&send(
        &keys,
        &src,
        &d.addr,
        "with-ticket",
        &["--ticket", &t],
    ));
}
