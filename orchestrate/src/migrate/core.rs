//! The pure core of a repository's migration: which action comes next, and what a result,
//! a failure or a crash means. No I/O, no clock, no database: the driver
//! ([`super::driver`]) carries the [`Action`]s out through the narrow traits of
//! [`super::ports`] and feeds back an [`Event`] per action.
//!
//! **Shape** (quinn-proto's): [`RepoMachine::poll`] says what to do now,
//! [`RepoMachine::handle`] takes its outcome. Every persisted state has a fixed script of
//! idempotent actions ending with the journal write of the next state; the position inside
//! a script is not persisted, so a machine rebuilt from the journal after a crash
//! ([`RepoMachine::resume`]) runs its state's whole script again. That is safe because
//! every action is idempotent, and it is the only thing a crash can cause.
//!
//! **Persist before acting where a crash would otherwise lie.**
//! - The freeze records its start (`frozen_at`, the window's start) *before* the hook goes
//!   in, so a window interrupted by a crash is measured from its true start.
//! - A rollback records `rolling_back` *before* undoing anything. Without it, a driver killed
//!   half-way through a rollback (maintenance already lifted) was resumed in `frozen` and
//!   would have sent the final pass of a repository that accepts pushes again: pushes landing
//!   after it would be lost at clusterize.
//!
//! **Decisions that live here, not in the driver.**
//! - A failure while the repository is live (pre-copy) is retried, then rolled back.
//! - A failure while frozen and before clusterize rolls back: A is still authoritative.
//! - From clusterize on there is no way back: a failure is retried (roll forward) with a
//!   backoff, then the repository is left *stuck* in its state with the error, for the next
//!   run to finish. It is never marked done with half its cut-over missing.
//! - A repository rolled back by an earlier run is retried from scratch by the next one.
//! - Without verified tips (pre-copy check skipped or `--full-verify`) verification is full.
//! - The pre-copy repeats while a round still moved much (a repack or heavy pushes during
//!   it), so the frozen pass stays short.
//!
//! **Two kinds of control plane.** With the built-in registry the freeze is a `pre-receive`
//! hook on each copy's disk ([`Profile::disk_hooks`]): A gets it at the freeze and keeps it
//! for good (its message turns "stale"), B receives it with the final pass and loses it at
//! the unfreeze. In Phorge the freeze is a database flag the front checks and the hooks on
//! disk are Phorge's own, so the machine emits no hook actions there.

use std::time::Duration;

use serde::Serialize;

/// Where one repository is in its migration (the persisted journal state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RepoState {
    /// Not started (or retried after a rollback): the repository is live on A.
    Pending,
    /// B holds a verified pre-copy in its staging area; A is still live.
    Precopied,
    /// A refuses pushes (hook and/or flag) and no push is in flight.
    Frozen,
    /// The final pass installed B's copy.
    Copied,
    /// B's copy has A's refs and every object they need.
    Verified,
    /// The repository's service is B: the point of no return.
    Clusterized,
    /// B's copy is declared authoritative; still read-only until the unfreeze.
    Promoted,
    /// Writable on B; A's copy refuses pushes for good.
    Done,
    /// Undoing a migration that failed before clusterize (recorded before the first undo).
    RollingBack,
    /// Undone: live on A, B's copy moved aside; the next run retries it.
    RolledBack,
}

