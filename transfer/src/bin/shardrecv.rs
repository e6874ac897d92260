//! `shardrecv`: the receiving daemon of verified QUIC tree transfers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use transfer::cli::{
    init_logging, report_error, DocCommand, IdentityCommand, LogFormat, Role, EXIT_CODES_HELP,
};
use transfer::identity::{AllowList, Fingerprint, IdentitySet, LiveAllowList, LiveIdentities};
use transfer::quic::Congestion;
use transfer::recv::config::{FileConfig, ServeFlags, ServeSettings};
use transfer::recv::{Receiver, ServeConfig};
use transfer::units::parse_size;
use transfer::Error;

#[derive(Parser)]
#[command(
    name = "shardrecv",
    version,
    about = "Receive repositories sent by shardsend, verify them and install them atomically",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: text (the default), or json (one object per line, for journald
    /// or a log shipper; RUST_LOG sets the level, info by default). Overrides the config
    /// file's log_format
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
}

// Parsed once per process: the size of its largest variant (`serve`'s flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Identity(IdentityCommand),
    #[command(flatten)]
    Doc(DocCommand),
    /// Accept transfers into ROOT until interrupted (SIGINT/SIGTERM)
    #[command(
        long_about = "Accept transfers into ROOT until interrupted (SIGINT/SIGTERM).\n\n\
        Each transfer is staged under ROOT/.shardrecv/, verified chunk by chunk (BLAKE3), fsynced and \
        renamed into place as ROOT/DEST; an existing DEST is moved aside to DEST.replaced-<unix-time>. \
        At most --max-transfers run at once; the next ones wait in line. Each admission is logged with \
        max_active, the most transfers active at once so far. \
        Installed files keep their mode, times, extended attributes and hardlinks; they belong to \
        the user running shardrecv unless the sender asks for owners (--preserve-owner, --chown, \
        --map-owner), which needs root (or CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_FSETID): \
        without them such a transfer is refused before \
        any data moves. A receiver killed while installing keeps the verified tree staged: the \
        sender's --resume then sends nothing and installs it. \
        Only senders whose key fingerprint is listed in the --allow file may connect (one fingerprint \
        per line, '#' comments). Prints 'listening ADDR fingerprint FP' on stdout once ready \
        (FP: the primary identity's), then 'metrics http://ADDR/metrics' with --metrics, then \
        'also fingerprint FP' for each further identity.\n\n\
        Key rotation: --identity may be repeated (the config file's identity may be a list); the \
        first is the primary. Senders name the keys they pin in the TLS server name, and get the \
        first of ours they name; a sender naming none (older shardsend) gets the primary. To \
        rotate without failing a transfer: serve the old and the new key (old first), reload; \
        pin both on the senders (shardsend --peer NEW --peer OLD, or shardmove device rotate-key); \
        make the new key primary, reload; once no sender pins only the old key, drop it, \
        reload (metrics: shardrecv_identity_presented_total says which keys senders still get).\n\n\
        Settings can come from a TOML file instead of flags: --config PATH, or \
        /etc/shard/shardrecv.toml when it exists, with the keys listen, root, identity, allow, \
        max_transfers, max_queued, congestion, window, metrics, log_format, ticket_signers, \
        keep_free, handshake_rate and max_handshakes (e.g. \
        listen = \"0.0.0.0:7400\", max_transfers = 8, window = \"64M\"). Flags override the file; \
        an unknown or badly typed key is an error naming it.\n\n\
        Under systemd (Type=notify) it says READY=1 once listening and STOPPING=1 when it stops. \
        SIGHUP reloads the identities and the allow-list (the --identity and --allow files, or \
        the config file's identity and allow as they are now) without dropping transfers in \
        flight: a removed sender's next connection is refused, a new one gets in, a removed key \
        is no longer presented to new connections. They are reloaded together or not at all: an \
        unreadable key file or list keeps the current ones (the log says why)."
    )]
    Serve {
        /// TOML file of settings (default /etc/shard/shardrecv.toml, read only when it
        /// exists); flags override it
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// UDP address to listen on, e.g. 0.0.0.0:7400 (port 0 picks a free port)
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory that receives the trees
        #[arg(long)]
        root: Option<PathBuf>,
        /// Our identity key (made by `shardrecv keygen`); repeat it to serve several during a
        /// key rotation, the first being the primary (reloaded on SIGHUP)
        #[arg(long, value_name = "KEY")]
        identity: Vec<PathBuf>,
        /// Allow-list of sender fingerprints (reloaded on SIGHUP)
        #[arg(long)]
        allow: Option<PathBuf>,
        /// Transfers served at once; more wait in line, first come first served, and are
        /// told their place (a waiting sender keeps its connection open) [default: 32]
        #[arg(long)]
        max_transfers: Option<usize>,
        /// Congestion controller of our sending side (control messages): auto (bbr, cubic
        /// on loopback), bbr, quinn-bbr, cubic, newreno or background. The data direction
        /// follows the sender's --congestion [default: auto]
        #[arg(long)]
        congestion: Option<Congestion>,
        /// Connection receive window per transfer, K/M suffixes: the most unread data one
        /// transfer may buffer here; it must cover the sender's rate x RTT
        #[arg(long, value_parser = transfer::quic::parse_window)]
        window: Option<u64>,
        /// Transfers waiting in line at most; beyond that senders are refused as busy
        /// [default: 512]
        #[arg(long)]
        max_queued: Option<usize>,
        /// Serve Prometheus metrics on http://ADDR/metrics (TCP; loopback or an admin
        /// network: nothing authenticates the scraper), e.g. 127.0.0.1:9400
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Require a transfer ticket signed by the orchestrator key with this fingerprint
        /// (`shardmove ticket-key`); repeatable, for a key rotation. With tickets on, a
        /// sender on the allow-list may still only write what a ticket for it allows: this
        /// destination, created or replacing a known tree, before it expires. Without, the
        /// allow-list alone decides (standalone shardsend use)
        #[arg(long, value_name = "FINGERPRINT", value_parser = parse_fingerprint)]
        ticket_signer: Vec<Fingerprint>,
        /// Disk space under --root never promised to transfers, K/M/G suffixes (room for
        /// everything else on that disk). Transfers are admitted only while what they still
        /// have to write fits beside what the others will still write, so concurrent
        /// transfers never fill the disk together; one that does not fit is refused before
        /// any data moves (exit 4 on the sender) [default: 0]
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        keep_free: Option<u64>,
        /// Failed handshakes per second per source address (IPv6: per /64), with bursts of
        /// twice that; once an address used them up, its new connections are refused before
        /// any cryptography, so a flood of handshakes does not take the CPU of authorised
        /// transfers. Authorised senders' handshakes cost nothing, however many one host
        /// starts. 0: no limit [default: 20]
        #[arg(long, value_name = "N")]
        handshake_rate: Option<u32>,
        /// Handshakes in progress at once; beyond that a new address must first prove it
        /// is real (QUIC Retry) and a proven one is refused [default: 128]
        #[arg(long, value_name = "N")]
        max_handshakes: Option<usize>,
    },
}

fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    Fingerprint::parse(s).map_err(|e| e.to_string())
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => report_error(&e, false),
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<(), Error> {
    let log_format = cli.log_format;
    match cli.command {
        Command::Identity(command) => {
            init_logging("info", log_format.unwrap_or_default());
            command.run(Role::Receiver)
        }
        Command::Doc(command) => command.run(Cli::command()),
        Command::Serve {
            config,
            listen,
            root,
            identity,
            allow,
            max_transfers,
            congestion,
            window,
            max_queued,
            metrics,
            ticket_signer,
            keep_free,
            handshake_rate,
            max_handshakes,
        } => {
            let flags = ServeFlags {
                listen,
                root,
                identity,
                allow,
                max_transfers,
                max_queued,
                congestion,
                window,
                metrics,
                log_format,
                ticket_signers: ticket_signer,
                keep_free,
                handshake_rate,
                max_handshakes,
            };
            let settings = ServeSettings::merge(flags, FileConfig::find(config.as_deref())?)?;
            init_logging("info", settings.log_format);
            serve(settings)
        }
    }
}

fn serve(settings: ServeSettings) -> Result<(), Error> {
    if std::env::var_os("SHARDMOVE_FAILPOINTS").is_some() && !transfer::failpoint::ENABLED {
        tracing::warn!("SHARDMOVE_FAILPOINTS is set but this build has no failpoints (build it with `cargo test` or --features failpoints)");
    }
    if let Some(path) = &settings.config_file {
        tracing::info!(config = %path.display(), "settings read from the config file (flags override it)");
    }
    let identities = IdentitySet::load(&settings.identity)?;
    let allow = AllowList::load(&settings.allow)?;
    if allow.is_empty() {
        tracing::warn!(file = %allow.source.display(), "the allow-list is empty: every sender will be refused");
    }
    let served = identities.fingerprints();
    let described = identities.describe();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let receiver = Receiver::bind(ServeConfig {
            listen: settings.listen,
            root: settings.root.clone(),
            identities,
            allow,
            max_transfers: settings.max_transfers,
            transport: settings.transport,
            max_queued: settings.max_queued,
            metrics: settings.metrics,
            ticket_signers: settings.ticket_signers.clone(),
            keep_free: settings.keep_free,
            handshake_rate: settings.handshake_rate,
            max_handshakes: settings.max_handshakes,
        })?;
        let addr = receiver.local_addr()?;
        // The first line keeps its four words (scripts read the primary from it).
        println!("listening {addr} fingerprint {}", served[0]);
        if let Some(metrics) = receiver.metrics_addr() {
            println!("metrics http://{metrics}/metrics");
            tracing::info!(%metrics, "serving Prometheus metrics on /metrics");
        }
        // Whoever read the first line may have gone: a closed stdout must not stop us.
        for fp in &served[1..] {
            let _ = writeln!(std::io::stdout(), "also fingerprint {fp}");
        }
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, fingerprint = %served[0], identities = %described, "shardrecv ready");
        sd_notify("READY=1");
        let reloader = tokio::spawn(reload_on_sighup(
            settings,
            receiver.identities(),
            receiver.allow_list(),
        ));
        receiver
            .run(async {
                shutdown_signal().await;
                sd_notify("STOPPING=1");
            })
            .await;
        reloader.abort();
        Ok(())
    })
}

