//! A simulated world for the pure core: one repository's copies on A and B, the control
//! plane's view of it, the journal, and clients pushing, all in memory. The property tests
//! drive [`RepoMachine`] through it with failures, partial effects and crashes injected
//! after any action, and check the invariants of issue 10 after every action and at the end:
//! - every repository ends `done` (one rolled back is retried by the next run);
//! - disk agrees with the control plane at rest: a copy has the maintenance hook exactly
//!   when the plane says it is frozen or is the stale source;
//! - every acknowledged push is in the final copy;
//! - after clusterize the old copy never accepts a push; B is never left hooked when done;
//! - nothing is left in B's staging.

use std::collections::BTreeSet;

use super::core::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    None,
    Freeze,
    Stale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// What may happen around one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Twist {
    /// The action runs and succeeds.
    Normal,
    /// It fails without any effect.
    FailBefore,
    /// It takes effect, then reports a failure (a lost answer, a dead ssh session).
    FailAfter,
    /// The driver dies right after the action took effect (before it is told).
    Crash,
    /// A client pushes where the control plane says the repository lives, then the action
    /// runs normally.
    Push,
    /// A client with an old remote pushes to A's copy directly, then the action runs.
    PushToA,
    /// At a final pass: it installs B's copy unheard, the driver's successor, finding
    /// nothing installed yet, stages the tree again, and dies too (seen in the kill -9
    /// soak: the receiver was still installing when the successor probed). Elsewhere a
    /// plain crash.
    Superseded,
}

#[derive(Debug, Clone)]
pub struct World {
    disk_hooks: bool,
    // The control plane.
    service: Side,
    maintenance: bool,
    b_promoted: bool,
    // Disk.
    a_refs: BTreeSet<u32>,
    a_hook: Hook,
    b_copy: Option<(BTreeSet<u32>, Hook)>,
    staging: Option<(BTreeSet<u32>, Hook)>,
    b_aside: u32,
    // The journal.
    record: RepoRecord,
    frozen_at: Option<i64>,
    thawed_at: Option<i64>,
    // Clients.
    next_push: u32,
    acknowledged: BTreeSet<u32>,
    clock_ms: i64,
}

impl World {
    pub fn new(disk_hooks: bool) -> World {
        World {
            disk_hooks,
            service: Side::A,
            maintenance: false,
            b_promoted: false,
            a_refs: [0].into(),
            a_hook: Hook::None,
            b_copy: None,
            staging: None,
            b_aside: 0,
            record: RepoRecord::default(),
            frozen_at: None,
            thawed_at: None,
            next_push: 1,
            acknowledged: BTreeSet::new(),
            clock_ms: 0,
        }
    }

    fn push(&mut self, to: Side) {
        self.next_push += 1;
        let id = self.next_push;
        let accepted = match to {
            // Phorge's front (no disk hooks) refuses during maintenance and routes to the
            // service's leader; the built-in world relies on the hooks alone.
            _ if !self.disk_hooks && self.maintenance => false,
            Side::A if self.disk_hooks => self.a_hook == Hook::None,
            Side::A => self.service == Side::A,
            Side::B => match &self.b_copy {
                Some((_, hook)) => *hook == Hook::None && (self.disk_hooks || self.b_promoted),
                None => false,
            },
        };
        if accepted {
            match to {
                Side::A => self.a_refs.insert(id),
                Side::B => self
                    .b_copy
                    .as_mut()
                    .is_some_and(|(refs, _)| refs.insert(id)),
            };
            self.acknowledged.insert(id);
        }
    }

