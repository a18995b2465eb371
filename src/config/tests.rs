//! Unit tests of the config file: parsing, the defaults, every rule of
//! `validate_static` (as a table of bad files with the exact one-line error
//! each must produce), and the host checks of `validate`.

use super::*;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

const PATH: &str = "/etc/pgwarden/pg1.toml";

/// The smallest valid file: only the required keys.
const MINIMAL: &str = r#"
scope = "demo"
name = "pg1"

[etcd]
endpoints = ["http://127.0.0.1:2379"]

[api]
listen = "127.0.0.1:8008"

[postgresql]
data_dir = "/var/lib/pgwarden/pg1"
listen = "127.0.0.1:5432"

[postgresql.authentication.superuser]
username = "postgres"
password = "secret"

[postgresql.authentication.replication]
username = "replicator"
password = "rep-secret"
"#;

fn parse_text(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new(PATH), text)
}

/// MINIMAL with `from` replaced by `to` (exactly one occurrence, so a table
/// row cannot silently test the valid file).
fn edit(from: &str, to: &str) -> String {
    assert_eq!(
        MINIMAL.matches(from).count(),
        1,
        "`{from}` must occur once in MINIMAL"
    );
    MINIMAL.replacen(from, to, 1)
}

/// MINIMAL with more lines after it (new tables).
fn append(extra: &str) -> String {
    format!("{MINIMAL}\n{extra}")
}

/// MINIMAL with more lines before it (top-level keys).
fn prepend(extra: &str) -> String {
    format!("{extra}\n{MINIMAL}")
}

fn key_error(key: &str, message: &str) -> String {
    format!("{PATH}: key `{key}`: {message}")
}

#[test]
fn minimal_config_parses_with_documented_defaults() {
    let cfg = parse_text(MINIMAL).expect("minimal config is valid");
    assert_eq!(cfg.source, Path::new(PATH));
    assert_eq!(cfg.scope, "demo");
    assert_eq!(cfg.name, "pg1");
    assert_eq!(cfg.namespace, "/service");
    assert_eq!(cfg.key_prefix(), "/service/demo/");

    assert_eq!(
        cfg.etcd.endpoints,
        vec!["http://127.0.0.1:2379".to_string()]
    );
    assert_eq!(cfg.etcd.dial_timeout, 2);

    assert_eq!(cfg.api.listen, "127.0.0.1:8008".parse().unwrap());
    assert_eq!(cfg.api.connect_address, None);
    assert_eq!(cfg.api_connect_address(), "127.0.0.1:8008");
    assert_eq!(cfg.api.max_connections, 256);

    let pg = &cfg.postgresql;
    assert_eq!(pg.data_dir, Path::new("/var/lib/pgwarden/pg1"));
    assert_eq!(pg.bin_dir, None);
    assert_eq!(pg.listen, "127.0.0.1:5432".parse().unwrap());
    assert_eq!(pg.connect_address, None);
    assert_eq!(cfg.pg_connect_address(), "127.0.0.1:5432");
    assert_eq!(pg.os_user, "postgres");
    assert!(pg.parameters.is_empty());
    assert_eq!(pg.pg_hba, default_pg_hba());
    assert_eq!(pg.start_timeout, 60);
    assert_eq!(pg.authentication.superuser.username, "postgres");
    assert_eq!(pg.authentication.superuser.password, "secret");
    assert_eq!(pg.authentication.replication.username, "replicator");
    assert_eq!(pg.authentication.replication.password, "rep-secret");

    assert_eq!(
        cfg.tags,
        Tags {
            nofailover: false,
            noloadbalance: false,
            nosync: false,
            failover_priority: 1,
            custom: Default::default(),
        }
    );

    // An empty [tags] table gives the same defaults as none at all.
    assert_eq!(parse_text(&append("[tags]\n")).unwrap().tags, cfg.tags);
    assert_eq!(Tags::default(), cfg.tags);

    let dcs = &cfg.bootstrap.dcs;
    assert_eq!(*dcs, DynamicConfig::default());
    assert_eq!(dcs.ttl, 10);
    assert_eq!(dcs.loop_wait, 1);
    assert_eq!(dcs.retry_timeout, 4);
    assert_eq!(dcs.maximum_lag_on_failover, 1024 * 1024);
    assert!(dcs.use_slots);
    assert!(dcs.use_pg_rewind);
    assert_eq!(dcs.member_slots_ttl, 1800);
    assert!(!dcs.synchronous_mode);
    assert!(dcs.postgresql.parameters.is_empty());
    // The defaults themselves obey the lease rule.
    assert!(dcs.check_timing().is_ok());
}

