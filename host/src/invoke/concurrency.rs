//! Concurrency control, as Lambda does it: an account limit on invocations
//! in flight, reserved concurrency that both guarantees and caps a
//! function's share, and the unreserved rest shared by every function
//! without a reservation. An invocation over its limit is refused at once
//! (never queued silently), with Lambda's `Reason`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why an invocation was throttled.
pub const RESERVED_LIMIT: &str = "ReservedFunctionConcurrentInvocationLimitExceeded";
/// Why an invocation was throttled.
pub const ACCOUNT_LIMIT: &str = "ConcurrentInvocationLimitExceeded";

#[derive(Debug, Default)]
struct State {
    reserved: HashMap<String, u32>,
    reserved_total: u32,
    in_flight: HashMap<String, u32>,
    unreserved_in_flight: u32,
}

/// Counts invocations in flight against the limits.
#[derive(Debug)]
pub(super) struct Governor {
    account_limit: u32,
    state: Mutex<State>,
}

/// One invocation's place in the limits; released when dropped.
#[derive(Debug)]
pub(super) struct Slot {
    governor: Arc<Governor>,
    function: String,
    unreserved: bool,
    /// The function's invocations in flight once this one was admitted
    /// (itself included).
    pub(super) in_flight: u32,
}

impl Governor {
    pub(super) fn new(account_limit: u32) -> Arc<Self> {
        Arc::new(Self {
            account_limit,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets or clears a function's reserved concurrency.
    pub(super) fn set_reserved(&self, function: &str, reserved: Option<u32>) {
        let mut s = self.lock();
        match reserved {
            Some(n) => s.reserved.insert(function.to_owned(), n),
            None => s.reserved.remove(function),
        };
        s.reserved_total = s.reserved.values().sum();
    }

    /// Takes a place for one invocation of `function`, or says why not.
    pub(super) fn acquire(self: &Arc<Self>, function: &str) -> Result<Slot, &'static str> {
        let mut s = self.lock();
        let in_flight = s.in_flight.get(function).copied().unwrap_or(0);
        let unreserved = match s.reserved.get(function) {
            Some(&limit) => {
                if in_flight >= limit {
                    return Err(RESERVED_LIMIT);
                }
                false
            }
            None => {
                let capacity = self.account_limit.saturating_sub(s.reserved_total);
                if s.unreserved_in_flight >= capacity {
                    return Err(ACCOUNT_LIMIT);
                }
                s.unreserved_in_flight += 1;
                true
            }
        };
        let count = s.in_flight.entry(function.to_owned()).or_insert(0);
        *count += 1;
        Ok(Slot {
            governor: self.clone(),
            function: function.to_owned(),
            unreserved,
            in_flight: *count,
        })
    }

    /// Invocations in flight for `function`.
    pub(super) fn in_flight(&self, function: &str) -> u32 {
        self.lock().in_flight.get(function).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.governor.lock();
        if self.unreserved {
            s.unreserved_in_flight = s.unreserved_in_flight.saturating_sub(1);
        }
        if let Some(n) = s.in_flight.get_mut(&self.function) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.function);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_concurrency_caps_the_function() {
        let g = Governor::new(10);
        g.set_reserved("f", Some(1));
        let first = g.acquire("f").unwrap();
        assert_eq!(g.acquire("f").unwrap_err(), RESERVED_LIMIT);
        drop(first);
        assert!(g.acquire("f").is_ok());
        g.set_reserved("z", Some(0));
        assert_eq!(g.acquire("z").unwrap_err(), RESERVED_LIMIT);
    }

    #[test]
    fn unreserved_functions_share_what_is_left() {
        let g = Governor::new(5);
        g.set_reserved("big", Some(3));
        let a = g.acquire("a").unwrap();
        let b = g.acquire("b").unwrap();
        assert_eq!(g.acquire("c").unwrap_err(), ACCOUNT_LIMIT);
        // The reservation is the reserved function's own.
        let _r: Vec<Slot> = (0..3).map(|_| g.acquire("big").unwrap()).collect();
        drop(a);
        let _c = g.acquire("c").unwrap();
        assert_eq!(g.in_flight("big"), 3);
        drop(b);
        assert_eq!(g.in_flight("b"), 0);
    }

    #[test]
    fn a_reservation_set_mid_flight_releases_correctly() {
        let g = Governor::new(2);
        let a = g.acquire("f").unwrap();
        g.set_reserved("f", Some(5));
        drop(a);
        let s = g.lock();
        assert_eq!(s.unreserved_in_flight, 0);
        assert!(s.in_flight.is_empty());
    }
}
