//! Verifying Core's calls: RS256 JWTs signed with the provider's key pair.
//!
//! Core signs every call to a provider, and the handshake of its WebSockets, with the private
//! half of the RSA key pair it made for that provider; the provider holds the public half
//! (`publicKey`, base64 DER SubjectPublicKeyInfo). A call is Core's when the signature checks
//! out, `iss` is `cloud.sdu.dk`, `exp` has not passed (one minute of leeway for clock skew),
//! and the subject is Core itself: `sub` `_UCloud` with `role` `SERVICE`. `aud` is not checked,
//! as Core's own provider does not check it either.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The issuer Core writes into its tokens.
pub const ISSUER: &str = "cloud.sdu.dk";
/// The subject and role of tokens Core mints for its own calls to providers.
const CORE_SUBJECT: &str = "_UCloud";
const CORE_ROLE: &str = "SERVICE";
/// Allowed clock skew between Core and this host.
const LEEWAY_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the configured UCloud public key is not base64 DER of an RSA public key")]
    BadKey,
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token is not Core's own (sub {sub:?}, role {role:?})")]
    NotCore { sub: String, role: String },
}

/// The claims vmhost reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    role: String,
}

/// Checks bearer tokens against the provider's public key.
pub struct CoreVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for CoreVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreVerifier").finish_non_exhaustive()
    }
}

impl CoreVerifier {
    /// `public_key` as Core hands it out: base64 of the DER SubjectPublicKeyInfo, without PEM
    /// armour (PEM armour is accepted too).
    pub fn new(public_key: &str) -> Result<CoreVerifier, AuthError> {
        let body: String = public_key
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect::<String>()
            .split_whitespace()
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(&body)
            .map_err(|_| AuthError::BadKey)?;
        let wrapped: String = body
            .as_bytes()
            .chunks(64)
            .map(|line| format!("{}\n", String::from_utf8_lossy(line)))
            .collect();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{wrapped}-----END PUBLIC KEY-----\n");
        let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| AuthError::BadKey)?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.validate_aud = false;
        validation.leeway = LEEWAY_SECS;
        Ok(CoreVerifier { key, validation })
    }

    /// Accepts `Authorization` header values of Core's own calls.
    pub fn verify_header(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        self.verify(token)
    }

    /// Accepts a token of Core's own calls.
    pub fn verify(&self, token: &str) -> Result<(), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let Claims { sub, role } = data.claims;
        if sub != CORE_SUBJECT || role != CORE_ROLE {
            return Err(AuthError::NotCore { sub, role });
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
