//! `shardmove status serve`: the side channel that tells users why their pushes are refused.
//!
//! A small read-only HTTP server (`GET /` an HTML page that refreshes itself, `GET
//! /api/status` the same as JSON) over the registry: which repositories are read-only, the
//! operator's message, since when, the migration step they are in, and when they should be
//! writable again (estimated from the read-only windows of the repositories the same
//! migration already finished). The server is deliberately tiny: one request per connection,
//! `GET` only, requests capped at 8 KiB, so it needs no web framework and exposes nothing but
//! this page.

use std::future::Future;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::Result;
use crate::migrate::{MigrationStatus, RepoState};
use crate::registry::{self, Registry};

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

/// What the page shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusReport {
    pub generated_at: i64,
    pub read_only: Vec<ReadOnlyRepo>,
    /// The most recent migration, if any.
    pub migration: Option<MigrationStatus>,
}

/// Builds the report from the registry.
pub async fn report(registry: &Registry) -> Result<StatusReport> {
    let now = registry::now();
    let migration = match registry.migration_ids().await?.first() {
        Some(id) => Some(crate::migrate::status(registry, *id).await?),
        None => None,
    };
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
    })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTML page for a report.
pub fn render(report: &StatusReport) -> String {
    let mut rows = String::new();
    for r in &report.read_only {
        let back = match r.expected_back_in_seconds {
            Some(s) if s < 1.0 => "any moment now".to_string(),
            Some(s) => format!("in about {s:.0} s"),
            None => "shortly".to_string(),
        };
        rows.push_str(&format!(
            "<tr class=\"readonly\"><td class=\"repo\">{}</td><td class=\"message\">{}</td>\
             <td>{} s ago</td><td>{}</td><td>{}</td></tr>\n",
            escape(&r.repository),
            escape(&r.message),
            r.seconds_so_far,
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
    let migration = match &report.migration {
        Some(m) => {
            let done = m.counts.get("done").copied().unwrap_or(0);
            let total = m.repositories.len();
            let moved: u64 = m.repositories.iter().map(|r| r.bytes).sum();
            format!(
                "<p id=\"migration\">Migration {} of <b>{}</b> from {} to {}: <b>{}</b>, \
                 {done} of {total} repositories moved ({} MB).</p>\
                 <progress max=\"{total}\" value=\"{done}\"></progress>",
                m.id,
                escape(&m.instance),
                escape(&m.from),
                escape(&m.to),
                escape(m.state.as_str()),
                moved / 1_000_000
            )
        }
        None => "<p id=\"migration\">No migration has run.</p>".to_string(),
    };
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>Repository maintenance</title><style>body{{font-family:sans-serif;margin:2em}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         tr.readonly{{background:#fff4e0}}</style></head><body>\n\
         <h1>Repository maintenance</h1>\n{table}\n{migration}\n\
         <p><small>Updated at unix time {}; reads (clone, fetch) keep working during maintenance. \
         JSON: <a href=\"/api/status\">/api/status</a></small></p></body></html>\n",
        report.generated_at
    )
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
    match path.split('?').next().unwrap_or("") {
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
        };
        let html = render(&report);
        assert!(html.contains("t/r&lt;1&gt;"));
        assert!(html.contains("moving &quot;now&quot; &amp; then"));
        assert!(html.contains("in about 4 s"));
        assert!(html.contains("final_copy"));
        let empty = StatusReport {
            generated_at: 1,
            read_only: vec![],
            migration: None,
        };
        assert!(render(&empty).contains("Every repository accepts pushes"));
    }
}
