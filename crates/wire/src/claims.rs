//! The claim word that a pool worker and its parent share (see `gipc.pool._claims`): the
//! last task the worker claimed, and up to which task the parent took back what it had sent.
//! The worker *claims* a task before it runs it; the parent *revokes* the tasks it sent that
//! are not claimed yet. Both are one compare-and-swap of one 64-bit word in memory mapped
//! by both processes, so a task is either run or handed back, never both and never neither,
//! and neither side ever waits for the other or makes a system call (a record lock on a
//! file, which this replaces, cost two system calls per task in the worker).
//!
//! Layout: the low 32 bits hold the last task claimed, the high 32 bits the last task
//! revoked. Tasks are numbered 1, 2, ... in send order; the word holds them modulo 2^32 and
//! compares them as serial numbers (RFC 1982), which is right while the numbers compared
//! are less than 2^31 apart. They always are: a claim moves the revoked mark up to the task
//! before it, and a revocation only reaches the last task sent, so both halves stay within
//! the handful of tasks in flight of each other. `widen` gives a full number back, from one
//! the parent knows (the last task it sent).

use std::sync::atomic::{AtomicU64, Ordering};

use rustix::mm::{self, MapFlags, ProtFlags};
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

/// `a` comes at or before `b`, in serial-number order.
fn serial_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) as i32 >= 0
}

fn pack(claimed: u32, revoked: u32) -> u64 {
    (u64::from(revoked) << 32) | u64::from(claimed)
}

fn unpack(word: u64) -> (u32, u32) {
    (word as u32, (word >> 32) as u32)
}

/// In the worker: claims task `number` unless the parent revoked it. Every task before it is
/// behind the worker by now (run, or skipped as revoked), so the revoked mark moves up to
/// `number - 1` with the claim: it never falls 2^31 behind.
pub fn claim(word: &AtomicU64, number: u64) -> bool {
    let number = number as u32;
    let mut current = word.load(Ordering::Acquire);
    loop {
        let (_, revoked) = unpack(current);
        if serial_le(number, revoked) {
            return false;
        }
        let new = pack(number, number.wrapping_sub(1));
        match word.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(seen) => current = seen,
        }
    }
}

/// In the parent: revokes every task up to `through` (the last one sent) that the worker
/// has not claimed, and returns the last one it did claim: those after it are revoked. The
/// mark never moves back (tasks revoked earlier may still be in the worker's pipe).
pub fn revoke(word: &AtomicU64, through: u64) -> u64 {
    let mark = through as u32;
    let mut current = word.load(Ordering::Acquire);
    loop {
        let (claimed, revoked) = unpack(current);
        let new = pack(
            claimed,
            if serial_le(mark, revoked) {
                revoked
            } else {
                mark
            },
        );
        match word.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return widen(claimed, through),
            Err(seen) => current = seen,
        }
    }
}

/// The last task the worker claimed, as a full number: `reference` is a task number the
/// caller knows to be at or after it (the last one sent).
pub fn claimed(word: &AtomicU64, reference: u64) -> u64 {
    widen(unpack(word.load(Ordering::Acquire)).0, reference)
}

/// The number at or before `reference`, and less than 2^32 before it, whose low 32 bits
/// are `low`.
fn widen(low: u32, reference: u64) -> u64 {
    let behind = (reference as u32).wrapping_sub(low);
    reference.saturating_sub(u64::from(behind))
}

/// One claim word in memory shared with other processes: an anonymous shared mapping
/// (inherited by a forked child) or the start of a file mapped shared (a descriptor that
/// travels to the other process). Unmapped on drop.
pub struct SharedWord {
    base: NonNull<AtomicU64>,
}

// SAFETY: the mapping is process-wide memory that stays mapped until drop (which takes the
// word by value or `&mut`), and every access to it is an atomic operation.
unsafe impl Send for SharedWord {}
// SAFETY: as above: shared references only ever make atomic accesses.
unsafe impl Sync for SharedWord {}

const MAPPED: usize = std::mem::size_of::<AtomicU64>();

impl SharedWord {
    /// A new zeroed word, shared with children forked from now on.
    pub fn anonymous() -> std::io::Result<Self> {
        // SAFETY: a new mapping at an address the kernel chooses: no existing memory is
        // affected.
        let base = unsafe {
            mm::mmap_anonymous(
                std::ptr::null_mut(),
                MAPPED,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )
        }?;
        Ok(Self::at(base))
    }

    /// The first 8 bytes of the file `fd` refers to, mapped shared; `EINVAL` if the file
    /// is shorter (its mapping would raise SIGBUS at the first access). The file must not
    /// shrink while it is mapped: gipc's is sealed against it where the system can seal.
    pub fn from_fd(fd: BorrowedFd<'_>) -> std::io::Result<Self> {
        if rustix::fs::fstat(fd)?.st_size < MAPPED as i64 {
            return Err(rustix::io::Errno::INVAL.into());
        }
        // SAFETY: a new mapping at an address the kernel chooses, of a file checked to
        // hold the 8 bytes accessed.
        let base = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                MAPPED,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        Ok(Self::at(base))
    }

    fn at(base: *mut std::ffi::c_void) -> Self {
        // A successful mmap never returns null, and a page is aligned for an AtomicU64.
        SharedWord {
            base: NonNull::new(base.cast()).expect("mmap returned null"),
        }
    }

