//! Making a fresh large buffer cheap to fill.
//!
//! A 64 MiB payload lands in a buffer that was just allocated, so every one of its 16,384
//! pages is faulted in as the kernel copies data into it; that costs about as much as the
//! copy itself. Asking for transparent huge pages on that buffer cuts the faults 512-fold,
//! and makes freeing the buffer (`munmap`, wherever Python drops the `bytes`) 20 times cheaper.
//!
//! But a huge page is only fast when the kernel has a 2 MiB block whose memory the machine
//! really holds. On a virtual machine with free page reporting (Firecracker and others,
//! `page_reporting.page_reporting_order=9` on the kernel command line: free 2 MiB blocks are
//! handed back to the host a couple of seconds after they were freed) a reported block
//! is backed again 4 KiB at a time by the hypervisor when the guest zeroes it: a huge-page
//! fault then takes 3-7 ms instead of 0.2 ms, inside one `read`. Small pages come from the
//! guest's own small free blocks, which are never reported, and cost the same every time.
//! So a buffer starts with the hint, and [`HugePages::after_read`] withdraws it for the rest
//! of the buffer as soon as one huge page proves slow (see docs/performance.md): a lone
//! message into a new process pays for one slow huge page at most. A buffer that follows
//! another one within [`WARM_WINDOW`] keeps the hint whatever it costs: the huge pages of
//! the previous buffer, freed a moment ago, are blocks the machine holds, and so will be the
//! slow ones this buffer faults in. A stream thus pays for its slow huge pages once, in its
//! second message, and runs on fast ones (and cheap frees) from then on.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::budget::now_ns;

/// Buffers at least this large get the huge-page hint (it only pays off for whole 2 MiB
/// extents, and smaller allocations may share pages with other heap data).
pub const HUGE_PAGE_HINT_MIN: usize = 8 << 20;

/// The size of a transparent huge page (x86-64, arm64 with 4 KiB pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// A read that faulted in a huge page and took longer than this found a block the host had to
/// back again: a huge page the guest already holds takes ~0.2 ms to zero, and the copy of a
/// whole read ([`crate::io::MAX_IO_CHUNK`]) well under that; a reported one takes 3-7 ms.
pub const SLOW_HUGE_FAULT: Duration = Duration::from_millis(1);

/// A large buffer that follows another one this soon is part of a stream: the kernel reports
/// free blocks to the host about 2 s after they were freed.
pub const WARM_WINDOW: Duration = Duration::from_secs(1);

/// When the last large buffer of this process was finished (monotonic ns, 0: none yet), and
/// how many huge pages it had. Atomics, not a lock: buffers are also filled by a reading
/// thread (see `aside`), and a lock that thread held when another forked would stay locked
/// in the child. The two are written one after the other: a buffer that reads them between
/// the two writes sees one buffer's time with another's count, which at worst costs it one
/// slow huge page or grants it the stream's allowance once.
static LAST_BUFFER_AT: AtomicU64 = AtomicU64::new(0);
static LAST_BUFFER_PAGES: AtomicUsize = AtomicUsize::new(0);

/// Slow huge pages a new buffer may take before it falls back to small pages: one, or any
/// number after a buffer with huge pages finished within [`WARM_WINDOW`].
fn slow_allowance(now: u64) -> usize {
    allowance_after(last_buffer(), now)
}

/// The record [`HugePages::finish`] leaves for the next buffer: `(when, huge pages)`.
pub(crate) fn last_buffer() -> Option<(u64, usize)> {
    let at = LAST_BUFFER_AT.load(Ordering::Relaxed);
    (at != 0).then(|| (at, LAST_BUFFER_PAGES.load(Ordering::Relaxed)))
}

fn allowance_after(last: Option<(u64, usize)>, now: u64) -> usize {
    let window = WARM_WINDOW.as_nanos() as u64;
    match last {
        Some((at, pages)) if pages > 0 && now.saturating_sub(at) < window => usize::MAX,
        _ => 1,
    }
}