impl RepoState {
    pub const ALL: [RepoState; 10] = [
        RepoState::Pending,
        RepoState::Precopied,
        RepoState::Frozen,
        RepoState::Copied,
        RepoState::Verified,
        RepoState::Clusterized,
        RepoState::Promoted,
        RepoState::Done,
        RepoState::RollingBack,
        RepoState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RepoState::Pending => "pending",
            RepoState::Precopied => "precopied",
            RepoState::Frozen => "frozen",
            RepoState::Copied => "copied",
            RepoState::Verified => "verified",
            RepoState::Clusterized => "clusterized",
            RepoState::Promoted => "promoted",
            RepoState::Done => "done",
            RepoState::RollingBack => "rolling_back",
            RepoState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<RepoState> {
        RepoState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a failure in this state can still be undone (A still authoritative).
    pub fn can_roll_back(self) -> bool {
        self < RepoState::Clusterized
    }

    /// Whether the repository is read-only in this state, whatever happens next.
    pub fn is_frozen(self) -> bool {
        (RepoState::Frozen..=RepoState::Promoted).contains(&self)
    }

    /// Whether this run has nothing more to do for the repository.
    pub fn is_final(self) -> bool {
        matches!(self, RepoState::Done | RepoState::RolledBack)
    }

    /// The step that runs from this state (what `migrate status` shows as running).
    pub fn step(self) -> Option<Step> {
        Some(match self {
            RepoState::Pending => Step::Precopy,
            RepoState::Precopied => Step::Freeze,
            RepoState::Frozen => Step::FinalCopy,
            RepoState::Copied => Step::Verify,
            RepoState::Verified => Step::Clusterize,
            RepoState::Clusterized => Step::Promote,
            RepoState::Promoted => Step::Unfreeze,
            RepoState::RollingBack => Step::RollBack,
            RepoState::Done | RepoState::RolledBack => return None,
        })
    }
}

/// The side effects that move a repository from one state to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Precopy,
    Freeze,
    FinalCopy,
    Verify,
    Clusterize,
    Promote,
    Unfreeze,
    RollBack,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Precopy => "precopy",
            Step::Freeze => "freeze",
            Step::FinalCopy => "final_copy",
            Step::Verify => "verify",
            Step::Clusterize => "clusterize",
            Step::Promote => "promote",
            Step::Unfreeze => "unfreeze",
            Step::RollBack => "roll_back",
        }
    }
}

/// How the control plane behaves, and the retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The freeze is a `pre-receive` hook on the copies' disks (the built-in registry), not
    /// only a flag the forge checks (Phorge).
    pub disk_hooks: bool,
    /// Run the full connectivity check in the window instead of the incremental one.
    pub full_verify: bool,
    /// Attempts of the live pre-copy before the repository is rolled back (and left for the
    /// next run).
    pub precopy_attempts: u32,
    /// Attempts of a step after clusterize (or of the rollback) before the repository is left
    /// stuck for the next run.
    pub roll_forward_attempts: u32,
    /// Pre-copy rounds at most; another round runs while the last one sent more than
    /// `precopy_settled_bytes`.
    pub precopy_rounds: u32,
    pub precopy_settled_bytes: u64,
}

impl Profile {
    pub fn builtin() -> Profile {
        Profile {
            disk_hooks: true,
            full_verify: false,
            precopy_attempts: 3,
            roll_forward_attempts: 5,
            precopy_rounds: 4,
            precopy_settled_bytes: 64 << 20,
        }
    }
}

/// What a repository's migration knows beyond its state.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoContext {
    /// The repository, as the control plane names it.
    pub repository: String,
    /// The target service (named in the stale copy's message).
    pub to_service: String,
    /// What a refused push shows during the freeze.
    pub message: String,
    pub profile: Profile,
}

impl RepoContext {
    /// What a push to A's old copy shows once the repository has moved.
    pub fn stale_message(&self) -> String {
        format!(
            "this copy is stale: {} moved to service {}; fetch its new location",
            self.repository, self.to_service
        )
    }
}

/// The journal's record of a repository, as a resumed machine reads it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RepoRecord {
    pub state: Option<RepoState>,
    /// Object ids of the refs of B's pre-copy that the full connectivity check passed.
    pub verified_tips: Option<Vec<String>>,
    pub error: Option<String>,
}

/// A change to the journal's record of a repository.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JournalWrite {
    /// The new state, if it changes.
    pub state: Option<RepoState>,
    /// The step running now (shown by `migrate status`); `None` clears it.
    pub step: Option<Step>,
    pub error: ErrorUpdate,
    /// Added to the repository's counters.
    pub add_bytes: u64,
    pub add_sent_bytes: u64,
    /// Record "now" as the start of the read-only window (the first value sticks).
    pub stamp_frozen: bool,
    /// The end of the read-only window, unix ms (kept only when a start was recorded; the
    /// first value sticks).
    pub thawed_at_ms: Option<i64>,
    pub verified_tips: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum ErrorUpdate {
    #[default]
    Keep,
    Set(String),
    Clear,
}

