//! Who is calling: users with passwords and expiring sessions, named API tokens, and the
//! bootstrap admin token from the data directory.
//!
//! Tokens are random and only their SHA-256 is stored. Their prefix says where to look them
//! up (`tms_` sessions, `tmt_` API tokens), so a request costs one query at most. Passwords
//! are hashed with argon2id. Failed logins are counted per user name and per client address
//! ([`LoginLimiter`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use chrono::Utc;
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use telemon_store::{Store, User};

use crate::error::HttpError;
use crate::AppState;

pub const SESSION_PREFIX: &str = "tms_";
pub const API_TOKEN_PREFIX: &str = "tmt_";
/// A working shift and some: a clinician logs in once per shift.
const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("hashing a password: {0}")]
    Hash(String),
}

/// What a principal may do. Clinicians and viewers see only their assigned patients;
/// viewers cannot acknowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Clinician,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "clinician" => Some(Role::Clinician),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// How a principal authenticated.
#[derive(Clone, Debug, PartialEq)]
pub enum Credential {
    /// The admin token file of the data directory.
    Bootstrap,
    /// A user's session; the hash is what logout deletes.
    Session { token_hash: String },
    /// A named integration token.
    ApiToken,
    /// A token that reads one device's data only.
    Device { device: String },
}

/// Who made a request, from its `Authorization: Bearer` header.
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub credential: Credential,
}

impl Principal {
    pub fn require_admin(&self) -> Result<(), HttpError> {
        match self.role {
            Role::Admin => Ok(()),
            _ => Err(HttpError::Forbidden),
        }
    }
}

/// The tokens and sessions the API accepts, and the login limiter.
pub struct Auth {
    admin_token: String,
    session_ttl: Duration,
    limiter: LoginLimiter,
}

impl Auth {
    pub fn new(admin_token: String) -> Self {
        Auth {
            admin_token,
            session_ttl: DEFAULT_SESSION_TTL,
            limiter: LoginLimiter::default(),
        }
    }

    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    pub fn limiter(&self) -> &LoginLimiter {
        &self.limiter
    }

    /// Resolves a bearer token to its principal, or None when it is unknown or expired.
    pub async fn check(&self, store: &Store, token: &str) -> Result<Option<Principal>, HttpError> {
        // Constant time, so the comparison leaks nothing about how much of a guess matched.
        let bootstrap: bool = token.as_bytes().ct_eq(self.admin_token.as_bytes()).into();
        if bootstrap {
            return Ok(Some(Principal {
                name: "admin".to_string(),
                role: Role::Admin,
                credential: Credential::Bootstrap,
            }));
        }

        let token_hash = hash_token(token);
        if token.starts_with(SESSION_PREFIX) {
            let user = store.session_user(&token_hash, Utc::now()).await?;
            return Ok(user.and_then(|u| {
                let role = Role::parse(&u.role)?;
                Some(Principal {
                    name: u.name,
                    role,
                    credential: Credential::Session { token_hash },
                })
            }));
        }
        if token.starts_with(API_TOKEN_PREFIX) {
            let found = store.api_token(&token_hash).await?;
            return Ok(found.and_then(|t| {
                let role = Role::parse(&t.role)?;
                let credential = match t.device {
                    Some(device) => Credential::Device { device },
                    None => Credential::ApiToken,
                };
                Some(Principal {
                    name: t.name,
                    role,
                    credential,
                })
            }));
        }
        Ok(None)
    }

    /// Checks a user's password; the user on success.
    pub async fn verify_password(
        &self,
        store: &Store,
        name: &str,
        password: &str,
    ) -> Result<Option<User>, HttpError> {
        let user = store.user(name).await?;
        let Some(user) = user else {
            // Spend the same work as a real check, so timing does not reveal which names exist.
            let _ = hash_password(password);
            return Ok(None);
        };
        let ok = PasswordHash::new(&user.password_hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        Ok(ok.then_some(user))
    }
}

/// A new random token with the given prefix: 256 bits, hex.
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// What is stored for a token: its SHA-256. Tokens carry 256 random bits, so a fast hash is
/// enough (no password-style stretching needed).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// An argon2id PHC string with a fresh salt.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Failed logins allowed per user name within [`WINDOW`]: enough for typos, too few to guess.
const PER_USER: u32 = 5;
/// Failed logins allowed per client address within [`WINDOW`]: a shared ward PC may host
/// several users' typos, a guesser spraying many names may not.
const PER_ADDRESS: u32 = 20;
const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Bounds the limiter's memory under a spray of distinct names or addresses.
const MAX_KEYS: usize = 10_000;

/// Counts failed logins per user name and per client address over a fixed window.
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, (Instant, u32)>>,
}

impl LoginLimiter {
    /// Seconds to wait when either the name or the address is over its budget.
    pub fn blocked(&self, user: &str, addr: Option<IpAddr>) -> Option<u64> {
        Self::over_budget(&self.failures.lock(), user, addr)
    }

