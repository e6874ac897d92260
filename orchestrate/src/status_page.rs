//! `shardmove status serve`: the side channel that tells users why their pushes are refused.
//!
//! A small read-only HTTP server (`GET /` an HTML page that refreshes itself, `GET
//! /api/status` the same as JSON, `GET /metrics` for Prometheus) over the registry: which
//! repositories are read-only, the operator's message, since when, the migration step they are
//! in, and when they should be writable again (estimated from the read-only windows of the
//! repositories the same migration already finished); per recent batch its progress in
//! repositories and bytes with an ETA; the last read-only windows. Times are shown as people
//! read them ("updated 14:08:24 UTC, 2 s ago", the age kept current by a line of script).
//! The server is deliberately tiny: one request per connection, `GET` only, requests capped
//! at 8 KiB, so it needs no web framework and exposes nothing but this page. The Prometheus
//! text is written by hand (a dozen lines of a stable format) rather than through a metrics
//! crate, because every value is read from the registry at scrape time: nothing accumulates
//! in this process.

use std::future::Future;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::Result;
use crate::migrate::{BatchState, MigrationStatus, RepoState};
use crate::registry::{self, Registry};
use crate::store::journal::MigrationTotals;

/// One read-only repository, as users see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReadOnlyRepo {
    pub repository: String,
    pub message: String,
    /// Unix seconds.
    pub since: i64,
    pub seconds_so_far: i64,
    /// The migration working on it, with its state and step.
    pub migration: Option<i64>,
    pub state: Option<String>,
    pub step: Option<String>,
    /// Expected seconds until pushes work again, when the migration has a track record.
    pub expected_back_in_seconds: Option<f64>,
}

/// Where one batch stands, for people.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchProgress {
    pub id: i64,
    pub instance: String,
    pub from: String,
    pub to: String,
    pub state: String,
    /// Unix seconds.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub repositories_total: u64,
    /// Moved (state `done`).
    pub repositories_moved: u64,
    /// In a final state (moved or rolled back).
    pub repositories_finished: u64,
    /// Size of the moved trees.
    pub bytes_moved: u64,
    /// Size of every tree whose size is known yet (a tree is measured by its first copy).
    pub bytes_known: u64,
    /// Repositories not measured yet (their size is not in `bytes_known`).
    pub repositories_unsized: u64,
    /// Seconds left at the pace so far, for a running batch that finished at least one.
    pub eta_seconds: Option<i64>,
}

/// A read-only window that ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReadOnlyWindow {
    pub repository: String,
    pub migration: i64,
    /// Unix milliseconds.
    pub ended_at_ms: i64,
    pub seconds: f64,
}

/// What the page shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusReport {
    pub generated_at: i64,
    pub read_only: Vec<ReadOnlyRepo>,
    /// The most recent migration, if any.
    pub migration: Option<MigrationStatus>,
    /// The most recent batches ([`RECENT_BATCHES`]), newest first.
    pub batches: Vec<BatchProgress>,
    /// The last read-only windows of those batches ([`RECENT_WINDOWS`]), newest first.
    pub recent_windows: Vec<ReadOnlyWindow>,
}

/// Batches the page shows.
pub const RECENT_BATCHES: usize = 3;
/// Read-only windows the page lists.
pub const RECENT_WINDOWS: usize = 10;

/// Progress of one batch at `now` (unix seconds).
pub fn batch_progress(m: &MigrationStatus, now: i64) -> BatchProgress {
    let total = m.repositories.len() as u64;
    let moved = m
        .repositories
        .iter()
        .filter(|r| r.state == RepoState::Done)
        .count() as u64;
    let finished = m.repositories.iter().filter(|r| r.state.is_final()).count() as u64;
    let eta_seconds =
        (m.state == BatchState::Running && finished > 0 && finished < total).then(|| {
            let elapsed = (now - m.created_at).max(0);
            let per_repo = elapsed as f64 / finished as f64;
            (per_repo * (total - finished) as f64).round() as i64
        });
    BatchProgress {
        id: m.id,
        instance: m.instance.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        state: m.state.as_str().to_string(),
        started_at: m.created_at,
        finished_at: m.finished_at,
        repositories_total: total,
        repositories_moved: moved,
        repositories_finished: finished,
        bytes_moved: m
            .repositories
            .iter()
            .filter(|r| r.state == RepoState::Done)
            .map(|r| r.bytes)
            .sum(),
        bytes_known: m.repositories.iter().map(|r| r.bytes).sum(),
        repositories_unsized: m.repositories.iter().filter(|r| r.bytes == 0).count() as u64,
        eta_seconds,
    }
}