/// The huge-page state of one fresh buffer: the 2 MiB-aligned address range that was advised,
/// and how far it has been filled.
#[derive(Clone, Debug)]
pub struct HugePages {
    /// Addresses still advised: after a fallback, only the part already faulted in.
    advised: Range<usize>,
    /// Slow huge-page faults this buffer may still take before it falls back.
    slow_left: usize,
    /// Huge pages faulted in so far (fast or slow).
    faulted: usize,
}

impl HugePages {
    /// Advises huge pages for the whole 2 MiB extents inside `buf`, which was just allocated
    /// and not written to yet. `None` when the buffer is too small, or the advice is refused
    /// (not Linux, transparent huge pages disabled): then there is nothing to follow.
    pub fn advise(buf: &mut [u8]) -> Option<HugePages> {
        if buf.len() < HUGE_PAGE_HINT_MIN {
            return None;
        }
        let addr = buf.as_mut_ptr() as usize;
        let start = addr.next_multiple_of(HUGE_PAGE);
        let end = (addr + buf.len()) / HUGE_PAGE * HUGE_PAGE;
        if end <= start {
            return None;
        }
        advise(start..end, true).then(|| HugePages {
            advised: start..end,
            slow_left: slow_allowance(now_ns()),
            faulted: 0,
        })
    }

    /// Reports a read into `buf[filled..filled + n]` that took `took`. If it faulted in a
    /// huge page (it reached into a 2 MiB extent not written before) and was slow once too
    /// often, the rest of the buffer gets small pages instead: the next blocks are likely
    /// reported ones too.
    pub fn after_read(&mut self, buf: &mut [u8], filled: usize, n: usize, took: Duration) {
        if n == 0 || self.advised.is_empty() {
            return;
        }
        let base = buf.as_mut_ptr() as usize;
        let (first, last) = (base + filled, base + filled + n - 1);
        // The extents already written to before this read: all of them up to the one holding
        // byte `filled - 1`.
        let touched_before = if filled == 0 {
            0
        } else {
            (base + filled - 1) / HUGE_PAGE * HUGE_PAGE + HUGE_PAGE
        };
        let faulted_new = last >= self.advised.start
            && first < self.advised.end
            && last / HUGE_PAGE * HUGE_PAGE >= touched_before;
        if !faulted_new {
            return;
        }
        self.faulted += 1;
        if took < SLOW_HUGE_FAULT {
            return;
        }
        self.slow_left = self.slow_left.saturating_sub(1);
        if self.slow_left > 0 {
            return;
        }
        // Extents from the one after the last byte read on have not been touched yet.
        let from = (last / HUGE_PAGE * HUGE_PAGE + HUGE_PAGE).max(self.advised.start);
        if from < self.advised.end {
            advise(from..self.advised.end, false);
        }
        self.advised.end = from.min(self.advised.end);
        // Followed once per buffer: the rest has small pages now.
        self.advised.start = self.advised.end;
    }

    /// The buffer is complete: its huge pages count as fast ones for the next buffer.
    pub fn finish(self) {
        LAST_BUFFER_PAGES.store(self.faulted, Ordering::Relaxed);
        LAST_BUFFER_AT.store(now_ns().max(1), Ordering::Relaxed);
    }

    /// Whether some of the buffer is still advised to get huge pages.
    pub fn advised(&self) -> bool {
        !self.advised.is_empty()
    }
}

/// `MADV_HUGEPAGE` (`huge`) or `MADV_NOHUGEPAGE` on `range`; whether the kernel took it.
#[cfg(target_os = "linux")]
fn advise(range: Range<usize>, huge: bool) -> bool {
    let advice = if huge {
        rustix::mm::Advice::LinuxHugepage
    } else {
        rustix::mm::Advice::LinuxNoHugepage
    };
    // SAFETY: callers pass a range inside a live allocation of theirs, rounded inwards to
    // 2 MiB boundaries; these two hints change neither the memory's contents nor its validity.
    unsafe {
        rustix::mm::madvise(
            range.start as *mut std::ffi::c_void,
            range.end - range.start,
            advice,
        )
    }
    .is_ok()
}

