//! Who owns the installed files: the sender's request (`--preserve-owner`, `--chown`,
//! `--map-owner`), what it means on the receiver, and whether the receiver may do it.
//!
//! Owners travel as numeric ids (every entry's [`Attrs`]), because names mean nothing across
//! hosts until someone says which names: the sender's options become an
//! [`OwnerPolicy`] in the `Hello` (protocol version 4). Its rules rewrite ids, first match
//! wins: a rule's source is resolved on the sender (a name there is a name in the sender's
//! user database, `*` is any), its target on the receiver (`--chown git:git` means the
//! receiver's `git`). Without any of the options the files belong to the user running
//! `shardrecv`, as before version 4.
//!
//! Giving a file to someone else needs `CAP_CHOWN`, and finishing the install of a tree that
//! is no longer ours (set-id bits back after `chown`, the rename of a directory we do not
//! own) needs `CAP_FOWNER`, `CAP_FSETID` and `CAP_DAC_OVERRIDE`: root has them all. Giving files to
//! ourselves and to one of our groups needs none. A receiver that cannot do what the sender
//! asked refuses the transfer before any data moves ([`check_can_give`]), naming the first
//! id it cannot give and the capabilities it lacks; it never installs with the wrong owner.
//!
//! Parsing, rule matching and the permission rule are sans-io; only [`Me::current`],
//! [`resolve_local`] and [`Resolved::resolve`] read the system's user database.

use std::collections::BTreeSet;

use crate::error::Error;
use crate::wire::{Attrs, Entry, IdKind, IdName, OwnerPolicy, OwnerRule};

/// A user or group pattern as the sender's operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Id(u32),
    Name(String),
}

/// One side of `--map-owner` / `--chown`: `USER:GROUP`, `USER` or `:GROUP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec<T> {
    pub user: Option<T>,
    pub group: Option<T>,
}

/// A `--map-owner FROM=TO` before the sender resolves FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOwner {
    pub from: Spec<Pattern>,
    pub to: Spec<IdName>,
}

fn parse_id_name(s: &str) -> Result<IdName, String> {
    if s.is_empty() {
        return Err("empty user or group".into());
    }
    Ok(match s.parse::<u32>() {
        Ok(id) => IdName::Id(id),
        Err(_) => IdName::Name(s.to_string()),
    })
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    Ok(match s {
        "*" => Pattern::Any,
        _ => match parse_id_name(s)? {
            IdName::Id(id) => Pattern::Id(id),
            IdName::Name(n) => Pattern::Name(n),
        },
    })
}

/// `USER:GROUP`, `USER` or `:GROUP`, each part parsed by `part`.
fn parse_spec<T>(s: &str, part: impl Fn(&str) -> Result<T, String>) -> Result<Spec<T>, String> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let spec = Spec {
        user: (!user.is_empty()).then(|| part(user)).transpose()?,
        group: group.map(&part).transpose()?,
    };
    if spec.user.is_none() && spec.group.is_none() {
        return Err(format!("{s:?} names no user and no group"));
    }
    Ok(spec)
}

/// Parses `--chown USER:GROUP` (names or numeric ids, resolved on the receiver).
pub fn parse_chown(s: &str) -> Result<Spec<IdName>, String> {
    let spec = parse_spec(s, parse_id_name)?;
    if spec.user.is_none() || spec.group.is_none() {
        return Err(format!("--chown {s:?}: expected USER:GROUP"));
    }
    Ok(spec)
}

/// Parses `--map-owner FROM=TO`: FROM and TO are `USER:GROUP`, `USER` or `:GROUP`; FROM's
/// parts may be `*` (any) and are the sender's users and groups, TO's the receiver's. Each
/// part of FROM needs its part in TO.
pub fn parse_map_owner(s: &str) -> Result<MapOwner, String> {
    let (from, to) = s
        .split_once('=')
        .ok_or_else(|| format!("--map-owner {s:?}: expected FROM=TO, e.g. git:git=phd:phd"))?;
    let from = parse_spec(from, parse_pattern).map_err(|e| format!("--map-owner {s:?}: {e}"))?;
    let to = parse_spec(to, parse_id_name).map_err(|e| format!("--map-owner {s:?}: {e}"))?;
    if from.user.is_some() != to.user.is_some() || from.group.is_some() != to.group.is_some() {
        return Err(format!(
            "--map-owner {s:?}: FROM and TO must both name a user, a group, or both"
        ));
    }
    Ok(MapOwner { from, to })
}

