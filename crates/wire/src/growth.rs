//! Growing a pipe for bulk traffic without eating the user's shared pipe budget.
//!
//! Linux counts the buffer pages of every pipe against its owner's user, across all of that
//! user's processes. Once an unprivileged user holds more than `fs.pipe-user-pages-soft`
//! pages (64 MiB by default), every new pipe of that user, in any program, is created with
//! 2 pages (8 KiB instead of 64 KiB) and can no longer be grown. A channel that grew its pipe
//! to 1 MiB up front used 1/64 of that budget, so 60-odd open channels were enough to shrink
//! the pipes of unrelated programs (and a 64 KiB write to such a pipe then waits for a
//! reader: a program written for the default size may deadlock).
//!
//! So a pipe is grown only when a payload too large for it is being written, and the pipes
//! this process has grown never hold more than 1/[`BUDGET_SHARE`] of the user's limit.
//! The kernel does not say how much of the budget the user's other processes hold, so this
//! caps what this process adds; a refusal by the kernel (`EPERM`) keeps the default size,
//! which works, only with more system calls per megabyte.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::io::PIPE_CAPACITY;

/// The share of the user's pipe budget that this process's grown pipes may hold, as a
/// divisor: 1/8 of 64 MiB is 8 MiB, eight pipes of 1 MiB.
pub const BUDGET_SHARE: usize = 8;

/// Pages the pipes grown by this process hold beyond their default size.
static GROWN_PAGES: AtomicUsize = AtomicUsize::new(0);

/// Pages this pipe was grown by, given back to the process's share when dropped (the writer
/// is closed). A forked child holding the other end keeps the kernel's count up a little
/// longer; the share leaves room for that.
#[derive(Debug)]
pub struct Grown {
    pages: usize,
    count: &'static AtomicUsize,
}

impl Drop for Grown {
    fn drop(&mut self) {
        self.count.fetch_sub(self.pages, Ordering::Relaxed);
    }
}

impl Grown {
    /// The pages this growth added to the pipe.
    pub fn pages(&self) -> usize {
        self.pages
    }
}

/// Grows the pipe of `fd` towards [`PIPE_CAPACITY`], within this process's share of the
/// user's budget. `None` when it is not grown (no room left, refused by the kernel, not
/// Linux): the pipe keeps its size, and that is fine.
pub fn grow_pipe(fd: BorrowedFd<'_>) -> Option<Grown> {
    grow_within(fd, user_limit_pages(), &GROWN_PAGES)
}

#[cfg(target_os = "linux")]
fn grow_within(
    fd: BorrowedFd<'_>,
    limit_pages: Option<usize>,
    count: &'static AtomicUsize,
) -> Option<Grown> {
    let page = rustix::param::page_size();
    let current = rustix::pipe::fcntl_getpipe_size(fd).ok()? / page;
    let share = limit_pages.map_or(usize::MAX, |limit| limit / BUDGET_SHARE);
    let room = share.saturating_sub(count.load(Ordering::Relaxed));
    // Pipe sizes are powers of two pages; the kernel would round up, past the room.
    let target = prev_power_of_two((PIPE_CAPACITY / page).min(current.saturating_add(room)));
    if target <= current {
        return None;
    }
    // Reserve first, so that two threads cannot both take the last of the room.
    let reserved = target - current;
    if count.fetch_add(reserved, Ordering::Relaxed) + reserved > share {
        count.fetch_sub(reserved, Ordering::Relaxed);
        return None;
    }
    let grown = Grown {
        pages: reserved,
        count,
    };
    match rustix::pipe::fcntl_setpipe_size(fd, target * page) {
        Ok(size) if size / page == target => Some(grown),
        // Any other outcome (EPERM above the user's limit, EBUSY): the reservation goes back
        // as `grown` is dropped, and the pipe keeps the size it had.
        _ => None,
    }
}

