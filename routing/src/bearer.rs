//! The shared bearer token that guards sandbox-extproc's ActivityService: read once from a file
//! (the module's `activity_report.token_file`, sandbox-extproc's `--activity-token-file`), sent
//! by reporters as `authorization: Bearer <token>`, checked by the server in constant time.
//!
//! Shared here so both sides agree on what a token file may hold and how the header looks.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// The gRPC metadata key the token travels in.
pub const AUTHORIZATION: &str = "authorization";

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {path} is empty (after trimming whitespace)")]
    Empty { path: PathBuf },
    #[error(
        "the token file {path} must hold one token of visible ASCII characters (no inner spaces)"
    )]
    Invalid { path: PathBuf },
}

/// A bearer token. `Debug` never prints it; equality is constant-time.
#[derive(Clone)]
pub struct BearerToken {
    token: Box<str>,
    /// SHA-256 of the token: comparing digests hides the token's length from timing.
    digest: [u8; 32],
}

impl BearerToken {
    /// Reads `path` once; surrounding whitespace (a trailing newline) is trimmed. An empty file
    /// or one with characters a header value cannot carry is refused, so a typo never turns into
    /// "every caller is refused" (or, worse, "any caller with an empty token is accepted").
    pub fn from_file(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_path_buf(),
            });
        }
        Self::new(token).ok_or_else(|| TokenFileError::Invalid {
            path: path.to_path_buf(),
        })
    }

    /// A token of visible ASCII (`!`..`~`), else None.
    pub fn new(token: &str) -> Option<Self> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        Some(BearerToken {
            token: token.into(),
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// The `authorization` metadata value a client sends: `Bearer <token>`.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// Whether an `authorization` value carries this token. The scheme is matched
    /// case-insensitively (RFC 9110 §11.1); the token in constant time.
    pub fn accepts(&self, authorization: &[u8]) -> bool {
        let Some(presented) = strip_bearer(authorization) else {
            return false;
        };
        let digest = Sha256::digest(presented);
        digest.as_slice().ct_eq(&self.digest).into()
    }
}

fn strip_bearer(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl PartialEq for BearerToken {
    fn eq(&self, other: &Self) -> bool {
        self.digest.ct_eq(&other.digest).into()
    }
}

impl Eq for BearerToken {}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), content).unwrap();
        f
    }

    #[test]
    fn reads_and_trims() {
        let f = file("  s3cret-token\n");
        let t = BearerToken::from_file(f.path()).unwrap();
        assert_eq!(t.authorization(), "Bearer s3cret-token");
        assert!(t.accepts(b"Bearer s3cret-token"));
        assert!(t.accepts(b"bearer s3cret-token"));
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn refuses_empty_missing_and_odd_files() {
        for content in ["", " \n\t\n"] {
            let e = BearerToken::from_file(file(content).path()).unwrap_err();
            assert!(matches!(e, TokenFileError::Empty { .. }), "{e}");
            assert!(e.to_string().contains("empty"));
        }
        let e = BearerToken::from_file(file("two words").path()).unwrap_err();
        assert!(matches!(e, TokenFileError::Invalid { .. }), "{e}");
        let e = BearerToken::from_file(Path::new("/nonexistent/token")).unwrap_err();
        assert!(matches!(e, TokenFileError::Read { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/token"));
    }

    #[test]
    fn accepts_only_the_right_token() {
        let t = BearerToken::new("abc").unwrap();
        for bad in [
            &b""[..],
            b"abc",
            b"Bearer",
            b"Bearer ",
            b"Bearer ab",
            b"Bearer abcd",
            b"Basic abc",
            b"Bearer ABC",
        ] {
            assert!(!t.accepts(bad), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(t.accepts(b"Bearer abc"));
        assert_eq!(t, BearerToken::new("abc").unwrap());
        assert_ne!(t, BearerToken::new("abd").unwrap());
    }
}
