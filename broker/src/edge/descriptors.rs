//! File descriptors: the resource that bounds how many devices one process can hold.
//!
//! The engine runs in the same process as the edge, so every device connection costs three
//! descriptors: the device's socket, and both ends of its loopback link to the engine. A
//! process that runs out does not fail gracefully: the engine's accept loop retries EMFILE
//! without pause, and new devices fail after paying for a full handshake. So the edge raises
//! its soft limit as far as the hard limit allows and admits only what fits.

/// Descriptors one device connection costs this process.
pub(crate) const PER_CONNECTION: u64 = 3;

/// Descriptors kept for everything else in the process: listeners, the database, the data
/// files, and the dashboard's HTTP clients (1,000 live streams are a target). A quarter of the
/// limit when that is less, so that a small limit still admits devices.
pub(crate) const RESERVED: u64 = 2_048;

/// Device connections that fit in a process allowed `limit` descriptors.
pub(crate) fn connections_within(limit: u64) -> usize {
    let fit = (limit - RESERVED.min(limit / 4)) / PER_CONNECTION;
    usize::try_from(fit).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_descriptors_per_device_after_the_reserve() {
        assert_eq!(connections_within(20_000), (20_000 - 2_048) / 3);
        assert_eq!(connections_within(1_024), (1_024 - 256) / 3);
        assert!(connections_within(1 << 20) > 300_000);
    }
}
