//! File descriptors: the resource that bounds how many devices one process can hold.
//!
//! The engine runs in the same process as the edge, so every device connection costs three
//! descriptors: the device's socket, and both ends of its loopback link to the engine. A
//! process that runs out does not fail gracefully: the engine's accept loop retries EMFILE
//! without pause, and new devices fail after paying for a full handshake. So the edge raises
//! its soft limit as far as the hard limit allows and admits only what fits.

use tracing::warn;

/// Descriptors one device connection costs this process.
pub(crate) const PER_CONNECTION: u64 = 3;

/// Descriptors kept for everything else in the process: listeners, the database, the data
/// files, and the dashboard's HTTP clients (1,000 live streams are a target). A quarter of the
/// limit when that is less, so that a small limit still admits devices.
pub(crate) const RESERVED: u64 = 2_048;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force after.
pub(crate) fn raise_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one plain struct owned here.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u64::MAX;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one plain struct; on failure the old limit stays in force.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
        warn!(
            soft = limit.rlim_cur,
            hard = limit.rlim_max,
            "could not raise the open file limit"
        );
    }
    limit.rlim_cur
}

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

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let soft = raise_limit();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
