//! `shardsend`: send a file or directory tree to a `shardrecv` daemon, verified end to end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, CommandFactory, Parser, Subcommand};
use transfer::cli::{
    init_logging, report_error, DocCommand, IdentityCommand, LogFormat, Role, EXIT_CODES_HELP,
};
use transfer::compress::CompressPolicy;
use transfer::gitdir::GitMode;
use transfer::identity::{Fingerprint, Identity};
use transfer::quic::{Congestion, TransportOptions};
use transfer::send::{
    send, EventSink, Fault, SendConfig, SendEvent, DEFAULT_CHUNK_SIZE, DEFAULT_STREAMS,
};
use transfer::units::parse_size;
use transfer::Error;

#[derive(Parser)]
#[command(
    name = "shardsend",
    version,
    about = "Send a repository (file or directory tree) to a shardrecv daemon over QUIC",
    long_about = "Send a repository (file or directory tree) to a shardrecv daemon over QUIC.\n\n\
        The tree is streamed in chunks over several QUIC streams, each chunk hashed with BLAKE3 and \
        checked by the receiver, then the receiver fsyncs and installs it atomically as \
        ROOT/DEST_NAME (an existing DEST_NAME is moved aside to DEST_NAME.replaced-<unix-time>). \
        Both ends authenticate with pinned key fingerprints. A connection lost mid-transfer (a cut \
        link, a receiver restarting) is made again and resumed on its own, for up to --retry-for \
        per outage; after a longer interruption, run the same command with --resume. Either way \
        only chunks the receiver has not verified are sent again.\n\n\
        Example: shardsend /srv/repos/r1.git 10.0.0.2:7400 r1.git --identity ~/.shard/send.key --peer <fingerprint>",
    after_help = EXIT_CODES_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    send: SendArgs,
    /// Log lines on stderr: text, or json (one object per line; RUST_LOG sets the level,
    /// warn by default)
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Identity(IdentityCommand),
    #[command(flatten)]
    Doc(DocCommand),
}