/// A sender-side id: a pattern resolved in the sender's user database.
fn resolve_pattern(p: &Pattern, kind: IdKind) -> Result<Option<u32>, Error> {
    Ok(match p {
        Pattern::Any => None,
        Pattern::Id(id) => Some(*id),
        Pattern::Name(name) => Some(lookup(kind, name)?.ok_or_else(|| {
            Error::Input(format!(
                "--map-owner: no {} {name:?} on this host",
                kind_name(kind)
            ))
        })?),
    })
}

fn kind_name(kind: IdKind) -> &'static str {
    match kind {
        IdKind::User => "user",
        IdKind::Group => "group",
    }
}

/// A user or group id by name, from this host's user database.
fn lookup(kind: IdKind, name: &str) -> Result<Option<u32>, Error> {
    let failed =
        |e: nix::Error| Error::Other(format!("cannot look up {} {name:?}: {e}", kind_name(kind)));
    Ok(match kind {
        IdKind::User => nix::unistd::User::from_name(name)
            .map_err(failed)?
            .map(|u| u.uid.as_raw()),
        IdKind::Group => nix::unistd::Group::from_name(name)
            .map_err(failed)?
            .map(|g| g.gid.as_raw()),
    })
}

/// The sender's policy from its options: `--map-owner` rules in order, then `--chown` as
/// the rule for everything else; `--preserve-owner` alone keeps every numeric id.
pub fn resolve_local(
    preserve: bool,
    chown: Option<&Spec<IdName>>,
    maps: &[MapOwner],
) -> Result<OwnerPolicy, Error> {
    if !preserve && chown.is_none() && maps.is_empty() {
        return Ok(OwnerPolicy::Receiver);
    }
    let mut rules = Vec::new();
    for m in maps {
        for (kind, from, to) in [
            (IdKind::User, &m.from.user, &m.to.user),
            (IdKind::Group, &m.from.group, &m.to.group),
        ] {
            if let (Some(from), Some(to)) = (from, to) {
                rules.push(OwnerRule {
                    kind,
                    from: resolve_pattern(from, kind)?,
                    to: to.clone(),
                });
            }
        }
    }
    if let Some(c) = chown {
        for (kind, to) in [(IdKind::User, &c.user), (IdKind::Group, &c.group)] {
            if let Some(to) = to {
                rules.push(OwnerRule {
                    kind,
                    from: None,
                    to: to.clone(),
                });
            }
        }
    }
    Ok(OwnerPolicy::Apply(rules))
}

/// How the summary describes a policy.
pub fn describe(policy: &OwnerPolicy) -> String {
    let name = |n: &IdName| match n {
        IdName::Id(id) => id.to_string(),
        IdName::Name(n) => n.clone(),
    };
    match policy {
        OwnerPolicy::Receiver => "receiver".into(),
        OwnerPolicy::Apply(rules) if rules.is_empty() => "preserve".into(),
        OwnerPolicy::Apply(rules) => {
            let rules: Vec<String> = rules
                .iter()
                .map(|r| {
                    let from = r.from.map_or("*".to_string(), |id| id.to_string());
                    match r.kind {
                        IdKind::User => format!("{from}={}", name(&r.to)),
                        IdKind::Group => format!(":{from}=:{}", name(&r.to)),
                    }
                })
                .collect();
            format!("preserve, mapping {}", rules.join(" "))
        }
    }
}

/// A policy resolved on the receiver: id rewrites, first match wins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    users: Vec<(Option<u32>, u32)>,
    groups: Vec<(Option<u32>, u32)>,
}

