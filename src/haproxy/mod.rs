//! Renders the HAProxy configuration that routes clients to the cluster:
//! read-write traffic to whichever member answers `/primary`, read-only
//! traffic to members answering `/replica`, and to the primary only while no
//! replica is up.
//!
//! HAProxy decides who is primary by probing each agent's HTTP API; this
//! module only decides *which* members HAProxy knows about. Membership comes
//! from etcd, health from the checks, so a stale member in the file costs
//! nothing but a failing check.

mod address;

pub use address::parse_api_url;

use crate::dcs::MemberStatus;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Section names other tools (stats scraping, tests, the demo) may rely on.
pub const FRONTEND_READ_WRITE: &str = "read_write";
pub const FRONTEND_READ_ONLY: &str = "read_only";
pub const BACKEND_PRIMARY: &str = "primary";
pub const BACKEND_REPLICAS: &str = "replicas";
pub const BACKEND_PRIMARY_FOR_READS: &str = "primary_for_reads";
pub const LISTEN_STATS: &str = "stats";

/// One member as HAProxy sees it: where clients connect, where it is probed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// The member's name as published in etcd; sanitized only when rendered.
    pub name: String,
    pub pg_host: String,
    pub pg_port: u16,
    pub api_host: String,
    pub api_port: u16,
}

/// Members that can be routed to, sorted by name. A member whose addresses
/// cannot be written into an HAProxy config is left out (and logged) rather
/// than failing the whole file: one bad member key must not take routing to
/// the others down.
pub fn backends_from_members(members: &[MemberStatus]) -> Vec<Backend> {
    let mut out: Vec<Backend> = members
        .iter()
        .filter_map(|m| {
            let Some((api_host, api_port)) = parse_api_url(&m.api_url) else {
                tracing::warn!(member = %m.name, api_url = %m.api_url, "skipping member: cannot parse its api_url");
                return None;
            };
            let Some(pg_host) = address::clean_host(&m.host) else {
                tracing::warn!(member = %m.name, host = %m.host, "skipping member: invalid PostgreSQL host");
                return None;
            };
            if m.port == 0 {
                tracing::warn!(member = %m.name, "skipping member: PostgreSQL port 0");
                return None;
            }
            Some(Backend {
                name: m.name.clone(),
                pg_host,
                pg_port: m.port,
                api_host,
                api_port,
            })
        })
        .collect();
    out.sort();
    out
}

/// Everything about the rendered file that is not membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Address the three listeners bind to; `*` for all IPv4 addresses.
    pub bind_address: String,
    pub rw_port: u16,
    pub ro_port: u16,
    pub stats_port: u16,
    /// Health-check interval in HAProxy time syntax (`1s`, `500ms`).
    pub inter: String,
    /// Consecutive failed checks before a server is marked down.
    pub fall: u32,
    /// Consecutive passed checks before a server is marked up.
    pub rise: u32,
    pub maxconn: u32,
    pub pidfile: Option<PathBuf>,
    /// Admin-level runtime API socket, for tooling that inspects live state.
    pub stats_socket: Option<PathBuf>,
    /// The agents' API serves HTTPS: health checks must speak TLS.
    pub check_ssl: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            bind_address: "*".to_string(),
            rw_port: 5000,
            ro_port: 5001,
            stats_port: 7000,
            inter: "1s".to_string(),
            fall: 2,
            rise: 1,
            maxconn: 1000,
            pidfile: None,
            stats_socket: None,
            check_ssl: false,
        }
    }
}