#[derive(Args)]
struct SendArgs {
    /// File or directory to send
    #[arg(required = true)]
    src: Option<PathBuf>,
    /// Receiver address, HOST:PORT
    #[arg(required = true)]
    receiver: Option<String>,
    /// Name to install under the receiver's root (relative path, e.g. rXYZ.git)
    #[arg(required = true)]
    dest: Option<String>,
    /// Our identity key (made by `shardsend keygen`)
    #[arg(long, required = true)]
    identity: Option<PathBuf>,
    /// The receiver's key fingerprint (printed by `shardrecv keygen`); the connection is
    /// refused if the receiver presents any other key. Repeat it during a key rotation to
    /// accept the old and the new key, preferred first: the receiver is asked for them in
    /// this order and presents the first it holds
    #[arg(long, required = true, value_name = "FINGERPRINT")]
    peer: Vec<String>,
    /// Compression: off, auto (compress only while the link is slower than the measured
    /// breakpoint), zstd or zstd:LEVEL (1-22)
    #[arg(long, default_value = "auto")]
    compress: CompressPolicy,
    /// Parallel QUIC data streams
    #[arg(long, default_value_t = DEFAULT_STREAMS)]
    streams: usize,
    /// Cap the send rate, bytes per second with K/M/G suffixes (binary), e.g. 50M
    #[arg(long, value_parser = parse_size)]
    bwlimit: Option<u64>,
    /// Keep what the receiver already verified from an earlier attempt of this transfer
    #[arg(long)]
    resume: bool,
    /// Pre-copy: verify into the receiver's staging area but do not install. A later run
    /// with --resume sends only what changed since, then installs (live pre-copy, short
    /// freeze). Files that change or vanish meanwhile never fail a pre-copy; the JSON
    /// summary says "complete": false if the source never held still
    #[arg(long)]
    stage_only: bool,
    /// Git directory rules: auto (on when SRC has HEAD, objects/ and refs/), on, off. In git
    /// mode git's transient files (push quarantines objects/tmp_objdir-*, *.lock, tmp_pack_*,
    /// gc.pid, ...) are never copied, and the refs are read before the objects are listed,
    /// so a pre-copy of a live repository is consistent
    #[arg(long, default_value = "auto", value_name = "MODE")]
    git: GitMode,
    /// In git mode, before sending: while a git gc, repack, prune, pack-refs,
    /// multi-pack-index or maintenance run works in the repository, wait up to DURATION
    /// (e.g. 90s, 1h; 0 only looks) for it to end, then exit 7 if it still runs. A pre-copy
    /// beside a repack copies the repository twice, a final pass fails. Processes are found
    /// by their working directory: run as root or as the repositories' user to see them.
    /// The JSON summary says what was waited for (waited_for, waited_seconds)
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    repack_wait: Option<std::time::Duration>,
    /// In git mode, remember the loose-object directories (objects/00..ff) each pre-copy
    /// listed in a file under DIR, so the next pass reads only those that changed since (a
    /// migration's final pass, inside the read-only window, lists 200k loose objects in
    /// ~0.5 s otherwise). Default: $XDG_CACHE_HOME/shardsend or ~/.cache/shardsend. The pass
    /// that installs removes the file. Trusts git's rule that a loose object is written once:
    /// a chmod or chown by hand inside objects/ between passes is not seen
    #[arg(long, value_name = "DIR", conflicts_with = "no_scan_cache")]
    scan_cache: Option<PathBuf>,
    /// Read every directory on every pass (no scan cache)
    #[arg(long)]
    no_scan_cache: bool,
    /// Where to remember each receiver's path (its window and minimum RTT at the end of a
    /// transfer that succeeded, for 15 minutes), so that the next transfer there starts from
    /// half that window instead of ten packets: careful resume, for the bbr and background
    /// controllers. Kept only if the new connection's first round trip is at least half the
    /// remembered one. Default: $XDG_CACHE_HOME/shardsend/paths or ~/.cache/shardsend/paths
    #[arg(long, value_name = "DIR", conflicts_with = "no_path_memory")]
    path_memory: Option<PathBuf>,
    /// Always start cold (no path memory read or written)
    #[arg(long)]
    no_path_memory: bool,
    /// Install the files for their numeric owner and group as on this host (the receiver
    /// must run as root, or with CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_FSETID, or the
    /// transfer is refused before any data moves).
    /// Without this, --chown or --map-owner, the files belong to the user running shardrecv
    #[arg(long)]
    preserve_owner: bool,
    /// Install every file for USER:GROUP, names or numeric ids as the RECEIVER knows them
    /// (e.g. the forge's daemon user: git refuses a repository owned by someone else).
    /// --map-owner rules are tried first
    #[arg(long, value_name = "USER:GROUP", value_parser = transfer::owner::parse_chown)]
    chown: Option<transfer::owner::Spec<transfer::wire::IdName>>,
    /// Rewrite an owner and/or group: FROM=TO, each USER:GROUP, USER or :GROUP; FROM is a
    /// user/group of this host (or * for any), TO one of the receiver's. Repeatable, first
    /// match wins, unmatched ids are kept (or given to --chown), e.g.
    /// --map-owner git:git=phd:phd --map-owner root=root
    #[arg(long, value_name = "FROM=TO", value_parser = transfer::owner::parse_map_owner)]
    map_owner: Vec<transfer::owner::MapOwner>,
    /// A symlink whose target leaves the tree is refused, unless that target is an absolute
    /// path inside DIR (e.g. a hooks directory shared by all repositories, present on both
    /// hosts): then it is copied as the link it is. Repeatable
    #[arg(long, value_name = "DIR", value_parser = parse_external_prefix)]
    allow_external_link: Vec<String>,
    /// A git directory that borrows objects from another repository
    /// (objects/info/alternates, e.g. `git clone --shared` or an object pool) is refused,
    /// unless this is given: then the objects it reaches only through the alternates are
    /// packed (in a temporary directory; this repository is not changed) and sent along, and
    /// the copy gets no alternates file: it is self-contained
    #[arg(long)]
    dissociate: bool,
    /// The transfer ticket `shardmove` signed for this transfer (its text, or @FILE to read
    /// it from a file): required by a receiver run with --ticket-signer, ignored by others
    /// that do not ask for one
    #[arg(
        long,
        value_name = "TICKET|@FILE",
        env = "SHARDSEND_TICKET",
        hide_env_values = true
    )]
    ticket: Option<String>,
    /// Print a JSON summary on stdout; what happens meanwhile goes to stderr as one JSON
    /// object per line (queued, admitted, reconnecting, reconnected, and progress at most
    /// every 0.5 s unless --no-progress), instead of sentences and the progress bar
    #[arg(long)]
    json: bool,
    /// Chunk size (K/M suffixes), between 64K and 64M
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: u64,
    /// Never draw a progress bar (it is drawn only when stderr is a terminal) nor print
    /// progress events (--json)
    #[arg(long)]
    no_progress: bool,
    /// Seconds to wait for the receiver to answer before giving up
    #[arg(long, default_value_t = 15.0)]
    connect_timeout: f64,
    /// Congestion controller: auto (default: bbr, except cubic on a loopback path, where
    /// nothing is lost and bbr costs throughput), bbr (keeps the link full under random
    /// loss, where cubic and newreno collapse, with a short queue), quinn-bbr (quinn's own
    /// BBR, for comparison: it overfills drop-tail queues), cubic, newreno, or background
    /// (delay-based: backs off when a queue builds, so users' traffic on a shared link keeps
    /// its share)
    #[arg(long, default_value_t = Congestion::default())]
    congestion: Congestion,
    /// Most bytes in flight (unacknowledged) on the connection, K/M suffixes, 4M-256M
    /// (default 16M). It must cover rate x RTT (1 Gbit/s x 150 ms = 19 MB; the default covers
    /// 1 Gbit/s up to ~130 ms) and it is memory this end may hold; give shardrecv the same
    /// --window. Opens at least WINDOW / 4M data streams
    #[arg(long, value_parser = parse_window)]
    window: Option<u64>,
    /// How long to wait in line when the receiver is running its limit of transfers, e.g.
    /// 90s, 10m, 1h; 0 fails at once (exit 4). While waiting, a line on stderr says where we
    /// stand (with --json: one JSON object per line, {"event":"queued",...})
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m", value_name = "DURATION")]
    wait_for: std::time::Duration,
    /// How long to keep reconnecting when the connection to the receiver is lost mid-transfer
    /// (a cut link is noticed after 30 s of silence), e.g. 90s, 5m, 1h; each new connection
    /// resumes, so only what the receiver has not verified is sent again. The clock restarts
    /// whenever a connection is made again. While reconnecting, a line on stderr says so
    /// (with --json: {"event":"reconnecting",...}). 0: exit 6 at once, like before
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m", value_name = "DURATION")]
    retry_for: std::time::Duration,
    /// Test-only fault injection: corrupt-once | corrupt-always
    #[arg(long, hide = true)]
    inject_fault: Option<Fault>,
}