#[test]
fn default_pg_hba_allows_local_and_replication_with_scram() {
    let hba = default_pg_hba();
    assert_eq!(hba[0], "local all all trust");
    assert!(hba
        .iter()
        .any(|l| l == "host replication all 127.0.0.1/32 scram-sha-256"));
    assert!(hba
        .iter()
        .all(|l| !l.contains(" md5") && !l.starts_with("host all all 0.0.0.0/0 trust")));
}

#[test]
fn wildcard_listen_connects_over_loopback_unless_connect_address_is_set() {
    let text = edit("listen = \"127.0.0.1:8008\"", "listen = \"0.0.0.0:8008\"");
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.api_connect_address(), "127.0.0.1:8008");

    let text = edit(
        "listen = \"127.0.0.1:5432\"",
        "listen = \"0.0.0.0:5432\"\nconnect_address = \"10.0.0.11:5432\"",
    );
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.pg_connect_address(), "10.0.0.11:5432");

    let text = edit("listen = \"127.0.0.1:8008\"", "listen = \"[::1]:8008\"");
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.api_connect_address(), "[::1]:8008");
    let text = edit("listen = \"127.0.0.1:5432\"", "listen = \"[::]:5432\"");
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.pg_connect_address(), "127.0.0.1:5432");
}

/// The complete example of docs/configuration.md must stay a valid file.
#[test]
fn documented_example_parses() {
    let doc = include_str!("../../docs/configuration.md");
    let start = doc
        .find("<!-- example:begin")
        .expect("docs/configuration.md marks its example with <!-- example:begin");
    let rest = &doc[start..];
    let body_start =
        rest.find("```toml\n").expect("example is a ```toml block") + "```toml\n".len();
    let body_len = rest[body_start..]
        .find("```")
        .expect("example block is closed");
    let example = &rest[body_start..body_start + body_len];
    let cfg = parse_text(example).unwrap_or_else(|e| panic!("documented example is invalid: {e}"));
    assert_eq!(cfg.name, "pg1");
    assert!(cfg.tags.custom.contains_key("zone"));
    assert!(!cfg.bootstrap.dcs.synchronous_mode);
    assert!(!cfg.bootstrap.dcs.postgresql.parameters.is_empty());
    assert!(cfg.postgresql.bin_dir.is_some());
}

#[test]
fn every_key_can_be_set() {
    let text = r#"
scope = "shop"
name = "db-01.a_b"
namespace = "/pg"

[etcd]
endpoints = ["https://10.0.0.1:2379", "http://10.0.0.2:2379/"]
dial_timeout = 5

[api]
listen = "0.0.0.0:8008"
connect_address = "10.0.0.11:8008"

[postgresql]
data_dir = "/data/pg"
bin_dir = "/usr/lib/postgresql/15/bin"
listen = "0.0.0.0:5433"
connect_address = "10.0.0.11:5433"
os_user = "pgsql"
pg_hba = ["local all all peer"]
start_timeout = 300

[postgresql.parameters]
shared_buffers = "1GB"
max_connections = 200
random_page_cost = 1.1
jit = false
"pg_stat_statements.max" = 10000

[postgresql.authentication.superuser]
username = "admin"
password = "a'b\\c"

[postgresql.authentication.replication]
username = "rep"
password = "r"

[tags]
nofailover = true
noloadbalance = true
failover_priority = 7

[tags.custom]
zone = "eu-1"

[bootstrap.dcs]
ttl = 30
loop_wait = 10
retry_timeout = 10
maximum_lag_on_failover = 0
use_slots = false
use_pg_rewind = false
member_slots_ttl = 60
synchronous_mode = false

[bootstrap.dcs.postgresql.parameters]
max_wal_senders = 20
"#;
    let cfg = parse_text(text).unwrap();
    assert_eq!(cfg.namespace, "/pg");
    assert_eq!(cfg.key_prefix(), "/pg/shop/");
    assert_eq!(cfg.etcd.dial_timeout, 5);
    assert_eq!(cfg.api_connect_address(), "10.0.0.11:8008");
    assert_eq!(cfg.postgresql.os_user, "pgsql");
    assert_eq!(
        cfg.postgresql.pg_hba,
        vec!["local all all peer".to_string()]
    );
    assert_eq!(cfg.postgresql.start_timeout, 300);
    let p = &cfg.postgresql.parameters;
    assert_eq!(p["shared_buffers"], ParamValue::Text("1GB".into()));
    assert_eq!(p["max_connections"], ParamValue::Int(200));
    assert_eq!(p["random_page_cost"], ParamValue::Float(1.1));
    assert_eq!(p["jit"], ParamValue::Bool(false));
    assert_eq!(p["pg_stat_statements.max"], ParamValue::Int(10000));
    assert_eq!(cfg.postgresql.authentication.superuser.password, "a'b\\c");
    assert_eq!(cfg.tags.failover_priority, 7);
    assert_eq!(cfg.tags.custom["zone"], "eu-1");
    let dcs = &cfg.bootstrap.dcs;
    assert_eq!((dcs.ttl, dcs.loop_wait, dcs.retry_timeout), (30, 10, 10));
    assert_eq!(dcs.maximum_lag_on_failover, 0);
    assert!(!dcs.use_slots && !dcs.use_pg_rewind && !dcs.synchronous_mode);
    assert_eq!(dcs.member_slots_ttl, 60);
    assert_eq!(
        dcs.postgresql.parameters["max_wal_senders"],
        ParamValue::Int(20)
    );
}