impl RenderOptions {
    /// Rejects values that would make HAProxy refuse the file or that would
    /// let an option inject extra config lines. `render` itself never fails,
    /// so callers taking options from users check them here first.
    pub fn validate(&self) -> Result<(), String> {
        if self.bind_address != "*" && address::clean_host(&self.bind_address).is_none() {
            return Err(format!(
                "bind address {:?} is not an IP address or host name",
                self.bind_address
            ));
        }
        let ports = [
            ("read-write", self.rw_port),
            ("read-only", self.ro_port),
            ("stats", self.stats_port),
        ];
        for (what, port) in ports {
            if port == 0 {
                return Err(format!("{what} port must not be 0"));
            }
        }
        let distinct: BTreeSet<u16> = ports.iter().map(|(_, p)| *p).collect();
        if distinct.len() != ports.len() {
            return Err(format!(
                "read-write ({}), read-only ({}) and stats ({}) ports must differ",
                self.rw_port, self.ro_port, self.stats_port
            ));
        }
        if !is_haproxy_time(&self.inter) {
            return Err(format!(
                "check interval {:?} is not a positive HAProxy time such as 1s or 500ms",
                self.inter
            ));
        }
        if self.fall == 0 || self.rise == 0 {
            return Err("fall and rise must be at least 1".to_string());
        }
        if self.maxconn == 0 {
            return Err("maxconn must be at least 1".to_string());
        }
        Ok(())
    }
}

/// `<digits>[us|ms|s|m|h|d]`, greater than zero.
fn is_haproxy_time(s: &str) -> bool {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    let positive = digits.parse::<u64>().map(|n| n > 0).unwrap_or(false);
    positive && matches!(unit, "" | "us" | "ms" | "s" | "m" | "h" | "d")
}

/// The complete `haproxy.cfg` for one cluster. Deterministic (no timestamps)
/// so callers can detect changes by comparing text.
///
/// Read-only routing uses two backends because HAProxy checks every server of
/// a backend with the same request: `replicas` probes `/replica`,
/// `primary_for_reads` probes `/primary`, and the read-only frontend falls
/// back to the latter only while no replica passes its check.
pub fn render(scope: &str, backends: &[Backend], opts: &RenderOptions) -> String {
    let servers = server_names(backends);
    let mut out = Out::default();

    out.line(format!(
        "# Generated by `pgwarden haproxy-config` for cluster {}.",
        comment_safe(scope)
    ));
    out.line("# Edits are lost when the member list changes: change pgwarden's options instead.");
    out.blank();

    out.line("global");
    out.ind(format!("maxconn {}", opts.maxconn));
    if let Some(pidfile) = &opts.pidfile {
        out.ind(format!("pidfile {}", quote(&pidfile.to_string_lossy())));
    }
    if let Some(socket) = &opts.stats_socket {
        out.ind(format!(
            "stats socket {} mode 600 level admin",
            quote(&socket.to_string_lossy())
        ));
    }
    out.blank();

    out.line("defaults");
    out.ind("mode tcp");
    out.ind("retries 2");
    out.ind("timeout connect 3s");
    // PostgreSQL sessions (and poolers' server connections) sit idle for long
    // stretches; a short timeout would cut them.
    out.ind("timeout client 30m");
    out.ind("timeout server 30m");
    out.ind("timeout check 3s");
    out.blank();

    out.line(format!("listen {LISTEN_STATS}"));
    out.ind("mode http");
    out.ind(format!(
        "bind {}",
        bind(&opts.bind_address, opts.stats_port)
    ));
    out.ind("stats enable");
    out.ind("stats uri /");
    out.ind("stats refresh 5s");
    out.blank();

    out.line(format!("frontend {FRONTEND_READ_WRITE}"));
    out.ind(format!("bind {}", bind(&opts.bind_address, opts.rw_port)));
    out.ind(format!("default_backend {BACKEND_PRIMARY}"));
    out.blank();

    backend_section(
        &mut out,
        BACKEND_PRIMARY,
        "/primary",
        None,
        backends,
        &servers,
        opts,
    );

    out.line(format!("frontend {FRONTEND_READ_ONLY}"));
    out.ind(format!("bind {}", bind(&opts.bind_address, opts.ro_port)));
    out.ind(format!(
        "use_backend {BACKEND_REPLICAS} if {{ nbsrv({BACKEND_REPLICAS}) gt 0 }}"
    ));
    out.ind(format!("default_backend {BACKEND_PRIMARY_FOR_READS}"));
    out.blank();

    backend_section(
        &mut out,
        BACKEND_REPLICAS,
        "/replica",
        Some("roundrobin"),
        backends,
        &servers,
        opts,
    );
    backend_section(
        &mut out,
        BACKEND_PRIMARY_FOR_READS,
        "/primary",
        None,
        backends,
        &servers,
        opts,
    );

    let mut text = out.0;
    // Every section ends with a blank line; the file needs only one newline.
    while text.ends_with("\n\n") {
        text.pop();
    }
    text
}