    /// The effect of `action`; `Err` when the world refuses it (a real failure).
    fn apply(&mut self, action: &Action) -> Result<Completion, String> {
        self.clock_ms += 7;
        Ok(match action {
            Action::Journal(w) => {
                if let Some(state) = w.state {
                    self.record.state = Some(state);
                }
                match &w.error {
                    ErrorUpdate::Keep => {}
                    ErrorUpdate::Set(e) => self.record.error = Some(e.clone()),
                    ErrorUpdate::Clear => self.record.error = None,
                }
                if let Some(tips) = &w.verified_tips {
                    self.record.verified_tips = Some(tips.clone());
                }
                if w.state == Some(RepoState::Pending) {
                    self.record.verified_tips = None;
                }
                if w.stamp_frozen && self.frozen_at.is_none() {
                    self.frozen_at = Some(self.clock_ms);
                }
                if self.frozen_at.is_some() && self.thawed_at.is_none() {
                    self.thawed_at = w.thawed_at_ms;
                }
                Completion::Nothing
            }
            Action::Host(op) => match op {
                HostOp::Precopy => {
                    self.staging = Some((self.a_refs.clone(), self.a_hook));
                    Completion::Precopied {
                        sent_bytes: 1,
                        waited: None,
                    }
                }
                HostOp::CheckStaged => Completion::Staged {
                    tips: self
                        .staging
                        .as_ref()
                        .map(|(refs, _)| refs.iter().map(|r| r.to_string()).collect()),
                },
                HostOp::HookSource { .. } => {
                    self.a_hook = Hook::Freeze;
                    Completion::Nothing
                }
                HostOp::FinalPass => {
                    if self.b_copy.is_some() {
                        self.b_aside += 1;
                    }
                    self.b_copy = Some((self.a_refs.clone(), self.a_hook));
                    self.staging = None;
                    Completion::FinalPass {
                        bytes: 1,
                        sent_bytes: 1,
                        source_refs: refs_text(&self.a_refs),
                    }
                }
                HostOp::ReadSourceRefs => Completion::SourceRefs(refs_text(&self.a_refs)),
                HostOp::ProbeInstalled => match &self.b_copy {
                    Some((refs, _)) if *refs == self.a_refs => Completion::AlreadyInstalled {
                        source_refs: refs_text(&self.a_refs),
                    },
                    _ => Completion::Nothing,
                },
                HostOp::VerifyTarget { source_refs, .. } => match &self.b_copy {
                    Some((refs, _)) if refs_text(refs) == *source_refs => Completion::Nothing,
                    Some(_) => return Err("refs differ".into()),
                    None => return Err("no copy on B".into()),
                },
                HostOp::UnhookTarget => {
                    if let Some((_, hook)) = &mut self.b_copy {
                        *hook = Hook::None;
                    }
                    Completion::Nothing
                }
                HostOp::MarkSourceStale { .. } => {
                    self.a_hook = Hook::Stale;
                    Completion::Nothing
                }
                HostOp::UnhookSource => {
                    self.a_hook = Hook::None;
                    Completion::Nothing
                }
                HostOp::DiscardTarget => {
                    if self.b_copy.take().is_some() {
                        self.b_aside += 1;
                    }
                    self.staging = None;
                    Completion::Nothing
                }
                HostOp::ClearStaging => {
                    self.staging = None;
                    Completion::Nothing
                }
            },
            Action::Control(op) => match op {
                ControlOp::Freeze { .. } => {
                    self.maintenance = true;
                    Completion::Nothing
                }
                ControlOp::Clusterize => {
                    self.service = Side::B;
                    Completion::Nothing
                }
                ControlOp::Promote => {
                    if self.service != Side::B {
                        return Err("promote before clusterize".into());
                    }
                    self.b_promoted = true;
                    Completion::Nothing
                }
                ControlOp::RevertClusterize => {
                    self.service = Side::A;
                    Completion::Nothing
                }
                ControlOp::Unfreeze => {
                    self.maintenance = false;
                    Completion::Unfrozen {
                        at_ms: self.clock_ms,
                    }
                }
            },
            Action::Wait(_) | Action::Finish(_) => Completion::Nothing,
        })
    }

    /// Invariants that hold after every action.
    fn check_always(&self, trace: &[String]) {
        if self.service == Side::B && self.disk_hooks {
            assert_ne!(
                self.a_hook,
                Hook::None,
                "A writable after clusterize\n{trace:#?}"
            );
        }
        if self.service == Side::B {
            // Nothing acknowledged may live only on A once B is the repository.
            let b = self
                .b_copy
                .as_ref()
                .map(|(r, _)| r.clone())
                .unwrap_or_default();
            for push in &self.acknowledged {
                assert!(
                    b.contains(push),
                    "push {push} acknowledged but not on B after clusterize\n{trace:#?}"
                );
            }
        }
    }

    /// Invariants once a run finished with `finish`.
    fn check_at_rest(&self, finish: Finish, trace: &[String]) {
        match finish {
            Finish::Done => {
                assert_eq!(self.service, Side::B, "{trace:#?}");
                assert!(!self.maintenance, "done but in maintenance\n{trace:#?}");
                assert!(self.b_promoted, "{trace:#?}");
                let (refs, hook) = self.b_copy.clone().expect("B holds the copy");
                assert_eq!(hook, Hook::None, "B left hooked when done\n{trace:#?}");
                assert!(self.acknowledged.is_subset(&refs), "push lost\n{trace:#?}");
                if self.disk_hooks {
                    assert_eq!(self.a_hook, Hook::Stale, "A not stale\n{trace:#?}");
                }
                assert!(self.staging.is_none(), "staging left\n{trace:#?}");
                assert!(
                    self.frozen_at.is_some() && self.thawed_at >= self.frozen_at,
                    "window not recorded: {:?}..{:?}\n{trace:#?}",
                    self.frozen_at,
                    self.thawed_at
                );
            }
            Finish::RolledBack => {
                assert_eq!(self.service, Side::A, "{trace:#?}");
                assert!(!self.maintenance, "{trace:#?}");
                assert_eq!(self.a_hook, Hook::None, "A left hooked\n{trace:#?}");
                assert!(self.b_copy.is_none(), "{trace:#?}");
                assert!(self.staging.is_none(), "staging left\n{trace:#?}");
                assert!(self.acknowledged.is_subset(&self.a_refs), "{trace:#?}");
            }
            Finish::Stuck => {}
        }
    }
}

