//! How long a reader or writer may keep the event loop busy before it must yield.
//!
//! While data keeps coming, a non-blocking read never says "would block", so a loop of `get()`
//! calls would never give the gevent hub a turn. The budget adds up the time the caller
//! spends in our calls since it last waited, and asks for a yield once a slice is used up.
//!
//! What counts: the time inside each call, and the gaps between calls that are shorter than
//! [`PAUSE`] (a caller in a tight loop around us: the loop is stalled all along). A longer
//! gap is the caller's own business, and may well include a wait elsewhere (on another
//! handle, a queue, a sleep) that this budget cannot see: it is not counted. Without that
//! rule a handle used now and then (the pool's task writer, a reply writer) found its slice
//! expired on every call, and each message waited a turn of the event loop before it went
//! out. The cost is one look at the clock per call that makes no system call (a message
//! served from the read buffer, a small message written in one go): its start stands for
//! its end (see [`Budget::end_call`]); two for the others.

use std::time::Duration;

/// The default slice: a tenth of the 5 ms stall we promise, so decoding that happens between
/// two checks still leaves a wide margin.
pub const DEFAULT_SLICE: Duration = Duration::from_micros(500);

/// Gaps between two calls up to this long count as our time (see the module docs).
pub const PAUSE: Duration = Duration::from_micros(50);

/// Work units between two looks at the clock: a system call is worth a full look, a message
/// served from the buffer 1/32 of one (reading the clock costs about as much as serving one).
pub const SYSCALL_WEIGHT: u32 = 32;
pub const BUFFERED_WEIGHT: u32 = 1;

/// The monotonic clock in nanoseconds. `Instant` reads the same clock, but its arithmetic
/// (checked, in seconds and nanoseconds) cost more than the read itself: ~100 of the ~3,400
/// instructions of a 100-byte `put` and `get` (callgrind, `benches/per_message.py`).
/// Plain integers do it in one instruction; 2^64 ns are 584 years of uptime.
pub(crate) fn now_ns() -> u64 {
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists, so the
    // call cannot fail (and a zeroed `ts` would only make one slice look short).
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        ts
    };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

fn as_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug)]
pub struct Budget {
    /// The slice, in nanoseconds.
    slice: Option<u64>,
    /// Time counted in this slice before `counting_since` (ns).
    spent: u64,
    /// Start of the stretch being counted now (inside a call), if any (`now_ns`).
    counting_since: Option<u64>,
    pending_weight: u32,
    /// When the previous call ended, unless the caller has waited or yielded since.
    last_end: Option<u64>,
    /// No work done yet in this slice.
    fresh_slice: bool,
    /// The current call accounted for a system call, or for enough buffered work to look
    /// at the clock: not a light call (see [`Budget::end_call`]).
    heavy_call: bool,
}

impl Budget {
    /// `None` never asks for a yield (for tests and for callers that yield on their own).
    pub fn new(slice: Option<Duration>) -> Self {
        Budget {
            slice: slice.map(as_ns),
            spent: 0,
            counting_since: None,
            pending_weight: 0,
            last_end: None,
            fresh_slice: true,
            heavy_call: false,
        }
    }

    /// A call begins: the gap since the previous call counts if it was short.
    pub fn begin_call(&mut self) {
        if self.slice.is_none() {
            return;
        }
        let now = now_ns();
        if let Some(end) = self.last_end {
            let gap = now.saturating_sub(end);
            if gap <= as_ns(PAUSE) {
                self.spent += gap;
            }
        }
        self.counting_since = Some(now);
        self.heavy_call = false;
    }

    /// A call ends: its time is added to the slice. A light call, one that accounted for
    /// no system call and too little buffered work to look at the clock (a message served
    /// from the read buffer, ~100 ns), ends as a short call does, without a look: its start
    /// stands for its end, and its time is counted with the gap after it when that gap is
    /// short. That saves a clock read (20-30 ns on a 2-core VM) of a ~150 ns `get`.
    pub fn end_call(&mut self) {
        if !std::mem::take(&mut self.heavy_call) {
            self.end_short_call();
            return;
        }
        if let Some(since) = self.counting_since.take() {
            let now = now_ns();
            self.spent += now.saturating_sub(since);
            self.last_end = Some(now);
        }
    }