/// Tells systemd (`Type=notify`) where we are; a failure is logged, never fatal.
fn sd_notify(state: &str) {
    match transfer::notify::notify(state) {
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, state, "cannot notify systemd"),
    }
}

/// SIGHUP: read the identities and the allow-list again (from the flags' files, or the
/// config file's `identity` and `allow` as they are now) and swap both in; handshakes from
/// then on use the new ones, connections already made go on. Both are read before either is
/// swapped: a key file or list that cannot be read keeps the current ones, so the receiver
/// never serves half of an operator's change.
async fn reload_on_sighup(
    settings: ServeSettings,
    identities: Arc<LiveIdentities>,
    live: Arc<LiveAllowList>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: identities and allow-list will not be reloaded");
            return;
        }
    };
    while hup.recv().await.is_some() {
        sd_notify(&transfer::notify::reloading_message());
        let loaded = settings.reload_paths_now().and_then(|paths| {
            Ok((
                IdentitySet::load(&paths.identities)?,
                AllowList::load(&paths.allow)?,
            ))
        });
        match loaded {
            Ok((set, list)) => {
                let before_ids = identities.current().describe();
                let now_ids = set.describe();
                let (before, now) = (live.current().len(), list.len());
                let file = list.source.display().to_string();
                if list.is_empty() {
                    tracing::warn!(%file, "the reloaded allow-list is empty: every new sender will be refused");
                }
                identities.replace(set);
                live.replace(list);
                if before_ids == now_ids {
                    tracing::info!(identities = %now_ids, "identities reloaded, unchanged");
                } else {
                    tracing::info!(before = %before_ids, now = %now_ids, "identities reloaded: new connections get these keys (connections made go on)");
                }
                tracing::info!(%file, before, now, "allow-list reloaded (transfers in flight go on)");
            }
            Err(e) => {
                tracing::error!(error = %e, "nothing reloaded: keeping the current identities and allow-list");
            }
        }
        sd_notify("READY=1");
    }
}
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}
