//! How many listening sockets the forwarder may hold.
//!
//! Every listener is a descriptor, and so is every relayed connection (two sockets, and two
//! pipes when splicing) and every pipe to a child such as `nft`. Thirty thousand Services
//! would take all of a 20,000-descriptor limit in listeners alone, and then the redirect
//! rules could not be written for any Service. So listeners draw on a budget that leaves a
//! reserve for connections and children: past it, the Service's listener is refused with an
//! error naming it (and counted), and everything already open keeps working.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Descriptors kept out of the listeners' reach: a quarter of the limit, at least this many.
const RESERVE_MIN: usize = 512;

#[derive(Debug)]
pub struct Budget {
    /// `None`: the process's open-file limit less the reserve, read at each opening (the
    /// daemon may raise the limit after start). The limit is the process's, so the
    /// forwarders of both IP families share one such budget.
    fixed: Option<usize>,
    open: AtomicUsize,
}

/// A listener's claim on the budget, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Budget>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The open-file limit (soft), or `None` if it cannot be read or is unlimited.
fn open_file_limit() -> Option<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`, which lives across the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur as usize)
}

/// Listeners allowed under an open-file limit of `limit`.
pub fn listeners_under(limit: usize) -> usize {
    limit.saturating_sub(RESERVE_MIN.max(limit / 4))
}

impl Budget {
    /// The process-wide budget, from the open-file limit.
    pub fn process() -> Arc<Budget> {
        static PROCESS: OnceLock<Arc<Budget>> = OnceLock::new();
        PROCESS
            .get_or_init(|| {
                Arc::new(Budget {
                    fixed: None,
                    open: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// A budget of its own, of `n` listeners (`max_listeners`).
    pub fn fixed(n: usize) -> Arc<Budget> {
        Arc::new(Budget {
            fixed: Some(n),
            open: AtomicUsize::new(0),
        })
    }

    pub fn limit(&self) -> usize {
        self.fixed
            .unwrap_or_else(|| open_file_limit().map_or(usize::MAX, listeners_under))
    }

    /// Claim one listener's slot, or say why not.
    pub fn claim(self: &Arc<Self>) -> Result<Slot, String> {
        let limit = self.limit();
        let taken = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(Slot(self.clone())),
            Err(n) => Err(match self.fixed {
                Some(_) => format!("{n} listeners open, the most allowed (max_listeners)"),
                None => format!(
                    "{n} listeners open, the most the open-file limit allows ({} descriptors; \
                     a quarter is kept for connections): raise the limit (ulimit -n, LimitNOFILE)",
                    open_file_limit().unwrap_or(0)
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_given_back_and_the_limit_holds() {
        let b = Budget::fixed(2);
        let one = b.claim().unwrap();
        let _two = b.claim().unwrap();
        let refused = b.claim().unwrap_err();
        assert!(refused.contains("2 listeners open"), "{refused}");
        drop(one);
        assert!(b.claim().is_ok());
    }

    #[test]
    fn a_reserve_is_kept_under_any_limit() {
        assert_eq!(listeners_under(20_000), 15_000);
        assert_eq!(listeners_under(1024), 512);
        assert_eq!(listeners_under(100), 0);
        assert_eq!(listeners_under(1 << 20), 3 << 18);
    }
}
