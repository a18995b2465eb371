use super::*;
use crate::config::Tags;
use crate::dcs::{PgState, Role};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn member(name: &str, host: &str, port: u16, api_url: &str) -> MemberStatus {
    MemberStatus {
        name: name.to_string(),
        role: Role::Replica,
        state: PgState::Streaming,
        host: host.to_string(),
        port,
        api_url: api_url.to_string(),
        conn_url: format!("postgres://{host}:{port}/postgres"),
        timeline: Some(1),
        wal_lsn: None,
        receive_lsn: None,
        upstream: None,
        tags: Tags::default(),
        version: "test".to_string(),
        error: None,
        pending_restart: false,
    }
}

fn backend(name: &str, pg_port: u16, api_port: u16) -> Backend {
    Backend {
        name: name.to_string(),
        pg_host: "127.0.0.1".to_string(),
        pg_port,
        api_host: "127.0.0.1".to_string(),
        api_port,
    }
}

fn test_opts() -> RenderOptions {
    RenderOptions {
        bind_address: "127.0.0.1".to_string(),
        ..RenderOptions::default()
    }
}

/// The binary under test: `HAPROXY` if set, else the Debian location (not
/// on a non-root PATH), else whatever PATH finds.
fn haproxy_bin() -> String {
    if let Ok(bin) = std::env::var("HAPROXY") {
        return bin;
    }
    if Path::new("/usr/sbin/haproxy").exists() {
        return "/usr/sbin/haproxy".to_string();
    }
    "haproxy".to_string()
}

/// Runs `haproxy -c`; panics (never skips) when haproxy cannot be run, so a
/// CI image without it fails loudly.
fn haproxy_check(path: &Path) -> (bool, String) {
    let bin = haproxy_bin();
    let out = Command::new(&bin)
        .arg("-c")
        .arg("-f")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} (install haproxy or set HAPROXY): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_haproxy_accepts(text: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, text).unwrap();
    let (ok, output) = haproxy_check(&path);
    assert!(
        ok,
        "haproxy -c rejected the config for {what}:\n{output}\n---\n{text}"
    );
    assert!(
        !output.contains("[WARNING]"),
        "haproxy -c warned about the config for {what}:\n{output}\n---\n{text}"
    );
}

#[test]
fn default_options() {
    let o = RenderOptions::default();
    assert_eq!(o.bind_address, "*");
    assert_eq!((o.rw_port, o.ro_port, o.stats_port), (5000, 5001, 7000));
    assert_eq!((o.inter.as_str(), o.fall, o.rise), ("1s", 2, 1));
    assert!(o.validate().is_ok());
}

#[test]
fn renders_expected_sections() {
    let backends = vec![backend("a", 5432, 8008), backend("b", 5433, 8009)];
    let text = render("demo", &backends, &test_opts());
    for line in [
        "global",
        "    maxconn 1000",
        "defaults",
        "    mode tcp",
        "    timeout connect 3s",
        "    timeout client 30m",
        "    timeout server 30m",
        "    timeout check 3s",
        "listen stats",
        "    mode http",
        "    bind 127.0.0.1:7000",
        "    stats enable",
        "    stats uri /",
        "frontend read_write",
        "    bind 127.0.0.1:5000",
        "    default_backend primary",
        "backend primary",
        "    option httpchk OPTIONS /primary",
        "    http-check expect status 200",
        "    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions init-addr libc,none",
        "    server a 127.0.0.1:5432 check port 8008",
        "    server b 127.0.0.1:5433 check port 8009",
        "frontend read_only",
        "    bind 127.0.0.1:5001",
        "    use_backend replicas if { nbsrv(replicas) gt 0 }",
        "    default_backend primary_for_reads",
        "backend replicas",
        "    balance roundrobin",
        "    option httpchk OPTIONS /replica",
        "backend primary_for_reads",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing line {line:?} in:\n{text}"
        );
    }
    assert!(text.contains("cluster \"demo\""));
    // Every backend section lists every member once.
    assert_eq!(text.matches("    server a ").count(), 3);
    assert_eq!(text.matches("    server b ").count(), 3);
    assert!(text.ends_with("5433 check port 8009\n"), "{text:?}");
}

#[test]
fn check_address_written_only_when_api_is_elsewhere() {
    let mut b = backend("a", 5432, 8008);
    b.api_host = "10.0.0.9".to_string();
    let v6 = Backend {
        name: "v6".to_string(),
        pg_host: "::1".to_string(),
        pg_port: 5432,
        api_host: "fd00::1".to_string(),
        api_port: 8008,
    };
    let text = render("s", &[b, v6], &test_opts());
    assert!(text.contains("server a 127.0.0.1:5432 check port 8008 addr 10.0.0.9\n"));
    assert!(text.contains("server v6 [::1]:5432 check port 8008 addr [fd00::1]\n"));
}