    /// The caller is about to wait (or yield): a new slice starts with the next call.
    pub fn reset(&mut self) {
        self.spent = 0;
        self.counting_since = None;
        self.pending_weight = 0;
        self.last_end = None;
        self.fresh_slice = true;
    }

    /// A short call begins: one that makes a single system call and ends with
    /// [`Budget::end_short_call`] (a small message written in one go). Does what
    /// `begin_call` then `spend(SYSCALL_WEIGHT)` do, with one look at the clock where they
    /// and `end_call` take three: on a 2-core VM those looks were ~60 ns of a ~700 ns
    /// `put` (docs/performance.md). Tells whether the slice is used up, like `spend`.
    pub fn begin_short_call(&mut self) -> bool {
        if self.slice.is_none() {
            return false;
        }
        self.begin_call();
        let now = self.counting_since;
        self.spend_at(SYSCALL_WEIGHT, now)
    }

    /// A call begun with [`Budget::begin_short_call`] ends, without a look at the clock: its
    /// start stands for its end, so its own time is counted with the gap that follows it
    /// when that gap is short, and not at all when the caller pauses after it. A call that
    /// went on to do more work ends with `end_call` instead.
    pub fn end_short_call(&mut self) {
        if let Some(since) = self.counting_since.take() {
            self.last_end = Some(since);
        }
    }

    /// Accounts for one piece of work and tells whether the slice is used up. When it is, the
    /// budget starts over, so exactly one yield is asked for per slice.
    pub fn spend(&mut self, weight: u32) -> bool {
        self.spend_at(weight, None)
    }

