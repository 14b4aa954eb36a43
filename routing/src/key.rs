//! Sandbox key extraction: which sandbox (and which port in it) a request is for.
//!
//! Runs on every request, so it borrows from the request and never allocates. Sources are tried in
//! a fixed order (header, Host, path prefix); the first source that is *present* decides, and a
//! present-but-malformed key is an error rather than a fall-through, so a bad header can never be
//! "rescued" by a Host that points somewhere else.

use crate::reply::ReplyCode;

/// Header names that carry the sandbox key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderNames {
    pub id: String,
    pub port: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames {
            id: "x-sandbox-id".into(),
            port: "x-sandbox-port".into(),
        }
    }
}

impl HeaderNames {
    /// E2B clients' header names.
    pub fn e2b() -> Self {
        HeaderNames {
            id: "e2b-sandbox-id".into(),
            port: "e2b-sandbox-port".into(),
        }
    }
}

/// How keys are found in a request (see `key::extract`). A `None`/empty source is switched off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    pub headers: Option<HeaderNames>,
    /// Host `<port>-<id>.<domain>` is recognised for these domains (lowercase, no leading dot).
    pub host_domains: Vec<String>,
    /// Path `<prefix>/<id>/<port>/...` (what the upstream then sees: `path_prefix_mode`).
    pub path_prefix: Option<String>,
}

/// Longest sandbox ID: one DNS label.
pub const MAX_ID_LEN: usize = 63;

/// Where the key was found; reported in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Header,
    Host,
    Path,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Header => "header",
            KeySource::Host => "host",
            KeySource::Path => "path",
        }
    }
}

/// A validated sandbox key, borrowing from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxKey<'a> {
    pub id: &'a str,
    /// `None`: use the route's default port.
    pub port: Option<u16>,
    pub source: KeySource,
    /// For path keys: the matched prefix and the rest of the path (see [`PathRewrite`]).
    pub rewritten_path: Option<PathRewrite<'a>>,
}

/// A path key split in two: `prefix` is `<prefix>/<id>/<port>` exactly as the client sent it
/// (what `x-forwarded-prefix` carries when the prefix is stripped), `rest` what follows it
/// (possibly empty) with the query, if any. Borrowed, so extraction stays allocation-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathRewrite<'a> {
    pub prefix: &'a [u8],
    pub rest: &'a [u8],
}

impl PathRewrite<'_> {
    /// The new `:path` value. Allocates; called only for path-keyed requests.
    pub fn to_path(&self) -> Vec<u8> {
        if self.rest.first() == Some(&b'/') {
            self.rest.to_vec()
        } else {
            let mut p = Vec::with_capacity(self.rest.len() + 1);
            p.push(b'/');
            p.extend_from_slice(self.rest);
            p
        }
    }
}

/// Why a request has no usable key. Each is a 400 whose code and message
/// [`ReplyCode`] owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    Missing,
    InvalidId,
    InvalidPort,
    DuplicateHeader,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(ReplyCode::from(*self).message())
    }
}

impl std::error::Error for KeyError {}

impl From<KeyError> for ReplyCode {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Missing => ReplyCode::MissingSandboxId,
            KeyError::InvalidId => ReplyCode::InvalidSandboxId,
            KeyError::InvalidPort => ReplyCode::InvalidSandboxPort,
            KeyError::DuplicateHeader => ReplyCode::DuplicateHeader,
        }
    }
}

/// What extraction needs from a request. Implemented over Envoy's header map by the filter and
/// over ext_proc's header list by sandbox-extproc; values are raw bytes because clients can send
/// anything. A header sent more than once is `Err(DuplicateHeader)`: which copy a proxy or the
/// sandbox would read is not ours to guess.
pub trait RequestView {
    fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError>;
    fn authority(&self) -> Option<&[u8]>;
    fn path(&self) -> Option<&[u8]>;
}

/// Checks a sandbox ID: a lowercase DNS label. Returns it as `&str` (ASCII by construction).
pub fn validate_id(raw: &[u8]) -> Result<&str, KeyError> {
    if raw.is_empty() || raw.len() > MAX_ID_LEN || raw[0] == b'-' || raw[raw.len() - 1] == b'-' {
        return Err(KeyError::InvalidId);
    }
    if !raw
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(KeyError::InvalidId);
    }
    // All bytes are ASCII, checked above.
    std::str::from_utf8(raw).map_err(|_| KeyError::InvalidId)
}

