//! Aligned buffers and the bounded pool the readers draw them from.
//!
//! Model: a [`BufferPool`] owns at most `count` equal [`AlignedBuf`]s. A reader takes one per
//! read ([`BufferPool::get`]), fills it, and hands it on as a [`PooledBuf`]; whoever holds the
//! `PooledBuf` last (usually a hashing/compression worker) returns it to the pool simply by
//! dropping it. Because `get` blocks while every buffer is lent out, memory use is
//! `count * capacity` no matter how large the disk is, and a slow consumer slows the reader
//! down instead of letting data pile up.
//!
//! Buffers are allocated lazily, on the first `get` that finds no free buffer while fewer than
//! `count` exist, so a pool of 64 x 4 MiB only commits what the pipeline actually keeps in
//! flight. Once allocated they are reused until the pool and every lent buffer are gone.

use std::alloc::{self, Layout};
use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// A heap buffer whose start address is aligned, as O_DIRECT reads require.
///
/// It owns its allocation exclusively (like a `Vec<u8>`), so it is `Send` and `Sync`. It
/// derefs to its first [`len`](Self::len) bytes; the bytes between `len` and
/// [`capacity`](Self::capacity) keep whatever they last held (zeros at allocation), so no
/// uninitialised memory is ever exposed.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    capacity: usize,
    len: usize,
}

// SAFETY: `AlignedBuf` is the unique owner of its allocation and exposes it only through
// `&self`/`&mut self` borrows, exactly like `Vec<u8>`, which is `Send`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reading the bytes (`Deref`), never mutation, so
// concurrent `&AlignedBuf` access is data-race free, as for `Vec<u8>`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `capacity` bytes starting at a multiple of `align`, with length 0.
    ///
    /// `align` is rounded up to a power of two (0 counts as 1). A zero capacity still
    /// allocates one byte so the pointer is real and aligned.
    ///
    /// # Panics
    /// If `capacity` rounded up to `align` overflows `isize` (a programming error, as with
    /// `Vec::with_capacity`). Allocation failure aborts, as for any std collection.
    pub fn new(capacity: usize, align: usize) -> Self {
        let align = normalize_align(align);
        let layout = match Layout::from_size_align(capacity.max(1), align) {
            Ok(layout) => layout,
            Err(_) => panic!("AlignedBuf: capacity {capacity} with alignment {align} is too large"),
        };
        // SAFETY: `layout` has a non-zero size (at least 1 byte) as `alloc_zeroed` requires.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            layout,
            capacity,
            len: 0,
        }
    }

    /// Usable size in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The alignment of the start address (a power of two).
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// Bytes currently visible through `Deref`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set the visible length, clamped to the capacity (so a bad length can never expose
    /// memory past the allocation). Newly visible bytes are whatever the buffer held.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity);
    }

    /// Pointer to the start of the whole capacity, for filling by the kernel (io_uring).
    ///
    /// Getting the pointer is safe; writing through it is sound only within `capacity()`
    /// bytes and only while this buffer is alive and not otherwise borrowed.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// Round an alignment request to the power of two `Layout` needs.
fn normalize_align(align: usize) -> usize {
    align
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << (usize::BITS - 1))
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `capacity` bytes, all initialised
        // (zeroed at allocation); `len <= capacity` is kept by `set_len`; the borrow of `self`
        // keeps the allocation alive and unmutated for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly `layout` and is freed only
        // here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("align", &self.align())
            .finish()
    }
}

/// A fixed set of equal buffers; [`get`](Self::get) blocks while all are lent out: this bound
/// is what keeps memory independent of disk size. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    count: usize,
    capacity: usize,
    align: usize,
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    free: Vec<AlignedBuf>,
    allocated: usize,
}

