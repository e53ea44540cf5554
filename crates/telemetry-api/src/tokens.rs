//! Per-user API tokens.
//!
//! A token is `tpa_` followed by 64 hex digits: 32 bytes from the operating system's random
//! source, shown once by `telemetry-api token create` and never stored. PostgreSQL keeps only its
//! SHA-256. A fast, unsalted hash is the right tool here, unlike for passwords: a token carries
//! 256 random bits, so a leaked `api_tokens` table cannot be brute-forced however fast the hash
//! is, and a plain digest can be found through a unique index in one query. A slow, salted hash
//! (bcrypt, Argon2) protects guessable secrets; on a random token it would only add milliseconds
//! of CPU to every request.
//!
//! A token grants read access to its own user's devices and HTTP ingest for them, nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::TryRngCore;
use sha2::{Digest, Sha256};
use telemetry_core::contract::{DeviceId, TopicError};
use tokio_postgres::types::Type;

use crate::cursor::{from_hex, to_hex};
use crate::metrics;
use crate::store::{Store, StoreError};

/// Marks a string as this API's token, so that secret scanners and people can tell what leaked.
pub const PREFIX: &str = "tpa_";
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("'{user}' cannot own a token: {source}")]
    InvalidUser {
        user: String,
        #[source]
        source: TopicError,
    },
    #[error("'{0}' cannot own a token: the user id contains '/', which ids may not")]
    SlashInUser(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("cannot store or change the token: {0}; run `telemetry-api migrate` first if api_tokens is missing")]
    Database(#[from] tokio_postgres::Error),
}

/// A token just created: the only moment its text exists outside the caller's hands.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: i64,
    pub user: String,
    pub token: String,
}

/// A new random token.
pub fn generate() -> Result<String, TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(format!("{PREFIX}{}", to_hex(&bytes)))
}

/// What `api_tokens.token_hash` holds for a token.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `text` has a token's shape; anything else is refused without a query.
fn well_formed(text: &str) -> bool {
    text.strip_prefix(PREFIX)
        .is_some_and(|hex| hex.len() == TOKEN_BYTES * 2 && from_hex(hex).is_some())
}

/// Creates a token for `user` (checked against the contract's id rules) and stores its hash.
pub async fn create(
    client: &tokio_postgres::Client,
    user: &str,
    label: &str,
) -> Result<Created, TokenError> {
    // A user id follows the same rules as in a topic; the device part is only a placeholder.
    if user.contains('/') {
        return Err(TokenError::SlashInUser(user.to_owned()));
    }
    DeviceId::new(user, "_").map_err(|source| TokenError::InvalidUser {
        user: user.to_owned(),
        source,
    })?;
    let token = generate()?;
    let digest: &[u8] = &hash(&token);
    let row = client
        .query_typed_one(
            "INSERT INTO api_tokens (user_id, token_hash, label) VALUES ($1, $2, $3) RETURNING id",
            &[
                (&user, Type::TEXT),
                (&digest, Type::BYTEA),
                (&label, Type::TEXT),
            ],
        )
        .await?;
    Ok(Created {
        id: row.try_get(0)?,
        user: user.to_owned(),
        token,
    })
}

/// Deletes a token; returns whether it existed. Replicas that cached it keep accepting it for
/// up to `auth.token_cache_seconds`.
pub async fn revoke(client: &tokio_postgres::Client, id: i64) -> Result<bool, TokenError> {
    let deleted = client
        .query_typed(
            "DELETE FROM api_tokens WHERE id = $1 RETURNING id",
            &[(&id, Type::INT8)],
        )
        .await?;
    Ok(!deleted.is_empty())
}

/// Answers "whose token is this?", remembering positive answers for a while so that most
/// requests cost one query, not two. Unknown tokens are not remembered: a caller cycling through
/// bad tokens cannot fill the cache, and a token created a second ago works at once.
#[derive(Debug)]
pub struct Authenticator {
    store: Store,
    ttl: Duration,
    cache: Mutex<Cache>,
}

/// Token hash -> its user and when to ask the database again.
type Cache = HashMap<[u8; 32], (Arc<str>, Instant)>;

/// Most distinct tokens remembered at once; past this the cache starts over, which bounds memory
/// and only costs a query per token on the next request.
const CACHE_CAPACITY: usize = 100_000;

impl Authenticator {
    pub fn new(store: Store, ttl: Duration) -> Authenticator {
        Authenticator {
            store,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The user `token` belongs to, or `None` for a token that is malformed or not stored.
    pub async fn user_for(&self, token: &str) -> Result<Option<Arc<str>>, StoreError> {
        if !well_formed(token) {
            return Ok(None);
        }
        let digest = hash(token);
        let now = Instant::now();
        if let Some((user, expires)) = self.cache().get(&digest) {
            if *expires > now {
                metrics::token_cache(true);
                return Ok(Some(user.clone()));
            }
        }
        metrics::token_cache(false);
        let Some(user) = self.store.token_user(&digest).await? else {
            self.cache().remove(&digest);
            return Ok(None);
        };
        let user: Arc<str> = user.into();
        if !self.ttl.is_zero() {
            let mut cache = self.cache();
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(digest, (user.clone(), now + self.ttl));
        }
        Ok(Some(user))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_well_formed() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 64, "{a}");
        assert!(well_formed(&a));
        assert!(!well_formed("tpa_short"));
        assert!(!well_formed(&a.replace(PREFIX, "xyz_")));
    }

    #[test]
    fn the_stored_hash_is_the_sha256_of_the_token_text() {
        // echo -n abc | sha256sum
        assert_eq!(
            to_hex(&hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