/// Parses a port: 1-5 ASCII digits, 1..=65535, no sign, no whitespace.
pub fn parse_port(raw: &[u8]) -> Result<u16, KeyError> {
    if raw.is_empty() || raw.len() > 5 || !raw.iter().all(u8::is_ascii_digit) {
        return Err(KeyError::InvalidPort);
    }
    let n = raw
        .iter()
        .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'));
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(KeyError::InvalidPort),
    }
}

/// Extracts and validates the sandbox key of a request according to `cfg`.
pub fn extract<'a, R: RequestView + ?Sized>(
    cfg: &KeyConfig,
    req: &'a R,
) -> Result<SandboxKey<'a>, KeyError> {
    if let Some(names) = &cfg.headers {
        if let Some(raw) = req.header(&names.id)? {
            let id = validate_id(raw)?;
            let port = match req.header(&names.port)? {
                Some(p) => Some(parse_port(p)?),
                None => None,
            };
            return Ok(SandboxKey {
                id,
                port,
                source: KeySource::Header,
                rewritten_path: None,
            });
        }
    }
    if !cfg.host_domains.is_empty() {
        if let Some(host) = req.authority() {
            if let Some(label) = host_label(host, &cfg.host_domains)? {
                let (id, port) = split_host_label(label)?;
                return Ok(SandboxKey {
                    id,
                    port,
                    source: KeySource::Host,
                    rewritten_path: None,
                });
            }
        }
    }
    if let Some(prefix) = &cfg.path_prefix {
        if let Some(path) = req.path() {
            if let Some(key) = from_path(path, prefix.as_bytes())? {
                return Ok(key);
            }
        }
    }
    Err(KeyError::Missing)
}

/// Returns the first label of `host` when the rest is one of `domains` (ASCII case-insensitive),
/// `None` when the host is not under any of them. A `:port` suffix is ignored.
fn host_label<'a>(host: &'a [u8], domains: &[String]) -> Result<Option<&'a [u8]>, KeyError> {
    let host = strip_host_port(host);
    for domain in domains {
        let d = domain.as_bytes();
        // host = <label> "." <domain>
        if host.len() > d.len() + 1 {
            let split = host.len() - d.len();
            if host[split - 1] == b'.' && host[split..].eq_ignore_ascii_case(d) {
                let label = &host[..split - 1];
                if label.contains(&b'.') {
                    // Deeper names are not sandboxes: refuse rather than guess which label is meant.
                    return Err(KeyError::InvalidId);
                }
                return Ok(Some(label));
            }
        }
    }
    Ok(None)
}

fn strip_host_port(host: &[u8]) -> &[u8] {
    // IPv6 literals ("[::1]:80") never match a sandbox domain, so only the plain form matters.
    match host.iter().rposition(|&b| b == b':') {
        Some(i) if host[i + 1..].iter().all(u8::is_ascii_digit) && !host.contains(&b']') => {
            &host[..i]
        }
        _ => host,
    }
}

/// `<port>-<id>` or `<id>`. A leading all-digit segment followed by `-` is the port, so an ID
/// that itself starts with `<digits>-` is reachable through the Host form only with a port.
fn split_host_label(label: &[u8]) -> Result<(&str, Option<u16>), KeyError> {
    if let Some(dash) = label.iter().position(|&b| b == b'-') {
        let head = &label[..dash];
        if !head.is_empty() && head.iter().all(u8::is_ascii_digit) {
            let port = parse_port(head)?;
            return Ok((validate_id(&label[dash + 1..])?, Some(port)));
        }
    }
    Ok((validate_id(label)?, None))
}

