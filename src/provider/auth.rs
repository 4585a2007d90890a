//! Verifying Core's calls: RS256 JWTs signed with the provider's key pair.