#[test]
fn ttl_rule_boundary_is_inclusive() {
    // ttl == loop_wait + 2 * retry_timeout is the smallest valid ttl.
    let ok = append("[bootstrap.dcs]\nttl = 9\nloop_wait = 1\nretry_timeout = 4\n");
    assert!(parse_text(&ok).is_ok());
    let bad = append("[bootstrap.dcs]\nttl = 8\nloop_wait = 1\nretry_timeout = 4\n");
    assert_eq!(
        parse_text(&bad).unwrap_err().to_string(),
        key_error(
            "bootstrap.dcs.ttl",
            "ttl (8) must be >= loop_wait + 2 * retry_timeout (1 + 2 * 4 = 9)"
        )
    );
}

#[test]
fn param_values_render_for_postgresql_conf_and_survive_json() {
    assert_eq!(ParamValue::Bool(true).render(), "on");
    assert_eq!(ParamValue::Bool(false).render(), "off");
    assert_eq!(ParamValue::Int(-3).render(), "-3");
    assert_eq!(ParamValue::Float(1.5).render(), "1.5");
    assert_eq!(
        ParamValue::Text("it's C:\\x".into()).render(),
        "'it''s C:\\\\x'"
    );

    // The dynamic config travels through etcd as JSON.
    let text =
        append("[bootstrap.dcs.postgresql.parameters]\na = true\nb = 42\nc = 0.25\nd = \"64MB\"\n");
    let dcs = parse_text(&text).unwrap().bootstrap.dcs;
    let json = serde_json::to_string(&dcs).unwrap();
    let back: DynamicConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, dcs);
    assert_eq!(back.postgresql.parameters["a"], ParamValue::Bool(true));
    assert_eq!(back.postgresql.parameters["b"], ParamValue::Int(42));
    assert_eq!(back.postgresql.parameters["c"], ParamValue::Float(0.25));
    assert_eq!(
        back.postgresql.parameters["d"],
        ParamValue::Text("64MB".into())
    );
    // A JSON integer beyond i64 still deserializes (as a float).
    let big: ParamValue = serde_json::from_str("18446744073709551615").unwrap();
    assert_eq!(big, ParamValue::Float(18446744073709551615.0));
}

enum Expect {
    /// `<path>: key `<key>`: <message>`
    Key(&'static str, &'static str),
    /// The whole line, for errors that are not about one key.
    Line(String),
}

