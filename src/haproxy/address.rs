//! Host and port parsing for what members publish. Anything accepted here is
//! written verbatim into the HAProxy config, so acceptance is strict: a
//! character HAProxy would read as syntax (space, `#`, quote) must never get
//! through.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Host and port of an agent's API from its published URL
/// (`http://10.0.0.5:8008`, `https://[fd00::5]:8008/`, or bare `host:port`).
/// A URL without a port gets its scheme's default. IPv6 hosts come back
/// without brackets.
pub fn parse_api_url(url: &str) -> Option<(String, u16)> {
    let url = url.trim();
    let (default_port, rest) = match url.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "http" => (Some(80), rest),
            "https" => (Some(443), rest),
            _ => return None,
        },
        None => (None, url),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);

    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (host, after) = inner.split_once(']')?;
        host.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => default_port?,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        (host.to_string(), port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (authority.to_string(), default_port?),
        }
    };
    if port == 0 {
        return None;
    }
    Some((clean_host(&host)?, port))
}

/// An IP address or DNS name fit to be written into the config, brackets
/// around IPv6 removed; `None` for anything else.
pub(super) fn clean_host(host: &str) -> Option<String> {
    let host = host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.parse::<Ipv4Addr>().is_ok() || host.parse::<Ipv6Addr>().is_ok() {
        return Some(host.to_string());
    }
    let is_dns_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    is_dns_name.then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> Option<(String, u16)> {
        parse_api_url(url)
    }

    #[test]
    fn parses_published_urls() {
        assert_eq!(
            ok("http://127.0.0.1:8008"),
            Some(("127.0.0.1".into(), 8008))
        );
        assert_eq!(
            ok("http://127.0.0.1:8008/"),
            Some(("127.0.0.1".into(), 8008))
        );
        assert_eq!(
            ok("https://db-1.example.com:8443/x?y#z"),
            Some(("db-1.example.com".into(), 8443))
        );
        assert_eq!(ok("http://[::1]:8008"), Some(("::1".into(), 8008)));
        assert_eq!(ok("HTTP://user:pw@host:9"), Some(("host".into(), 9)));
        assert_eq!(ok("http://host"), Some(("host".into(), 80)));
        assert_eq!(ok("https://[fd00::5]"), Some(("fd00::5".into(), 443)));
        assert_eq!(ok("10.0.0.5:8008"), Some(("10.0.0.5".into(), 8008)));
    }

    #[test]
    fn rejects_what_haproxy_could_misread() {
        for bad in [
            "",
            "http://",
            "http://:8008",
            "http://host:0",
            "http://host:99999",
            "http://host:port",
            "ftp://host:21",
            "host",
            "http://ho st:8008",
            "http://[::1:8008",
            "http://[nothex]:8008",
            "http://::1:8008",
            "http://-host:8008",
            "http://a..b:8008",
            "http://h\"x:8008",
        ] {
            assert_eq!(parse_api_url(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cleans_hosts() {
        assert_eq!(clean_host("[::1]").as_deref(), Some("::1"));
        assert_eq!(clean_host("db_1.local").as_deref(), Some("db_1.local"));
        assert_eq!(clean_host("a b"), None);
        assert_eq!(clean_host(""), None);
    }
}