#[cfg(not(target_os = "linux"))]
fn advise(_range: Range<usize>, _huge: bool) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOW: Duration = Duration::from_millis(5);
    const FAST: Duration = Duration::from_micros(100);

    /// A buffer of `len` bytes that got the hint, with a slow allowance of `slow` (the
    /// process-wide record of the last buffer is shared by tests running in parallel).
    fn advised(buf: &mut [u8], slow: usize) -> Option<HugePages> {
        let mut pages = HugePages::advise(buf)?;
        pages.slow_left = slow;
        Some(pages)
    }

    #[test]
    fn advice_leaves_contents_alone_whatever_the_alignment() {
        for len in [
            0,
            4096,
            HUGE_PAGE_HINT_MIN - 1,
            HUGE_PAGE_HINT_MIN,
            3 * HUGE_PAGE_HINT_MIN + 17,
        ] {
            let mut buf = vec![0x5au8; len];
            let pages = advised(&mut buf, 1);
            if len < HUGE_PAGE_HINT_MIN {
                assert!(pages.is_none());
            }
            // Also an unaligned start.
            if len > 1 {
                HugePages::advise(&mut buf[1..]);
            }
            if let Some(mut pages) = pages {
                pages.after_read(&mut buf, 0, len, SLOW);
                assert!(!pages.advised());
            }
            assert!(buf.iter().all(|&b| b == 0x5a));
        }
    }

    #[test]
    fn a_slow_huge_fault_withdraws_the_hint_for_the_rest() {
        let mut buf = vec![0u8; 16 << 20];
        let Some(mut pages) = advised(&mut buf, 1) else {
            return; // no transparent huge pages here: nothing to follow
        };
        let all = pages.advised.clone();
        let first = all.start - buf.as_ptr() as usize;
        // Fast reads keep the hint, whatever they touch.
        pages.after_read(&mut buf, 0, first + (256 << 10), FAST);
        assert_eq!(pages.advised, all);
        // A slow read inside an extent written before is no huge-page fault: kept.
        pages.after_read(&mut buf, first + 4096, 4096, SLOW);
        assert_eq!(pages.advised, all);
        // A slow read reaching into a new extent: the hint goes, from the next extent on.
        let at = first + HUGE_PAGE - 100;
        pages.after_read(&mut buf, at, 200, SLOW);
        assert!(!pages.advised());
        assert_eq!(pages.faulted, 2);
        // Followed once: nothing more happens.
        pages.after_read(&mut buf, at + 200 + HUGE_PAGE, 200, SLOW);
        assert!(!pages.advised());
        assert_eq!(pages.faulted, 2);
    }

    #[test]
    fn a_buffer_may_take_as_many_slow_faults_as_its_allowance() {
        let mut buf = vec![0u8; 16 << 20];
        let Some(mut pages) = advised(&mut buf, 3) else {
            return;
        };
        let first = pages.advised.start - buf.as_ptr() as usize;
        for k in 0..3 {
            assert!(pages.advised(), "withdrawn after {k} slow faults");
            pages.after_read(&mut buf, first + k * HUGE_PAGE, 4096, SLOW);
        }
        assert!(!pages.advised());
        assert_eq!(pages.faulted, 3);
    }

    #[test]
    fn a_slow_read_before_the_advised_extents_changes_nothing() {
        let mut buf = vec![0u8; 16 << 20];
        let Some(mut pages) = advised(&mut buf, 1) else {
            return;
        };
        let all = pages.advised.clone();
        let before_first = all.start - buf.as_ptr() as usize;
        if before_first > 0 {
            pages.after_read(&mut buf, 0, before_first, SLOW);
            assert_eq!(pages.advised, all);
            assert_eq!(pages.faulted, 0);
        }
    }

    #[test]
    fn only_a_recent_buffer_with_huge_pages_lifts_the_allowance() {
        let now = now_ns();
        let window = WARM_WINDOW.as_nanos() as u64;
        assert_eq!(allowance_after(Some((now, 7)), now), usize::MAX);
        assert_eq!(
            allowance_after(Some((now - window / 2, 7)), now),
            usize::MAX
        );
        assert_eq!(allowance_after(Some((now, 0)), now), 1);
        assert_eq!(allowance_after(Some((now - 2 * window, 7)), now), 1);
        // A record from the future (another thread wrote it after `now` was read) is recent.
        assert_eq!(allowance_after(Some((now + 5, 7)), now), usize::MAX);
        assert_eq!(allowance_after(None, now), 1);
    }
}
