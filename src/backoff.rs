//! Retrying with exponential backoff and jitter: the one schedule every
//! retry loop uses (cluster links, joins, reconnects).

use std::time::Duration;

/// A value in [0, 1) for jitter, from the system's random source (0.5
/// without one: retrying unjittered is still correct).
pub fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::fill(&mut b) {
        Ok(()) => f64::from(u32::from_be_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

/// The delay after `failures` earlier failures: doubling from `min` up to
/// `max`, then `jitter` in [0, 1) spreads it over the upper half, so that
/// nodes which failed together do not retry together.
pub fn delay(min: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let ceiling = min
        .saturating_mul(1u32 << failures.min(20))
        .min(max.max(min));
    let half = ceiling / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// A backoff that counts its own failures.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The delay after one more failure (see [`delay`]).
    pub fn next(&mut self, jitter: f64) -> Duration {
        let d = delay(self.min, self.max, self.failures, jitter);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Start over after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let full: Vec<Duration> = (0..8).map(|_| b.next(0.999_999)).collect();
        assert!(full.windows(2).all(|w| w[0] <= w[1]), "{full:?}");
        assert!(full.iter().all(|d| *d < Duration::from_secs(2)));
        assert!(full[7] > Duration::from_millis(1900));
        // The low end of the jitter is half the step.
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(b.next(0.0), Duration::from_millis(50));
        b.next(0.0);
        b.reset();
        assert_eq!(b.next(0.0), Duration::from_millis(50));
    }
}
