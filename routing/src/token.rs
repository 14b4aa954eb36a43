//! Per-sandbox access tokens: routes carry the SHA-256 of the token, requests carry the token.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Parses a 64-hex-digit SHA-256 (either case).
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Whether `presented` hashes to `expected`. Hashing first makes the comparison independent of
/// the token's length, and the final compare is constant-time.
pub fn token_matches(presented: &[u8], expected: &[u8; 32]) -> bool {
    let digest = Sha256::digest(presented);
    digest.as_slice().ct_eq(expected.as_slice()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_right_token() {
        // sha256("secret")
        let h = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";
        let expected = parse_sha256_hex(h).unwrap();
        assert_eq!(parse_sha256_hex(&h.to_uppercase()), Some(expected));
        assert!(token_matches(b"secret", &expected));
        assert!(!token_matches(b"secreT", &expected));
        assert!(!token_matches(b"", &expected));
        assert!(!token_matches(&[0xff; 10_000], &expected));
    }

    #[test]
    fn rejects_bad_hex() {
        assert_eq!(parse_sha256_hex(""), None);
        assert_eq!(parse_sha256_hex("zz"), None);
        assert_eq!(parse_sha256_hex(&"a".repeat(63)), None);
        assert_eq!(parse_sha256_hex(&"a".repeat(66)), None);
    }
}
