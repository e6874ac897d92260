//! `linkemu`: a userspace link emulator between two network namespaces.
//!
//! This kernel has neither netem nor sch_fq, so delay, loss and cuts cannot be had from `tc`.
//! An [`Emulator`] creates two namespaces, each with a TUN device (`netns`), and forwards
//! packets between them (`forward`), applying one [`model::LinkModel`] per direction: rate
//! with a drop-tail queue, delay, jitter, random and Gilbert–Elliott loss, reordering, and
//! cuts on a schedule or on request ([`Emulator::set_down`], SIGUSR1/SIGUSR2 in the binary).
//! By default the TUN devices offload segmentation ([`offload`]): a sender's TSO/GSO
//! super-packet crosses whole, each of its wire packets is judged by the model, and the
//! survivors reach the receiver coalesced, as with real NICs; per-packet costs a 2-core
//! machine would otherwise charge to the emulation stay out of the measurement.
//!
//! Used two ways: the `linkemu` binary (`linkemu --rate 100M --delay 25ms --loss 1% -- CMD`,
//! or without CMD as a long-running link that prints its namespace names and addresses), and
//! in-process from tests through [`Emulator::start`]. Namespaces are removed on every exit:
//! [`Emulator`]'s `Drop`, and the [`watchdog`] process for deaths no destructor sees.
//! [`probe`] measures what the link does (TCP throughput, UDP round trips and loss).

pub mod forward;
pub mod model;
pub mod netns;
pub mod offload;
pub mod probe;
pub mod units;
pub mod watchdog;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::Serialize;

pub use forward::Framing;
use forward::{Control, DirectionStats, Link};
use model::{CutSchedule, LinkModel, LinkParams};

/// Everything that defines an emulated link.
#[derive(Debug, Clone)]
pub struct LinkSpec {
    /// Applied to each direction (a symmetric, full-duplex link).
    pub params: LinkParams,
    pub cuts: CutSchedule,
    /// Seed of the loss/jitter/reorder draws (direction B→A uses `seed + 1`).
    pub seed: u64,
    /// Namespace name prefix; `lemu<pid>` when `None`. Namespaces are `PREFIX-a`, `PREFIX-b`.
    pub prefix: Option<String>,
    /// Whether super-packets cross the link ([`Framing::Offload`], the default: what hosts
    /// with real NICs do) or every wire packet is a read and a write ([`Framing::Plain`]).
    pub framing: Framing,
}

impl Default for LinkSpec {
    fn default() -> Self {
        LinkSpec {
            params: LinkParams::default(),
            cuts: CutSchedule::default(),
            seed: 0,
            prefix: None,
            framing: Framing::Offload,
        }
    }
}

/// Both directions' counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LinkStats {
    pub a_to_b: DirectionStats,
    pub b_to_a: DirectionStats,
}

/// A running emulated link; dropping it removes the namespaces.
pub struct Emulator {
    pub ns_a: String,
    pub ns_b: String,
    pub addr_a: Ipv4Addr,
    pub addr_b: Ipv4Addr,
    link: Option<Link>,
    watchdog: Option<watchdog::Watchdog>,
    created: Vec<String>,
}

impl Emulator {
    /// Creates the namespaces and starts forwarding. `watchdog_exe` is the `linkemu` binary
    /// (it cleans up if this process is killed); `None` relies on `Drop` alone.
    pub fn start(spec: &LinkSpec, watchdog_exe: Option<&Path>) -> Result<Emulator> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("linkemu needs root (network namespaces and TUN devices)");
        }
        let prefix = spec
            .prefix
            .clone()
            .unwrap_or_else(|| format!("lemu{}", std::process::id()));
        if prefix.is_empty()
            || prefix.len() > 24
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("namespace prefix {prefix:?}: use 1-24 letters, digits, '-' or '_'");
        }
        let ns_a = format!("{prefix}-a");
        let ns_b = format!("{prefix}-b");
        for ns in [&ns_a, &ns_b] {
            if netns::exists(ns) {
                bail!("network namespace {ns} already exists (another linkemu, or a leftover: `ip netns del {ns}`)");
            }
        }
        let names = vec![ns_a.clone(), ns_b.clone()];
        let watchdog = match watchdog_exe {
            Some(exe) => Some(watchdog::Watchdog::spawn(exe, &names)?),
            None => None,
        };
        let mut emu = Emulator {
            ns_a,
            ns_b,
            addr_a: netns::ADDR_A,
            addr_b: netns::ADDR_B,
            link: None,
            watchdog,
            created: Vec::new(),
        };
        // From here any error drops `emu`, which removes what was created.
        for ns in &names {
            netns::create(ns)?;
            emu.created.push(ns.clone());
        }
        let tun_a = netns::open_tun(&emu.ns_a, netns::ADDR_A, netns::ADDR_B, spec.framing)?;
        let tun_b = netns::open_tun(&emu.ns_b, netns::ADDR_B, netns::ADDR_A, spec.framing)?;
        let models = (
            LinkModel::new(spec.params.clone(), spec.seed),
            LinkModel::new(spec.params.clone(), spec.seed.wrapping_add(1)),
        );
        let control = Arc::new(Control::new(spec.cuts.clone()));
        emu.link = Some(Link::start(tun_a, tun_b, spec.framing, models, control));
        Ok(emu)
    }

    /// Cuts (`true`) or restores (`false`) the link, on top of any schedule.
    pub fn set_down(&self, down: bool) {
        if let Some(link) = &self.link {
            link.control.down_by_signal.store(down, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> LinkStats {
        match &self.link {
            Some(l) => LinkStats {
                a_to_b: l.a_to_b.snapshot(),
                b_to_a: l.b_to_a.snapshot(),
            },
            None => LinkStats::default(),
        }
    }

    /// Stops forwarding, removes the namespaces and returns the final counters.
    pub fn shutdown(mut self) -> LinkStats {
        self.teardown()
    }

    fn teardown(&mut self) -> LinkStats {
        let stats = self.stats();
        if let Some(mut link) = self.link.take() {
            link.stop();
        }
        for ns in self.created.drain(..) {
            netns::remove(&ns);
        }
        if let Some(w) = self.watchdog.take() {
            w.release();
        }
        stats
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.teardown();
    }
}