/// Operations on a shard host's disk.
#[derive(Debug, Clone, PartialEq)]
pub enum HostOp {
    /// On A, while live: send the tree into B's staging (`shardsend --stage-only --resume`);
    /// files git creates and deletes meanwhile are tolerated.
    Precopy,
    /// On B: the full connectivity check of the staged tree; yields its refs' object ids.
    CheckStaged,
    /// On A: the maintenance hook with the freeze message, then the wait until no push is
    /// in flight.
    HookSource { message: String },
    /// On B and A, after a crash inside the window: whether B's copy is already installed with
    /// A's refs (the dead driver's final pass finished on the receiver just before the
    /// crash). Then the final pass is skipped: sending it again would re-send the whole tree
    /// inside the read-only window and move the installed copy aside.
    ProbeInstalled,
    /// On A: send what changed and install on B (`shardsend --resume`); A's refs are read
    /// meanwhile.
    FinalPass,
    /// On A: its refs (after a resume lost those read during the final pass).
    ReadSourceRefs,
    /// On B: refs equal to A's, and every object they need present (incrementally from the
    /// verified tips, or fully without them).
    VerifyTarget {
        source_refs: String,
        verified_tips: Option<Vec<String>>,
    },
    /// On B: remove the hook that travelled with the copy.
    UnhookTarget,
    /// On A: keep the hook, with the message saying where the repository went.
    MarkSourceStale { message: String },
    /// On A (rollback): remove the hook, restoring any original `pre-receive`.
    UnhookSource,
    /// On B (rollback): move B's copy aside and discard the staging.
    DiscardTarget,
    /// On B, once the window is over, after a crash inside it: remove the staging of this
    /// repository, waiting for a transfer that still holds it to end. A final pass the dead
    /// driver did not hear of may have installed B's copy while its successor's pass, which
    /// found nothing installed yet, staged the tree again; when that one dies too, the next
    /// probe finds the copy installed and nothing else would remove what it staged.
    ClearStaging,
}

/// Operations on the control plane (the registry, or Phorge).
#[derive(Debug, Clone, PartialEq)]
pub enum ControlOp {
    /// The repository is in maintenance with this message (Phorge: and no write in flight).
    Freeze { message: String },
    /// The repository's service becomes B.
    Clusterize,
    /// B's copy becomes the authoritative one (Phorge: demote A, then promote B).
    Promote,
    /// Maintenance lifted.
    Unfreeze,
    /// The repository's service is A again. A rollback starts with it: a clusterize whose
    /// answer was lost (it failed as far as the driver knows) may still have taken effect,
    /// and undoing everything else while the plane points at B would send users to a copy
    /// about to be moved aside. A no-op when the service is A.
    RevertClusterize,
}

/// What the driver does next for a repository.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Journal(JournalWrite),
    Host(HostOp),
    Control(ControlOp),
    /// Wait this long, then go on (backoff before a retry).
    Wait(Duration),
    /// Nothing more to do in this run.
    Finish(Finish),
}

impl Action {
    /// A stable name per action, for failpoints and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Journal(w) => match w.state {
                Some(s) => match s {
                    RepoState::Pending => "journal-pending",
                    RepoState::Precopied => "journal-precopied",
                    RepoState::Frozen => "journal-frozen",
                    RepoState::Copied => "journal-copied",
                    RepoState::Verified => "journal-verified",
                    RepoState::Clusterized => "journal-clusterized",
                    RepoState::Promoted => "journal-promoted",
                    RepoState::Done => "journal-done",
                    RepoState::RollingBack => "journal-rolling-back",
                    RepoState::RolledBack => "journal-rolled-back",
                },
                None if w.stamp_frozen => "journal-freeze-start",
                None => "journal-step",
            },
            Action::Host(op) => match op {
                HostOp::Precopy => "host-precopy",
                HostOp::CheckStaged => "host-check-staged",
                HostOp::HookSource { .. } => "host-hook-source",
                HostOp::ProbeInstalled => "host-probe-installed",
                HostOp::FinalPass => "host-final-pass",
                HostOp::ReadSourceRefs => "host-read-source-refs",
                HostOp::VerifyTarget { .. } => "host-verify-target",
                HostOp::UnhookTarget => "host-unhook-target",
                HostOp::MarkSourceStale { .. } => "host-mark-source-stale",
                HostOp::UnhookSource => "host-unhook-source",
                HostOp::DiscardTarget => "host-discard-target",
                HostOp::ClearStaging => "host-clear-staging",
            },
            Action::Control(op) => match op {
                ControlOp::Freeze { .. } => "control-freeze",
                ControlOp::Clusterize => "control-clusterize",
                ControlOp::Promote => "control-promote",
                ControlOp::Unfreeze => "control-unfreeze",
                ControlOp::RevertClusterize => "control-revert-clusterize",
            },
            Action::Wait(_) => "wait",
            Action::Finish(_) => "finish",
        }
    }
}

