//! A small Conduit client: Phorge's HTTP API, `POST /api/METHOD` with the parameters as one
//! JSON document (`params`) carrying the API token.
//!
//! ureq (blocking, rustls with ring like the rest of the workspace) run on tokio's blocking
//! pool: a handful of calls per batch do not justify an async HTTP stack.

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A Conduit endpoint and the token to call it with.
#[derive(Clone)]
pub struct Conduit {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Conduit {
    /// `base` is Phorge's base URL (`https://phorge.example.org/`).
    pub fn new(base: &str, token: &str) -> Result<Conduit> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::invalid(
                format!("conduit URL {base:?}"),
                "expected http://... or https://...",
            ));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::invalid("conduit token", "empty"));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Conduit {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent,
        })
    }

    /// Calls `method` with `params`; returns its `result`, or its error as [`Error::Refused`].
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        let mut params = params;
        if let Some(map) = params.as_object_mut() {
            map.insert("__conduit__".into(), json!({"token": self.token}));
        }
        let url = format!("{}/api/{method}", self.base);
        let agent = self.agent.clone();
        let body = params.to_string();
        let what = format!("conduit {method} at {}", self.base);
        let text = tokio::task::spawn_blocking(move || {
            agent
                .post(&url)
                .send_form([
                    ("params", body.as_str()),
                    ("output", "json"),
                    ("__conduit__", "1"),
                ])
                .and_then(|mut r| r.body_mut().read_to_string())
        })
        .await
        .map_err(|e| Error::Refused(format!("{what}: {e}")))?
        .map_err(|e| Error::Refused(format!("{what}: {e}")))?;
        let answer: Value = serde_json::from_str(&text).map_err(|e| {
            Error::Refused(format!(
                "{what}: not a Conduit answer ({e}): {}",
                text.chars().take(200).collect::<String>()
            ))
        })?;
        match answer["error_code"].as_str() {
            None => Ok(answer["result"].clone()),
            Some(code) => Err(Error::Refused(format!(
                "{what}: {code}: {}",
                answer["error_info"].as_str().unwrap_or("")
            ))),
        }
    }

    /// A `*.search` method, every page: the `data` rows.
    pub async fn search(&self, method: &str, params: Value) -> Result<Vec<Value>> {
        let mut rows = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut p = params.clone();
            if let (Some(map), Some(after)) = (p.as_object_mut(), &after) {
                map.insert("after".into(), Value::String(after.clone()));
            }
            let result = self.call(method, p).await?;
            rows.extend(result["data"].as_array().cloned().unwrap_or_default());
            match result["cursor"]["after"].as_str() {
                Some(next) if !next.is_empty() => after = Some(next.to_string()),
                _ => return Ok(rows),
            }
        }
    }
}