fn parse_window(text: &str) -> Result<u64, String> {
    transfer::quic::parse_window(text)
}

/// A stream carries at most `quic::STREAM_WINDOW` unacknowledged bytes, so a larger
/// `--window` needs enough streams to fill it.
fn streams_for_window(streams: usize, window: Option<u64>) -> usize {
    let needed = window.map_or(0, |w| w.div_ceil(transfer::quic::STREAM_WINDOW)) as usize;
    streams.max(needed)
}

/// `--allow-external-link DIR`: an absolute directory other than `/`, without a trailing
/// `/`, `.` or `..` (the receiver checks the same).
fn parse_external_prefix(s: &str) -> Result<String, String> {
    transfer::manifest::check_external_prefix(s.as_bytes())
        .map(|()| s.to_string())
        .map_err(|reason| format!("{s:?}: {reason}"))
}

/// `--peer`s: each a fingerprint; at least one.
fn parse_peers(given: &[String]) -> Result<Vec<Fingerprint>, Error> {
    if given.is_empty() {
        return Err(Error::Input("missing --peer".into()));
    }
    given
        .iter()
        .map(|p| Fingerprint::parse(p).map_err(|e| Error::Input(format!("--peer: {e}"))))
        .collect()
}

/// `--ticket`: the text itself, or `@FILE` holding it.
fn read_ticket(arg: String) -> Result<String, Error> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?,
        None => arg,
    };
    let text = text.trim().to_string();
    if text.len() > transfer::ticket::MAX_TICKET_LEN {
        return Err(Error::Input(format!(
            "--ticket: {} bytes, more than a ticket's {}",
            text.len(),
            transfer::ticket::MAX_TICKET_LEN
        )));
    }
    Ok(text)
}

/// A cache directory option: DIR as given, else the default place, unless turned off.
fn cache_dir(
    off: bool,
    given: &Option<PathBuf>,
    default: fn() -> Option<PathBuf>,
) -> Option<PathBuf> {
    if off {
        None
    } else {
        given.clone().or_else(default)
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging("warn", cli.log_format);
    let json = cli.send.json;
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => report_error(&e, json),
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Some(Command::Identity(identity)) => identity.run(Role::Sender),
        Some(Command::Doc(doc)) => doc.run(Cli::command()),
        None => send_main(cli.send),
    }
}

