//! When a resume has failed, and when the next one may start (docs/controller.md#pause-and-wake).
//!
//! A resume ends `Ready`, or fails: its pod failed or went before it was Ready, or it was not
//! Ready within the pool's `startupTimeout` of its creation (a warm pod was Ready when bound, so
//! a warm pod that is not Ready now has failed too). A failed resume pauses the sandbox again;
//! the next one waits out a backoff that doubles with each failure in a row, so a sandbox whose
//! pods keep failing costs one pod at a time and at most one per backoff, never a storm.

use std::time::Duration;

/// The backoff after the first failed resume; it doubles with each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// The longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long a resume waits after `failures` failed resumes in a row (zero for none).
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = (failures - 1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF)
}

/// Kubernetes timestamps (`metav1.Time`, `creationTimestamp`) are rounded down to the second on
/// the wire; a deadline read from one counts from the end of its second, so it never fires early.
const SECOND_MS: u64 = 1_000;

/// How long a resume must still wait before it binds a pod: zero once the backoff since the last
/// failure (`resumeFailedAt`, as read back: whole seconds) has passed.
pub fn wait_before_binding(failures: u32, failed_at_ms: Option<u64>, now_ms: u64) -> Duration {
    let Some(at) = failed_at_ms else {
        return Duration::ZERO;
    };
    let wait = backoff(failures);
    let until = at
        .saturating_add(SECOND_MS)
        .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
    // Never longer than the backoff itself: a failure time ahead of this clock (another
    // replica's, skewed) must not hold a resume back for longer.
    Duration::from_millis(until.saturating_sub(now_ms)).min(wait)
}

/// Where a resume whose pod is alive stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The pod is Ready: the resume is done.
    Ready,
    /// Not Ready yet; look again after this long (the deadline), or when the pod changes.
    Starting(Duration),
    /// Not Ready within the startup timeout: the resume failed.
    TimedOut,
}

/// Judges a resume's live pod: Ready, still within `startup_timeout` of `created_ms`, or late.
pub fn progress(ready: bool, created_ms: u64, startup_timeout: Duration, now_ms: u64) -> Progress {
    if ready {
        return Progress::Ready;
    }
    let limit = u64::try_from(startup_timeout.as_millis()).unwrap_or(u64::MAX);
    let deadline = created_ms.saturating_add(SECOND_MS).saturating_add(limit);
    if now_ms >= deadline {
        Progress::TimedOut
    } else {
        Progress::Starting(Duration::from_millis(deadline - now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_five_seconds_up_to_five_minutes() {
        let secs: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [0, 5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF, "no overflow");
    }

    #[test]
    fn a_resume_waits_out_the_backoff_since_the_last_failure() {
        assert_eq!(wait_before_binding(0, None, 1_000), Duration::ZERO);
        assert_eq!(wait_before_binding(3, None, 1_000), Duration::ZERO);
        // Two failures: 10 s from the end of the last one's second.
        assert_eq!(
            wait_before_binding(2, Some(1_000), 4_000),
            Duration::from_millis(8_000)
        );
        assert_eq!(
            wait_before_binding(2, Some(1_000), 11_000),
            Duration::from_millis(1_000)
        );
        assert_eq!(wait_before_binding(2, Some(1_000), 12_000), Duration::ZERO);
        assert_eq!(wait_before_binding(2, Some(1_000), 99_000), Duration::ZERO);
        // A failure time in the future (clock skew between replicas) waits at most the backoff.
        assert_eq!(wait_before_binding(1, Some(10_000), 0), FIRST_BACKOFF);
        assert_eq!(wait_before_binding(1, Some(u64::MAX), 0), FIRST_BACKOFF);
    }

    #[test]
    fn a_pod_not_ready_by_the_startup_timeout_fails_the_resume() {
        let t = Duration::from_secs(60);
        assert_eq!(progress(true, 0, t, 1_000_000), Progress::Ready);
        // Created in the second starting at 10 s: the 60 s count from its end.
        assert_eq!(
            progress(false, 10_000, t, 30_000),
            Progress::Starting(Duration::from_secs(41))
        );
        assert_eq!(
            progress(false, 10_000, t, 70_000),
            Progress::Starting(Duration::from_secs(1))
        );
        assert_eq!(progress(false, 10_000, t, 71_000), Progress::TimedOut);
        assert_eq!(progress(false, 10_000, t, 71_001), Progress::TimedOut);
        // A pod created "in the future" (skew) is still starting, never late.
        assert!(matches!(
            progress(false, 100_000, t, 0),
            Progress::Starting(_)
        ));
    }
}
