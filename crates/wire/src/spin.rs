//! Waiting briefly on the CPU before waiting on the event loop.
//!
//! When the peer answers within microseconds (a request/reply exchange), going to sleep in
//! the event loop costs more than the wait itself: a poll system call, a switch to the hub
//! and back, and the kernel waking this process. Looking again for a few microseconds
//! first catches such replies while this process is still on the CPU.
//!
//! Spinning is only worth it while it pays: a reader whose spins keep coming back empty (an
//! idle pipe, a slow peer) backs off, spinning on one wait in 2, 4, ... up to 1 in
//! `MAX_PENALTY + 1`, and is back to spinning every time after one spin that caught a message.
//! The worst case, a reader that always waits long, is one spin (tens of microseconds of
//! CPU) per `MAX_PENALTY + 1` waits.
//!
//! A policy for streams ([`SpinPolicy::for_streams`], one-way readers) spins only in the
//! middle of a stream: when at least two messages were taken since the reader last had to
//! wait, or the last spin caught one. A reader that gets one message now and then (an idle
//! pipe, a slow peer, a request now and then) never spins, and a stream's reader that keeps
//! up with its writer takes the next message on the CPU instead of sleeping for it (going to
//! sleep and being woken every few messages was most of a small message's cost between two
//! processes, see docs/performance.md). Such a reader spins on `poll` rather than on empty
//! reads ([`SpinPolicy::attempt_when`]), and once it has caught up it waits
//! [`STREAM_PAUSE`] before it reads again ([`SpinPolicy::pause_in_stream`]): both keep its
//! reads off the pipe's lock, which the writer needs for every message.

use std::time::{Duration, Instant};

/// The most waits in a row that skip spinning after spins that caught nothing.
pub const MAX_PENALTY: u32 = 63;

/// How long to spin for a reply. Measured on a 2-core VM, ping-pong over a duplex pipe:
/// with both ends spinning 50 us the median round trip was 9 us; 10 or 25 us were too short
/// to keep both processes on the CPU, and the round trip fell back to the cost of waking
/// an idle virtual CPU (150-450 us on a quiet machine, ~30 us on a busy one).
pub const REPLY_SPIN: Duration = Duration::from_micros(50);

/// How long a reader in the middle of a stream that has caught up with its writer lets
/// messages gather before it reads again ([`SpinPolicy::pause_in_stream`]). Reading each
/// small message as it lands means one `read` per `write`, and on a pipe every one of them
/// holds the lock the writer's next `write` needs. On a 2-core VM a stream of small dicts
/// ran at 0.97M messages/s that way; pauses of 0.5, 1.5 and 4 us gave 1.26M, 1.37M and
/// 1.38M (at 1.5 us one read per 11 messages, and the writer's kernel time per message
/// down from ~490 ns to ~170), and 2 us, kept, one read per ~14. Each message of such a
/// stream arrives up to this much later.
pub const STREAM_PAUSE: Duration = Duration::from_micros(2);

/// The longest a stream's spin goes on `poll` alone, without an attempt: half of
/// [`crate::budget::PAUSE`] (25 us). The attempt (a call into the receiver) is what the time
/// budget sees, and it counts the time since the previous call only up to `PAUSE`, so a
/// spin that only polled would be invisible to it, and one set longer than that
/// (`spin_us`) would hold the event loop for all of it instead of yielding when the slice
/// is used up.
pub const ATTEMPT_AT_LEAST_EVERY: Duration =
    Duration::from_nanos((crate::budget::PAUSE.as_nanos() / 2) as u64);

#[derive(Debug)]
pub struct SpinPolicy {
    limit: Option<Duration>,
    /// Waits still to skip before the next spin.
    skip: u32,
    /// How many waits to skip after the next spin that catches nothing.
    penalty: u32,
    /// Spins only in the middle of a stream (see the module's documentation).
    streams_only: bool,
    /// Answers since the caller last had to wait (saturating; 2 is all that matters).
    answers: u8,
}

impl SpinPolicy {
    /// Spins on every wait (a reader that expects replies). `None` never spins.
    pub fn new(limit: Option<Duration>) -> Self {
        SpinPolicy {
            limit,
            skip: 0,
            penalty: 0,
            streams_only: false,
            answers: 0,
        }
    }

