//! The Phorge agent: one `php` process per batch in the Phorge checkout (`agent.php`), that
//! takes one JSON request per line and answers one per line. See `agent.php` for why.

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::error::{Error, Result};
use crate::executor::{executor_for_host, spawn_piped};

/// The agent's code: `agent.php` without its `<?php` line (it runs as `php -r CODE ROOT`).
fn code() -> &'static str {
    let text = include_str!("agent.php");
    text.split_once('\n').map_or(text, |(_, rest)| rest)
}

/// A running agent.
pub struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    host: String,
}

impl Agent {
    /// Starts the agent on `host` for the Phorge checkout at `root`.
    pub fn start(host: &str, root: &str) -> Result<Agent> {
        let exec = executor_for_host("phorge", host)?;
        let mut child = spawn_piped(exec.as_ref(), &["php", "-r", code(), root])?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Refused("the Phorge agent has no pipes".into()));
        };
        Ok(Agent {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            host: host.to_string(),
        })
    }

    /// One request, its answer; `{"ok": false, "error": E}` becomes [`Error::Refused`].
    pub async fn call(&mut self, request: &Value) -> Result<Value> {
        let op = request["op"].as_str().unwrap_or("?").to_string();
        let lost = |e: String| Error::HostCommand {
            host: self.host.clone(),
            command: format!("phorge agent {op}"),
            status: "agent lost".into(),
            stderr: e,
        };
        let mut line = request.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| lost(e.to_string()))?;
        self.stdin.flush().await.map_err(|e| lost(e.to_string()))?;
        let mut answer = String::new();
        let n = self
            .stdout
            .read_line(&mut answer)
            .await
            .map_err(|e| lost(e.to_string()))?;
        if n == 0 {
            let status = self.child.try_wait().ok().flatten();
            return Err(lost(format!(
                "the agent ended ({}); is `php` installed and the Phorge checkout readable?",
                status.map_or("still running".to_string(), |s| s.to_string())
            )));
        }
        let value: Value = serde_json::from_str(&answer)
            .map_err(|e| lost(format!("not JSON ({e}): {}", answer.trim())))?;
        if value["ok"] == true {
            Ok(value)
        } else {
            Err(Error::Refused(format!(
                "Phorge {op}: {}",
                value["error"].as_str().unwrap_or("failed")
            )))
        }
    }
}