/// The windows of `batches` that ended, newest first, at most `limit`.
pub fn recent_windows(batches: &[MigrationStatus], limit: usize) -> Vec<ReadOnlyWindow> {
    let mut windows: Vec<ReadOnlyWindow> = batches
        .iter()
        .flat_map(|m| {
            m.repositories.iter().filter_map(move |r| {
                let (frozen, thawed) = (r.frozen_at_ms?, r.thawed_at_ms?);
                Some(ReadOnlyWindow {
                    repository: r.repository.clone(),
                    migration: m.id,
                    ended_at_ms: thawed,
                    seconds: (thawed - frozen).max(0) as f64 / 1000.0,
                })
            })
        })
        .collect();
    windows.sort_by_key(|w| std::cmp::Reverse(w.ended_at_ms));
    windows.truncate(limit);
    windows
}

/// Builds the report from the registry.
pub async fn report(registry: &Registry) -> Result<StatusReport> {
    let now = registry::now();
    let mut recent = Vec::new();
    for id in registry
        .migration_ids()
        .await?
        .into_iter()
        .take(RECENT_BATCHES)
    {
        recent.push(crate::migrate::status(registry, id).await?);
    }
    let batches = recent.iter().map(|m| batch_progress(m, now)).collect();
    let recent_windows = recent_windows(&recent, RECENT_WINDOWS);
    let migration = recent.into_iter().next();
    // The median read-only window of what the migration already finished.
    let median = migration.as_ref().and_then(|m| {
        let mut done: Vec<f64> = m
            .repositories
            .iter()
            .filter(|r| r.state == RepoState::Done)
            .filter_map(|r| r.readonly_seconds)
            .collect();
        done.sort_by(f64::total_cmp);
        done.get(done.len() / 2).copied()
    });
    let mut read_only = Vec::new();
    for repo in registry.in_maintenance().await? {
        let name = repo.full_name();
        let progress = migration.as_ref().and_then(|m| {
            m.repositories
                .iter()
                .find(|r| r.repository == name && !r.state.is_final())
                .map(|r| (m.id, r))
        });
        let since = repo.maintenance_since.unwrap_or(now);
        let so_far = now - since;
        read_only.push(ReadOnlyRepo {
            repository: name,
            message: repo.maintenance_message.clone().unwrap_or_default(),
            since,
            seconds_so_far: so_far,
            migration: progress.map(|(id, _)| id),
            state: progress.map(|(_, r)| r.state.as_str().to_string()),
            step: progress.and_then(|(_, r)| r.step.clone()),
            expected_back_in_seconds: progress.and(median).map(|m| (m - so_far as f64).max(0.0)),
        });
    }
    Ok(StatusReport {
        generated_at: now,
        read_only,
        migration,
        batches,
        recent_windows,
    })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `14:08:24 UTC` (the date too when it is not `today`'s, both unix seconds).
fn clock(unix: i64, today: i64) -> String {
    let full = crate::render::utc(unix);
    if unix.div_euclid(86_400) == today.div_euclid(86_400) {
        full[11..].to_string()
    } else {
        full
    }
}

/// `950 B`, `12.3 MB`, `4.50 GB` (decimal units, as disks are sold).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let digits = if value < 10.0 {
        2
    } else if value < 100.0 {
        1
    } else {
        0
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// `45 s`, `3 min 20 s`, `2 h 5 min`.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 if s % 60 == 0 => format!("{} min", s / 60),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// A read-only window: `0.12 s` below ten seconds, else whole seconds or minutes.
fn window(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{seconds:.2} s")
    } else {
        human_duration(seconds.round() as i64)
    }
}

fn percent(part: u64, whole: u64) -> u64 {
    part.saturating_mul(100).checked_div(whole).unwrap_or(0)
}

fn batch_html(b: &BatchProgress, now: i64) -> String {
    let bytes = if b.repositories_unsized == 0 {
        format!(
            "{} of {}",
            human_bytes(b.bytes_moved),
            human_bytes(b.bytes_known)
        )
    } else {
        format!(
            "{} of {} so far ({} not measured yet)",
            human_bytes(b.bytes_moved),
            human_bytes(b.bytes_known),
            b.repositories_unsized
        )
    };
    let when = match (b.state.as_str(), b.finished_at, b.eta_seconds) {
        (_, Some(end), _) => format!(
            "finished {} after {}",
            clock(end, now),
            human_duration(end - b.started_at)
        ),
        ("running", None, Some(eta)) => format!(
            "started {}; about {} left at the pace so far",
            clock(b.started_at, now),
            human_duration(eta)
        ),
        (_, None, _) => format!("started {}", clock(b.started_at, now)),
    };
    let moved = percent(b.repositories_moved, b.repositories_total);
    let bytes_percent = percent(b.bytes_moved, b.bytes_known);
    format!(
        "<div class=\"batch\" id=\"batch-{id}\"><h3>Migration {id} of <b>{instance}</b> from {from} \
         to {to}: <span class=\"state\">{state}</span></h3>\
         <div class=\"bar\"><div class=\"fill\" style=\"width:{moved}%\"></div></div>\
         <p class=\"repos\">{done} of {total} repositories moved ({moved}%)</p>\
         <div class=\"bar\"><div class=\"fill\" style=\"width:{bytes_percent}%\"></div></div>\
         <p class=\"bytes\">{bytes}</p><p class=\"when\">{when}</p></div>",
        id = b.id,
        instance = escape(&b.instance),
        from = escape(&b.from),
        to = escape(&b.to),
        state = escape(&b.state),
        done = b.repositories_moved,
        total = b.repositories_total,
    )
}

/// The HTML page for a report.
pub fn render(report: &StatusReport) -> String {
    let now = report.generated_at;
    let mut rows = String::new();
    for r in &report.read_only {
        let back = match r.expected_back_in_seconds {
            Some(s) if s < 1.0 => "any moment now".to_string(),
            Some(s) => format!("in about {}", human_duration(s.round() as i64)),
            None => "shortly".to_string(),
        };
        rows.push_str(&format!(
            "<tr class=\"readonly\"><td class=\"repo\">{}</td><td class=\"message\">{}</td>\
             <td>{} ({} ago)</td><td>{}</td><td>{}</td></tr>\n",
            escape(&r.repository),
            escape(&r.message),
            clock(r.since, now),
            human_duration(r.seconds_so_far),
            escape(r.step.as_deref().or(r.state.as_deref()).unwrap_or("-")),
            back
        ));
    }
    let table = if report.read_only.is_empty() {
        "<p id=\"none\">Every repository accepts pushes.</p>".to_string()
    } else {
        format!(
            "<table id=\"readonly\"><tr><th>repository</th><th>why</th><th>read-only since</th>\
             <th>step</th><th>writable again</th></tr>\n{rows}</table>"
        )
    };
    let batches = if report.batches.is_empty() {
        "<p id=\"migration\">No migration has run.</p>".to_string()
    } else {
        let all: Vec<String> = report.batches.iter().map(|b| batch_html(b, now)).collect();
        format!(
            "<h2>Migrations</h2>\n<div id=\"migration\">{}</div>",
            all.join("\n")
        )
    };
    let windows = if report.recent_windows.is_empty() {
        String::new()
    } else {
        let mut rows = String::new();
        for w in &report.recent_windows {
            rows.push_str(&format!(
                "<tr><td class=\"repo\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                escape(&w.repository),
                window(w.seconds),
                clock(w.ended_at_ms.div_euclid(1000), now),
                w.migration
            ));
        }
        format!(
            "<h2>Last read-only windows</h2>\n<table id=\"windows\"><tr><th>repository</th>\
             <th>read-only for</th><th>writable again at</th><th>migration</th></tr>\n{rows}</table>"
        )
    };
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>Repository maintenance</title><style>body{{font-family:sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         tr.readonly{{background:#fff4e0}}h2{{font-size:1.1em;margin-top:1.5em}}h3{{font-size:1em;font-weight:normal}}\
         .batch{{margin-bottom:1.2em}}.bar{{width:28em;height:.8em;background:#e6e6e6;border-radius:.4em;overflow:hidden}}\
         .fill{{height:100%;background:#3a7bd5}}.batch p{{margin:.2em 0 .6em}}#updated{{color:#666}}</style></head><body>\n\
         <h1>Repository maintenance</h1>\n{table}\n{batches}\n{windows}\n\
         <p id=\"updated\"><small>updated <span id=\"at\" data-unix=\"{now}\">{clock}</span>, \
         <span id=\"age\">0 s</span> ago (refreshes every 5 s); reads (clone, fetch) keep working \
         during maintenance. JSON: <a href=\"/api/status\">/api/status</a>, \
         Prometheus: <a href=\"/metrics\">/metrics</a></small></p>\n\
         <script>(function(){{var t=+document.getElementById('at').dataset.unix;\
         function tick(){{var a=Math.max(0,Math.round(Date.now()/1000-t));\
         document.getElementById('age').textContent=a<60?a+' s':Math.floor(a/60)+' min '+(a%60)+' s';}}\
         tick();setInterval(tick,1000);}})();</script></body></html>\n",
        clock = clock(now, now),
    )
}

/// Upper bounds of the read-only window histogram, seconds: windows are meant to be well
/// under a second, and anything past a minute is an incident.
pub const WINDOW_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The `/metrics` text (Prometheus exposition format 0.0.4).
pub fn metrics(read_only: usize, totals: &MigrationTotals) -> String {
    let mut out = format!(
        "# HELP shardmove_repositories_read_only Repositories in maintenance now (pushes refused, reads working).\n\
         # TYPE shardmove_repositories_read_only gauge\n\
         shardmove_repositories_read_only {read_only}\n"
    );
    out.push_str(
        "# HELP shardmove_migration_batches Migration batches in the journal, by state.\n\
         # TYPE shardmove_migration_batches gauge\n",
    );
    for state in [
        BatchState::Running,
        BatchState::Done,
        BatchState::Incomplete,
    ] {
        let n = totals.batches.get(state.as_str()).copied().unwrap_or(0);
        out.push_str(&format!(
            "shardmove_migration_batches{{state=\"{}\"}} {n}\n",
            state.as_str()
        ));
    }
    out.push_str(
        "# HELP shardmove_migration_repositories Repositories of every batch, by migration state.\n\
         # TYPE shardmove_migration_repositories gauge\n",
    );
    for state in RepoState::ALL {
        let n = totals
            .repositories
            .get(state.as_str())
            .copied()
            .unwrap_or(0);
        out.push_str(&format!(
            "shardmove_migration_repositories{{state=\"{}\"}} {n}\n",
            state.as_str()
        ));
    }
    let moved = totals
        .repositories
        .get(RepoState::Done.as_str())
        .copied()
        .unwrap_or(0);
    out.push_str(&format!(
        "# HELP shardmove_migrated_repositories_total Repositories moved to their new service.\n\
         # TYPE shardmove_migrated_repositories_total counter\n\
         shardmove_migrated_repositories_total {moved}\n\
         # HELP shardmove_migrated_bytes_total Size of the trees of the repositories moved.\n\
         # TYPE shardmove_migrated_bytes_total counter\n\
         shardmove_migrated_bytes_total {}\n\
         # HELP shardmove_migration_sent_bytes_total Bytes that crossed the wire (pre-copies and final passes).\n\
         # TYPE shardmove_migration_sent_bytes_total counter\n\
         shardmove_migration_sent_bytes_total {}\n",
        totals.moved_bytes, totals.sent_bytes
    ));
    out.push_str(
        "# HELP shardmove_readonly_window_seconds How long repositories were read-only during their migration.\n\
         # TYPE shardmove_readonly_window_seconds histogram\n",
    );
    for bound in WINDOW_BUCKETS {
        let n = totals
            .readonly_windows
            .iter()
            .filter(|w| **w <= bound)
            .count();
        out.push_str(&format!(
            "shardmove_readonly_window_seconds_bucket{{le=\"{bound}\"}} {n}\n"
        ));
    }
    let count = totals.readonly_windows.len();
    let sum: f64 = totals.readonly_windows.iter().sum();
    out.push_str(&format!(
        "shardmove_readonly_window_seconds_bucket{{le=\"+Inf\"}} {count}\n\
         shardmove_readonly_window_seconds_sum {sum}\n\
         shardmove_readonly_window_seconds_count {count}\n"
    ));
    out
}

/// Serves the page on `listener` until `shutdown` resolves.
pub async fn serve(
    registry: Registry,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _ = handle(&registry, stream).await;
        });
    }
}

async fn handle(registry: &Registry, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "too large\n",
            )
            .await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    let route = path.split('?').next().unwrap_or("");
    if route == "/metrics" {
        let scraped = async {
            let read_only = registry.in_maintenance().await?.len();
            Ok::<_, crate::Error>(metrics(read_only, &registry.migration_totals().await?))
        };
        return match scraped.await {
            Ok(text) => {
                respond(
                    &mut stream,
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    &text,
                )
                .await
            }
            Err(e) => {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    &format!("registry unavailable: {e}\n"),
                )
                .await
            }
        };
    }
    let report = match report(registry).await {
        Ok(r) => r,
        Err(e) => {
            return respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                &format!("registry unavailable: {e}\n"),
            )
            .await
        }
    };
    match route {
        "/" => {
            respond(
                &mut stream,
                "200 OK",
                "text/html; charset=utf-8",
                &render(&report),
            )
            .await
        }
        "/api/status" => {
            let body = serde_json::to_string_pretty(&report).unwrap_or_else(|_| "{}".into());
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::RepoProgress;
    use std::collections::HashMap;

    #[test]
    fn page_escapes_operator_text_and_says_when_pushes_return() {
        let report = StatusReport {
            generated_at: 100,
            read_only: vec![ReadOnlyRepo {
                repository: "t/r<1>".into(),
                message: "moving \"now\" & then".into(),
                since: 90,
                seconds_so_far: 10,
                migration: Some(1),
                state: Some("frozen".into()),
                step: Some("final_copy".into()),
                expected_back_in_seconds: Some(4.0),
            }],
            migration: None,
            batches: vec![],
            recent_windows: vec![],
        };
        let html = render(&report);
        assert!(html.contains("t/r&lt;1&gt;"));
        assert!(html.contains("moving &quot;now&quot; &amp; then"));
        assert!(html.contains("in about 4 s"));
        assert!(html.contains("00:01:30 UTC (10 s ago)"), "{html}");
        assert!(html.contains("final_copy"));
        let empty = StatusReport {
            generated_at: 1,
            read_only: vec![],
            migration: None,
            batches: vec![],
            recent_windows: vec![],
        };
        assert!(render(&empty).contains("Every repository accepts pushes"));
    }

    fn repo(
        name: &str,
        state: RepoState,
        bytes: u64,
        window_ms: Option<(i64, i64)>,
    ) -> RepoProgress {
        RepoProgress {
            repository: name.into(),
            state,
            step: None,
            error: None,
            source_device: "a1".into(),
            target_device: "b1".into(),
            bytes,
            sent_bytes: bytes,
            frozen_at_ms: window_ms.map(|w| w.0),
            thawed_at_ms: window_ms.map(|w| w.1),
            readonly_seconds: window_ms.map(|(f, t)| (t - f) as f64 / 1000.0),
        }
    }

    /// 14:08:24 UTC on 2026-11-26.
    const T: i64 = 1_795_702_104;

    fn running_batch() -> MigrationStatus {
        MigrationStatus {
            id: 7,
            plane: "builtin".into(),
            instance: "t".into(),
            from: "repo001".into(),
            to: "repo002".into(),
            message: "moving".into(),
            state: BatchState::Running,
            created_at: T - 120,
            updated_at: T,
            finished_at: None,
            owner: None,
            owner_gone: None,
            repositories: vec![
                repo(
                    "t/a",
                    RepoState::Done,
                    2_000_000,
                    Some(((T - 100) * 1000, (T - 100) * 1000 + 120)),
                ),
                repo(
                    "t/b",
                    RepoState::Done,
                    3_000_000,
                    Some(((T - 50) * 1000, (T - 50) * 1000 + 2_500)),
                ),
                repo("t/c", RepoState::Precopied, 5_000_000, None),
                repo("t/d", RepoState::Pending, 0, None),
            ],
            counts: HashMap::new(),
        }
    }

    #[test]
    fn batch_progress_counts_repositories_and_bytes_with_an_eta() {
        let progress = batch_progress(&running_batch(), T);
        assert_eq!(progress.repositories_total, 4);
        assert_eq!(progress.repositories_moved, 2);
        assert_eq!(progress.bytes_moved, 5_000_000);
        assert_eq!(progress.bytes_known, 10_000_000);
        assert_eq!(progress.repositories_unsized, 1);
        // Two finished in 120 s: the two left take about as long.
        assert_eq!(progress.eta_seconds, Some(120));
        let mut done = running_batch();
        done.state = BatchState::Done;
        done.finished_at = Some(T);
        assert_eq!(batch_progress(&done, T).eta_seconds, None);
    }

    #[test]
    fn page_speaks_to_people() {
        let batch = running_batch();
        let report = StatusReport {
            generated_at: T,
            read_only: vec![],
            batches: vec![batch_progress(&batch, T)],
            recent_windows: recent_windows(std::slice::from_ref(&batch), RECENT_WINDOWS),
            migration: Some(batch),
        };
        let html = render(&report);
        assert!(
            html.contains("updated <span id=\"at\" data-unix=\"1795702104\">14:08:24 UTC</span>"),
            "{html}"
        );
        assert!(html.contains("http-equiv=\"refresh\""));
        assert!(
            html.contains("Migration 7 of <b>t</b> from repo001 to repo002"),
            "{html}"
        );
        assert!(html.contains("2 of 4 repositories moved (50%)"), "{html}");
        assert!(
            html.contains("5.00 MB of 10.0 MB so far (1 not measured yet)"),
            "{html}"
        );
        assert!(
            html.contains("about 2 min left at the pace so far"),
            "{html}"
        );
        // Newest window first, sub-second ones with their fraction.
        let b = html
            .find("<td class=\"repo\">t/b</td><td>2.50 s</td>")
            .expect("t/b's window");
        let a = html
            .find("<td class=\"repo\">t/a</td><td>0.12 s</td>")
            .expect("t/a's window");
        assert!(b < a, "{html}");
        assert!(!html.contains("unix time"));
    }

    #[test]
    fn readable_sizes_and_durations() {
        assert_eq!(human_bytes(950), "950 B");
        assert_eq!(human_bytes(12_345_678), "12.3 MB");
        assert_eq!(human_bytes(4_500_000_000), "4.50 GB");
        assert_eq!(human_duration(45), "45 s");
        assert_eq!(human_duration(200), "3 min 20 s");
        assert_eq!(human_duration(7_500), "2 h 5 min");
        assert_eq!(clock(T, T), "14:08:24 UTC");
        assert_eq!(clock(T - 86_400, T), "2026-11-25 14:08:24 UTC");
    }

    #[test]
    fn metrics_are_prometheus_text_with_a_window_histogram() {
        let mut totals = MigrationTotals::default();
        totals.batches.insert("done".into(), 2);
        totals.repositories.insert("done".into(), 3);
        totals.repositories.insert("rolled_back".into(), 1);
        totals.moved_bytes = 42;
        totals.sent_bytes = 50;
        totals.readonly_windows = vec![0.08, 0.3, 12.0];
        let text = metrics(1, &totals);
        for line in [
            "shardmove_repositories_read_only 1",
            "shardmove_migration_batches{state=\"done\"} 2",
            "shardmove_migration_batches{state=\"running\"} 0",
            "shardmove_migration_repositories{state=\"rolled_back\"} 1",
            "shardmove_migration_repositories{state=\"pending\"} 0",
            "shardmove_migrated_repositories_total 3",
            "shardmove_migrated_bytes_total 42",
            "shardmove_migration_sent_bytes_total 50",
            "shardmove_readonly_window_seconds_bucket{le=\"0.05\"} 0",
            "shardmove_readonly_window_seconds_bucket{le=\"0.1\"} 1",
            "shardmove_readonly_window_seconds_bucket{le=\"0.5\"} 2",
            "shardmove_readonly_window_seconds_bucket{le=\"10\"} 2",
            "shardmove_readonly_window_seconds_bucket{le=\"30\"} 3",
            "shardmove_readonly_window_seconds_bucket{le=\"+Inf\"} 3",
            "shardmove_readonly_window_seconds_count 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Every sample belongs to a family declared before it, once.
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                assert!(declared.insert(name.to_string()), "{name} declared twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(declared.contains(family), "{line}: no TYPE before it");
                let value = line.rsplit(' ').next().unwrap_or_default();
                assert!(value.parse::<f64>().is_ok(), "{line}: bad value");
            }
        }
    }
}
