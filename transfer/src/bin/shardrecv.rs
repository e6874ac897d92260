//! `shardrecv`: the receiving daemon of verified QUIC tree transfers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use transfer::cli::{
    init_logging, report_error, IdentityCommand, LogFormat, Role, EXIT_CODES_HELP,
};
use transfer::identity::{AllowList, Identity};
use transfer::quic::{Congestion, TransportOptions};
use transfer::recv::{Receiver, ServeConfig, DEFAULT_MAX_QUEUED, DEFAULT_MAX_TRANSFERS};
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
    /// Log lines on stderr: text, or json (one object per line, for journald or a log
    /// shipper; RUST_LOG sets the level, info by default)
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Identity(IdentityCommand),
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
        per line, '#' comments). Prints 'listening ADDR fingerprint FP' on stdout once ready."
    )]
    Serve {
        /// UDP address to listen on, e.g. 0.0.0.0:7400 (port 0 picks a free port)
        #[arg(long)]
        listen: SocketAddr,
        /// Directory that receives the trees
        #[arg(long)]
        root: PathBuf,
        /// Our identity key (made by `shardrecv keygen`)
        #[arg(long)]
        identity: PathBuf,
        /// Allow-list of sender fingerprints
        #[arg(long)]
        allow: PathBuf,
        /// Transfers served at once; more wait in line, first come first served, and are
        /// told their place (a waiting sender keeps its connection open)
        #[arg(long, default_value_t = DEFAULT_MAX_TRANSFERS)]
        max_transfers: usize,
        /// Congestion controller of our sending side (control messages): bbr, cubic or
        /// newreno. The data direction follows the sender's --congestion
        #[arg(long, default_value_t = Congestion::default())]
        congestion: Congestion,
        /// Connection receive window per transfer, K/M suffixes: the most unread data one
        /// transfer may buffer here; it must cover the sender's rate x RTT
        #[arg(long, value_parser = transfer::quic::parse_window)]
        window: Option<u64>,
        /// Transfers waiting in line at most; beyond that senders are refused as busy
        #[arg(long, default_value_t = DEFAULT_MAX_QUEUED)]
        max_queued: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    init_logging("info", cli.log_format);
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => report_error(&e, false),
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Identity(command) => command.run(Role::Receiver),
        Command::Serve {
            listen,
            root,
            identity,
            allow,
            max_transfers,
            congestion,
            window,
            max_queued,
        } => {
            if std::env::var_os("SHARDMOVE_FAILPOINTS").is_some() && !transfer::failpoint::ENABLED {
                tracing::warn!("SHARDMOVE_FAILPOINTS is set but this build has no failpoints (build it with `cargo test` or --features failpoints)");
            }
            let identity = Identity::load(&identity)?;
            let allow = AllowList::load(&allow)?;
            if allow.is_empty() {
                tracing::warn!(file = %allow.source.display(), "the allow-list is empty: every sender will be refused");
            }
            let fingerprint = identity.fingerprint;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))?;
            rt.block_on(async move {
                let receiver = Receiver::bind(ServeConfig {
                    listen,
                    root,
                    identity,
                    allow,
                    max_transfers,
                    transport: TransportOptions { congestion, window },
                    max_queued,
                })?;
                let addr = receiver.local_addr()?;
                println!("listening {addr} fingerprint {fingerprint}");
                let _ = std::io::stdout().flush();
                tracing::info!(%addr, %fingerprint, "shardrecv ready");
                receiver.run(shutdown_signal()).await;
                Ok(())
            })
        }
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
