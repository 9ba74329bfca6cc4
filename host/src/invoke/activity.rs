//! Recent activity per function, for the console's charts: invocations,
//! errors, throttles, cold starts, peak concurrency and duration
//! percentiles in 10-second periods over the last 30 minutes, and the last
//! invocations with what a reader needs to find their logs.
//!
//! Prometheus counters answer "how many since start"; a chart needs "how
//! many in each period", which a scrape-less server must keep itself. Only
//! periods with activity are kept, each with a duration histogram, and
//! periods older than the window are dropped whenever the function is
//! written or read: a function holds at most one window's periods (about
//! 80 KiB when every period was busy) and its last 50 invocations.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Length of one chart period.
pub const PERIOD_SECONDS: i64 = 10;
/// Periods kept: 30 minutes.
pub const PERIODS: usize = 180;
/// Invocations kept per function for the "recent" list.
const RECENT: usize = 50;

/// Histogram bounds: 10 µs × 2^(i/4), so each bucket is about 19 % wide,
/// up to about 45 minutes.
const HIST_BUCKETS: usize = 112;

fn bucket_of(micros: u64) -> usize {
    if micros <= 10 {
        return 0;
    }
    let i = ((micros as f64 / 10.0).log2() * 4.0).ceil() as usize;
    i.min(HIST_BUCKETS - 1)
}

fn upper_bound_ms(i: usize) -> f64 {
    0.01 * 2f64.powf(i as f64 / 4.0)
}

/// One finished invocation, as the data plane reports it.
#[derive(Debug, Clone)]
pub struct Finished<'a> {
    pub function: &'a str,
    pub version: &'a str,
    pub request_id: &'a str,
    pub log_stream: &'a str,
    pub duration: Duration,
    pub init: Option<Duration>,
    pub error: Option<&'a str>,
    /// Invocations of the function in flight when this one was admitted
    /// (itself included).
    pub concurrency: u32,
}

/// One invocation in the "recent" list.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Recent {
    pub request_id: String,
    /// Milliseconds since the Unix epoch, when it finished.
    pub timestamp: i64,
    pub version: String,
    pub duration_ms: f64,
    pub billed_ms: u64,
    pub error: Option<String>,
    pub cold_start: bool,
    pub init_duration_ms: Option<f64>,
    pub log_stream: String,
}

/// One period of a chart.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Period {
    /// Milliseconds since the Unix epoch.
    pub start: i64,
    pub invocations: u64,
    pub errors: u64,
    pub throttles: u64,
    pub cold_starts: u64,
    pub max_concurrency: u32,
    #[serde(rename = "P50Ms")]
    pub p50_ms: Option<f64>,
    #[serde(rename = "P90Ms")]
    pub p90_ms: Option<f64>,
    #[serde(rename = "P99Ms")]
    pub p99_ms: Option<f64>,
}

#[derive(Default, Clone)]
struct Bucket {
    /// Period number (seconds since the epoch / PERIOD_SECONDS).
    period: i64,
    invocations: u64,
    errors: u64,
    throttles: u64,
    cold_starts: u64,
    max_concurrency: u32,
    min_ms: f64,
    max_ms: f64,
    hist: Option<Box<[u32; HIST_BUCKETS]>>,
}

impl Bucket {
    fn percentile(&self, q: f64) -> Option<f64> {
        let hist = self.hist.as_ref()?;
        let total: u64 = hist.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &n) in hist.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                // The bucket's upper bound, within what was seen: exact for
                // a period of one invocation.
                return Some(upper_bound_ms(i).clamp(self.min_ms, self.max_ms));
            }
        }
        Some(self.max_ms)
    }
}

#[derive(Default)]
struct FunctionActivity {
    buckets: VecDeque<Bucket>,
    recent: VecDeque<Recent>,
}

impl FunctionActivity {
    fn bucket(&mut self, period: i64) -> &mut Bucket {
        self.prune(period);
        if self.buckets.back().is_none_or(|b| b.period < period) {
            self.buckets.push_back(Bucket {
                period,
                ..Bucket::default()
            });
        }
        // Clocks can step back: a late write lands in the newest period.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }

    fn prune(&mut self, now_period: i64) {
        while self
            .buckets
            .front()
            .is_some_and(|b| b.period <= now_period - PERIODS as i64)
        {
            self.buckets.pop_front();
        }
    }
}

/// Every function's recent activity.
#[derive(Default)]
pub struct Activity {
    functions: Mutex<HashMap<String, FunctionActivity>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

/// What the console shows of one function.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Report {
    pub period_seconds: i64,
    /// Oldest first, every period of the window, the current one last.
    pub buckets: Vec<Period>,
    /// Newest first.
    pub recent: Vec<Recent>,
}

fn now_ms() -> i64 {
    crate::store::queue::now_ms()
}

impl Activity {
    fn with<T>(&self, function: &str, f: impl FnOnce(&mut FunctionActivity) -> T) -> T {
        let mut map = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = map.get_mut(function) {
            return f(a);
        }
        f(map.entry(function.to_owned()).or_default())
    }

