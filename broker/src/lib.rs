//! The device edge: the one door every device comes through.
//!
//! telemon terminates mutual TLS itself (tokio-rustls), takes the device identity from the
//! client certificate, enforces connection limits and per-identity topic ACLs on every
//! CONNECT, PUBLISH and SUBSCRIBE, and only then forwards packets to the embedded rumqttd
//! engine, which does routing, QoS, sessions and retained messages. The engine listens on
//! loopback only and accepts nobody without a per-process secret, so it is not reachable
//! without passing the edge.
//!
//! - [`pki`]: development CA, device certificates, revocation list.
//! - [`crypto`]: the TLS crypto provider of the device listener.
//! - [`acl`]: Mosquitto-style ACL file.
//! - [`edge`]: the TLS listener, limits and the per-connection packet filter.
//! - [`engine`]: the embedded rumqttd and its configuration.

pub mod acl;
pub mod crypto;
pub mod edge;
pub mod engine;
pub mod pki;