impl BufferPool {
    /// A pool of at most `count` buffers of `capacity` bytes aligned to `align`.
    ///
    /// `count` 0 is treated as 1: a pool that can never lend would block `get` forever.
    /// Nothing is allocated here (see the module docs).
    pub fn new(count: usize, capacity: usize, align: usize) -> Self {
        let count = count.max(1);
        BufferPool {
            inner: Arc::new(PoolInner {
                count,
                capacity,
                align: normalize_align(align),
                state: Mutex::new(PoolState {
                    free: Vec::with_capacity(count),
                    allocated: 0,
                }),
                returned: Condvar::new(),
            }),
        }
    }

    /// Take a buffer (length 0), waiting for one to be dropped if all are lent out.
    pub fn get(&self) -> PooledBuf {
        let mut state = self.inner.lock();
        loop {
            if let Some(buf) = self.inner.take(&mut state) {
                drop(state);
                return self.lend(buf);
            }
            state = self
                .inner
                .returned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Take a buffer if one is free or may still be allocated, without waiting.
    ///
    /// Readers with reads in flight use this: blocking there could wait for a buffer that
    /// only the reader itself would free.
    pub fn try_get(&self) -> Option<PooledBuf> {
        let mut state = self.inner.lock();
        let buf = self.inner.take(&mut state);
        drop(state);
        buf.map(|b| self.lend(b))
    }

    /// Size in bytes of every buffer.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Alignment of every buffer's address (a power of two).
    pub fn align(&self) -> usize {
        self.inner.align
    }

    /// The most buffers that can be lent at once.
    pub fn count(&self) -> usize {
        self.inner.count
    }

    fn lend(&self, buf: Slot) -> PooledBuf {
        let mut buf = match buf {
            Slot::Free(buf) => buf,
            // Allocate outside the lock: zeroing megabytes must not stall other takers.
            Slot::New => AlignedBuf::new(self.inner.capacity, self.inner.align),
        };
        buf.set_len(0);
        PooledBuf {
            buf: ManuallyDrop::new(buf),
            pool: Arc::clone(&self.inner),
        }
    }

    /// Buffers currently lent out (for tests of the bound).
    #[cfg(test)]
    pub(crate) fn lent(&self) -> usize {
        let state = self.inner.lock();
        state.allocated - state.free.len()
    }

    /// Buffers allocated so far (for tests of lazy allocation).
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.inner.lock().allocated
    }
}

/// What `PoolInner::take` found: a buffer to reuse, or permission to allocate one.
enum Slot {
    Free(AlignedBuf),
    New,
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is a Vec and a counter, consistent after every statement, so a panic in
        // another holder leaves nothing half-done: ignore poisoning.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self, state: &mut PoolState) -> Option<Slot> {
        if let Some(buf) = state.free.pop() {
            return Some(Slot::Free(buf));
        }
        if state.allocated < self.count {
            state.allocated += 1;
            return Some(Slot::New);
        }
        None
    }
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("count", &self.inner.count)
            .field("capacity", &self.inner.capacity)
            .field("align", &self.inner.align)
            .finish()
    }
}

/// A buffer lent from a [`BufferPool`]; returned to the pool when dropped. Derefs to its
/// [`len`](Self::len) bytes.
pub struct PooledBuf {
    buf: ManuallyDrop<AlignedBuf>,
    pool: Arc<PoolInner>,
}

impl PooledBuf {
    /// Bytes currently visible.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether `len() == 0`.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Set the visible length (clamped to the capacity); see [`AlignedBuf::set_len`].
    pub fn set_len(&mut self, len: usize) {
        self.buf.set_len(len);
    }

    /// Usable size in bytes.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Pointer to the start of the whole capacity; see [`AlignedBuf::as_mut_ptr`].
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }

    /// Give this buffer up for good without freeing its memory, which the kernel may still
    /// access (an io_uring whose completions can no longer be reaped). The pool may then
    /// allocate a replacement, so a taker waiting in [`BufferPool::get`] does not wait
    /// forever for a buffer that will never come back.
    pub fn leak(self) {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so `buf` is taken exactly once, here.
        std::mem::forget(unsafe { ManuallyDrop::take(&mut this.buf) });
        // SAFETY: as above: the Arc is moved out of `this` exactly once, here.
        let pool = unsafe { std::ptr::read(&this.pool) };
        pool.lock().allocated -= 1;
        pool.returned.notify_one();
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        // SAFETY: `buf` is taken exactly once, here, and `self` is never used again.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        self.pool.lock().free.push(buf);
        self.pool.returned.notify_one();
    }
}

