//! The cryptography behind every TLS handshake at the device edge.
//!
//! A device connects with a full mutual-TLS handshake: per connection the edge signs once
//! (ECDSA P-256), verifies the device certificate, its CertificateVerify and the CRL signature
//! (three P-256 verifications) and computes one X25519 key agreement; these dominate the cost
//! of a reconnect storm. Measured here, aws-lc-rs made X25519 cheaper than ring did (about 7%
//! against 11% of the storm's CPU) and P-256 verification no faster.

use std::sync::{Arc, OnceLock};

use rustls::crypto::{aws_lc_rs, CryptoProvider, SupportedKxGroup};
use rustls::NamedGroup;

/// The provider of the device listener and its certificate verifier: aws-lc-rs, with X25519
/// offered and chosen first. X25519 is the cheapest group on both sides, and a server that
/// preferred a hybrid post-quantum group would pay for a larger key share and, with clients
/// that guessed X25519, a HelloRetryRequest round trip.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = aws_lc_rs::default_provider();
            provider.kx_groups = x25519_first(&provider.kx_groups);
            Arc::new(provider)
        })
        .clone()
}

fn x25519_first(groups: &[&'static dyn SupportedKxGroup]) -> Vec<&'static dyn SupportedKxGroup> {
    let is_x25519 = |g: &&&dyn SupportedKxGroup| g.name() == NamedGroup::X25519;
    let first = groups.iter().filter(is_x25519);
    let rest = groups.iter().filter(|g| !is_x25519(g));
    first.chain(rest).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x25519_is_the_first_group() {
        let groups: Vec<NamedGroup> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups.first(), Some(&NamedGroup::X25519));
        assert!(groups.contains(&NamedGroup::secp256r1));
    }

    #[test]
    fn x25519_moves_ahead_of_a_hybrid_group() {
        let groups = [
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
        ];
        let names: Vec<NamedGroup> = x25519_first(&groups).iter().map(|g| g.name()).collect();
        assert_eq!(names, [NamedGroup::X25519, NamedGroup::X25519MLKEM768]);
    }
}