impl Resolved {
    /// Resolves the sender's policy on this host; `None` for [`OwnerPolicy::Receiver`].
    pub fn resolve(policy: &OwnerPolicy) -> Result<Option<Resolved>, String> {
        let OwnerPolicy::Apply(rules) = policy else {
            return Ok(None);
        };
        let mut resolved = Resolved::default();
        for rule in rules {
            let to = match &rule.to {
                IdName::Id(id) => *id,
                IdName::Name(name) => lookup(rule.kind, name)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!(
                            "no {} {name:?} on the receiver (asked by --chown or --map-owner)",
                            kind_name(rule.kind)
                        )
                    })?,
            };
            match rule.kind {
                IdKind::User => resolved.users.push((rule.from, to)),
                IdKind::Group => resolved.groups.push((rule.from, to)),
            }
        }
        Ok(Some(resolved))
    }

    /// The (uid, gid) an entry with these attributes is installed with.
    pub fn map(&self, attrs: &Attrs) -> (u32, u32) {
        let rewrite = |rules: &[(Option<u32>, u32)], id: u32| {
            rules
                .iter()
                .find(|(from, _)| from.is_none_or(|f| f == id))
                .map_or(id, |(_, to)| *to)
        };
        (
            rewrite(&self.users, attrs.uid),
            rewrite(&self.groups, attrs.gid),
        )
    }
}

/// What this process may give files to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub euid: u32,
    pub groups: BTreeSet<u32>,
    /// The capabilities giving files away takes that we lack (root has them all, unless
    /// dropped); empty when we may.
    pub missing_caps: Vec<&'static str>,
}

/// What giving files away takes: (name, bit in `/proc/self/status`'s `CapEff`).
const GIVE_AWAY_CAPS: [(&str, u32); 4] = [
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
];

impl Me {
    pub fn current() -> Me {
        let euid = nix::unistd::geteuid().as_raw();
        let mut groups: BTreeSet<u32> = nix::unistd::getgroups()
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        groups.insert(nix::unistd::getegid().as_raw());
        let cap_eff = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            });
        let has = |bit: u32| cap_eff.map_or(euid == 0, |c| c & (1 << bit) != 0);
        Me {
            euid,
            groups,
            missing_caps: GIVE_AWAY_CAPS
                .iter()
                .filter(|(_, bit)| !has(*bit))
                .map(|(name, _)| *name)
                .collect(),
        }
    }
}

