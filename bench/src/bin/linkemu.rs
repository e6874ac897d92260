//! `linkemu`: emulate a WAN link (rate, queue, delay, jitter, loss, bursty loss, reordering,
//! cuts) between two network namespaces. Parses arguments and drives `bench::linkemu`.

use std::io::Write;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bench::linkemu::model::{CutSchedule, LinkParams};
use bench::linkemu::{probe, units, watchdog, Emulator, Framing, LinkSpec, LinkStats};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "linkemu",
    about = "Emulate a WAN link between two network namespaces (needs root)",
    long_about = "Emulate a WAN link between two network namespaces (needs root).\n\n\
        Creates namespaces PREFIX-a and PREFIX-b (PREFIX defaults to lemu<pid>), each with a TUN \
        device lemu0: side A is 10.250.88.1, side B 10.250.88.2 (addresses that exist only inside \
        the two namespaces). Packets between them pass through this process, which applies, per \
        direction: --rate with a drop-tail queue of --queue, then --delay (one way, so the RTT is \
        twice it) plus --jitter, --loss, --burst-loss and --reorder. The link goes down during each \
        --cut, on SIGUSR1 (until SIGUSR2), or with both.\n\n\
        With a CMD after --, runs it (in the machine's namespace, with LINKEMU_NS_A, LINKEMU_NS_B, \
        LINKEMU_ADDR_A, LINKEMU_ADDR_B and LINKEMU_PID set; use `ip netns exec $LINKEMU_NS_B ...` \
        inside) and exits with its status. Without CMD, prints one ready line (JSON with --json) \
        and runs until SIGINT/SIGTERM. Counters go to stderr at the end (stdout with --json).\n\n\
        The namespaces are removed on every exit, SIGKILL included (a watchdog process does it).\n\n\
        Examples:\n  linkemu --rate 100M --delay 25ms --loss 1% -- ip netns exec '$LINKEMU_NS_A' ...\n  \
        linkemu --measure-ceiling"
)]
struct Cli {
    /// Line rate, bits per second (decimal): 100M, 1G, 16mbit; unlimited when absent
    #[arg(long, value_parser = units::parse_rate)]
    rate: Option<u64>,
    /// Drop-tail queue, as the longest wait at the line rate
    #[arg(long, default_value = "50ms", value_parser = units::parse_duration)]
    queue: u64,
    /// One-way delay (RTT is twice this)
    #[arg(long, default_value = "0", value_parser = units::parse_duration)]
    delay: u64,
    /// Uniform extra delay in [0, JITTER]; never reorders (see --reorder)
    #[arg(long, default_value = "0", value_parser = units::parse_duration)]
    jitter: u64,
    /// Random loss per packet and direction: 1%, 0.1% or 0.001
    #[arg(long, default_value = "0", value_parser = units::parse_probability)]
    loss: f64,
    /// Gilbert-Elliott bursty loss: P_GOOD_TO_BAD,P_BAD_TO_GOOD[,LOSS_BAD[,LOSS_GOOD]],
    /// e.g. 0.25%,25% (about 1% loss in bursts of 4 packets on average)
    #[arg(long, value_parser = units::parse_gilbert_elliott)]
    burst_loss: Option<bench::linkemu::model::GilbertElliott>,
    /// Probability that a packet is held back by --reorder-gap and overtaken
    #[arg(long, default_value = "0", value_parser = units::parse_probability)]
    reorder: f64,
    /// How long a reordered packet is held back
    #[arg(long, default_value = "1ms", value_parser = units::parse_duration)]
    reorder_gap: u64,
    /// Take the link down at START for LENGTH, e.g. 10s+45s (repeatable; times from ready)
    #[arg(long = "cut", value_parser = units::parse_cut)]
    cuts: Vec<(u64, u64)>,
    /// Seed of the random draws (loss, jitter, reordering)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Segmentation offload: `on` lets TCP and UDP super-packets (TSO, UDP GSO) cross whole
    /// and delivers the surviving wire packets of each in coalesced runs, as hosts with real
    /// NICs do (GSO on send, GRO on receive); the model still judges every wire packet.
    /// `off`: one read and one write per wire packet, every host pays per-packet costs
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    offload: String,
    /// Namespace name prefix (namespaces PREFIX-a and PREFIX-b)
    #[arg(long)]
    name: Option<String>,
    /// Machine-readable output: a JSON ready line and JSON counters on stdout
    #[arg(long)]
    json: bool,
    /// Measure what the link carries with one TCP stream A->B (kernel TCP, BBR here) and a
    /// round-trip probe, print it and exit. Without shaping options this is linkemu's ceiling
    #[arg(long, conflicts_with = "cmd")]
    measure_ceiling: bool,
    /// Length of the --measure-ceiling TCP stream
    #[arg(long, default_value = "5s", value_parser = units::parse_duration)]
    measure_for: u64,
    /// Command to run while the link is up
    #[arg(last = true)]
    cmd: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(watchdog::WATCHDOG_ARG) {
        std::process::exit(watchdog::run(&args[2..]));
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("linkemu: error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Signals handled by the main thread through `sigtimedwait`.
const SIGNALS: [libc::c_int; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Waits up to `timeout` for one of [`SIGNALS`].
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timespec; siginfo not requested.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

fn run(cli: Cli) -> Result<i32> {
    let spec = LinkSpec {
        params: LinkParams {
            rate_bps: cli.rate,
            queue: cli.queue,
            delay: cli.delay,
            jitter: cli.jitter,
            loss: cli.loss,
            gilbert_elliott: cli.burst_loss,
            reorder: cli.reorder,
            reorder_gap: cli.reorder_gap,
        },
        cuts: CutSchedule::new(cli.cuts.clone()),
        seed: cli.seed,
        prefix: cli.name.clone(),
        framing: if cli.offload == "off" {
            Framing::Plain
        } else {
            Framing::Offload
        },
    };
    // Block the signals before any thread exists, so every thread inherits the mask and only
    // the main thread's sigtimedwait sees them. (Linux keeps a blocked signal pending even
    // when its disposition is "ignore", as a shell sets SIGINT for background jobs, so
    // sigtimedwait still receives it.)
    let set = signal_set();
    // SAFETY: a valid set; the previous mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let emu = Emulator::start(&spec, Some(&exe))?;
    if cli.measure_ceiling {
        return measure(emu, &cli);
    }
    let ready = serde_json::json!({
        "event": "ready",
        "ns_a": emu.ns_a, "addr_a": emu.addr_a.to_string(),
        "ns_b": emu.ns_b, "addr_b": emu.addr_b.to_string(),
        "pid": std::process::id(),
    });
    let mut out = std::io::stdout().lock();
    if cli.json {
        let _ = writeln!(out, "{ready}");
    } else {
        let _ = writeln!(
            out,
            "linkemu ready: ns_a={} addr_a={} ns_b={} addr_b={} pid={}",
            emu.ns_a,
            emu.addr_a,
            emu.ns_b,
            emu.addr_b,
            std::process::id()
        );
    }
    let _ = out.flush();
    drop(out);

    let mut child = if cli.cmd.is_empty() {
        None
    } else {
        Some(spawn_cmd(&cli.cmd, &emu)?)
    };
    let exit_code = loop {
        if let Some(c) = child.as_mut() {
            if let Some(status) = c.try_wait().context("wait for the command")? {
                break status_code(status);
            }
        }
        match wait_signal(&set, Duration::from_millis(50)) {
            Some(libc::SIGUSR1) => {
                emu.set_down(true);
                eprintln!("linkemu: link down (SIGUSR1)");
            }
            Some(libc::SIGUSR2) => {
                emu.set_down(false);
                eprintln!("linkemu: link up (SIGUSR2)");
            }
            Some(sig) => {
                if let Some(mut c) = child.take() {
                    stop_child(&mut c, sig);
                }
                break 128 + sig;
            }
            None => {}
        }
    };
    let stats = emu.shutdown();
    print_stats(&stats, cli.json);
    Ok(exit_code)
}

fn spawn_cmd(cmd: &[String], emu: &Emulator) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .env("LINKEMU_NS_A", &emu.ns_a)
        .env("LINKEMU_NS_B", &emu.ns_b)
        .env("LINKEMU_ADDR_A", emu.addr_a.to_string())
        .env("LINKEMU_ADDR_B", emu.addr_b.to_string())
        .env("LINKEMU_PID", std::process::id().to_string());
    // SAFETY: only async-signal-safe calls between fork and exec: the command gets the
    // default signal mask back.
    unsafe {
        c.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    c.spawn()
        .with_context(|| format!("cannot run {:?}", cmd[0]))
}

/// Passes a termination signal on (Ctrl-C already reached the whole process group) and
/// gives the command 5 s before killing it.
fn stop_child(child: &mut std::process::Child, sig: libc::c_int) {
    if sig != libc::SIGINT {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    }
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn status_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn print_stats(stats: &LinkStats, json: bool) {
    if json {
        let obj = serde_json::json!({ "event": "stats", "stats": stats });
        println!("{obj}");
        return;
    }
    for (name, d) in [("a->b", &stats.a_to_b), ("b->a", &stats.b_to_a)] {
        eprintln!(
            "linkemu {name}: {} packets in, {} out ({} bytes); lost: {} random, {} burst, {} down; \
             dropped: {} queue full, {} delay line full; {} reordered; {} write errors",
            d.packets_in,
            d.packets_out,
            d.bytes_out,
            d.lost_random,
            d.lost_burst,
            d.lost_down,
            d.dropped_queue,
            d.dropped_delay_line,
            d.reordered,
            d.write_errors
        );
    }
}

fn measure(emu: Emulator, cli: &Cli) -> Result<i32> {
    let shaped = cli.rate.is_some()
        || cli.delay > 0
        || cli.loss > 0.0
        || cli.burst_loss.is_some()
        || cli.jitter > 0
        || cli.reorder > 0.0;
    let echo = probe::udp_echo(
        &emu.ns_a,
        &emu.ns_b,
        emu.addr_b,
        200,
        Duration::from_millis(2),
        Duration::from_millis(500) + Duration::from_nanos(4 * cli.delay),
    )?;
    let stream = probe::tcp_stream(
        &emu.ns_a,
        &emu.ns_b,
        emu.addr_b,
        Duration::from_nanos(cli.measure_for),
    )?;
    let stats = emu.shutdown();
    if stream.bytes == 0 {
        bail!("the TCP stream through the link carried nothing");
    }
    if cli.json {
        let obj = serde_json::json!({
            "event": "measure",
            "shaped": shaped,
            "tcp": stream,
            "echo": echo,
            "stats": stats,
        });
        println!("{obj}");
    } else {
        println!(
            "{}: one TCP stream carried {:.0} Mbit/s ({} bytes in {:.2} s); UDP echo: rtt min {:.3} ms, median {:.3} ms, loss {:.1}%",
            if shaped { "shaped link" } else { "linkemu ceiling (no shaping)" },
            stream.mbit_per_s,
            stream.bytes,
            stream.seconds,
            echo.min_rtt_ms,
            echo.median_rtt_ms,
            echo.loss * 100.0
        );
        print_stats(&stats, false);
    }
    Ok(0)
}
