//! The process's open-file limit, which bounds how many connections it can hold: devices at
//! the edge and HTTP clients at the API share it.

use tracing::warn;

/// The soft and hard RLIMIT_NOFILE, or `None` where they cannot be read.
pub fn open_files() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one plain struct owned here.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (got == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft limit to the hard limit; returns the soft limit in force after (`u64::MAX`
/// where it cannot be read). Raising it is always allowed, and the default soft limit (1,024
/// on most systems) is far below what a broker holding thousands of devices needs.
pub fn raise_open_files() -> u64 {
    let Some((soft, hard)) = open_files() else {
        return u64::MAX;
    };
    if soft < hard {
        let raised = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one plain struct; on failure the old limit stays in force.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return hard;
        }
        warn!(soft, hard, "could not raise the open file limit");
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let soft = raise_open_files();
        let (now_soft, hard) = open_files().expect("the limit is readable");
        assert_eq!((soft, now_soft), (hard, hard));
    }
}
