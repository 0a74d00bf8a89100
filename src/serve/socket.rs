//! Talking to a client without ever waiting forever: the socket's read timeout is short
//! ([`POLL`]), and each time it fires the reader checks for SIGINT/SIGTERM and for its
//! deadline (the handshake has one, an idle connection in transmission does not). In
//! transmission writes time out as often, so a client that stops reading cannot keep a
//! stopping server waiting either.

use std::io::{self, IoSlice, Read, Write};
use std::time::{Duration, Instant};

use crate::source::nbd::stream::Stream;

/// How often a blocked read looks at the stop flag.
pub const POLL: Duration = Duration::from_millis(200);

/// How a read ended when it did not fill the buffer.
#[derive(Debug)]
pub enum Stop {
    /// The client closed the connection before the first byte.
    Closed,
    /// SIGINT or SIGTERM asked the server to stop.
    Signal,
    /// An I/O error, an end of stream inside a message, or the deadline passed.
    Failed(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Failed(e)
    }
}

/// Fill `buf` from `s` (whose read timeout is [`POLL`]) before `deadline`.
pub fn read_full(s: &mut Stream, buf: &mut [u8], deadline: Option<Instant>) -> Result<(), Stop> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(Stop::Closed),
            Ok(0) => {
                return Err(Stop::Failed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the client closed the connection inside a {}-byte message",
                        buf.len()
                    ),
                )))
            }
            Ok(n) => got += n,
            Err(e) if is_poll_timeout(&e) => {
                if crate::interrupt::requested().is_some() {
                    return Err(Stop::Signal);
                }
                if deadline.is_some_and(|d| Instant::now() > d) {
                    return Err(Stop::Failed(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Stop::Failed(e)),
        }
    }
    Ok(())
}

/// Most slices handed to one `writev` (the kernel's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Send all of `parts`, in order, on `s` (whose write timeout is [`POLL`]) with vectored
/// writes, however slowly the client reads, unless SIGINT or SIGTERM asks the server to
/// stop.
pub fn write_full(s: &mut Stream, mut parts: &mut [IoSlice<'_>]) -> Result<(), Stop> {
    while !parts.is_empty() {
        let n = parts.len().min(IOV_MAX);
        match s.write_vectored(&parts[..n]) {
            Ok(0) => return Err(Stop::Failed(io::ErrorKind::WriteZero.into())),
            Ok(sent) => IoSlice::advance_slices(&mut parts, sent),
            Err(e) if is_poll_timeout(&e) => {
                if crate::interrupt::requested().is_some() {
                    return Err(Stop::Signal);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Stop::Failed(e)),
        }
    }
    Ok(())
}

/// Whether `e` is the socket's [`POLL`] timeout running out: the moment to look at the stop
/// flag, not a failure.
fn is_poll_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