impl fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBuf")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn a_leaked_buffer_is_replaced_so_a_waiting_taker_gets_one() {
        let pool = BufferPool::new(1, 4096, 4096);
        let first = pool.get();
        let waiter = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.get().capacity())
        };
        std::thread::sleep(Duration::from_millis(50));
        first.leak();
        assert_eq!(waiter.join().expect("the waiter got a buffer"), 4096);
        assert_eq!(
            pool.allocated(),
            1,
            "the replacement is the only one counted"
        );
        assert_eq!(pool.lent(), 0);
        assert!(pool.try_get().is_some());
    }

    #[test]
    fn aligned_buf_is_aligned_zeroed_and_clamped() {
        for align in [1, 512, 4096, 3000] {
            let mut b = AlignedBuf::new(10_000, align);
            assert!((b.as_mut_ptr() as usize).is_multiple_of(normalize_align(align)));
            assert!(b.is_empty());
            b.set_len(10_000);
            assert!(b.iter().all(|&x| x == 0));
            b[9_999] = 7;
            b.set_len(usize::MAX);
            assert_eq!(b.len(), 10_000);
            assert_eq!(b[9_999], 7);
        }
        let z = AlignedBuf::new(0, 4096);
        assert_eq!(z.capacity(), 0);
        assert!(z.is_empty());
    }

    #[test]
    fn pool_allocates_lazily_and_reuses() {
        let pool = BufferPool::new(64, 4 << 20, 4096);
        assert_eq!(pool.allocated(), 0);
        let mut a = pool.get();
        assert_eq!(pool.allocated(), 1);
        a.set_len(3);
        a.copy_from_slice(b"abc");
        let p = a.as_mut_ptr();
        drop(a);
        let mut b = pool.get();
        assert_eq!(pool.allocated(), 1, "the returned buffer is reused");
        assert_eq!(b.as_mut_ptr(), p);
        assert_eq!(b.len(), 0, "a lent buffer starts empty");
        assert_eq!(b.capacity(), 4 << 20);
    }

    #[test]
    fn try_get_respects_the_bound() {
        let pool = BufferPool::new(2, 16, 1);
        let a = pool.try_get().expect("first");
        let _b = pool.try_get().expect("second");
        assert!(pool.try_get().is_none());
        drop(a);
        assert!(pool.try_get().is_some());
        assert_eq!(BufferPool::new(0, 16, 1).count(), 1);
    }

    #[test]
    fn get_blocks_until_a_buffer_is_returned_and_bound_holds() {
        let pool = BufferPool::new(3, 64, 8);
        let out = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (pool, out, max) = (pool.clone(), out.clone(), max.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let b = pool.get();
                        let now = out.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        assert!(pool.lent() <= 3);
                        std::thread::sleep(Duration::from_micros(200));
                        out.fetch_sub(1, Ordering::SeqCst);
                        drop(b);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker");
        }
        assert!(max.load(Ordering::SeqCst) <= 3);
        assert_eq!(pool.lent(), 0);
        assert!(pool.allocated() <= 3);
    }

    #[test]
    fn pooled_buf_is_send_and_outlives_pool_handle() {
        fn assert_send<T: Send>() {}
        assert_send::<PooledBuf>();
        assert_send::<BufferPool>();
        let pool = BufferPool::new(1, 8, 1);
        let b = pool.get();
        drop(pool);
        std::thread::spawn(move || drop(b))
            .join()
            .expect("drop elsewhere");
    }
}