#[cfg(not(target_os = "linux"))]
fn grow_within(
    _fd: BorrowedFd<'_>,
    _limit_pages: Option<usize>,
    _count: &'static AtomicUsize,
) -> Option<Grown> {
    None
}

fn prev_power_of_two(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// The user's pipe budget in pages: the lower of the soft and hard limits that are set
/// (0 means unset), or `None` when neither is.
fn user_limit_pages() -> Option<usize> {
    ["soft", "hard"]
        .iter()
        .filter_map(|which| {
            std::fs::read_to_string(format!("/proc/sys/fs/pipe-user-pages-{which}"))
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .filter(|&pages| pages > 0)
        .min()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::io::{channel, Transport};
    use std::os::fd::AsFd;

    // The harness runs tests in parallel: each one that counts has a count of its own.

    #[test]
    fn a_pipe_grows_to_the_capacity_when_there_is_room() {
        let (_r, w) = channel(Transport::Pipe).unwrap();
        let page = rustix::param::page_size();
        let before = rustix::pipe::fcntl_getpipe_size(&w).unwrap();
        let grown = grow_within(w.as_fd(), None, &GROWN_PAGES).expect("no limit: it grows");
        assert_eq!(rustix::pipe::fcntl_getpipe_size(&w).unwrap(), PIPE_CAPACITY);
        assert_eq!(grown.pages(), (PIPE_CAPACITY - before) / page);
        assert!(
            grow_within(w.as_fd(), None, &GROWN_PAGES).is_none(),
            "grown already"
        );
    }

    #[test]
    fn a_pipe_grows_no_further_than_the_share_allows() {
        let (_r, w) = channel(Transport::Pipe).unwrap();
        let before = rustix::pipe::fcntl_getpipe_size(&w).unwrap();
        // A share that is used up already: the pipe keeps its size.
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let page = rustix::param::page_size();
        let capacity = PIPE_CAPACITY / page;
        COUNT.store(capacity, Ordering::Relaxed);
        assert!(grow_within(w.as_fd(), Some(capacity * BUDGET_SHARE), &COUNT).is_none());
        assert_eq!(rustix::pipe::fcntl_getpipe_size(&w).unwrap(), before);
        // Room for a quarter of the capacity: it grows that far, a power of two, no more.
        COUNT.store(capacity - capacity / 4, Ordering::Relaxed);
        let grown = grow_within(w.as_fd(), Some(capacity * BUDGET_SHARE), &COUNT).unwrap();
        let after = rustix::pipe::fcntl_getpipe_size(&w).unwrap() / page;
        assert_eq!(after, prev_power_of_two(before / page + capacity / 4));
        assert_eq!(grown.pages(), after - before / page);
        assert!(COUNT.load(Ordering::Relaxed) <= capacity);
    }

    #[test]
    fn the_room_goes_back_when_a_grown_pipe_is_released_or_refused() {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let (_r, w) = channel(Transport::Pipe).unwrap();
        let grown = grow_within(w.as_fd(), None, &COUNT).unwrap();
        assert_eq!(COUNT.load(Ordering::Relaxed), grown.pages());
        drop(grown);
        assert_eq!(COUNT.load(Ordering::Relaxed), 0);
        // Not a pipe: the kernel refuses, and nothing stays reserved.
        let (a, _b) = channel(Transport::Socket).unwrap();
        assert!(grow_within(a.as_fd(), None, &COUNT).is_none());
        assert_eq!(COUNT.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_user_limit_is_read_from_proc() {
        let soft: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if soft > 0 {
            assert!(user_limit_pages().unwrap() <= soft);
        }
    }

    #[test]
    fn powers_of_two_round_down() {
        assert_eq!(prev_power_of_two(0), 0);
        assert_eq!(prev_power_of_two(1), 1);
        assert_eq!(prev_power_of_two(255), 128);
        assert_eq!(prev_power_of_two(256), 256);
    }
}