/// How a repository's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Done,
    RolledBack,
    /// A step after clusterize (or a rollback) kept failing; the state and the error are in
    /// the journal and the next run goes on from there.
    Stuck,
}

/// What an action produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Completion {
    #[default]
    Nothing,
    /// A pre-copy round: bytes that crossed the wire, and what the round waited for first
    /// (a `git repack` on A), for the progress report.
    Precopied {
        sent_bytes: u64,
        waited: Option<String>,
    },
    /// The staged tree's check: its refs' object ids, or `None` when there was nothing staged
    /// to check.
    Staged {
        tips: Option<Vec<String>>,
    },
    /// The final pass: the tree's size, bytes sent, and A's refs.
    FinalPass {
        bytes: u64,
        sent_bytes: u64,
        source_refs: String,
    },
    SourceRefs(String),
    /// B's copy is installed and has A's refs (these).
    AlreadyInstalled {
        source_refs: String,
    },
    /// Maintenance lifted at this instant (unix ms): the end of the read-only window.
    Unfrozen {
        at_ms: i64,
    },
}

/// The outcome of the action [`RepoMachine::poll`] returned last.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Completed(Completion),
    /// The action failed (a refused host step, a failed transfer, a control-plane refusal).
    Failed(String),
}

/// One repository's migration, as a pure state machine.
#[derive(Debug, Clone)]
pub struct RepoMachine {
    ctx: RepoContext,
    state: RepoState,
    /// Next action of the current state's script.
    pos: usize,
    /// An action that runs before the script goes on (a state change the driver must
    /// journal first, or a wait), set by a failure or a resume.
    interlude: Option<Action>,
    finished: Option<Finish>,
    verified_tips: Option<Vec<String>>,
    /// A's refs as read during the final pass (lost on a crash; read again then).
    source_refs: Option<String>,
    /// Failures of the current state's script in this run.
    attempts: u32,
    precopy_round: u32,
    /// Counters and the window's end, journaled with the next state.
    bytes: u64,
    sent_bytes: u64,
    thawed_at_ms: Option<i64>,
    /// Tips found by the staged check, journaled with `precopied`.
    new_tips: Option<Vec<String>>,
    /// Built from the journal in a frozen state: a dead driver's last action may have taken
    /// effect (see [`HostOp::ProbeInstalled`]).
    resumed_frozen: bool,
    /// The probe found B's copy installed: no final pass.
    installed: bool,
    /// Built from the journal between the freeze and done: a dead driver's final pass may
    /// have left a staging area behind (see [`HostOp::ClearStaging`]).
    resumed_in_window: bool,
}

impl RepoMachine {
    /// A machine for a repository whose journal says `record`. With `retry_rolled_back`, a
    /// repository rolled back by an earlier run starts again from `pending`.
    pub fn resume(ctx: RepoContext, record: &RepoRecord, retry_rolled_back: bool) -> RepoMachine {
        let state = record.state.unwrap_or(RepoState::Pending);
        let mut m = RepoMachine {
            ctx,
            state,
            pos: 0,
            interlude: None,
            finished: None,
            verified_tips: record.verified_tips.clone(),
            source_refs: None,
            attempts: 0,
            precopy_round: 0,
            bytes: 0,
            sent_bytes: 0,
            thawed_at_ms: None,
            new_tips: None,
            resumed_frozen: state == RepoState::Frozen,
            installed: false,
            resumed_in_window: (RepoState::Frozen..=RepoState::Promoted).contains(&state),
        };
        match state {
            RepoState::Done => m.finished = Some(Finish::Done),
            RepoState::RolledBack if retry_rolled_back => {
                m.interlude = Some(Action::Journal(JournalWrite {
                    state: Some(RepoState::Pending),
                    error: ErrorUpdate::Clear,
                    ..Default::default()
                }));
            }
            RepoState::RolledBack => m.finished = Some(Finish::RolledBack),
            _ => {}
        }
        m
    }

    pub fn state(&self) -> RepoState {
        self.state
    }

    pub fn context(&self) -> &RepoContext {
        &self.ctx
    }

    /// What to do now. Returns the same action until [`RepoMachine::handle`] is called.
    pub fn poll(&self) -> Action {
        if let Some(finish) = self.finished {
            return Action::Finish(finish);
        }
        if let Some(action) = &self.interlude {
            return action.clone();
        }
        self.current().1
    }

