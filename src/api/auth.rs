//! HTTP basic authentication of mutating requests. Read-only paths (health
//! checks, views, metrics) never ask for credentials.

// A Response is the natural error of a handler step; it is built once per
// request, so its size does not matter.
#![allow(clippy::result_large_err)]

use super::views::error_response;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine;
use subtle::ConstantTimeEq;

pub(crate) const NO_CREDENTIALS: &str =
    "mutating requests are disabled: no API credentials configured (set [api] username and password)";
pub(crate) const AUTH_REQUIRED: &str =
    "authentication required: send the [api] username and password as HTTP basic credentials";
pub(crate) const MALFORMED_AUTH: &str =
    "malformed Authorization header: expected HTTP basic credentials";
pub(crate) const WRONG_CREDENTIALS: &str = "wrong username or password";

/// The configured `[api]` username and password.
#[derive(Clone)]
pub struct Credentials {
    username: Vec<u8>,
    password: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials { .. }")
    }
}

impl Credentials {
    pub fn new(username: &str, password: &str) -> Self {
        Credentials {
            username: username.as_bytes().to_vec(),
            password: password.as_bytes().to_vec(),
        }
    }

    /// Both halves are always compared, each in constant time for its
    /// length, so the answer's timing tells nothing about which was wrong
    /// nor how much of it matched.
    fn matches(&self, username: &[u8], password: &[u8]) -> bool {
        let user_ok = self.username.as_slice().ct_eq(username);
        let pass_ok = self.password.as_slice().ct_eq(password);
        bool::from(user_ok & pass_ok)
    }
}

/// Ok when the request may mutate; otherwise the response to send: 403
/// when no credentials are configured, 401 (with a challenge) when the
/// request's are missing, malformed or wrong.
pub(crate) fn authorize(
    configured: Option<&Credentials>,
    headers: &HeaderMap,
) -> Result<(), Response> {
    let Some(creds) = configured else {
        return Err(error_response(StatusCode::FORBIDDEN, NO_CREDENTIALS));
    };
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(unauthorized(AUTH_REQUIRED));
    };
    let Some((user, pass)) = parse_basic(value) else {
        return Err(unauthorized(MALFORMED_AUTH));
    };
    if creds.matches(&user, &pass) {
        Ok(())
    } else {
        Err(unauthorized(WRONG_CREDENTIALS))
    }
}

fn unauthorized(reason: &str) -> Response {
    let mut resp = error_response(StatusCode::UNAUTHORIZED, reason);
    resp.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"pgwarden\""),
    );
    resp
}

/// `Basic base64(user:password)` → (user, password). The scheme is
/// case-insensitive (RFC 7617); the password may contain ':'.
fn parse_basic(value: &HeaderValue) -> Option<(Vec<u8>, Vec<u8>)> {
    let text = value.to_str().ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    #[test]
    fn basic_credentials() {
        let creds = Credentials::new("admin", "s3:cret");
        let ok = |h: &HeaderMap| authorize(Some(&creds), h).is_ok();
        assert!(ok(&header(&basic("admin", "s3:cret"))));
        assert!(ok(&header(
            &basic("admin", "s3:cret").replace("Basic", "basic")
        )));
        for bad in [
            basic("admin", "s3:cre"),
            basic("admin", "s3:crett"),
            basic("Admin", "s3:cret"),
            basic("", ""),
            "Basic !!!".to_string(),
            "Bearer abc".to_string(),
            "Basic".to_string(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("nocolon")
            ),
        ] {
            let resp = authorize(Some(&creds), &header(&bad)).unwrap_err();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bad}");
            assert_eq!(
                resp.headers().get(WWW_AUTHENTICATE).unwrap(),
                "Basic realm=\"pgwarden\""
            );
        }
        let resp = authorize(Some(&creds), &HeaderMap::new()).unwrap_err();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let resp = authorize(None, &header(&basic("admin", "s3:cret"))).unwrap_err();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn debug_hides_the_secret() {
        let creds = Credentials::new("admin", "hunter2");
        assert!(!format!("{creds:?}").contains("hunter2"));
    }
}
