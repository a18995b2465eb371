//! What the operator verbs share: the etcd connection, the HTTP client for
//! members' APIs (with the `[api]` credentials and CA of the config file),
//! and the yes/no question.

use crate::config::Config;
use crate::dcs::{ClusterView, Dcs, Keys, MemberStatus};
use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::time::Duration;

pub(crate) async fn connect(cfg: &Config) -> anyhow::Result<Dcs> {
    Dcs::connect(
        &cfg.etcd.endpoints,
        Keys::new(cfg.key_prefix()),
        Duration::from_secs(cfg.etcd.dial_timeout.max(1)),
    )
    .await
    .with_context(|| format!("cannot reach etcd at {}", cfg.etcd.endpoints.join(", ")))
}

pub(crate) async fn read_view(cfg: &Config, dcs: &mut Dcs) -> anyhow::Result<ClusterView> {
    Ok(dcs.read_cluster(&cfg.bootstrap.dcs).await?)
}

/// The member named `name`, or the one-line error every verb uses.
pub(crate) fn member<'a>(
    cfg: &Config,
    view: &'a ClusterView,
    name: &str,
) -> anyhow::Result<&'a MemberStatus> {
    view.member(name)
        .ok_or_else(|| anyhow!("no member named {name} in cluster {}", cfg.scope))
}

/// HTTP(S) to members' APIs.
pub(crate) struct ApiClient {
    http: reqwest::Client,
    credentials: Option<(String, String)>,
    tls: bool,
}

/// A member's answer: status and JSON body (Null when not JSON).
pub(crate) struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The API's `error` (or `message`) text.
    pub fn reason(&self) -> String {
        self.body
            .get("error")
            .or_else(|| self.body.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {}", self.status))
    }
}

impl ApiClient {
    pub(crate) fn new(cfg: &Config) -> anyhow::Result<ApiClient> {
        let builder = crate::api::client_builder(cfg)?
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3));
        Ok(ApiClient {
            http: builder.build().context("cannot build the HTTP client")?,
            credentials: cfg
                .api
                .credentials()
                .map(|(u, p)| (u.to_string(), p.to_string())),
            tls: cfg.api.tls(),
        })
    }

    /// The member's published API URL. With TLS configured here, a plain
    /// `http://` URL is taken to mean the same address over HTTPS (the whole
    /// cluster shares one `[api]` setup).
    pub(crate) fn url(&self, member: &MemberStatus, path: &str) -> String {
        let base = member.api_url.trim_end_matches('/');
        let base = match base.strip_prefix("http://") {
            Some(rest) if self.tls => format!("https://{rest}"),
            _ => base.to_string(),
        };
        format!("{base}{path}")
    }

    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let mut req = self.http.request(method, url);
        if let Some((u, p)) = &self.credentials {
            req = req.basic_auth(u, Some(p));
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach {url}: {}", error_chain(&e)))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        })
    }

    pub(crate) async fn status(&self, member: &MemberStatus) -> anyhow::Result<Value> {
        let url = self.url(member, "/status");
        let a = self.send(reqwest::Method::GET, &url, None).await?;
        if a.body.is_null() {
            bail!("{url} answered HTTP {} without a JSON body", a.status);
        }
        Ok(a.body)
    }
}

/// reqwest's errors say "error sending request" and hide the cause in the
/// source chain: one line with all of it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Asks `question` on stderr and reads the answer from stdin: only `y` or
/// `yes` goes ahead; anything else (or no terminal at all) refuses.
pub(crate) async fn confirm(question: &str) -> anyhow::Result<()> {
    let answer = ask(&format!("{question} [y/N] ")).await?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => bail!("aborted: not confirmed (use --force to skip the question)"),
    }
}

/// Prints `prompt` on stderr and returns one line of stdin ("" at EOF).
pub(crate) async fn ask(prompt: &str) -> anyhow::Result<String> {
    let mut err = std::io::stderr();
    let _ = write!(err, "{prompt}");
    let _ = err.flush();
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .context("reading the answer")?
    .context("reading the answer from stdin")?;
    if line.is_empty() || !std::io::stdin().is_terminal() {
        // Nothing echoed the answer's newline (EOF, or input from a pipe):
        // end the prompt's line so what follows starts on its own.
        let _ = writeln!(err);
    }
    Ok(line)
}