    /// The script's next action that has work to do, and its position.
    fn current(&self) -> (usize, Action) {
        let script = self.script();
        let mut pos = self.pos;
        loop {
            let needless = match script.get(pos) {
                Some(Action::Host(HostOp::ReadSourceRefs)) => self.source_refs.is_some(),
                Some(Action::Host(HostOp::FinalPass)) => self.installed,
                _ => false,
            };
            if !needless {
                break;
            }
            pos += 1;
        }
        let action = script
            .get(pos)
            .cloned()
            .unwrap_or(Action::Finish(Finish::Stuck));
        (pos, action)
    }

    /// The outcome of the action [`RepoMachine::poll`] returned.
    pub fn handle(&mut self, event: Event) {
        if self.finished.is_some() {
            return;
        }
        let (pos, action) = match &self.interlude {
            Some(action) => (self.pos, action.clone()),
            None => self.current(),
        };
        self.pos = pos;
        let from_interlude = self.interlude.take().is_some();
        match event {
            Event::Completed(done) => self.completed(action, done, from_interlude),
            Event::Failed(why) => self.failed(action, why),
        }
    }

    fn completed(&mut self, action: Action, done: Completion, from_interlude: bool) {
        match done {
            Completion::Nothing => {}
            Completion::Precopied { sent_bytes, .. } => {
                self.sent_bytes += sent_bytes;
                self.precopy_round += 1;
                let settled = sent_bytes <= self.ctx.profile.precopy_settled_bytes;
                if !settled && self.precopy_round < self.ctx.profile.precopy_rounds {
                    // Another round: it sends only what changed during this one.
                    return;
                }
            }
            Completion::Staged { tips } => self.new_tips = tips,
            Completion::FinalPass {
                bytes,
                sent_bytes,
                source_refs,
            } => {
                self.bytes += bytes;
                self.sent_bytes += sent_bytes;
                self.source_refs = Some(source_refs);
            }
            Completion::SourceRefs(refs) => self.source_refs = Some(refs),
            Completion::AlreadyInstalled { source_refs } => {
                self.installed = true;
                self.source_refs = Some(source_refs);
            }
            Completion::Unfrozen { at_ms } => self.thawed_at_ms = Some(at_ms),
        }
        match action {
            Action::Journal(JournalWrite {
                state: Some(next), ..
            }) => self.enter(next),
            Action::Journal(JournalWrite {
                error: ErrorUpdate::Set(_),
                state: None,
                ..
            }) if from_interlude => self.finished = Some(Finish::Stuck),
            Action::Wait(_) if from_interlude => self.pos = 0,
            _ if from_interlude => {}
            _ => self.pos += 1,
        }
    }

    fn enter(&mut self, next: RepoState) {
        self.state = next;
        self.resumed_frozen = false;
        self.pos = 0;
        self.attempts = 0;
        self.bytes = 0;
        self.sent_bytes = 0;
        if next == RepoState::Precopied {
            self.verified_tips = self.new_tips.take();
        }
        if next == RepoState::Pending {
            self.precopy_round = 0;
            self.verified_tips = None;
        }
        self.finished = match next {
            RepoState::Done => Some(Finish::Done),
            RepoState::RolledBack => Some(Finish::RolledBack),
            _ => None,
        };
    }

    fn failed(&mut self, action: Action, why: String) {
        self.attempts += 1;
        let why = format!("{}: {why}", step_text(self.state, &action));
        let backoff = |attempt: u32| Duration::from_millis(200 << attempt.min(5));
        match self.state {
            RepoState::Pending if self.attempts < self.ctx.profile.precopy_attempts => {
                // Live: nothing to undo; the next attempt resumes what was staged.
                self.interlude = Some(Action::Wait(backoff(self.attempts)));
            }
            s if s.can_roll_back() => {
                self.interlude = Some(Action::Journal(JournalWrite {
                    state: Some(RepoState::RollingBack),
                    error: ErrorUpdate::Set(why),
                    ..Default::default()
                }));
            }
            _ if self.attempts < self.ctx.profile.roll_forward_attempts => {
                self.interlude = Some(Action::Wait(backoff(self.attempts)));
            }
            _ => {
                self.interlude = Some(Action::Journal(JournalWrite {
                    error: ErrorUpdate::Set(format!(
                        "{why} (after {} attempts; the next `migrate` goes on from here)",
                        self.attempts
                    )),
                    ..Default::default()
                }));
            }
        }
    }

