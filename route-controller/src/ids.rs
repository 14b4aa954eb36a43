//! Sandbox IDs and access tokens, from the OS CSPRNG.
//!
//! An ID is the gateway's route key, so it must be a DNS label the gateway accepts and unique in
//! the cluster. It is 16 characters of lowercase base32 (80 random bits), starting with a letter;
//! the claimer also checks each new ID against every ID in its caches (pods and `Sandbox`
//! objects in every namespace it manages, plus the IDs it released while leading) and draws
//! again on a match, so a collision is not left to the 2^-80 odds alone.

use rand::rngs::OsRng;
use rand::TryRngCore;

/// The characters of an ID: RFC 4648 base32, lowercased (no `-`, so `<port>-<id>` hosts parse).
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Characters per ID.
pub const ID_LEN: usize = 16;

/// Errors drawing randomness (the OS refused: nothing sensible to do but report it).
#[derive(Debug, thiserror::Error)]
#[error("the OS random number generator failed: {0}")]
pub struct RandomError(String);

fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut buf = [0u8; N];
    OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| RandomError(e.to_string()))?;
    Ok(buf)
}

/// A new sandbox ID (not yet checked against the ones in use: see [`new_unique_id`]).
pub fn new_id() -> Result<String, RandomError> {
    let bytes = random_bytes::<ID_LEN>()?;
    Ok(bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            // The first character is a letter (26 of 32 values): IDs look like names, never
            // like numbers. The modulo bias on one character costs under a bit of entropy.
            if i == 0 {
                char::from(ALPHABET[usize::from(*b) % 26])
            } else {
                char::from(ALPHABET[usize::from(*b) % 32])
            }
        })
        .collect())
}

/// A new ID that `in_use` does not know.
pub fn new_unique_id(mut in_use: impl FnMut(&str) -> bool) -> Result<String, RandomError> {
    loop {
        let id = new_id()?;
        if !in_use(&id) {
            return Ok(id);
        }
    }
}

/// A new access token: 32 random bytes, hex (64 characters), as the client sends it.
pub fn new_token() -> Result<String, RandomError> {
    Ok(hex::encode(random_bytes::<32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_valid_gateway_keys_and_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let id = new_id().unwrap();
            assert_eq!(id.len(), ID_LEN);
            assert!(routing::key::validate_id(id.as_bytes()).is_ok(), "{id}");
            assert!(id.as_bytes()[0].is_ascii_lowercase());
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn an_id_in_use_is_drawn_again() {
        let taken = new_id().unwrap();
        let mut calls = 0;
        let id = new_unique_id(|c| {
            calls += 1;
            calls == 1 || c == taken
        });
        let id = id.unwrap();
        assert!(calls >= 2 && id != taken);
    }

    #[test]
    fn tokens_are_32_bytes_of_hex() {
        let t = new_token().unwrap();
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, new_token().unwrap());
    }
}
