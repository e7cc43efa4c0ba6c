//! The one authentication check, for the API and the ops surface alike, on both transports.
//!
//! Which key a request needs follows from its path alone ([`required_keys`]), so the HTTP/3
//! bridge can refuse an unauthenticated stream from its headers before it buffers a byte of the
//! body, and the router's middleware applies the very same rule to every route (there is no
//! second check to drift). A key is presented as `Authorization: Bearer KEY` (scheme in any case)
//! or as the password of HTTP Basic credentials — Basic is there for people: a browser opening
//! `/dashboard` gets a Basic challenge, asks once, and sends the same credentials on the page's
//! own polling requests. A refusal is [`ApiError::InvalidApiKey`]: 401, `type`
//! `authentication_error`, code `invalid_api_key`, with a `WWW-Authenticate` challenge.

use axum::http::{header, HeaderMap};

use crate::api::error::{ApiError, KeySurface};
use crate::state::Auth;

/// The keys `path` takes and which surface they belong to; `None` for open routes (`/health`,
/// `/version`) and for any surface with no keys configured.
pub fn required_keys<'a>(path: &str, auth: &'a Auth) -> Option<(&'a [String], KeySurface)> {
    let api = path.starts_with("/v1/") || path == "/v1" || path == "/tokenize" || path == "/detokenize";
    let ops = path == "/metrics" || path == "/dashboard" || path == "/ops" || path.starts_with("/ops/");
    let (keys, surface) = match (api, ops) {
        (true, _) => (&auth.api_keys, KeySurface::Api),
        (_, true) => (&auth.ops_keys, KeySurface::Ops),
        _ => return None,
    };
    (!keys.is_empty()).then_some((keys.as_slice(), surface))
}

/// `Ok` when `path` needs no key or `headers` present one of the keys it takes.
pub fn check(path: &str, headers: &HeaderMap, auth: &Auth) -> Result<(), ApiError> {
    match required_keys(path, auth) {
        Some((keys, surface)) if !authorized(headers, keys) => Err(ApiError::InvalidApiKey { surface }),
        _ => Ok(()),
    }
}

/// True when `keys` is empty, or the request presents one of them as a bearer token or as the
/// password of Basic credentials.
pub fn authorized(headers: &HeaderMap, keys: &[String]) -> bool {
    if keys.is_empty() {
        return true;
    }
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let presented = if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        match base64_decode(rest.trim()) {
            Some(creds) => match creds.iter().position(|&b| b == b':') {
                Some(i) => creds[i + 1..].to_vec(),
                None => creds,
            },
            None => return false,
        }
    } else {
        return false;
    };
    // Compare against every key in full so timing says nothing about which prefix matched.
    keys.iter().fold(false, |ok, k| ok | constant_time_eq(k.as_bytes(), &presented))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64 with optional padding (all Basic credentials need).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Keys from every source a command line offers — repeated flags, files of one key per line
/// (blank lines and `#` comments ignored) and a comma-separated environment variable — refusing
/// an empty key (a server that refuses everyone is a misconfiguration, not a lock).
pub fn collect_keys(
    what: &str,
    flags: &[String],
    files: &[std::path::PathBuf],
    env: Option<&str>,
) -> Result<Vec<String>, KeyError> {
    let mut keys = Vec::new();
    for k in flags {
        if k.trim().is_empty() {
            return Err(KeyError::Empty { what: what.to_string(), origin: "the command line".into() });
        }
        keys.push(k.trim().to_string());
    }
    for path in files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Read { path: path.display().to_string(), message: e.to_string() })?;
        let before = keys.len();
        keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string));
        if keys.len() == before {
            return Err(KeyError::Empty { what: what.to_string(), origin: path.display().to_string() });
        }
    }
    if let Some(value) = env {
        let before = keys.len();
        keys.extend(value.split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_string));
        if keys.len() == before {
            return Err(KeyError::Empty { what: what.to_string(), origin: "the environment".into() });
        }
    }
    Ok(keys)
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("an empty {what} key from {origin} would refuse every client; give a non-empty key or none")]
    Empty { what: String, origin: String },
    #[error("reading keys from {path}: {message}")]
    Read { path: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn keys_are_accepted_as_bearer_in_any_case_or_as_basic_password() {
        let keys = vec!["s3cret".to_string(), "other".to_string()];
        assert!(authorized(&HeaderMap::new(), &[]), "no keys configured: open");
        assert!(!authorized(&HeaderMap::new(), &keys));
        assert!(authorized(&headers("Bearer s3cret"), &keys));
        assert!(authorized(&headers("bearer other"), &keys));
        assert!(authorized(&headers("BEARER other"), &keys));
        assert!(!authorized(&headers("Bearer s3cre"), &keys));
        // "ops:s3cret" and "s3cret" (no user part).
        assert!(authorized(&headers("Basic b3BzOnMzY3JldA=="), &keys));
        assert!(authorized(&headers("Basic czNjcmV0"), &keys));
        assert!(!authorized(&headers("Basic b3BzOndyb25n"), &keys)); // ops:wrong
        assert!(!authorized(&headers("Basic !!!"), &keys));
        assert!(!authorized(&headers("Token s3cret"), &keys));
    }

    #[test]
    fn each_route_takes_its_surfaces_keys() {
        let auth = Auth { api_keys: vec!["a".into()], ops_keys: vec!["o".into()] };
        assert_eq!(required_keys("/v1/completions", &auth).map(|k| k.1), Some(KeySurface::Api));
        assert_eq!(required_keys("/tokenize", &auth).map(|k| k.1), Some(KeySurface::Api));
        assert_eq!(required_keys("/ops/soak", &auth).map(|k| k.1), Some(KeySurface::Ops));
        assert_eq!(required_keys("/dashboard", &auth).map(|k| k.1), Some(KeySurface::Ops));
        assert_eq!(required_keys("/health", &auth), None);
        assert_eq!(required_keys("/version", &auth), None);
        let open = Auth::default();
        assert_eq!(required_keys("/v1/completions", &open), None);
    }

    #[test]
    fn empty_keys_are_refused_from_every_source() {
        assert!(matches!(collect_keys("API", &["".into()], &[], None), Err(KeyError::Empty { .. })));
        assert!(matches!(collect_keys("API", &[], &[], Some(" , ")), Err(KeyError::Empty { .. })));
        assert_eq!(collect_keys("API", &["k1".into()], &[], Some("k2,k3")).unwrap(), ["k1", "k2", "k3"]);
        assert!(collect_keys("API", &[], &[], None).unwrap().is_empty());
    }

    #[test]
    fn base64_decodes_padded_and_unpadded() {
        assert_eq!(base64_decode("b3BzOnMzY3JldA==").unwrap(), b"ops:s3cret");
        assert_eq!(base64_decode("b3BzOnMzY3JldA").unwrap(), b"ops:s3cret");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("YQ").unwrap(), b"a");
        assert!(base64_decode("Y").is_none());
    }
}