#[test]
fn names_are_sanitized_and_unique() {
    assert_eq!(sanitize_name("db-01.a:b_c"), "db-01.a:b_c");
    assert_eq!(sanitize_name("db 01/ü"), "db_01__");
    assert_eq!(sanitize_name(""), "member");
    let backends = vec![
        backend("a b", 1, 2),
        backend("a_b", 3, 4),
        backend("a#b", 5, 6),
        backend("a_b_2", 7, 8),
    ];
    assert_eq!(
        server_names(&backends),
        vec!["a_b", "a_b_2", "a_b_3", "a_b_2_2"]
    );
    let text = render("s", &backends, &test_opts());
    assert!(!text.contains("server a b"));
    assert!(!text.contains("a#b"));
}

#[test]
fn scope_cannot_inject_config() {
    let text = render("x\nbackend evil", &[], &test_opts());
    assert!(!text.lines().any(|l| l.starts_with("backend evil")));
}

#[test]
fn backends_from_members_parses_skips_and_sorts() {
    let members = vec![
        member("c", "10.0.0.3", 5432, "http://10.0.0.3:8008"),
        member("a", "10.0.0.1", 5433, "http://10.0.0.11:8009/"),
        member("bad-url", "10.0.0.4", 5432, "not a url"),
        member("bad-host", "evil host", 5432, "http://10.0.0.5:8008"),
        member("b", "[::1]", 5434, "http://[::1]:8010"),
    ];
    let got = backends_from_members(&members);
    assert_eq!(
        got,
        vec![
            Backend {
                name: "a".into(),
                pg_host: "10.0.0.1".into(),
                pg_port: 5433,
                api_host: "10.0.0.11".into(),
                api_port: 8009,
            },
            Backend {
                name: "b".into(),
                pg_host: "::1".into(),
                pg_port: 5434,
                api_host: "::1".into(),
                api_port: 8010,
            },
            Backend {
                name: "c".into(),
                pg_host: "10.0.0.3".into(),
                pg_port: 5432,
                api_host: "10.0.0.3".into(),
                api_port: 8008,
            },
        ]
    );
}

#[test]
fn validate_rejects_bad_options() {
    let good = test_opts();
    assert!(good.validate().is_ok());
    type Change = fn(&mut RenderOptions);
    let cases: Vec<(&str, Change)> = vec![
        ("same ports", |o| o.ro_port = o.rw_port),
        ("port 0", |o| o.stats_port = 0),
        ("inter 0", |o| o.inter = "0s".into()),
        ("inter unit", |o| o.inter = "1x".into()),
        ("inter injection", |o| o.inter = "1s\nlisten x".into()),
        ("fall 0", |o| o.fall = 0),
        ("rise 0", |o| o.rise = 0),
        ("maxconn 0", |o| o.maxconn = 0),
        ("bind", |o| o.bind_address = "1.2.3.4 x".into()),
    ];
    for (what, change) in cases {
        let mut o = good.clone();
        change(&mut o);
        assert!(o.validate().is_err(), "{what} accepted");
    }
    for inter in ["1s", "500ms", "100", "2m", "250us"] {
        let o = RenderOptions {
            inter: inter.into(),
            ..test_opts()
        };
        assert!(o.validate().is_ok(), "{inter} rejected");
    }
}

#[test]
fn haproxy_accepts_rendered_config() {
    let three = vec![
        backend("alpha", 5432, 8008),
        Backend {
            name: "beta two".into(),
            pg_host: "::1".into(),
            pg_port: 5433,
            api_host: "::1".into(),
            api_port: 8009,
        },
        Backend {
            name: "gamma".into(),
            pg_host: "localhost".into(),
            pg_port: 5434,
            api_host: "127.0.0.2".into(),
            api_port: 8010,
        },
    ];
    for n in [0, 1, 3] {
        let text = render("demo", &three[..n], &test_opts());
        assert_haproxy_accepts(&text, &format!("{n} backends"));
    }

    let dir = tempfile::tempdir().unwrap();
    let opts = RenderOptions {
        bind_address: "::1".into(),
        pidfile: Some(dir.path().join("odd $name \"x\".pid")),
        stats_socket: Some(dir.path().join("admin sock")),
        inter: "250ms".into(),
        ..test_opts()
    };
    assert_haproxy_accepts(&render("demo", &three, &opts), "ipv6 bind, quoted paths");
}