/// `<prefix>/<id>/<port>[/rest][?query]`. Returns `None` if the path is not under the prefix.
fn from_path<'a>(path: &'a [u8], prefix: &[u8]) -> Result<Option<SandboxKey<'a>>, KeyError> {
    let Some(after) = path.strip_prefix(prefix) else {
        return Ok(None);
    };
    let Some(after) = after.strip_prefix(b"/") else {
        // "/sandboxesX" is another path, "/sandboxes" alone names no sandbox.
        return if after.is_empty() || after[0] == b'?' {
            Err(KeyError::Missing)
        } else {
            Ok(None)
        };
    };
    let seg_end = |s: &[u8]| s.iter().position(|&b| b == b'/' || b == b'?');
    let id_end = seg_end(after).ok_or(KeyError::InvalidPort)?;
    if after[id_end] != b'/' {
        return Err(KeyError::InvalidPort);
    }
    let id = validate_id(&after[..id_end])?;
    let rest = &after[id_end + 1..];
    let port_end = seg_end(rest).unwrap_or(rest.len());
    let port = parse_port(&rest[..port_end])?;
    // `path` = prefix "/" id "/" port rest: the split point is everything up to the port's end.
    let split = path.len() - (rest.len() - port_end);
    Ok(Some(SandboxKey {
        id,
        port: Some(port),
        source: KeySource::Path,
        rewritten_path: Some(PathRewrite {
            prefix: &path[..split],
            rest: &rest[port_end..],
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::{HeaderNames, KeyConfig};

    #[derive(Default)]
    struct Req {
        headers: Vec<(&'static str, Vec<u8>)>,
        authority: Option<Vec<u8>>,
        path: Option<Vec<u8>>,
    }
    impl RequestView for Req {
        fn header(&self, name: &str) -> Result<Option<&[u8]>, KeyError> {
            let mut found = self.headers.iter().filter(|(n, _)| *n == name);
            let first = found.next().map(|(_, v)| v.as_slice());
            if found.next().is_some() {
                return Err(KeyError::DuplicateHeader);
            }
            Ok(first)
        }
        fn authority(&self) -> Option<&[u8]> {
            self.authority.as_deref()
        }
        fn path(&self) -> Option<&[u8]> {
            self.path.as_deref()
        }
    }

    fn cfg() -> KeyConfig {
        KeyConfig {
            headers: Some(HeaderNames::default()),
            host_domains: vec!["sandbox.local".into(), "box.example.com".into()],
            path_prefix: Some("/sandboxes".into()),
        }
    }

    fn hdr(id: &str, port: Option<&str>) -> Req {
        let mut headers = vec![("x-sandbox-id", id.as_bytes().to_vec())];
        if let Some(p) = port {
            headers.push(("x-sandbox-port", p.as_bytes().to_vec()));
        }
        Req {
            headers,
            ..Default::default()
        }
    }

    fn host(h: &str) -> Req {
        Req {
            authority: Some(h.as_bytes().to_vec()),
            path: Some(b"/x".to_vec()),
            ..Default::default()
        }
    }

    fn path(p: &[u8]) -> Req {
        Req {
            authority: Some(b"gateway:8080".to_vec()),
            path: Some(p.to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn ids() {
        for ok in ["a", "abc-123", "0", &"a".repeat(63)] {
            assert_eq!(validate_id(ok.as_bytes()), Ok(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "ABC",
            "aBc",
            "a_b",
            "a.b",
            "é",
            "a b",
            &"a".repeat(64),
        ] {
            assert_eq!(
                validate_id(bad.as_bytes()),
                Err(KeyError::InvalidId),
                "{bad}"
            );
        }
        assert_eq!(validate_id(b"\xff\xfe"), Err(KeyError::InvalidId));
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port(b"1"), Ok(1));
        assert_eq!(parse_port(b"65535"), Ok(65535));
        assert_eq!(parse_port(b"08080"), Ok(8080));
        for bad in [
            &b""[..],
            b"0",
            b"65536",
            b"99999",
            b"+80",
            b"80 ",
            b"-1",
            b"123456",
            b"8o",
        ] {
            assert_eq!(parse_port(bad), Err(KeyError::InvalidPort), "{bad:?}");
        }
    }

    #[test]
    fn header_key() {
        let c = cfg();
        let r = hdr("abc", Some("8080"));
        let k = extract(&c, &r).unwrap();
        assert_eq!(
            (k.id, k.port, k.source),
            ("abc", Some(8080), KeySource::Header)
        );
        let r = hdr("abc", None);
        assert_eq!(extract(&c, &r).unwrap().port, None);
        assert_eq!(extract(&c, &hdr("ABC", None)), Err(KeyError::InvalidId));
        assert_eq!(
            extract(&c, &hdr("abc", Some("0"))),
            Err(KeyError::InvalidPort)
        );
    }

    #[test]
    fn bad_header_does_not_fall_through_to_host() {
        let c = cfg();
        let mut r = host("8080-good.sandbox.local");
        r.headers.push(("x-sandbox-id", b"Bad".to_vec()));
        assert_eq!(extract(&c, &r), Err(KeyError::InvalidId));
    }

    #[test]
    fn duplicate_key_headers_are_rejected() {
        let c = cfg();
        let mut r = hdr("abc", None);
        r.headers.push(("x-sandbox-id", b"other".to_vec()));
        assert_eq!(extract(&c, &r), Err(KeyError::DuplicateHeader));
        let mut r = hdr("abc", Some("80"));
        r.headers.push(("x-sandbox-port", b"81".to_vec()));
        assert_eq!(extract(&c, &r), Err(KeyError::DuplicateHeader));
    }

    #[test]
    fn host_key() {
        let c = cfg();
        let key = |h: &str| {
            let r = host(h);
            extract(&c, &r).map(|k| (k.id.to_string(), k.port, k.source))
        };
        assert_eq!(
            key("8080-abc.sandbox.local"),
            Ok(("abc".into(), Some(8080), KeySource::Host))
        );
        assert_eq!(
            key("3000-my-box-1.BOX.example.com:443"),
            Ok(("my-box-1".into(), Some(3000), KeySource::Host))
        );
        assert_eq!(
            key("abc.sandbox.local"),
            Ok(("abc".into(), None, KeySource::Host))
        );
        assert_eq!(
            extract(&c, &host("8080-ABC.sandbox.local")),
            Err(KeyError::InvalidId)
        );
        assert_eq!(
            extract(&c, &host("99999-abc.sandbox.local")),
            Err(KeyError::InvalidPort)
        );
        assert_eq!(
            extract(&c, &host("a.b.sandbox.local")),
            Err(KeyError::InvalidId)
        );
        // Not under a sandbox domain, no path key: missing.
        assert_eq!(extract(&c, &host("sandbox.local")), Err(KeyError::Missing));
        assert_eq!(
            extract(&c, &host("8080-abc.evilsandbox.local")),
            Err(KeyError::Missing)
        );
        let long = format!("{}.sandbox.local", "a".repeat(10_000));
        assert_eq!(extract(&c, &host(&long)), Err(KeyError::InvalidId));
    }

    #[test]
    fn path_key() {
        let c = cfg();
        let r = path(b"/sandboxes/abc/8080/api/v1?x=1");
        let k = extract(&c, &r).unwrap();
        assert_eq!(
            (k.id, k.port, k.source),
            ("abc", Some(8080), KeySource::Path)
        );
        let rw = k.rewritten_path.unwrap();
        assert_eq!(rw.to_path(), b"/api/v1?x=1");
        // The prefix is what the client sent, leading zeros and all.
        assert_eq!(rw.prefix, b"/sandboxes/abc/8080");
        let r = path(b"/sandboxes/abc/08080/x");
        assert_eq!(
            extract(&c, &r).unwrap().rewritten_path.unwrap().prefix,
            b"/sandboxes/abc/08080"
        );
        let r = path(b"/sandboxes/abc/8080");
        assert_eq!(
            extract(&c, &r).unwrap().rewritten_path.unwrap().to_path(),
            b"/"
        );
        let r = path(b"/sandboxes/abc/8080?q");
        let rw = extract(&c, &r).unwrap().rewritten_path.unwrap();
        assert_eq!(
            (rw.to_path(), rw.prefix),
            (b"/?q".to_vec(), &b"/sandboxes/abc/8080"[..])
        );
        assert_eq!(
            extract(&c, &path(b"/sandboxes/abc")),
            Err(KeyError::InvalidPort)
        );
        assert_eq!(
            extract(&c, &path(b"/sandboxes/abc/x/y")),
            Err(KeyError::InvalidPort)
        );
        assert_eq!(
            extract(&c, &path(b"/sandboxes/Abc/80/")),
            Err(KeyError::InvalidId)
        );
        assert_eq!(extract(&c, &path(b"/sandboxes")), Err(KeyError::Missing));
        assert_eq!(
            extract(&c, &path(b"/sandboxesx/a/80")),
            Err(KeyError::Missing)
        );
        assert_eq!(extract(&c, &path(b"/other")), Err(KeyError::Missing));
    }

    #[test]
    fn sources_can_be_switched_off() {
        let c = KeyConfig {
            headers: None,
            host_domains: vec![],
            path_prefix: None,
        };
        let mut r = hdr("abc", None);
        r.authority = Some(b"8080-abc.sandbox.local".to_vec());
        r.path = Some(b"/sandboxes/abc/80/".to_vec());
        assert_eq!(extract(&c, &r), Err(KeyError::Missing));
    }

    #[test]
    fn e2b_preset_names() {
        let c = KeyConfig {
            headers: Some(HeaderNames::e2b()),
            ..cfg()
        };
        let r = Req {
            headers: vec![
                ("e2b-sandbox-id", b"abc".to_vec()),
                ("e2b-sandbox-port", b"49983".to_vec()),
            ],
            ..Default::default()
        };
        let k = extract(&c, &r).unwrap();
        assert_eq!((k.id, k.port), ("abc", Some(49983)));
    }
}