    /// Spins only in the middle of a stream. `None` never spins.
    pub fn for_streams(limit: Option<Duration>) -> Self {
        SpinPolicy {
            streams_only: true,
            ..SpinPolicy::new(limit)
        }
    }

    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }

    pub fn set_limit(&mut self, limit: Option<Duration>) {
        let streams_only = self.streams_only;
        *self = SpinPolicy::new(limit);
        self.streams_only = streams_only;
    }

    pub fn streams_only(&self) -> bool {
        self.streams_only
    }

    pub fn set_streams_only(&mut self, streams_only: bool) {
        self.streams_only = streams_only;
    }

    /// Called when the caller would have to wait: the deadline until which to look again,
    /// or `None` to wait right away.
    pub fn start(&mut self, now: Instant) -> Option<Instant> {
        let limit = self.limit?;
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        Some(now + limit)
    }

    /// How the spin that `start` allowed ended.
    pub fn finish(&mut self, caught: bool) {
        if caught {
            self.penalty = 0;
        } else {
            self.skip = self.penalty;
            self.penalty = (self.penalty * 2 + 1).min(MAX_PENALTY);
        }
    }

    /// Before a reader that has caught up with its writer reads again ([`crate::recv::
    /// Receiver::caught_up`]): waits [`STREAM_PAUSE`] on the CPU if this is a stream policy
    /// in the middle of a stream, so that the next read takes several messages. A policy
    /// that does not spin never pauses, nor does one that expects replies: a reply comes
    /// alone, and would only be late.
    pub fn pause_in_stream(&self) {
        if let Some(pause) = self.stream_pause() {
            let until = Instant::now() + pause;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
    }

    /// How long [`SpinPolicy::pause_in_stream`] waits now, if at all.
    fn stream_pause(&self) -> Option<Duration> {
        let in_stream = self.streams_only && self.answers >= 2;
        (self.limit.is_some() && in_stream).then_some(STREAM_PAUSE)
    }

    /// `attempt()`'s answer; when it has none (`Ok(None)`: the caller would have to wait),
    /// tries again on the CPU until the limit, if the policy spins this time. This and
    /// [`SpinPolicy::pause_in_stream`] are the only places in gipc that wait without the
    /// event loop: for at most the limit, and for [`STREAM_PAUSE`].
    pub fn attempt<T, E>(
        &mut self,
        attempt: impl FnMut() -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        self.attempt_when(|| true, attempt)
    }

    /// As [`SpinPolicy::attempt`], but a stream policy, while spinning, attempts again only
    /// when `ready()` says it may find something, or [`ATTEMPT_AT_LEAST_EVERY`] after its
    /// last attempt: a cheap look that leaves alone what the attempt itself would disturb.
    /// A stream's reader spins on `poll` rather than on `read`, because every empty read
    /// takes the pipe's lock: on a 2-core VM, a stream of small dicts whose reader spun on
    /// reads ran 7-10% slower, its writer waiting for that lock. A reader that expects
    /// replies reads at once: its peer writes one reply and waits, and a look first would
    /// put a system call on the reply's way (ping-pong went from 2.1 to 2.2 us).
    pub fn attempt_when<T, E>(
        &mut self,
        mut ready: impl FnMut() -> bool,
        mut attempt: impl FnMut() -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        if let Some(answer) = attempt()? {
            self.answers = self.answers.saturating_add(1);
            return Ok(Some(answer));
        }
        let in_stream = self.answers >= 2;
        self.answers = 0;
        if self.streams_only && !in_stream {
            return Ok(None);
        }
        let Some(deadline) = self.start(Instant::now()) else {
            return Ok(None);
        };
        let mut attempted = Instant::now();
        loop {
            std::hint::spin_loop();
            let now = Instant::now();
            if self.streams_only && now - attempted < ATTEMPT_AT_LEAST_EVERY && !ready() {
                if now >= deadline {
                    self.finish(false);
                    return Ok(None);
                }
                continue;
            }
            attempted = now;
            if let Some(answer) = attempt()? {
                self.finish(true);
                self.answers = 2; // still in the stream: the next wait spins too
                return Ok(Some(answer));
            }
            if Instant::now() >= deadline {
                self.finish(false);
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn spins_in(policy: &mut SpinPolicy, waits: usize, caught: bool) -> usize {
        let now = Instant::now();
        let mut spins = 0;
        for _ in 0..waits {
            if policy.start(now).is_some() {
                spins += 1;
                policy.finish(caught);
            }
        }
        spins
    }

    #[test]
    fn attempt_looks_again_until_an_answer_or_the_limit() {
        let mut calls = 0;
        let mut policy = SpinPolicy::new(Some(Duration::from_secs(5)));
        let got: Result<_, ()> = policy.attempt(|| {
            calls += 1;
            Ok((calls == 3).then_some("reply"))
        });
        assert_eq!((got, calls), (Ok(Some("reply")), 3));

        let mut policy = SpinPolicy::new(Some(Duration::from_micros(200)));
        for _ in 0..2 {
            let started = Instant::now();
            let got: Result<Option<()>, ()> = policy.attempt(|| Ok(None));
            assert_eq!(got, Ok(None));
            assert!(started.elapsed() >= Duration::from_micros(200));
        }
        // Two spins caught nothing: the next wait skips spinning, one attempt only.
        let mut calls = 0;
        let _: Result<Option<()>, ()> = policy.attempt(|| {
            calls += 1;
            Ok(None)
        });
        assert_eq!(calls, 1);

        // Errors end the spin at once; a policy that never spins attempts once.
        let mut policy = SpinPolicy::new(Some(Duration::from_secs(5)));
        assert_eq!(policy.attempt::<(), _>(|| Err("broken")), Err("broken"));
        let mut calls = 0;
        let _: Result<Option<()>, ()> = SpinPolicy::new(None).attempt(|| {
            calls += 1;
            Ok(None)
        });
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_stream_policy_spins_on_readiness_and_a_reply_policy_on_attempts() {
        for (mut policy, attempts_while_not_ready) in [
            (SpinPolicy::for_streams(Some(Duration::from_secs(5))), false),
            (SpinPolicy::new(Some(Duration::from_secs(5))), true),
        ] {
            // Into a stream, then a wait: the spin looks 20 times before it is ready.
            for _ in 0..2 {
                let _: Result<_, ()> = policy.attempt(|| Ok(Some(())));
            }
            // The message arrives after 20 looks or attempts, whichever the policy makes.
            let (ticks, attempts, started) = (Cell::new(0), Cell::new(0), Instant::now());
            let arrived = || {
                ticks.set(ticks.get() + 1);
                ticks.get() > 20
            };
            let got: Result<_, ()> = policy.attempt_when(arrived, || {
                attempts.set(attempts.get() + 1);
                Ok(arrived().then_some("caught"))
            });
            assert_eq!(got, Ok(Some("caught")));
            let attempts = attempts.get();
            // The first attempt is made without a look, whatever the policy; a stream's
            // spin makes one more only when ready, or when it went on for a while (here,
            // only if this thread lost its CPU in the middle of the 20 looks).
            if attempts_while_not_ready {
                assert_eq!(attempts, 21, "{policy:?}");
            } else {
                let long = started.elapsed() >= ATTEMPT_AT_LEAST_EVERY;
                assert!(attempts == 2 || (long && attempts < 21), "{attempts}");
            }
        }
        // A look that never says ready still lets the attempt run now and then (it is what
        // the time budget sees): an answer that only the attempt finds is found.
        let mut policy = SpinPolicy::for_streams(Some(Duration::from_secs(5)));
        policy.answers = 2;
        let (mut attempts, started) = (0, Instant::now());
        let got: Result<_, ()> = policy.attempt_when(
            || false,
            || {
                attempts += 1;
                Ok((attempts == 3).then_some("yield, say"))
            },
        );
        assert_eq!(got, Ok(Some("yield, say")));
        assert!(started.elapsed() >= 2 * ATTEMPT_AT_LEAST_EVERY);
        // A look that never says ready ends with the limit, as a spin does.
        let mut policy = SpinPolicy::for_streams(Some(Duration::from_micros(200)));
        policy.answers = 2;
        let got: Result<Option<()>, ()> = policy.attempt_when(|| false, || Ok(None));
        assert_eq!(got, Ok(None));
    }

    #[test]
    fn only_a_stream_policy_in_a_stream_pauses_before_reading() {
        let limit = Some(REPLY_SPIN);
        let mut stream = SpinPolicy::for_streams(limit);
        assert_eq!(stream.stream_pause(), None, "a fresh reader");
        assert_eq!(attempt_on(&mut stream, &[true]), (false, true));
        assert_eq!(stream.stream_pause(), None, "one message is no stream");
        assert_eq!(attempt_on(&mut stream, &[true]), (false, true));
        assert_eq!(stream.stream_pause(), Some(STREAM_PAUSE));
        let started = Instant::now();
        stream.pause_in_stream();
        assert!(started.elapsed() >= STREAM_PAUSE);
        // A wait ends the stream...
        assert_eq!(attempt_on(&mut stream, &[false]), (true, false));
        assert_eq!(stream.stream_pause(), None);
        // ...and a spin that catches the next message keeps it going.
        let mut caught = SpinPolicy::for_streams(limit);
        assert_eq!(attempt_on(&mut caught, &[false, true]), (false, false));
        caught.answers = 2;
        assert_eq!(attempt_on(&mut caught, &[false, true]), (true, true));
        assert_eq!(caught.stream_pause(), Some(STREAM_PAUSE));

        // A reply reader, and a reader told not to spin, never pause.
        let mut replies = SpinPolicy::new(limit);
        let mut never = SpinPolicy::for_streams(None);
        for _ in 0..5 {
            assert_eq!(attempt_on(&mut replies, &[true]), (false, true));
            assert_eq!(attempt_on(&mut never, &[true]), (false, true));
        }
        assert_eq!((replies.stream_pause(), never.stream_pause()), (None, None));
    }

    /// Runs `policy.attempt` against a queue of answers: `true` an answer, `false` none;
    /// returns whether it spun (looked more than once) and what it answered.
    fn attempt_on(policy: &mut SpinPolicy, answers: &[bool]) -> (bool, bool) {
        let mut calls = 0;
        let got: Result<Option<()>, ()> = policy.attempt(|| {
            let answer = answers.get(calls).copied().unwrap_or(false);
            calls += 1;
            Ok(answer.then_some(()))
        });
        (calls > 1, got == Ok(Some(())))
    }

    #[test]
    fn a_stream_policy_never_spins_for_messages_one_at_a_time() {
        let mut policy = SpinPolicy::for_streams(Some(Duration::from_micros(200)));
        // A fresh reader, then one message per wait: never a spin.
        for _ in 0..50 {
            assert_eq!(attempt_on(&mut policy, &[false, true]), (false, false));
            assert_eq!(attempt_on(&mut policy, &[true]), (false, true));
        }
    }

    #[test]
    fn a_stream_policy_spins_after_two_messages_and_while_spins_catch() {
        let mut policy = SpinPolicy::for_streams(Some(Duration::from_secs(5)));
        assert_eq!(attempt_on(&mut policy, &[true]), (false, true));
        assert_eq!(attempt_on(&mut policy, &[true]), (false, true));
        // Two messages since the last wait: the next wait spins, and catches one...
        assert_eq!(attempt_on(&mut policy, &[false, false, true]), (true, true));
        // ...which keeps it in the stream: the wait after it spins again.
        assert_eq!(attempt_on(&mut policy, &[false, true]), (true, true));
        // A spin that catches nothing ends the stream: the next wait does not spin.
        let mut short = SpinPolicy::for_streams(Some(Duration::from_micros(100)));
        attempt_on(&mut short, &[true]);
        attempt_on(&mut short, &[true]);
        assert_eq!(attempt_on(&mut short, &[]), (true, false));
        assert_eq!(attempt_on(&mut short, &[]), (false, false));
        // Changing the limit keeps the kind of policy.
        short.set_limit(Some(REPLY_SPIN));
        assert!(short.streams_only());
        assert!(!SpinPolicy::new(Some(REPLY_SPIN)).streams_only());
    }

    #[test]
    fn disabled_never_spins() {
        let mut policy = SpinPolicy::new(None);
        assert_eq!(spins_in(&mut policy, 100, true), 0);
    }

    #[test]
    fn spins_every_time_while_spins_pay() {
        let mut policy = SpinPolicy::new(Some(REPLY_SPIN));
        assert_eq!(spins_in(&mut policy, 100, true), 100);
    }

    #[test]
    fn deadline_is_the_limit_from_now() {
        let mut policy = SpinPolicy::new(Some(Duration::from_micros(7)));
        let now = Instant::now();
        assert_eq!(policy.start(now), Some(now + Duration::from_micros(7)));
    }

    #[test]
    fn backs_off_exponentially_when_spins_catch_nothing() {
        let mut policy = SpinPolicy::new(Some(REPLY_SPIN));
        let now = Instant::now();
        let pattern: Vec<bool> = (0..16)
            .map(|_| {
                let spun = policy.start(now).is_some();
                if spun {
                    policy.finish(false);
                }
                spun
            })
            .collect();
        // Spin, then skip 1, 3, 7 ... waits between spins.
        let spun_at: Vec<usize> = (0..16).filter(|&i| pattern[i]).collect();
        assert_eq!(spun_at, vec![0, 1, 3, 7, 15]);
    }

    #[test]
    fn backoff_is_capped_so_an_idle_reader_still_tries_now_and_then() {
        let mut policy = SpinPolicy::new(Some(REPLY_SPIN));
        let waits = 100 * (MAX_PENALTY as usize + 1);
        let spins = spins_in(&mut policy, waits, false);
        assert!((100..=110).contains(&spins), "{spins} spins");
    }

    #[test]
    fn one_catch_restores_spinning_on_every_wait() {
        let mut policy = SpinPolicy::new(Some(REPLY_SPIN));
        spins_in(&mut policy, 1000, false);
        // Drain the current skip, then a spin that pays.
        let now = Instant::now();
        while policy.start(now).is_none() {}
        policy.finish(true);
        assert_eq!(spins_in(&mut policy, 10, true), 10);
    }
}