/// Refuses, before any data moves, a policy this receiver cannot carry out: an id it may
/// not give files to without the capabilities it lacks.
pub fn check_can_give(resolved: &Resolved, entries: &[Entry], me: &Me) -> Result<(), String> {
    if me.missing_caps.is_empty() {
        return Ok(());
    }
    for e in entries {
        let Some(attrs) = &e.attrs else { continue };
        let (uid, gid) = resolved.map(attrs);
        if uid != me.euid || !me.groups.contains(&gid) {
            return Err(format!(
                "cannot install {:?} for uid {uid} gid {gid}: shardrecv runs as uid {} without \
                 {} (run it as root, or grant it CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and \
                 CAP_FSETID, e.g. systemd AmbientCapabilities=CAP_CHOWN CAP_DAC_OVERRIDE \
                 CAP_FOWNER CAP_FSETID)",
                String::from_utf8_lossy(&e.path),
                me.euid,
                me.missing_caps.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(uid: u32, gid: u32) -> Attrs {
        Attrs {
            uid,
            gid,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn options_parse_and_refuse_clearly() {
        assert_eq!(
            parse_chown("phd:998").unwrap(),
            Spec {
                user: Some(IdName::Name("phd".into())),
                group: Some(IdName::Id(998)),
            }
        );
        for bad in ["phd", ":phd", "", ":"] {
            assert!(parse_chown(bad).is_err(), "{bad}");
        }
        let m = parse_map_owner("*:git=phd:phd").unwrap();
        assert_eq!(m.from.user, Some(Pattern::Any));
        assert_eq!(m.from.group, Some(Pattern::Name("git".into())));
        let m = parse_map_owner(":0=:1001").unwrap();
        assert_eq!((m.from.user, m.to.group), (None, Some(IdName::Id(1001))));
        for bad in ["git", "git=", "=phd", "git=:phd", "git:git=phd", ":=:"] {
            let err = parse_map_owner(bad).unwrap_err();
            assert!(err.contains("--map-owner"), "{bad}: {err}");
        }
    }

    #[test]
    fn rules_rewrite_ids_first_match_wins() {
        let policy = resolve_local(
            false,
            Some(&parse_chown("7:8").unwrap()),
            &[
                parse_map_owner("0:0=0:0").unwrap(),
                parse_map_owner("1000=2000").unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(
            describe(&policy),
            "preserve, mapping 0=0 :0=:0 1000=2000 *=7 :*=:8"
        );
        let r = Resolved::resolve(&policy).unwrap().unwrap();
        assert_eq!(r.map(&attrs(0, 0)), (0, 0));
        assert_eq!(r.map(&attrs(1000, 1000)), (2000, 8));
        assert_eq!(r.map(&attrs(5, 6)), (7, 8));
        // --preserve-owner alone keeps every id; no option leaves files to the receiver.
        let keep = resolve_local(true, None, &[]).unwrap();
        assert_eq!(describe(&keep), "preserve");
        let r = Resolved::resolve(&keep).unwrap().unwrap();
        assert_eq!(r.map(&attrs(5, 6)), (5, 6));
        assert_eq!(
            resolve_local(false, None, &[]).unwrap(),
            OwnerPolicy::Receiver
        );
        assert_eq!(Resolved::resolve(&OwnerPolicy::Receiver), Ok(None));
    }

    #[test]
    fn names_resolve_on_their_own_side_and_unknown_ones_are_refused() {
        let root = parse_map_owner("root=root").unwrap();
        let policy = resolve_local(false, None, &[root]).unwrap();
        let OwnerPolicy::Apply(rules) = &policy else {
            panic!("{policy:?}")
        };
        assert_eq!(rules[0].from, Some(0), "the sender resolves FROM");
        assert_eq!(
            rules[0].to,
            IdName::Name("root".into()),
            "TO travels as a name"
        );
        assert_eq!(
            Resolved::resolve(&policy)
                .unwrap()
                .unwrap()
                .map(&attrs(0, 5)),
            (0, 5)
        );
        let missing = OwnerPolicy::Apply(vec![OwnerRule {
            kind: IdKind::Group,
            from: None,
            to: IdName::Name("no-such-group-shardmove".into()),
        }]);
        let err = Resolved::resolve(&missing).unwrap_err();
        assert!(
            err.contains("no group \"no-such-group-shardmove\""),
            "{err}"
        );
        let err = resolve_local(
            false,
            None,
            &[parse_map_owner("no-such-user-sm=root").unwrap()],
        )
        .unwrap_err();
        assert!(err.to_string().contains("no user"), "{err}");
    }

    #[test]
    fn without_cap_chown_only_our_own_ids_are_allowed() {
        let me = Me {
            euid: 1000,
            groups: [1000, 27].into(),
            missing_caps: vec!["CAP_CHOWN", "CAP_FOWNER"],
        };
        let entry = |path: &str, uid, gid| Entry {
            path: path.as_bytes().to_vec(),
            attrs: Some(attrs(uid, gid)),
            ..Entry::default()
        };
        let keep = Resolved::default();
        let ours = [entry("", 1000, 1000), entry("f", 1000, 27)];
        assert_eq!(check_can_give(&keep, &ours, &me), Ok(()));
        let theirs = [entry("", 1000, 1000), entry("hooks/x", 998, 998)];
        let err = check_can_give(&keep, &theirs, &me).unwrap_err();
        assert!(err.contains("\"hooks/x\" for uid 998 gid 998"), "{err}");
        assert!(err.contains("without CAP_CHOWN, CAP_FOWNER"), "{err}");
        let root = Me {
            missing_caps: Vec::new(),
            ..me
        };
        assert_eq!(check_can_give(&keep, &theirs, &root), Ok(()));
    }
}
