//! How long a reader or writer may keep the event loop busy before it must yield.
//!
//! While data keeps coming, a non-blocking read never says "would block", so a loop of `get()`
//! calls would never give the gevent hub a turn. The budget measures the time spent since the
//! caller last waited, and asks for a yield once a slice is used up.
//!
//! The caller may also wait elsewhere between two calls (on another handle, a queue, a
//! sleep), which this budget cannot see. So a call that begins more than a slice after the
//! previous one began starts a fresh slice: otherwise a handle used once in a while would
//! find its slice long expired on every call and yield each time, delaying every message by
//! a turn of the event loop. The cost is one look at the clock per call; the price in the
//! worst case (a long call, then a pause, then more work) is a stall of two slices, not one.

use std::time::{Duration, Instant};

/// The default slice: a tenth of the 5 ms stall we promise, so decoding that happens between
/// two checks still leaves a wide margin.
pub const DEFAULT_SLICE: Duration = Duration::from_micros(500);

/// Work units between two looks at the clock: a system call is worth a full look, a message
/// served from the buffer 1/32 of one (reading the clock costs about as much as serving one).
pub const SYSCALL_WEIGHT: u32 = 32;
pub const BUFFERED_WEIGHT: u32 = 1;

#[derive(Debug)]
pub struct Budget {
    slice: Option<Duration>,
    since: Option<Instant>,
    pending_weight: u32,
    last_call: Option<Instant>,
}

impl Budget {
    /// `None` never asks for a yield (for tests and for callers that yield on their own).
    pub fn new(slice: Option<Duration>) -> Self {
        Budget {
            slice,
            since: None,
            pending_weight: 0,
            last_call: None,
        }
    }

    /// Called as each call of the caller's begins: after a pause of more than a slice since
    /// the previous call began, the slice starts over.
    pub fn begin_call(&mut self) {
        let Some(slice) = self.slice else {
            return;
        };
        let now = Instant::now();
        if let Some(previous) = self.last_call {
            if now.duration_since(previous) > slice {
                self.reset();
            }
        }
        self.last_call = Some(now);
    }

    /// The caller has just waited (or yielded): a new slice starts with the next piece of work.
    pub fn reset(&mut self) {
        self.since = None;
        self.pending_weight = 0;
    }

    /// Accounts for one piece of work and tells whether the slice is used up. When it is, the
    /// budget starts over, so exactly one yield is asked for per slice.
    pub fn spend(&mut self, weight: u32) -> bool {
        let Some(slice) = self.slice else {
            return false;
        };
        let Some(since) = self.since else {
            self.since = Some(Instant::now());
            return false;
        };
        self.pending_weight += weight;
        if self.pending_weight < SYSCALL_WEIGHT {
            return false;
        }
        self.pending_weight = 0;
        if since.elapsed() >= slice {
            self.reset();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_budget_never_yields() {
        let mut budget = Budget::new(None);
        assert!((0..10_000).all(|_| !budget.spend(SYSCALL_WEIGHT)));
    }

    #[test]
    fn exhausted_slice_asks_for_one_yield_then_starts_over() {
        let mut budget = Budget::new(Some(Duration::from_millis(1)));
        assert!(!budget.spend(SYSCALL_WEIGHT));
        std::thread::sleep(Duration::from_millis(2));
        assert!(budget.spend(SYSCALL_WEIGHT));
        // A fresh slice: the next piece of work only starts the clock.
        assert!(!budget.spend(SYSCALL_WEIGHT));
    }

    #[test]
    fn cheap_work_looks_at_the_clock_only_now_and_then() {
        let mut budget = Budget::new(Some(Duration::ZERO));
        assert!(!budget.spend(BUFFERED_WEIGHT));
        let asked = (0..SYSCALL_WEIGHT)
            .map(|_| budget.spend(BUFFERED_WEIGHT))
            .filter(|&y| y)
            .count();
        assert_eq!(asked, 1);
    }

    #[test]
    fn a_call_after_a_pause_starts_a_fresh_slice() {
        let mut budget = Budget::new(Some(Duration::from_millis(1)));
        budget.begin_call();
        budget.spend(SYSCALL_WEIGHT);
        std::thread::sleep(Duration::from_millis(3));
        budget.begin_call();
        assert!(
            !budget.spend(SYSCALL_WEIGHT),
            "the pause was not this budget's work"
        );
        assert!(!budget.spend(SYSCALL_WEIGHT));
    }

    #[test]
    fn calls_in_quick_succession_share_one_slice() {
        let slice = Duration::from_millis(2);
        let mut budget = Budget::new(Some(slice));
        let start = Instant::now();
        let mut yielded = false;
        while !yielded && start.elapsed() < slice * 10 {
            budget.begin_call();
            yielded = budget.spend(SYSCALL_WEIGHT);
        }
        assert!(
            yielded,
            "many short calls in a row must still be asked to yield"
        );
        assert!(start.elapsed() >= slice);
    }

    #[test]
    fn reset_restarts_the_slice() {
        let mut budget = Budget::new(Some(Duration::from_millis(1)));
        budget.spend(SYSCALL_WEIGHT);
        std::thread::sleep(Duration::from_millis(2));
        budget.reset();
        assert!(!budget.spend(SYSCALL_WEIGHT));
        assert!(!budget.spend(SYSCALL_WEIGHT));
    }
}