fn refs_text(refs: &BTreeSet<u32>) -> String {
    refs.iter().map(|r| format!("{r}\n")).collect()
}

/// Drives a repository to its end through `twists` (consumed one per action; `Normal` once
/// they run out), with a new machine resumed from the journal after every crash and a new
/// run after a rollback or a stuck run. Returns the world and the trace.
pub fn drive(profile: Profile, twists: &[Twist]) -> (World, Vec<String>) {
    let mut world = World::new(profile.disk_hooks);
    let ctx = RepoContext {
        repository: "t/r".into(),
        to_service: "b".into(),
        message: "moving".into(),
        profile,
    };
    let mut twists = twists.iter().copied();
    let mut trace = Vec::new();
    let mut runs = 0;
    'runs: loop {
        runs += 1;
        assert!(runs < 200, "no progress\n{trace:#?}");
        let mut m = RepoMachine::resume(ctx.clone(), &world.record, true);
        loop {
            let action = m.poll();
            if let Action::Finish(finish) = action {
                trace.push(format!("finish {finish:?} in {:?}", m.state()));
                world.check_at_rest(finish, &trace);
                if finish == Finish::Done {
                    break 'runs;
                }
                continue 'runs;
            }
            let twist = twists.next().unwrap_or(Twist::Normal);
            // Journal writes are the driver's memory: a failed one stops the driver (a
            // crash, as far as the core is concerned), never a failed action.
            let twist = match (&action, twist) {
                (Action::Journal(_) | Action::Wait(_), Twist::FailBefore | Twist::FailAfter) => {
                    Twist::Crash
                }
                (_, t) => t,
            };
            match twist {
                Twist::Push => world.push(world.service),
                Twist::PushToA => world.push(Side::A),
                _ => {}
            }
            trace.push(format!("{:?} {} ({twist:?})", m.state(), action.name()));
            let event = match twist {
                Twist::FailBefore => Event::Failed("injected".into()),
                _ => match world.apply(&action) {
                    Ok(_) if twist == Twist::FailAfter => Event::Failed("answer lost".into()),
                    Ok(done) => Event::Completed(done),
                    Err(why) => Event::Failed(why),
                },
            };
            if twist == Twist::Superseded && action == Action::Host(HostOp::FinalPass) {
                world.staging = Some((world.a_refs.clone(), world.a_hook));
            }
            world.check_always(&trace);
            if matches!(twist, Twist::Crash | Twist::Superseded) {
                continue 'runs;
            }
            m.handle(event);
        }
    }
    (world, trace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn profiles() -> [Profile; 3] {
        let phorge = Profile {
            disk_hooks: false,
            ..Profile::builtin()
        };
        let full = Profile {
            full_verify: true,
            ..Profile::builtin()
        };
        [Profile::builtin(), phorge, full]
    }

    #[test]
    fn the_happy_path_walks_every_state_in_order() {
        for profile in profiles() {
            let (world, trace) = drive(profile.clone(), &[]);
            let states: Vec<&str> = trace
                .iter()
                .filter_map(|t| t.split_once(" journal-"))
                .map(|(_, rest)| rest.split(' ').next().unwrap_or(""))
                .collect();
            let expected = [
                "step",
                "precopied",
                "freeze-start",
                "frozen",
                "copied",
                "verified",
                "clusterized",
                "promoted",
                "done",
            ];
            assert_eq!(states, expected, "{profile:?}");
            assert_eq!(world.b_aside, 0);
            assert!(
                !trace.iter().any(|t| t.contains("host-clear-staging")),
                "nothing to clear without a crash\n{trace:#?}"
            );
        }
    }

    /// A crash after each action of the happy path in turn, then a resume: the deterministic
    /// twin of the driver's failpoint test.
    #[test]
    fn a_crash_after_any_action_is_taken_over() {
        for profile in profiles() {
            let (_, happy) = drive(profile.clone(), &[]);
            for at in 0..happy.len() {
                let mut twists = vec![Twist::Normal; at];
                twists.push(Twist::Crash);
                let (world, trace) = drive(profile.clone(), &twists);
                assert_eq!(world.record.state, Some(RepoState::Done), "{trace:#?}");
            }
        }
    }

    /// A failure of each action in turn: before clusterize it rolls back (the next run
    /// moves it), after it the step is retried; both before and after the effect.
    #[test]
    fn a_failure_of_any_action_rolls_back_or_forward() {
        for profile in profiles() {
            let (_, happy) = drive(profile.clone(), &[]);
            for at in 0..happy.len() {
                for twist in [Twist::FailBefore, Twist::FailAfter] {
                    let mut twists = vec![Twist::Normal; at];
                    twists.push(twist);
                    let (world, trace) = drive(profile.clone(), &twists);
                    assert_eq!(world.record.state, Some(RepoState::Done), "{trace:#?}");
                }
            }
        }
    }

    /// `Normal` for every action of the happy path before its final pass.
    fn up_to_the_final_pass(profile: &Profile) -> Vec<Twist> {
        let (_, happy) = drive(profile.clone(), &[]);
        let final_pass = happy
            .iter()
            .position(|t| t.contains("host-final-pass"))
            .expect("final pass");
        vec![Twist::Normal; final_pass]
    }

    /// A driver killed just after its final pass installed B's copy: the next one finds it
    /// installed and does not send it again (nor move it aside).
    #[test]
    fn a_final_pass_that_finished_before_the_crash_is_not_sent_again() {
        let profile = Profile::builtin();
        let mut twists = up_to_the_final_pass(&profile);
        twists.push(Twist::Crash);
        let (world, trace) = drive(profile, &twists);
        assert_eq!(world.record.state, Some(RepoState::Done), "{trace:#?}");
        assert_eq!(
            world.b_aside, 0,
            "the installed copy was sent again\n{trace:#?}"
        );
        assert_eq!(
            trace
                .iter()
                .filter(|t| t.contains("host-final-pass"))
                .count(),
            1,
            "{trace:#?}"
        );
    }

    /// The soak's case: the final pass installed unheard, the successor's pass staged the
    /// tree again and died; the next driver finds B installed, skips the final pass, and
    /// still leaves nothing in B's staging (checked at rest by `drive`).
    #[test]
    fn a_final_pass_superseded_after_it_installed_leaves_no_staging() {
        for profile in profiles() {
            let mut twists = up_to_the_final_pass(&profile);
            twists.push(Twist::Superseded);
            let (world, trace) = drive(profile, &twists);
            assert_eq!(world.record.state, Some(RepoState::Done), "{trace:#?}");
            assert!(world.staging.is_none(), "{trace:#?}");
            assert!(
                trace.iter().any(|t| t.contains("host-clear-staging")),
                "{trace:#?}"
            );
        }
    }

    #[test]
    fn a_rollback_interrupted_by_a_crash_finishes_rolling_back() {
        // Fail the final pass (frozen), then crash inside the rollback after A was unhooked.
        let profile = Profile::builtin();
        let mut twists = up_to_the_final_pass(&profile);
        // fail, journal rolling_back, revert clusterize, unhook A, then crash after the unfreeze.
        twists.extend([
            Twist::FailBefore,
            Twist::Normal,
            Twist::Normal,
            Twist::Normal,
            Twist::Crash,
        ]);
        // The crashed run must not resume in `frozen` with the freeze lifted: pushes now.
        twists.extend([Twist::Push, Twist::Push, Twist::PushToA]);
        let (world, trace) = drive(profile, &twists);
        assert_eq!(world.record.state, Some(RepoState::Done), "{trace:#?}");
        assert!(
            trace
                .iter()
                .any(|t| t.starts_with("RollingBack host-discard-target")),
            "{trace:#?}"
        );
    }

    fn twist() -> impl Strategy<Value = Twist> {
        prop_oneof![
            6 => Just(Twist::Normal),
            1 => Just(Twist::FailBefore),
            1 => Just(Twist::FailAfter),
            1 => Just(Twist::Crash),
            1 => Just(Twist::Superseded),
            2 => Just(Twist::Push),
            2 => Just(Twist::PushToA),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any sequence of failures, lost answers, crashes and pushes ends `done` with every
        /// invariant holding after every action.
        #[test]
        fn any_twists_end_done_with_the_invariants(
            which in 0usize..3,
            twists in proptest::collection::vec(twist(), 0..120),
        ) {
            let profile = profiles()[which].clone();
            let (world, trace) = drive(profile, &twists);
            prop_assert_eq!(world.record.state, Some(RepoState::Done), "{:#?}", trace);
        }
    }
}
