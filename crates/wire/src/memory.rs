//! Making a fresh large buffer cheap to fill.
//!
//! A 64 MiB payload lands in a buffer that was just allocated, so every one of its 16,384
//! pages is faulted in as the kernel copies data into it; that costs about as much as the
//! copy itself. Asking for transparent huge pages on that buffer cuts the faults 512-fold.

/// Buffers at least this large get the huge-page hint (it only pays off for whole 2 MiB
/// extents, and smaller allocations may share pages with other heap data).
pub const HUGE_PAGE_HINT_MIN: usize = 8 << 20;

/// Hints that `[ptr, ptr + len)` will be filled soon and should be backed by huge pages.
/// A hint only: it never changes contents and any failure is ignored.
#[cfg(target_os = "linux")]
pub fn advise_fresh_buffer(ptr: *mut u8, len: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    if len < HUGE_PAGE_HINT_MIN {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
    if end <= start {
        return;
    }
    // SAFETY: the range lies inside the caller's allocation (rounded inwards to 2 MiB
    // boundaries), and MADV_HUGEPAGE does not change the memory's contents or validity.
    let _ = unsafe {
        rustix::mm::madvise(
            start as *mut std::ffi::c_void,
            end - start,
            rustix::mm::Advice::LinuxHugepage,
        )
    };
}

#[cfg(not(target_os = "linux"))]
pub fn advise_fresh_buffer(_ptr: *mut u8, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

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
            advise_fresh_buffer(buf.as_mut_ptr(), len);
            // Also an unaligned start.
            if len > 1 {
                advise_fresh_buffer(buf[1..].as_mut_ptr(), len - 1);
            }
            assert!(buf.iter().all(|&b| b == 0x5a));
        }
    }
}
