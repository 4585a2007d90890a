//! The verifier's refusals that need no key pair; tests/provider_api.rs signs real tokens.

use super::*;

/// A well-formed RSA-2048 SubjectPublicKeyInfo, base64 as Core hands it out.
const PUBLIC_KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW/VDL5AaWTg0nLVkjRo9z+40RQzuVaE8AkAFmxZzow3x+VJYKdjykkJ0iT9wCS0DRTXu269V264Vf/3jvredZiKRkgwlL9xNAwxXFg0x/XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC+9aGVd+Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmwIDAQAB";

#[test]
fn a_key_that_is_not_rsa_der_is_refused() {
    assert!(matches!(
        CoreVerifier::new("not base64!"),
        Err(AuthError::BadKey)
    ));
    assert!(matches!(
        CoreVerifier::new("aGVsbG8="),
        Err(AuthError::BadKey)
    ));
}

#[test]
fn core_s_key_is_read_bare_or_armoured() {
    CoreVerifier::new(PUBLIC_KEY).expect("bare base64");
    let armoured = format!("-----BEGIN PUBLIC KEY-----\n{PUBLIC_KEY}\n-----END PUBLIC KEY-----\n");
    CoreVerifier::new(&armoured).expect("PEM");
}

#[test]
fn a_missing_or_malformed_bearer_is_refused() {
    let verifier = CoreVerifier::new(PUBLIC_KEY).expect("key");
    for header in [None, Some(""), Some("Bearer "), Some("Basic abc")] {
        assert!(
            matches!(verifier.verify_header(header), Err(AuthError::Missing)),
            "{header:?}"
        );
    }
    for token in ["abc", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.e30.AAAA"] {
        assert!(
            matches!(verifier.verify(token), Err(AuthError::Invalid(_))),
            "{token}"
        );
    }
}