    /// Records a finished invocation.
    pub fn finished(&self, i: &Finished<'_>) {
        let now = now_ms();
        let ms = i.duration.as_secs_f64() * 1000.0;
        self.with(i.function, |a| {
            let b = a.bucket(now.div_euclid(1000 * PERIOD_SECONDS));
            if b.invocations == 0 {
                b.min_ms = ms;
                b.max_ms = ms;
            } else {
                b.min_ms = b.min_ms.min(ms);
                b.max_ms = b.max_ms.max(ms);
            }
            b.invocations += 1;
            b.errors += u64::from(i.error.is_some());
            b.cold_starts += u64::from(i.init.is_some());
            b.max_concurrency = b.max_concurrency.max(i.concurrency);
            let hist = b.hist.get_or_insert_with(|| Box::new([0; HIST_BUCKETS]));
            hist[bucket_of(i.duration.as_micros() as u64)] += 1;
            if a.recent.len() == RECENT {
                a.recent.pop_back();
            }
            a.recent.push_front(Recent {
                request_id: i.request_id.to_owned(),
                timestamp: now,
                version: i.version.to_owned(),
                duration_ms: (ms * 100.0).round() / 100.0,
                billed_ms: ms.ceil().max(1.0) as u64,
                error: i.error.map(str::to_owned),
                cold_start: i.init.is_some(),
                init_duration_ms: i
                    .init
                    .map(|d| (d.as_secs_f64() * 100_000.0).round() / 100.0),
                log_stream: i.log_stream.to_owned(),
            });
        });
    }

    /// Records a throttled invocation.
    pub fn throttled(&self, function: &str) {
        let period = now_ms().div_euclid(1000 * PERIOD_SECONDS);
        self.with(function, |a| a.bucket(period).throttles += 1);
    }

    /// Forgets a deleted function.
    pub fn remove(&self, function: &str) {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(function);
    }

    /// The window as the console charts it.
    pub fn report(&self, function: &str) -> Report {
        let now_period = now_ms().div_euclid(1000 * PERIOD_SECONDS);
        let first = now_period - PERIODS as i64 + 1;
        // Copied out under the lock, ranked after it: invocations take the
        // same lock.
        let (kept, recent): (Vec<Bucket>, Vec<Recent>) = {
            let mut map = self.functions.lock().unwrap_or_else(|e| e.into_inner());
            match map.get_mut(function) {
                Some(a) => {
                    a.prune(now_period);
                    (
                        a.buckets.iter().cloned().collect(),
                        a.recent.iter().cloned().collect(),
                    )
                }
                None => (Vec::new(), Vec::new()),
            }
        };
        let mut kept = kept.into_iter().peekable();
        let mut buckets = Vec::with_capacity(PERIODS);
        for period in first..=now_period {
            let mut out = Period {
                start: period * PERIOD_SECONDS * 1000,
                invocations: 0,
                errors: 0,
                throttles: 0,
                cold_starts: 0,
                max_concurrency: 0,
                p50_ms: None,
                p90_ms: None,
                p99_ms: None,
            };
            while kept.peek().is_some_and(|b| b.period < period) {
                kept.next();
            }
            if let Some(b) = kept.peek().filter(|b| b.period == period) {
                out.invocations = b.invocations;
                out.errors = b.errors;
                out.throttles = b.throttles;
                out.cold_starts = b.cold_starts;
                out.max_concurrency = b.max_concurrency;
                out.p50_ms = b.percentile(0.50);
                out.p90_ms = b.percentile(0.90);
                out.p99_ms = b.percentile(0.99);
            }
            buckets.push(out);
        }
        Report {
            period_seconds: PERIOD_SECONDS,
            buckets,
            recent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(ms: u64, error: bool, concurrency: u32) -> Finished<'static> {
        Finished {
            function: "f",
            version: "$LATEST",
            request_id: "r",
            log_stream: "s",
            duration: Duration::from_millis(ms),
            init: None,
            error: error.then_some("Unhandled"),
            concurrency,
        }
    }

    #[test]
    fn a_period_counts_and_ranks_what_it_saw() {
        let a = Activity::default();
        for ms in 1..=100 {
            a.finished(&finished(ms, ms % 10 == 0, (ms % 7) as u32));
        }
        a.throttled("f");
        let r = a.report("f");
        assert_eq!(r.buckets.len(), PERIODS);
        // The run may straddle a period boundary: sum the last two.
        let tail = &r.buckets[PERIODS - 2..];
        assert_eq!(tail.iter().map(|b| b.invocations).sum::<u64>(), 100);
        assert_eq!(tail.iter().map(|b| b.errors).sum::<u64>(), 10);
        assert_eq!(tail.iter().map(|b| b.throttles).sum::<u64>(), 1);
        let b = tail.iter().max_by_key(|b| b.invocations).unwrap();
        if b.invocations == 100 {
            assert_eq!(b.max_concurrency, 6);
            let p50 = b.p50_ms.unwrap();
            assert!((45.0..=60.0).contains(&p50), "{p50}");
            let p99 = b.p99_ms.unwrap();
            assert!((95.0..=100.0).contains(&p99), "{p99}");
        }
        assert_eq!(r.recent.len(), RECENT);
        assert_eq!(r.recent[0].duration_ms, 100.0);
        assert!(r.buckets[..PERIODS - 2].iter().all(|b| b.invocations == 0));
    }

    #[test]
    fn one_invocation_is_its_own_percentile() {
        let a = Activity::default();
        a.finished(&finished(7, false, 1));
        let r = a.report("f");
        let b = r.buckets.iter().find(|b| b.invocations == 1).unwrap();
        assert_eq!(b.p50_ms, Some(7.0));
        assert_eq!(b.p99_ms, Some(7.0));
        assert!(a.report("other").recent.is_empty());
    }

    #[test]
    fn histogram_buckets_are_ordered_and_bounded() {
        assert_eq!(bucket_of(0), 0);
        assert!(bucket_of(1_000) < bucket_of(1_200));
        assert_eq!(bucket_of(u64::MAX), HIST_BUCKETS - 1);
        let ms = 3.3;
        assert!(upper_bound_ms(bucket_of((ms * 1000.0) as u64)) >= ms);
    }
}