/// Every bad file gives exactly one line naming the key and the problem.
#[test]
fn bad_configs_are_rejected_with_one_line_naming_the_key() {
    use Expect::{Key, Line};
    let long_name = "n".repeat(64);
    let cases: Vec<(&str, String, Expect)> = vec![
        // --- unknown keys (a typo must never be silently ignored) ---
        (
            "unknown top-level key",
            prepend("bogus = 1"),
            Key(
                "bogus",
                "unknown field `bogus`, expected one of `scope`, `name`, `namespace`, `etcd`, `api`, `postgresql`, `tags`, `bootstrap`",
            ),
        ),
        (
            "typo in a nested key",
            edit("data_dir =", "datadir ="),
            Key(
                "postgresql.datadir",
                "unknown field `datadir`, expected one of `data_dir`, `bin_dir`, `listen`, `connect_address`, `os_user`, `parameters`, `pg_hba`, `authentication`, `start_timeout`, `remove_data_directory_on_rewind_failure`",
            ),
        ),
        (
            "unknown key in a credentials table",
            edit("password = \"secret\"", "password = \"secret\"\npasswd = \"x\""),
            Key(
                "postgresql.authentication.superuser.passwd",
                "unknown field `passwd`, expected `username` or `password`",
            ),
        ),
        (
            "unknown key in bootstrap.dcs",
            append("[bootstrap.dcs]\nsynchronous = true\n"),
            Key(
                "bootstrap.dcs.synchronous",
                "unknown field `synchronous`, expected one of `ttl`, `loop_wait`, `retry_timeout`, `maximum_lag_on_failover`, `use_slots`, `use_pg_rewind`, `member_slots_ttl`, `primary_start_timeout`, `synchronous_mode`, `synchronous_mode_strict`, `synchronous_node_count`, `failsafe_mode`, `pause`, `postgresql`",
            ),
        ),
        (
            "no synchronous standby to wait for",
            append("[bootstrap.dcs]\nsynchronous_mode = true\nsynchronous_node_count = 0\n"),
            Key(
                "bootstrap.dcs.synchronous_node_count",
                "must be at least 1 (turn synchronous_mode off for asynchronous replication)",
            ),
        ),
        (
            "quorum commit is not implemented",
            append("[bootstrap.dcs]\nsynchronous_mode = \"quorum\"\n"),
            Key(
                "bootstrap.dcs.synchronous_mode",
                "invalid type: string \"quorum\", expected a boolean",
            ),
        ),
        (
            "unknown table",
            append("[etcd3]\nendpoints = []\n"),
            Key(
                "etcd3",
                "unknown field `etcd3`, expected one of `scope`, `name`, `namespace`, `etcd`, `api`, `postgresql`, `tags`, `bootstrap`",
            ),
        ),
        (
            "unknown key with a newline in its quoted name stays on one line",
            prepend("\"a\\nb\" = 1"),
            Key(
                "a\\nb",
                "unknown field `a\\nb`, expected one of `scope`, `name`, `namespace`, `etcd`, `api`, `postgresql`, `tags`, `bootstrap`",
            ),
        ),
        // --- wrong types ---
        (
            "port as a bare number instead of IP:port",
            edit("listen = \"127.0.0.1:8008\"", "listen = 8008"),
            Key("api.listen", "invalid type: integer `8008`, expected socket address"),
        ),
        (
            "port that is not a number",
            edit("listen = \"127.0.0.1:5432\"", "listen = \"127.0.0.1:pg\""),
            Key(
                "postgresql.listen",
                "invalid socket address syntax, expected IP:port such as 127.0.0.1:5432 or [::1]:5432 (not a host name)",
            ),
        ),
        (
            "host name instead of an IP in listen",
            edit("listen = \"127.0.0.1:5432\"", "listen = \"localhost:5432\""),
            Key(
                "postgresql.listen",
                "invalid socket address syntax, expected IP:port such as 127.0.0.1:5432 or [::1]:5432 (not a host name)",
            ),
        ),
        (
            "ttl as a string",
            append("[bootstrap.dcs]\nttl = \"30\"\n"),
            Key("bootstrap.dcs.ttl", "invalid type: string \"30\", expected u64"),
        ),
        (
            "negative ttl",
            append("[bootstrap.dcs]\nttl = -1\n"),
            Key("bootstrap.dcs.ttl", "invalid value: integer `-1`, expected u64"),
        ),
        (
            "dial_timeout with a unit",
            edit("[etcd]\n", "[etcd]\ndial_timeout = \"2s\"\n"),
            Key("etcd.dial_timeout", "invalid type: string \"2s\", expected u64"),
        ),
        (
            "endpoints as a single string",
            edit("endpoints = [\"http://127.0.0.1:2379\"]", "endpoints = \"http://127.0.0.1:2379\""),
            Key("etcd.endpoints", "invalid type: string \"http://127.0.0.1:2379\", expected a sequence"),
        ),
        (
            "tag flag as a string",
            append("[tags]\nnofailover = \"yes\"\n"),
            Key("tags.nofailover", "invalid type: string \"yes\", expected a boolean"),
        ),
        (
            "custom tag that is not a string",
            append("[tags.custom]\nrack = 3\n"),
            Key("tags.custom.rack", "invalid type: integer `3`, expected a string"),
        ),
        (
            "parameter value that is an array",
            append("[postgresql.parameters]\nshared_preload_libraries = [\"pg_stat_statements\"]\n"),
            Key(
                "postgresql.parameters.shared_preload_libraries",
                "invalid type: sequence, expected a string, integer, float or boolean",
            ),
        ),
        // --- missing required keys ---
        (
            "no name",
            edit("name = \"pg1\"\n", ""),
            Key("name", "required key is missing"),
        ),
        (
            "no [api] table",
            edit("[api]\nlisten = \"127.0.0.1:8008\"\n", ""),
            Key("api", "required key is missing"),
        ),
        (
            "no postgresql.authentication",
            edit(
                "[postgresql.authentication.superuser]\nusername = \"postgres\"\npassword = \"secret\"\n\n\
                 [postgresql.authentication.replication]\nusername = \"replicator\"\npassword = \"rep-secret\"\n",
                "",
            ),
            Key("postgresql.authentication", "required key is missing"),
        ),
        (
            "no replication password",
            edit("password = \"rep-secret\"\n", ""),
            Key("postgresql.authentication.replication.password", "required key is missing"),
        ),
        (
            "no postgresql.data_dir",
            edit("data_dir = \"/var/lib/pgwarden/pg1\"\n", ""),
            Key("postgresql.data_dir", "required key is missing"),
        ),
        // --- credentials ---
        (
            "empty superuser password",
            edit("password = \"secret\"", "password = \"\""),
            Key("postgresql.authentication.superuser.password", "must not be empty"),
        ),
        (
            "empty replication username",
            edit("username = \"replicator\"", "username = \"\""),
            Key("postgresql.authentication.replication.username", "must not be empty"),
        ),
        (
            "blank superuser username",
            edit("username = \"postgres\"", "username = \"  \""),
            Key("postgresql.authentication.superuser.username", "must not be empty"),
        ),
        // --- the lease rule ---
        (
            "ttl below loop_wait + 2 * retry_timeout",
            append("[bootstrap.dcs]\nttl = 20\nloop_wait = 5\nretry_timeout = 10\n"),
            Key(
                "bootstrap.dcs.ttl",
                "ttl (20) must be >= loop_wait + 2 * retry_timeout (5 + 2 * 10 = 25)",
            ),
        ),
        (
            "ttl rule with absurd values does not overflow",
            append("[bootstrap.dcs]\nttl = 30\nloop_wait = 9223372036854775807\nretry_timeout = 9223372036854775807\n"),
            Key(
                "bootstrap.dcs.ttl",
                "ttl (30) must be >= loop_wait + 2 * retry_timeout (9223372036854775807 + 2 * 9223372036854775807 = 27670116110564327421)",
            ),
        ),
        (
            "loop_wait = 0",
            append("[bootstrap.dcs]\nloop_wait = 0\n"),
            Key("bootstrap.dcs.loop_wait", "must be at least 1 second"),
        ),
        (
            "retry_timeout = 0",
            append("[bootstrap.dcs]\nretry_timeout = 0\n"),
            Key("bootstrap.dcs.retry_timeout", "must be at least 1 second"),
        ),
        // --- paths, names, endpoints ---
        (
            "relative data_dir",
            edit("data_dir = \"/var/lib/pgwarden/pg1\"", "data_dir = \"data/pg1\""),
            Key("postgresql.data_dir", "must be an absolute path"),
        ),
        (
            "empty data_dir",
            edit("data_dir = \"/var/lib/pgwarden/pg1\"", "data_dir = \"\""),
            Key("postgresql.data_dir", "must be an absolute path"),
        ),
        (
            "etcd endpoint without scheme",
            edit("\"http://127.0.0.1:2379\"", "\"127.0.0.1:2379\""),
            Key("etcd.endpoints", "`127.0.0.1:2379` must start with http:// or https://"),
        ),
        (
            "etcd endpoint with a foreign scheme",
            edit("\"http://127.0.0.1:2379\"", "\"http://127.0.0.1:2379\", \"unix:///run/etcd.sock\""),
            Key("etcd.endpoints", "`unix:///run/etcd.sock` must start with http:// or https://"),
        ),
        (
            "etcd endpoint without host",
            edit("\"http://127.0.0.1:2379\"", "\"https://\""),
            Key("etcd.endpoints", "`https://` has no host after the scheme"),
        ),
        (
            "empty endpoints list",
            edit("endpoints = [\"http://127.0.0.1:2379\"]", "endpoints = []"),
            Key("etcd.endpoints", "needs at least one endpoint"),
        ),
        (
            "dial_timeout = 0",
            edit("[etcd]\n", "[etcd]\ndial_timeout = 0\n"),
            Key("etcd.dial_timeout", "must be at least 1 second"),
        ),
        (
            "member name with a space",
            edit("name = \"pg1\"", "name = \"pg 1\""),
            Key("name", "must be 1-63 characters of letters, digits, '-', '_' or '.'"),
        ),
        (
            "member name with a slash (would escape its etcd key)",
            edit("name = \"pg1\"", "name = \"../leader\""),
            Key("name", "must be 1-63 characters of letters, digits, '-', '_' or '.'"),
        ),
        (
            "empty member name",
            edit("name = \"pg1\"", "name = \"\""),
            Key("name", "must be 1-63 characters of letters, digits, '-', '_' or '.'"),
        ),
        (
            "member name of 64 characters",
            edit("name = \"pg1\"", &format!("name = \"{long_name}\"")),
            Key("name", "must be 1-63 characters of letters, digits, '-', '_' or '.'"),
        ),
        (
            "empty scope",
            edit("scope = \"demo\"", "scope = \" \""),
            Key("scope", "must not be empty"),
        ),
        (
            "namespace without leading slash",
            prepend("namespace = \"service\""),
            Key("namespace", "must start with '/'"),
        ),
        (
            "empty os_user",
            edit("listen = \"127.0.0.1:5432\"", "listen = \"127.0.0.1:5432\"\nos_user = \"\""),
            Key("postgresql.os_user", "must not be empty"),
        ),
        (
            "start_timeout = 0",
            edit("listen = \"127.0.0.1:5432\"", "listen = \"127.0.0.1:5432\"\nstart_timeout = 0"),
            Key("postgresql.start_timeout", "must be at least 1 second"),
        ),
        // --- parameters pgwarden manages ---
        (
            "port in postgresql.parameters",
            append("[postgresql.parameters]\nport = 5433\n"),
            Key("postgresql.parameters.port", "is managed by pgwarden and cannot be set here"),
        ),
        (
            "managed parameter spelled in another case",
            append("[postgresql.parameters]\nListen_Addresses = \"*\"\n"),
            Key(
                "postgresql.parameters.Listen_Addresses",
                "is managed by pgwarden and cannot be set here",
            ),
        ),
        (
            "managed parameter in bootstrap.dcs",
            append("[bootstrap.dcs.postgresql.parameters]\nprimary_conninfo = \"host=x\"\n"),
            Key(
                "bootstrap.dcs.postgresql.parameters.primary_conninfo",
                "is managed by pgwarden and cannot be set here",
            ),
        ),
        (
            "parameter name that is not one",
            append("[postgresql.parameters]\n\"work mem\" = \"4MB\"\n"),
            Key(
                "postgresql.parameters.work mem",
                "is not a valid PostgreSQL parameter name (letters, digits, '_', '.')",
            ),
        ),
        (
            "parameter name smuggling a second line into postgresql.conf",
            append("[postgresql.parameters]\n\"x = 1\\nport\" = 5433\n"),
            Key(
                "postgresql.parameters.x = 1\\nport",
                "is not a valid PostgreSQL parameter name (letters, digits, '_', '.')",
            ),
        ),
        (
            "parameter value with a newline",
            append("[postgresql.parameters]\napplication_name = \"a\\nb\"\n"),
            Key("postgresql.parameters.application_name", "value must be a single line"),
        ),
        // --- addresses ---
        (
            "api.listen equal to postgresql.listen",
            edit("listen = \"127.0.0.1:8008\"", "listen = \"127.0.0.1:5432\""),
            Key("api.listen", "is the same address as postgresql.listen"),
        ),
        (
            "api.listen on all addresses with postgresql's port",
            edit("listen = \"127.0.0.1:8008\"", "listen = \"0.0.0.0:5432\""),
            Key(
                "api.listen",
                "0.0.0.0:5432 overlaps postgresql.listen 127.0.0.1:5432 (same port, one of them on all addresses)",
            ),
        ),
        (
            "api.listen on port 0",
            edit("listen = \"127.0.0.1:8008\"", "listen = \"127.0.0.1:0\""),
            Key("api.listen", "port must be between 1 and 65535"),
        ),
        (
            "api.max_connections = 0",
            edit("listen = \"127.0.0.1:8008\"", "listen = \"127.0.0.1:8008\"\nmax_connections = 0"),
            Key("api.max_connections", "must be at least 1"),
        ),
        (
            "negative api.max_connections",
            edit("listen = \"127.0.0.1:8008\"", "listen = \"127.0.0.1:8008\"\nmax_connections = -5"),
            Key("api.max_connections", "invalid value: integer `-5`, expected usize"),
        ),
        (
            "postgresql.listen on port 0",
            edit("listen = \"127.0.0.1:5432\"", "listen = \"127.0.0.1:0\""),
            Key("postgresql.listen", "port must be between 1 and 65535"),
        ),
        // --- not TOML at all: the line and column instead of a key ---
        (
            "syntax error",
            prepend("namespace = "),
            Line(format!("{PATH}: line 1, column 13: invalid string; expected `\"`, `'`")),
        ),
        (
            "key defined twice",
            prepend("scope = \"other\""),
            Line(format!("{PATH}: line 3, column 1: duplicate key `scope` in document root")),
        ),
        (
            "table defined twice",
            append("[etcd]\ndial_timeout = 3\n"),
            Line(format!(
                "{PATH}: line 23, column 1: invalid table header; duplicate key `etcd` in document root"
            )),
        ),
    ];

    assert!(cases.len() >= 14);
    let mut failures = Vec::new();
    for (name, text, expect) in &cases {
        let err = match parse_text(text) {
            Ok(_) => {
                failures.push(format!("{name}: accepted"));
                continue;
            }
            Err(err) => err,
        };
        let shown = err.to_string();
        assert!(
            !shown.contains('\n') && !shown.contains('\r'),
            "{name}: not one line: {shown:?}"
        );
        let (want, want_key) = match expect {
            Key(key, message) => (key_error(key, message), Some(*key)),
            Line(line) => (line.clone(), None),
        };
        if shown != want || err.key_name() != want_key {
            failures.push(format!("{name}:\n   got  {shown}\n   want {want}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// `validate_static` on its own, for callers that build a Config in code.
#[test]
fn validate_static_checks_a_config_built_in_code() {
    let mut cfg = parse_text(MINIMAL).unwrap();
    assert!(validate_static(&cfg).is_ok());
    cfg.postgresql.authentication.superuser.password.clear();
    assert_eq!(
        validate_static(&cfg).unwrap_err().to_string(),
        key_error(
            "postgresql.authentication.superuser.password",
            "must not be empty"
        )
    );
    cfg.postgresql.authentication.superuser.password = "s".into();
    cfg.bootstrap.dcs.ttl = 3;
    assert_eq!(
        validate_static(&cfg).unwrap_err().key_name(),
        Some("bootstrap.dcs.ttl")
    );
}

#[test]
fn check_parameters_is_usable_for_cluster_config_edits() {
    let ok = BTreeMap::from([
        ("work_mem".to_string(), ParamValue::Text("4MB".into())),
        (
            "auto_explain.log_min_duration".to_string(),
            ParamValue::Int(100),
        ),
    ]);
    assert_eq!(check_parameters(&ok), Ok(()));
    for managed in MANAGED_PARAMETERS {
        let bad = BTreeMap::from([(managed.to_string(), ParamValue::Int(1))]);
        assert_eq!(
            check_parameters(&bad),
            Err((
                managed.to_string(),
                "is managed by pgwarden and cannot be set here".to_string()
            ))
        );
    }
}

#[test]
fn unreadable_file_is_one_line() {
    let err = load(Path::new("/nonexistent/pgwarden.toml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot read config file /nonexistent/pgwarden.toml: No such file or directory (os error 2)"
    );
    assert_eq!(err.key_name(), None);
}

#[test]
fn load_reads_and_validates_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pg1.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let cfg = load(&path).unwrap();
    assert_eq!(cfg.source, path);

    std::fs::write(&path, edit("password = \"secret\"", "password = \"\"")).unwrap();
    assert_eq!(
        load(&path).unwrap_err().to_string(),
        format!(
            "{}: key `postgresql.authentication.superuser.password`: must not be empty",
            path.display()
        )
    );
}

// --- validate(): checks against this host ---

/// A port nobody listens on right now (bound then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config_on_free_ports() -> Config {
    let mut cfg = parse_text(MINIMAL).unwrap();
    cfg.api.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    cfg.postgresql.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    cfg
}

#[test]
fn find_bin_dir_finds_the_installed_postgresql() {
    // The highest /usr/lib/postgresql/N/bin holding a postgres binary; on
    // the build machine that is PostgreSQL 15.
    let highest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| Path::new(&format!("/usr/lib/postgresql/{v}/bin/postgres")).exists())
        .max();
    let Some(version) = highest else {
        eprintln!("no PostgreSQL under /usr/lib/postgresql; skipping");
        return;
    };
    let found = find_bin_dir().expect("a PostgreSQL is installed");
    assert_eq!(
        found,
        PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"))
    );
    if Path::new("/usr/lib/postgresql/15/bin/postgres").exists() && version == 15 {
        assert_eq!(found, Path::new("/usr/lib/postgresql/15/bin"));
    }
}

#[test]
fn validate_discovers_bin_dir_when_not_set() {
    let cfg = config_on_free_ports();
    assert_eq!(cfg.postgresql.bin_dir, None);
    match find_bin_dir() {
        Some(expected) => assert_eq!(validate(&cfg, false).unwrap(), expected),
        None => assert_eq!(
            validate(&cfg, false).unwrap_err().key_name(),
            Some("postgresql.bin_dir")
        ),
    }
}

#[test]
fn validate_rejects_a_missing_bin_dir() {
    let mut cfg = config_on_free_ports();
    cfg.postgresql.bin_dir = Some("/nonexistent/pgwarden/bin".into());
    let err = validate(&cfg, false).unwrap_err();
    assert_eq!(err.key_name(), Some("postgresql.bin_dir"));
    assert_eq!(
        err.to_string(),
        key_error(
            "postgresql.bin_dir",
            "cannot read /nonexistent/pgwarden/bin: No such file or directory (os error 2)"
        )
    );
}

#[test]
fn validate_rejects_a_bin_dir_without_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_on_free_ports();
    cfg.postgresql.bin_dir = Some(dir.path().to_path_buf());
    let err = validate(&cfg, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        key_error(
            "postgresql.bin_dir",
            &format!("{} has no executable `postgres`", dir.path().display())
        )
    );
}

#[test]
fn validate_rejects_an_api_port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cfg = config_on_free_ports();
    cfg.api.listen = addr;
    let err = validate(&cfg, false).unwrap_err();
    assert_eq!(err.key_name(), Some("api.listen"));
    assert_eq!(
        err.to_string(),
        key_error("api.listen", &format!("{addr} is already in use"))
    );
    // Our own postmaster running does not excuse the API port.
    assert_eq!(
        validate(&cfg, true).unwrap_err().key_name(),
        Some("api.listen")
    );
    drop(taken);
}

#[test]
fn validate_accepts_the_postgresql_port_held_by_our_own_postmaster() {
    let Some(bin_dir) = find_bin_dir() else {
        eprintln!("no PostgreSQL installed; skipping");
        return;
    };
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cfg = config_on_free_ports();
    cfg.postgresql.listen = addr;
    let err = validate(&cfg, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        key_error("postgresql.listen", &format!("{addr} is already in use"))
    );
    assert_eq!(validate(&cfg, true).unwrap(), bin_dir);
    drop(taken);
}

#[test]
fn debug_output_hides_every_password() {
    let text = append(
        r#"
[tags]
nofailover = true
"#,
    )
    .replace("password = \"secret\"", "password = \"su-Pw-1f3e\"")
    .replace("password = \"rep-secret\"", "password = \"repl-Pw-77aa\"")
    .replace(
        "listen = \"127.0.0.1:8008\"",
        "listen = \"127.0.0.1:8008\"\nusername = \"op\"\npassword = \"api-Pw-9c2d\"\ncertfile = \"/etc/pgwarden/api.crt\"\nkeyfile = \"/etc/pgwarden/api.key\"",
    );
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.api.credentials(), Some(("op", "api-Pw-9c2d")));
    assert_eq!(
        cfg.postgresql.authentication.superuser.password,
        "su-Pw-1f3e"
    );
    for shown in [format!("{cfg:?}"), format!("{cfg:#?}")] {
        for secret in ["su-Pw-1f3e", "repl-Pw-77aa", "api-Pw-9c2d"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert_eq!(shown.matches("<redacted>").count(), 3, "{shown}");
        // Only the secrets are hidden.
        for visible in [
            "\"op\"",
            "\"postgres\"",
            "\"replicator\"",
            "api.crt",
            "nofailover: true",
        ] {
            assert!(shown.contains(visible), "{visible} missing from {shown}");
        }
    }
    // Without API credentials nothing claims a password is set.
    let cfg = parse_text(MINIMAL).unwrap();
    assert!(format!("{:?}", cfg.api).contains("password: None"));
}
