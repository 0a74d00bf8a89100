//! The pread reader: one synchronous read at a time, on the calling thread.
//!
//! It exists for kernels and sandboxes without io_uring and as the simple reference the
//! io_uring reader is tested against. Same contract as [`super::read_all`].

use super::MAX_OP;
use super::{ended_early, plan, read_failed, BufferPool, PooledBuf, ReadRequest, ReadStats};
use crate::error::Result;
use crate::source::Source;
use nix::errno::Errno;
use std::os::fd::BorrowedFd;

/// Read each request in order with `pread`, continuing short reads, then deliver it.
pub(super) fn read_all(
    source: &dyn Source,
    fd: BorrowedFd<'_>,
    requests: impl Iterator<Item = ReadRequest>,
    pool: &BufferPool,
    mut deliver: impl FnMut(u64, PooledBuf) -> Result<()>,
) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    for req in requests {
        let read_len = plan(source, pool, &req)?;
        let mut buf = pool.get();
        buf.set_len(read_len);
        let mut done = 0;
        while done < req.len {
            let end = read_len.min(done + MAX_OP);
            // `plan` bounded the offset by the source size, which came from the kernel, but
            // convert without assuming it fits `off_t`.
            let Ok(at) = libc::off_t::try_from(req.offset + done as u64) else {
                return Err(read_failed(source, &req, done, Errno::EOVERFLOW as i32));
            };
            match nix::sys::uio::pread(fd, &mut buf[done..end], at) {
                Ok(0) => return Err(ended_early(source, &req, done)),
                Ok(n) => done += n,
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(read_failed(source, &req, done, e as i32)),
            }
        }
        buf.set_len(req.len);
        deliver(req.tag, buf)?;
        stats.requests += 1;
        stats.bytes += req.len as u64;
    }
    Ok(stats)
}