    /// `spend`, where `now` (when given) is the time, read at most a few instructions ago.
    fn spend_at(&mut self, weight: u32, now: Option<u64>) -> bool {
        let Some(slice) = self.slice else {
            return false;
        };
        if weight >= SYSCALL_WEIGHT {
            // Accounted before the system call: `end_call` times it.
            self.heavy_call = true;
        }
        // Work outside begin_call/end_call (or after a yield inside a call) is counted from
        // its first piece on.
        let since = *self
            .counting_since
            .get_or_insert_with(|| now.unwrap_or_else(now_ns));
        if std::mem::take(&mut self.fresh_slice) {
            // The first piece of work of a slice is always done, so that a call right after
            // a yield makes progress whatever the slice.
            return false;
        }
        self.pending_weight += weight;
        if self.pending_weight < SYSCALL_WEIGHT {
            return false;
        }
        self.pending_weight = 0;
        self.heavy_call = true;
        let elapsed = now.unwrap_or_else(now_ns).saturating_sub(since);
        if self.spent + elapsed >= slice {
            self.reset();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
    fn pauses_between_calls_are_not_counted() {
        // (A slice far above a preemption between two lines of a loaded machine.)
        let mut budget = Budget::new(Some(Duration::from_millis(20)));
        for _ in 0..5 {
            budget.begin_call();
            assert!(
                !budget.spend(SYSCALL_WEIGHT),
                "the pauses were not this budget's work"
            );
            budget.end_call();
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    #[test]
    fn a_long_call_is_counted_whole() {
        let mut budget = Budget::new(Some(Duration::from_millis(1)));
        budget.begin_call();
        assert!(
            !budget.spend(SYSCALL_WEIGHT),
            "the first piece of work is always done"
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(budget.spend(SYSCALL_WEIGHT));
    }

    /// Calls in a tight loop, each accounting `weight`: whether one was asked to yield,
    /// and not before the slice had passed.
    fn a_tight_loop_is_asked_to_yield(weight: u32) -> bool {
        let slice = Duration::from_millis(2);
        let mut budget = Budget::new(Some(slice));
        let start = Instant::now();
        let mut yielded = false;
        // (A generous bound: on a loaded machine many gaps are preemptions longer than
        // PAUSE, which do not count, and the 2 ms of counted time take longer to gather.)
        while !yielded && start.elapsed() < Duration::from_secs(5) {
            budget.begin_call();
            yielded = budget.spend(weight);
            budget.end_call();
        }
        assert!(start.elapsed() >= slice);
        yielded
    }

    #[test]
    fn calls_in_quick_succession_share_one_slice() {
        assert!(
            a_tight_loop_is_asked_to_yield(SYSCALL_WEIGHT),
            "many short calls in a row must still be asked to yield"
        );
    }

    #[test]
    fn time_of_ended_calls_adds_up() {
        // Three calls of at least 1 ms each, back to back, fill a 3 ms slice: a yield is
        // asked for by the third at the latest. (Sooner if this machine stretched a
        // sleep: the second then fills it, and the third starts a new slice. Asserting on
        // the third alone failed once under CI load.) A budget that counted only the call
        // in progress would never ask, each call being well under the slice.
        let mut budget = Budget::new(Some(Duration::from_millis(3)));
        let mut asked = false;
        for _ in 0..3 {
            budget.begin_call();
            std::thread::sleep(Duration::from_millis(1));
            asked |= budget.spend(SYSCALL_WEIGHT);
            budget.end_call();
        }
        assert!(asked, "three 1 ms calls fill a 3 ms slice");
    }

    #[test]
    fn short_calls_in_quick_succession_share_one_slice() {
        let slice = Duration::from_millis(2);
        let mut budget = Budget::new(Some(slice));
        // Before the first call, whose clock reading starts the slice: the time counted is
        // never more than the time since then. (Taken after it, a first call and a gap
        // counted with it could make the slice end a few microseconds before `start` +
        // `slice`: that failed once under CI load.)
        let start = Instant::now();
        assert!(
            !budget.begin_short_call(),
            "the first call of a slice is never cut"
        );
        budget.end_short_call();
        let mut yielded = false;
        // (A generous bound: on a loaded machine many gaps are preemptions longer than
        // PAUSE, which do not count, and the 2 ms of counted time take longer to gather.)
        while !yielded && start.elapsed() < Duration::from_secs(5) {
            yielded = budget.begin_short_call();
            budget.end_short_call();
        }
        assert!(
            yielded,
            "a tight loop of short calls must be asked to yield"
        );
        assert!(start.elapsed() >= slice);
        // A fresh slice after the yield.
        assert!(!budget.begin_short_call());
    }

    #[test]
    fn a_pause_after_a_short_call_is_not_counted() {
        let mut budget = Budget::new(Some(Duration::from_millis(1)));
        for _ in 0..5 {
            assert!(
                !budget.begin_short_call(),
                "the pauses were not this budget's work"
            );
            budget.end_short_call();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn short_and_ordinary_calls_add_up() {
        let mut budget = Budget::new(Some(Duration::from_millis(3)));
        budget.begin_call();
        std::thread::sleep(Duration::from_millis(2));
        assert!(!budget.spend(SYSCALL_WEIGHT));
        budget.end_call();
        assert!(!budget.begin_short_call(), "2 ms of 3");
        std::thread::sleep(Duration::from_micros(1100));
        budget.end_call(); // it went on to do more: counted to its end
        assert!(budget.begin_short_call(), "3.1 ms of 3");
    }

    #[test]
    fn a_light_call_ends_without_a_look_and_a_pause_after_it_is_not_counted() {
        let mut budget = Budget::new(Some(Duration::from_millis(1)));
        for _ in 0..5 {
            budget.begin_call();
            assert!(!budget.spend(BUFFERED_WEIGHT));
            let before_end = now_ns();
            budget.end_call();
            let ended = budget.last_end.expect("a call ended");
            assert!(
                ended <= before_end,
                "its start stands for its end: no look at the clock"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            !budget.spend(BUFFERED_WEIGHT),
            "the pauses were not this budget's work"
        );
    }

    #[test]
    fn light_calls_in_quick_succession_share_one_slice() {
        assert!(
            a_tight_loop_is_asked_to_yield(BUFFERED_WEIGHT),
            "a tight loop of light calls must be asked to yield"
        );
    }

    #[test]
    fn a_system_call_is_timed_to_its_end_even_as_a_slice_s_first_work() {
        // The first piece of work of a slice is never cut, and looks at no clock; the call
        // is still not a light one: a 3.5 ms read there counts, pause after it or not.
        // (Only "must yield" is asserted: a stretched sleep cannot make it fail.)
        let mut budget = Budget::new(Some(Duration::from_millis(3)));
        budget.begin_call();
        assert!(
            !budget.spend(SYSCALL_WEIGHT),
            "the first piece of work is always done"
        );
        std::thread::sleep(Duration::from_micros(3500));
        budget.end_call();
        std::thread::sleep(Duration::from_millis(5)); // a pause: not counted
        budget.begin_call();
        assert!(budget.spend(SYSCALL_WEIGHT), "3.5 ms of 3");
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