    /// The current state's actions, in order; each is idempotent, the last one journals the
    /// next state.
    fn script(&self) -> Vec<Action> {
        let hooks = self.ctx.profile.disk_hooks;
        let mut s = Vec::new();
        match self.state {
            RepoState::Pending => {
                s.push(running(Step::Precopy));
                s.push(Action::Host(HostOp::Precopy));
                if !self.ctx.profile.full_verify {
                    s.push(Action::Host(HostOp::CheckStaged));
                }
                s.push(Action::Journal(JournalWrite {
                    state: Some(RepoState::Precopied),
                    add_sent_bytes: self.sent_bytes,
                    verified_tips: self.new_tips.clone(),
                    ..Default::default()
                }));
            }
            RepoState::Precopied => {
                // The window starts here, recorded before the freeze can refuse a push.
                s.push(Action::Journal(JournalWrite {
                    step: Some(Step::Freeze),
                    stamp_frozen: true,
                    ..Default::default()
                }));
                s.push(Action::Control(ControlOp::Freeze {
                    message: self.ctx.message.clone(),
                }));
                if hooks {
                    s.push(Action::Host(HostOp::HookSource {
                        message: self.ctx.message.clone(),
                    }));
                }
                s.push(next(RepoState::Frozen));
            }
            RepoState::Frozen => {
                if self.resumed_frozen {
                    s.push(Action::Host(HostOp::ProbeInstalled));
                }
                // Skipped by `current` when the probe found the copy installed.
                s.push(Action::Host(HostOp::FinalPass));
                s.push(Action::Journal(JournalWrite {
                    state: Some(RepoState::Copied),
                    add_bytes: self.bytes,
                    add_sent_bytes: self.sent_bytes,
                    ..Default::default()
                }));
            }
            RepoState::Copied => {
                // Skipped by `current` when the final pass's reading of A's refs survived.
                s.push(Action::Host(HostOp::ReadSourceRefs));
                s.push(Action::Host(HostOp::VerifyTarget {
                    source_refs: self.source_refs.clone().unwrap_or_default(),
                    verified_tips: match self.ctx.profile.full_verify {
                        true => None,
                        false => self.verified_tips.clone(),
                    },
                }));
                s.push(next(RepoState::Verified));
            }
            RepoState::Verified => {
                s.push(Action::Control(ControlOp::Clusterize));
                s.push(next(RepoState::Clusterized));
            }
            RepoState::Clusterized => {
                s.push(Action::Control(ControlOp::Promote));
                s.push(next(RepoState::Promoted));
            }
            RepoState::Promoted => {
                if hooks {
                    s.push(Action::Host(HostOp::UnhookTarget));
                }
                s.push(Action::Control(ControlOp::Unfreeze));
                if hooks {
                    s.push(Action::Host(HostOp::MarkSourceStale {
                        message: self.ctx.stale_message(),
                    }));
                }
                if self.resumed_in_window {
                    s.push(Action::Host(HostOp::ClearStaging));
                }
                s.push(Action::Journal(JournalWrite {
                    state: Some(RepoState::Done),
                    thawed_at_ms: self.thawed_at_ms,
                    ..Default::default()
                }));
            }
            RepoState::RollingBack => {
                s.push(Action::Control(ControlOp::RevertClusterize));
                if hooks {
                    s.push(Action::Host(HostOp::UnhookSource));
                }
                s.push(Action::Control(ControlOp::Unfreeze));
                s.push(Action::Host(HostOp::DiscardTarget));
                s.push(Action::Journal(JournalWrite {
                    state: Some(RepoState::RolledBack),
                    thawed_at_ms: self.thawed_at_ms,
                    ..Default::default()
                }));
            }
            RepoState::Done | RepoState::RolledBack => {}
        }
        s
    }
}

fn running(step: Step) -> Action {
    Action::Journal(JournalWrite {
        step: Some(step),
        ..Default::default()
    })
}

fn next(state: RepoState) -> Action {
    Action::Journal(JournalWrite {
        state: Some(state),
        ..Default::default()
    })
}

fn step_text(state: RepoState, action: &Action) -> String {
    match state.step() {
        Some(step) => format!("{} ({})", step.as_str(), action.name()),
        None => action.name().to_string(),
    }
}
