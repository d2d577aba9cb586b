//! Token buckets per key (client IP, API key): `rate` tokens a second, at most `rate`
//! saved up, so a key gets a burst of up to one second's worth and then the steady rate
//! ([`Buckets::new`]); or `n` tokens per period, all at once if it likes
//! ([`Buckets::per`]).

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Keys not seen for this long are forgotten (their bucket would be full again anyway).
const IDLE: Duration = Duration::from_secs(10);
/// Forget idle keys when the map grows past this many since the last sweep.
const SWEEP_AT: usize = 1024;

/// Token buckets keyed by `K`, for one owner (see [`SharedBuckets`] for many).
#[derive(Debug)]
pub struct Buckets<K> {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens saved up.
    capacity: f64,
    /// A key idle this long has a full bucket again: it is forgotten.
    idle: Duration,
    buckets: HashMap<K, Bucket>,
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq> Buckets<K> {
    /// Buckets allowing `rate` per second per key; `rate` 0 allows everything.
    pub fn new(rate: u32) -> Self {
        Self::per(rate, Duration::from_secs(1))
    }

    /// Buckets of `capacity` tokens per key, refilled over `period`; 0 allows
    /// everything.
    pub fn per(capacity: u32, period: Duration) -> Self {
        let capacity = f64::from(capacity);
        let secs = period.as_secs_f64().max(1e-3);
        Self {
            rate: capacity / secs,
            capacity,
            idle: IDLE.max(period),
            buckets: HashMap::new(),
            sweep_at: SWEEP_AT,
        }
    }

    /// Whether the limit is on.
    pub fn enabled(&self) -> bool {
        self.capacity > 0.0
    }

    /// Takes `cost` tokens from `key`'s bucket at `now`; false (and nothing taken) when
    /// it holds fewer. A cost above the bucket's size never passes.
    pub fn take(&mut self, key: K, cost: u32, now: Instant) -> bool {
        if !self.enabled() {
            return true;
        }
        if self.buckets.len() >= self.sweep_at {
            let idle = self.idle;
            self.buckets.retain(|_, b| now.saturating_duration_since(b.at) < idle);
            self.sweep_at = (self.buckets.len() * 2).max(SWEEP_AT);
        }
        let (rate, capacity) = (self.rate, self.capacity);
        let b = self.buckets.entry(key).or_insert(Bucket { tokens: capacity, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(capacity);
        b.at = now;
        let cost = f64::from(cost);
        if b.tokens >= cost {
            b.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// [`Buckets`] behind a mutex, for handlers running on many tasks.
#[derive(Debug)]
pub struct SharedBuckets<K> {
    enabled: bool,
    buckets: Mutex<Buckets<K>>,
}

impl<K: Hash + Eq> SharedBuckets<K> {
    /// See [`Buckets::new`].
    pub fn new(rate: u32) -> Self {
        Self { enabled: rate > 0, buckets: Mutex::new(Buckets::new(rate)) }
    }

    /// See [`Buckets::per`].
    pub fn per(capacity: u32, period: Duration) -> Self {
        Self { enabled: capacity > 0, buckets: Mutex::new(Buckets::per(capacity, period)) }
    }

    /// See [`Buckets::take`]; uses the current time. No lock is taken when the limit is off.
    pub fn take(&self, key: K, cost: u32) -> bool {
        if !self.enabled {
            return true;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        b.take(key, cost, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_one_second_then_the_rate() {
        let mut b = Buckets::new(5);
        let t0 = Instant::now();
        assert_eq!((0..10).filter(|_| b.take("a", 1, t0)).count(), 5, "burst of `rate`");
        assert!(!b.take("a", 1, t0 + Duration::from_millis(100)), "0.5 token after 100 ms");
        assert!(b.take("a", 1, t0 + Duration::from_millis(200)), "1 token after 200 ms");
        assert!(b.take("b", 1, t0), "keys are independent");
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take("a", 1, later)).count(), 5, "refills to `rate`, no more");
    }

    #[test]
    fn cost_above_the_bucket_never_passes_and_takes_nothing() {
        let mut b = Buckets::new(3);
        let t0 = Instant::now();
        assert!(!b.take(1, 4, t0));
        assert!(b.take(1, 3, t0), "the failed take left the tokens");
    }

    #[test]
    fn a_bucket_per_period_takes_all_at_once_and_refills_over_the_period() {
        let mut b = Buckets::per(10, Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(b.take("ip", 10, t0), "the whole capacity at once");
        assert!(!b.take("ip", 1, t0 + Duration::from_secs(2)), "a third of a token after 2 s");
        assert!(b.take("ip", 1, t0 + Duration::from_secs(3)), "one token per 3 s");
        assert!(b.take("ip", 9, t0 + Duration::from_secs(30)), "refilled over the period, no more");
    }

    #[test]
    fn zero_rate_is_off() {
        let mut b = Buckets::new(0);
        let t0 = Instant::now();
        assert!((0..1000).all(|_| b.take(1, 1, t0)));
        assert!(b.is_empty(), "nothing tracked when off");
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let mut b = Buckets::new(1);
        let t0 = Instant::now();
        for k in 0..SWEEP_AT as u32 {
            b.take(k, 1, t0);
        }
        assert_eq!(b.len(), SWEEP_AT);
        b.take(u32::MAX, 1, t0 + IDLE + Duration::from_secs(1));
        assert_eq!(b.len(), 1, "old keys swept");
    }
}