    fn over_budget(
        failures: &HashMap<String, (Instant, u32)>,
        user: &str,
        addr: Option<IpAddr>,
    ) -> Option<u64> {
        let now = Instant::now();
        let over = |key: String, max: u32| {
            failures.get(&key).and_then(|(start, n)| {
                let elapsed = now.duration_since(*start);
                (*n >= max && elapsed < WINDOW).then(|| (WINDOW - elapsed).as_secs().max(1))
            })
        };
        let by_user = over(format!("user:{user}"), PER_USER);
        let by_addr = addr.and_then(|a| over(format!("addr:{a}"), PER_ADDRESS));
        by_user.max(by_addr)
    }

    /// Takes one login attempt from the budgets of the name and the address, or says how
    /// long to wait when either is spent. Checked and counted under one lock: concurrent
    /// attempts cannot all slip past the check. A success then clears the name's count.
    pub fn attempt(&self, user: &str, addr: Option<IpAddr>) -> Option<u64> {
        let mut failures = self.failures.lock();
        if let Some(wait) = Self::over_budget(&failures, user, addr) {
            return Some(wait);
        }
        Self::count(&mut failures, user, addr);
        None
    }

    pub fn failed(&self, user: &str, addr: Option<IpAddr>) {
        Self::count(&mut self.failures.lock(), user, addr);
    }

    fn count(failures: &mut HashMap<String, (Instant, u32)>, user: &str, addr: Option<IpAddr>) {
        let now = Instant::now();
        if failures.len() >= MAX_KEYS {
            failures.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let keys = [
            Some(format!("user:{user}")),
            addr.map(|a| format!("addr:{a}")),
        ];
        for key in keys.into_iter().flatten() {
            let entry = failures.entry(key).or_insert((now, 0));
            if now.duration_since(entry.0) >= WINDOW {
                *entry = (now, 0);
            }
            entry.1 += 1;
        }
    }

    /// A successful login clears the name's count and gives the address back the attempt it
    /// took: a shared ward computer (or every user behind one proxy) must not run out of
    /// logins by logging in, only by failing.
    pub fn succeeded(&self, user: &str, addr: Option<IpAddr>) {
        let mut failures = self.failures.lock();
        failures.remove(&format!("user:{user}"));
        if let Some(addr) = addr {
            if let Some((_, n)) = failures.get_mut(&format!("addr:{addr}")) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// The client address, when the server was started with connect info.
pub fn client_addr(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The bearer token of a request: the `Authorization` header, or for browsers' EventSource
/// and WebSocket (which cannot set headers) an `access_token` query parameter.
fn bearer(parts: &Parts) -> Option<String> {
    if let Some(header) = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return header.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("access_token=")?;
        Some(value.to_string())
    })
}

/// A request's bearer token, kept by a long-lived stream to check again later that its
/// session or token still stands. Never logged: `Debug` shows nothing of it.
#[derive(Clone)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl FromRequestParts<AppState> for BearerToken {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, HttpError> {
        bearer(parts)
            .map(BearerToken)
            .ok_or(HttpError::Unauthorized)
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let token = bearer(parts).ok_or(HttpError::Unauthorized)?;
        state
            .auth
            .check(&state.store, &token)
            .await?
            .ok_or(HttpError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse").unwrap();
        let parsed = PasswordHash::new(&hash).unwrap();
        let argon = Argon2::default();
        assert!(argon.verify_password(b"correct horse", &parsed).is_ok());
        assert!(argon.verify_password(b"correct horsf", &parsed).is_err());
        assert_ne!(hash, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let a = new_token(SESSION_PREFIX);
        let b = new_token(SESSION_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with(SESSION_PREFIX) && a.len() == 4 + 64);
        assert_ne!(hash_token(&a), a);
        assert_eq!(hash_token(&a), hash_token(&a));
    }

    #[test]
    fn limiter_blocks_per_user_and_per_address() {
        let limiter = LoginLimiter::default();
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..PER_USER {
            assert_eq!(limiter.blocked("ann", Some(addr)), None);
            limiter.failed("ann", Some(addr));
        }
        assert!(limiter.blocked("ann", None).is_some());
        assert_eq!(limiter.blocked("bob", Some(addr)), None);

        for i in 0..PER_ADDRESS {
            limiter.failed(&format!("user{i}"), Some(addr));
        }
        assert!(limiter.blocked("carol", Some(addr)).is_some());
        assert_eq!(
            limiter.blocked("carol", Some("10.0.0.2".parse().unwrap())),
            None
        );
        limiter.succeeded("ann", None);
        assert_eq!(
            limiter.blocked("ann", Some("10.0.0.2".parse().unwrap())),
            None
        );
    }

    #[test]
    fn successful_logins_do_not_spend_the_address_budget() {
        let limiter = LoginLimiter::default();
        let ward_pc: IpAddr = "10.0.0.9".parse().unwrap();
        for i in 0..PER_ADDRESS * 3 {
            let user = format!("nurse{}", i % 4);
            assert_eq!(
                limiter.attempt(&user, Some(ward_pc)),
                None,
                "login {i} refused"
            );
            limiter.succeeded(&user, Some(ward_pc));
        }
        for i in 0..PER_ADDRESS {
            assert_eq!(limiter.attempt(&format!("guess{i}"), Some(ward_pc)), None);
        }
        assert!(
            limiter.attempt("nurse0", Some(ward_pc)).is_some(),
            "failures still count"
        );
    }
}