#[test]
fn haproxy_survives_unresolvable_member_host() {
    let b = Backend {
        name: "ghost".into(),
        pg_host: "no-such-host.invalid".into(),
        pg_port: 5432,
        api_host: "no-such-host.invalid".into(),
        api_port: 8008,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, render("s", &[b], &test_opts())).unwrap();
    let (ok, output) = haproxy_check(&path);
    assert!(ok, "{output}");
}

// ---- routing through a real HAProxy -------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum FakeRole {
    Primary,
    Replica,
    Down,
}

/// A member: a "PostgreSQL" that greets with its name and an "agent" that
/// answers health checks from its role.
struct FakeMember {
    role: Arc<Mutex<FakeRole>>,
    backend: Backend,
}

impl FakeMember {
    fn start(name: &str, role: FakeRole) -> FakeMember {
        let pg = TcpListener::bind("127.0.0.1:0").unwrap();
        let api = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = backend(
            name,
            pg.local_addr().unwrap().port(),
            api.local_addr().unwrap().port(),
        );
        let greeting = format!("{name}\n");
        std::thread::spawn(move || {
            for mut conn in pg.incoming().flatten() {
                let _ = conn.write_all(greeting.as_bytes());
            }
        });
        let role = Arc::new(Mutex::new(role));
        let r = role.clone();
        std::thread::spawn(move || {
            for mut conn in api.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let n = conn.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let role = *r.lock().unwrap();
                let up = (req.starts_with("OPTIONS /primary ") && role == FakeRole::Primary)
                    || (req.starts_with("OPTIONS /replica ") && role == FakeRole::Replica);
                let status = if up {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = write!(
                    conn,
                    "HTTP/1.0 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        FakeMember { role, backend }
    }

    fn set(&self, role: FakeRole) {
        *self.role.lock().unwrap() = role;
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Name of the member a new connection to `port` lands on, if any.
fn landed_on(port: u16) -> Option<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut s = String::new();
    conn.read_to_string(&mut s).ok()?;
    let name = s.trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// Polls until `port` routes only to members in `expected` (and, over
/// several connections, to all of them).
fn wait_routes(port: u16, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let seen: Vec<Option<String>> = (0..2 * expected.len().max(1))
            .map(|_| landed_on(port))
            .collect();
        let all_expected = seen
            .iter()
            .all(|s| s.as_deref().is_some_and(|n| expected.contains(&n)));
        let all_seen = expected
            .iter()
            .all(|e| seen.iter().any(|s| s.as_deref() == Some(*e)));
        if all_expected && all_seen {
            return;
        }
        last = seen;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("port {port} never routed to exactly {expected:?}; last saw {last:?}");
}

#[test]
fn haproxy_routes_reads_and_writes() {
    let a = FakeMember::start("a", FakeRole::Primary);
    let b = FakeMember::start("b", FakeRole::Replica);
    let c = FakeMember::start("c", FakeRole::Replica);
    let opts = RenderOptions {
        rw_port: free_port(),
        ro_port: free_port(),
        stats_port: free_port(),
        inter: "100ms".into(),
        fall: 1,
        rise: 1,
        ..test_opts()
    };
    let backends = vec![a.backend.clone(), b.backend.clone(), c.backend.clone()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, render("demo", &backends, &opts)).unwrap();
    let bin = haproxy_bin();
    let child = Command::new(&bin)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let _haproxy = KillOnDrop(child);

    wait_routes(opts.rw_port, &["a"]);
    wait_routes(opts.ro_port, &["b", "c"]);

    // No replica left: reads go to the primary.
    b.set(FakeRole::Down);
    c.set(FakeRole::Down);
    wait_routes(opts.ro_port, &["a"]);

    // Failover to b; c comes back as its replica and takes the reads again.
    a.set(FakeRole::Down);
    b.set(FakeRole::Primary);
    wait_routes(opts.rw_port, &["b"]);
    wait_routes(opts.ro_port, &["b"]);
    c.set(FakeRole::Replica);
    wait_routes(opts.ro_port, &["c"]);
    wait_routes(opts.rw_port, &["b"]);
}

#[test]
fn tls_api_checks_speak_tls_and_pass_haproxy_c() {
    let opts = RenderOptions {
        check_ssl: true,
        ..test_opts()
    };
    let text = render("s", &[backend("pg1", 5432, 8008)], &opts);
    assert!(text.contains("check-ssl verify none"), "{text}");
    assert_haproxy_accepts(&text, "TLS checks");
    let plain = render("s", &[backend("pg1", 5432, 8008)], &test_opts());
    assert!(!plain.contains("check-ssl"), "{plain}");
}