fn backend_section(
    out: &mut Out,
    name: &str,
    check_path: &str,
    balance: Option<&str>,
    backends: &[Backend],
    servers: &[String],
    opts: &RenderOptions,
) {
    out.line(format!("backend {name}"));
    if let Some(balance) = balance {
        out.ind(format!("balance {balance}"));
    }
    out.ind(format!("option httpchk OPTIONS {check_path}"));
    out.ind("http-check expect status 200");
    // shutdown-sessions: clients of a demoted primary must reconnect (and land
    // on the new one) instead of lingering on a read-only server.
    // init-addr libc,none: one member host name that does not resolve must not
    // make HAProxy reject the whole file; that server just stays down.
    out.ind(format!(
        "default-server inter {} fall {} rise {} on-marked-down shutdown-sessions init-addr libc,none{}",
        opts.inter,
        opts.fall,
        opts.rise,
        // The API's certificate is the cluster's own: HAProxy checks that
        // it answers over TLS, not who signed it.
        if opts.check_ssl { " check-ssl verify none" } else { "" }
    ));
    for (b, server) in backends.iter().zip(servers) {
        let mut line = format!(
            "server {server} {} check port {}",
            host_port(&b.pg_host, b.pg_port),
            b.api_port
        );
        // `addr` is resolved when the file is parsed and a failure is fatal
        // (init-addr does not apply to it), so it is only written when the
        // API lives elsewhere than PostgreSQL; otherwise the check goes to
        // the server's own address, which is the same host.
        if b.api_host != b.pg_host {
            line.push_str(&format!(" addr {}", bracket_v6(&b.api_host)));
        }
        out.ind(line);
    }
    out.blank();
}

/// HAProxy server names for the backends, in the same order: member names
/// reduced to the characters HAProxy accepts in identifiers, made unique
/// because HAProxy rejects two servers of one name in a backend.
pub fn server_names(backends: &[Backend]) -> Vec<String> {
    let mut taken = BTreeSet::new();
    backends
        .iter()
        .map(|b| {
            let base = sanitize_name(&b.name);
            let mut name = base.clone();
            let mut n = 2;
            while !taken.insert(name.clone()) {
                name = format!("{base}_{n}");
                n += 1;
            }
            name
        })
        .collect()
}

/// A string usable as an HAProxy identifier: letters, digits, `-`, `_`, `.`
/// and `:`; anything else becomes `_`.
pub fn sanitize_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "member".to_string()
    } else {
        s
    }
}

fn bind(addr: &str, port: u16) -> String {
    if addr == "*" {
        format!("*:{port}")
    } else {
        host_port(addr, port)
    }
}

fn host_port(host: &str, port: u16) -> String {
    format!("{}:{port}", bracket_v6(host))
}

/// HAProxy reads the last `:` of an address as the port separator, so IPv6
/// literals need brackets to be unambiguous.
fn bracket_v6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// HAProxy expands `$VAR` and backslash escapes inside double quotes.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '$') {
            q.push('\\');
        }
        if !c.is_control() {
            q.push(c);
        }
    }
    q.push('"');
    q
}

/// A scope with a newline in it must not end the comment and start config.
fn comment_safe(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    format!("\"{cleaned}\"")
}

#[derive(Default)]
struct Out(String);

impl Out {
    fn line(&mut self, s: impl AsRef<str>) {
        self.0.push_str(s.as_ref());
        self.0.push('\n');
    }
    fn ind(&mut self, s: impl AsRef<str>) {
        self.0.push_str("    ");
        self.line(s);
    }
    fn blank(&mut self) {
        self.0.push('\n');
    }
}

#[cfg(test)]
mod tests;