    pub fn word(&self) -> &AtomicU64 {
        // SAFETY: `base` is a live mapping of at least 8 writable, page-aligned bytes until
        // drop, and AtomicU64 has the layout of a u64.
        unsafe { self.base.as_ref() }
    }
}

impl Drop for SharedWord {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `anonymous`/`from_fd`, unmapped once; no reference
        // from `word()` outlives `self`.
        let _ = unsafe { mm::munmap(self.base.as_ptr().cast(), MAPPED) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_task_claimed_is_not_revoked_and_one_revoked_is_not_claimed() {
        let word = AtomicU64::new(0);
        assert!(claim(&word, 1));
        assert_eq!(revoke(&word, 3), 1); // 2 and 3 were sent and not claimed: revoked
        assert!(!claim(&word, 2));
        assert!(!claim(&word, 3));
        assert!(claim(&word, 4)); // sent after the revocation
        assert_eq!(claimed(&word, 4), 4);
    }

    #[test]
    fn the_revoked_mark_never_moves_back() {
        let word = AtomicU64::new(0);
        assert_eq!(revoke(&word, 5), 0);
        assert_eq!(revoke(&word, 3), 0);
        assert!(!claim(&word, 5));
        assert!(claim(&word, 6));
    }

    #[test]
    fn numbers_past_two_to_the_32_keep_their_order() {
        // As after 2^32 - 4 tasks, the last one claimed and every one before it behind.
        let start = (1u64 << 32) - 3;
        let word = AtomicU64::new(pack((start - 1) as u32, (start - 2) as u32));
        for number in start..start + 6 {
            assert!(claim(&word, number), "{number}");
            assert_eq!(claimed(&word, number + 2), number);
        }
        let last = start + 5;
        assert_eq!(revoke(&word, last + 2), last);
        assert!(!claim(&word, last + 1) && !claim(&word, last + 2));
        assert!(claim(&word, last + 3));
    }

    #[test]
    fn a_claim_moves_an_old_revocation_mark_along() {
        // Else, 2^31 tasks after a revocation, the old mark would read as ahead of them.
        let word = AtomicU64::new(0);
        assert_eq!(revoke(&word, 2), 0);
        assert!(claim(&word, 3));
        assert_eq!(unpack(word.load(Ordering::Relaxed)), (3, 2));
        assert!(claim(&word, 4));
        assert_eq!(unpack(word.load(Ordering::Relaxed)), (4, 3));
    }

    #[test]
    fn widen_finds_the_number_at_or_before_the_reference() {
        assert_eq!(widen(5, 7), 5);
        assert_eq!(widen(0, 0), 0);
        assert_eq!(widen(u32::MAX, 1u64 << 32), (1u64 << 32) - 1);
        assert_eq!(widen(2, (1u64 << 32) + 3), (1u64 << 32) + 2);
    }

    #[test]
    fn racing_claims_and_revocations_run_each_task_once_or_hand_it_back() {
        // The worker claims tasks 1..=N in order; the parent revokes now and then, up to
        // a few tasks ahead of the worker. Every task is either claimed (run) or revoked
        // (handed back), never both, never neither, whatever the interleaving.
        const TASKS: u64 = 200_000;
        let shared = Arc::new(SharedWord::anonymous().unwrap());
        let sent = Arc::new(AtomicU64::new(0));
        let worker = {
            let (shared, sent) = (shared.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut ran = Vec::new();
                for number in 1..=TASKS {
                    while sent.load(Ordering::Acquire) < number {
                        std::hint::spin_loop();
                    }
                    if claim(shared.word(), number) {
                        ran.push(number);
                    }
                }
                ran
            })
        };
        let mut handed_back = Vec::new();
        let mut revoked_through = 0;
        for number in 1..=TASKS {
            sent.store(number, Ordering::Release);
            if number % 7 == 0 {
                let last_claimed = revoke(shared.word(), number);
                assert!(last_claimed <= number);
                handed_back.extend((last_claimed.max(revoked_through) + 1)..=number);
                revoked_through = number;
            }
        }
        let ran = worker.join().unwrap();
        let mut all: Vec<u64> = ran.iter().chain(&handed_back).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=TASKS).collect::<Vec<_>>(),
            "a task ran twice or was lost"
        );
    }

    #[test]
    fn a_file_too_short_for_the_word_is_refused() {
        let fd = rustix::fs::memfd_create("claims-short", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4).unwrap();
        let err = SharedWord::from_fd(std::os::fd::AsFd::as_fd(&fd))
            .err()
            .unwrap();
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::INVAL.raw_os_error())
        );
    }

    #[test]
    fn a_word_mapped_from_a_file_is_shared_by_its_mappings() {
        let fd = rustix::fs::memfd_create("claims-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 16).unwrap();
        let one = SharedWord::from_fd(std::os::fd::AsFd::as_fd(&fd)).unwrap();
        let two = SharedWord::from_fd(std::os::fd::AsFd::as_fd(&fd)).unwrap();
        assert!(claim(one.word(), 1));
        assert_eq!(revoke(two.word(), 2), 1);
        assert!(!claim(one.word(), 2));
    }
}