/// How often `--json` prints a progress event (besides the first and the last).
const PROGRESS_EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Prints [`SendEvent`]s on stderr: a sentence, or one JSON object per line with `--json`
/// (stdout carries only the summary). Progress is printed only as JSON, when
/// `json_progress`: on a terminal the progress bar shows it.
fn event_printer(json: bool, json_progress: bool) -> EventSink {
    let last_progress = std::sync::Mutex::new(None::<std::time::Instant>);
    Arc::new(move |event: &SendEvent| {
        use std::io::Write;
        if let SendEvent::Progress(r) = event {
            let Ok(mut last) = last_progress.lock() else {
                return;
            };
            let now = std::time::Instant::now();
            let due = last.is_none_or(|t| now.duration_since(t) >= PROGRESS_EVENT_INTERVAL);
            let edge = r.seconds == 0.0 || r.done_bytes == r.total_bytes;
            if !(json && json_progress && (due || edge)) {
                return;
            }
            *last = Some(now);
        }
        let line = if json {
            serde_json::to_string(event).unwrap_or_default()
        } else {
            match event {
                SendEvent::Queued {
                    position,
                    active,
                    limit,
                    waited_seconds,
                } => format!(
                    "waiting for the receiver: number {position} in line, {active} of its \
                     {limit} transfers running (waited {waited_seconds:.0} s)"
                ),
                SendEvent::Admitted { waited_seconds } => {
                    format!("the receiver took the transfer after {waited_seconds:.1} s in line")
                }
                SendEvent::Reconnecting {
                    reason,
                    try_number,
                    waited_seconds,
                    retry_for_seconds,
                } => format!(
                    "no connection to the receiver ({reason}): reconnecting to resume, try \
                     {try_number}, {waited_seconds:.0} s of --retry-for {retry_for_seconds:.0} s"
                ),
                SendEvent::Reconnected {
                    waited_seconds,
                    tries,
                } => format!(
                    "connected to the receiver again after {waited_seconds:.1} s ({tries} tries): \
                     resuming"
                ),
                SendEvent::Progress(_) => return,
            }
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    })
}

fn send_main(a: SendArgs) -> Result<(), Error> {
    let missing = |what: &str| Error::Input(format!("missing {what}"));
    if !(transfer::manifest::MIN_CHUNK_SIZE..=transfer::manifest::MAX_CHUNK_SIZE)
        .contains(&a.chunk_size)
    {
        return Err(Error::Input(
            "--chunk-size must be between 64K and 64M".into(),
        ));
    }
    let identity = Identity::load(&a.identity.ok_or_else(|| missing("--identity"))?)?;
    let cfg = SendConfig {
        src: a.src.ok_or_else(|| missing("SRC"))?,
        addr: a.receiver.ok_or_else(|| missing("RECEIVER"))?,
        dest: a.dest.ok_or_else(|| missing("DEST"))?,
        identity: Arc::new(identity),
        peers: parse_peers(&a.peer)?,
        compress: a.compress,
        streams: streams_for_window(a.streams, a.window),
        bwlimit: a.bwlimit,
        resume: a.resume,
        chunk_size: a.chunk_size,
        progress: !a.no_progress && !a.json && std::io::stderr().is_terminal(),
        fault: a.inject_fault,
        stage_only: a.stage_only,
        git: a.git,
        connect_timeout: std::time::Duration::try_from_secs_f64(a.connect_timeout)
            .map_err(|_| Error::Input("--connect-timeout must be a positive number".into()))?,
        transport: TransportOptions {
            congestion: a.congestion,
            window: a.window,
            resume: None,
        },
        wait_for: a.wait_for,
        events: Some(event_printer(a.json, !a.no_progress)),
        retry_for: a.retry_for,
        owner: transfer::owner::resolve_local(a.preserve_owner, a.chown.as_ref(), &a.map_owner)?,
        external_links: a
            .allow_external_link
            .into_iter()
            .map(String::into_bytes)
            .collect(),
        dissociate: a.dissociate,
        ticket: a.ticket.map(read_ticket).transpose()?,
        repack_wait: a.repack_wait,
        scan_cache: cache_dir(
            a.no_scan_cache,
            &a.scan_cache,
            transfer::scan_cache::default_dir,
        ),
        path_memory: cache_dir(
            a.no_path_memory,
            &a.path_memory,
            transfer::path_memory::default_dir,
        ),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))?;
    let summary = rt.block_on(send(&cfg))?;
    // A closed stdout (the caller went away) must not turn success into a panic.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if a.json {
        let text =
            serde_json::to_string_pretty(&summary).map_err(|e| Error::Other(e.to_string()))?;
        let _ = writeln!(out, "{text}");
    } else {
        let _ = writeln!(
            out,
            "{} {} ({} bytes, {} resumed) to {}:{} in {:.2} s, {:.1} MB/s, {} streams",
            if summary.staged_only {
                "staged"
            } else {
                "sent"
            },
            summary.source,
            summary.bytes,
            summary.resumed_bytes,
            summary.receiver,
            if summary.staged_only {
                &summary.dest
            } else {
                &summary.installed_path
            },
            summary.seconds,
            summary.mb_per_s,
            summary.streams
        );
        let _ = writeln!(out, "compression: {}", summary.compression.reason);
        if let Some(r) = &summary.replaced {
            let _ = writeln!(out, "previous copy moved aside to {r}");
        }
        for s in &summary.skipped {
            let _ = writeln!(out, "skipped {s}");
        }
        let _ = writeln!(out, "root hash {}", summary.root_hash);
    }
    Ok(())
}
