//! Requests pipelined on one connection, from many threads at once: reads and block status
//! for a backup, writes, write-zeroes and flushes for a restore into an export.
//!
//! ```text
//!  reader threads ── submit: register Pending (cookie) ─▶ table ◀── lookup ── receiver thread
//!        │          └ write request under the send mutex              │  reads every reply,
//!        │                                                            │  fills Pending.data,
//!        └── wait on Pending.state (condvar, timeout) ◀── done/notify ─┘  marks done
//! ```
//!
//! Each request gets a unique cookie and a [`Pending`] in the table *before* it is written, so
//! its reply always finds it. One receiver thread owns the reading side: it parses each reply
//! with [`super::proto`] and streams data chunks straight into the request's own buffer (sized
//! by the request, never by the server). Replies may come in any order; chunks of a read are
//! checked to lie within it and not overlap, and a finished read must be fully covered. A
//! write's data follows its request under the same send lock, so requests never interleave;
//! its reply is a bare acknowledgement (a simple reply, or a NONE chunk) or an error.
//!
//! Failure model: a server error chunk fails only its request (Io, naming offset and length).
//! Anything that leaves the stream in doubt — a malformed reply (Integrity), the connection
//! dropping (Io), no reply within the timeout (Io) — fails the whole connection: every request
//! in flight and every later one gets the error, and the socket is shut down so nothing hangs.

use super::handshake::BlockLimits;
use super::proto::{
    self, encode_request, reply_header_len, Chunk, Command, Coverage, Expect, Extent, ReplyHeader,
    CHUNK_HEADER_LEN, MAGIC_LEN,
};
use super::stream::Stream;
use crate::error::{Error, ErrorKind, Result};
use crate::util::lock;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest read or write sent as one request, whatever the server allows: the
/// protocol's interoperable maximum, and what qemu-nbd accepts.
pub const MAX_READ: u32 = 32 << 20;

/// An open connection in the transmission phase.
pub struct Client {
    shared: Arc<Shared>,
    writer: Mutex<Stream>,
    receiver: Option<JoinHandle<()>>,
    cookies: AtomicU64,
    timeout: Duration,
    size: u64,
    /// Offsets and lengths sent are multiples of this.
    align: u64,
    /// Longest read or write request (a multiple of `align`).
    max_request: u64,
}

/// What the callers and the receiver share.
struct Shared {
    /// "NBD export URL", the prefix of every message.
    name: String,
    table: Mutex<Table>,
    /// A handle to shut the socket down with, waking the receiver.
    control: Stream,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u64, Arc<Pending>>,
    /// Set once the connection is unusable: the kind and message every request gets.
    dead: Option<(ErrorKind, String)>,
}

/// One request in flight.
struct Pending {
    expect: Expect,
    /// For block status: the context whose extents are wanted.
    context: u32,
    /// For reads: the bytes, filled by the receiver. A lock of its own, so a receiver
    /// streaming into it never blocks a caller waiting on `state` (and its timeout).
    data: Mutex<Vec<u8>>,
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    done: bool,
    error: Option<Error>,
    coverage: Coverage,
    extents: Option<Vec<Extent>>,
}

impl Client {
    /// Take over `stream` (handshake done) and start the receiver thread.
    pub fn start(
        stream: Stream,
        name: String,
        timeout: Duration,
        size: u64,
        limits: BlockLimits,
    ) -> Result<Client> {
        let io = |e| Error::io(format!("{name}: cannot set up the connection"), e);
        // The receiver waits for replies as long as it takes (callers have the timeout);
        // writes must not block forever behind a server that stopped reading.
        stream.set_timeouts(None, Some(timeout)).map_err(io)?;
        let reader = stream.try_clone().map_err(io)?;
        let control = stream.try_clone().map_err(io)?;
        let shared = Arc::new(Shared {
            name: name.clone(),
            table: Mutex::new(Table::default()),
            control,
        });
        let for_thread = Arc::clone(&shared);
        let receiver = std::thread::Builder::new()
            .name("bv-nbd-recv".into())
            .spawn(move || receive(&for_thread, reader))
            .map_err(|e| Error::io(format!("{name}: cannot start the receiver thread"), e))?;
        let align = u64::from(limits.min.max(1));
        let max_request = (u64::from(limits.max.min(MAX_READ)) / align * align).max(align);
        Ok(Client {
            shared,
            writer: Mutex::new(stream),
            receiver: Some(receiver),
            cookies: AtomicU64::new(1),
            timeout,
            size,
            align,
            max_request,
        })
    }

    /// Fill `buf` with the export's bytes at `offset`. Requests are widened to the server's
    /// minimum block size and split at its maximum; all pieces are sent before the first
    /// is awaited, so a large read keeps several in flight.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = self.end_of(Command::Read, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let start = offset / self.align * self.align;
        let aligned_end = end
            .div_ceil(self.align)
            .saturating_mul(self.align)
            .min(self.size);
        let pieces = self
            .split(Command::Read, start, aligned_end)
            .into_iter()
            .map(|expect| self.submit(expect, 0, &[]))
            .collect::<Result<Vec<_>>>()?;
        for p in pieces {
            self.wait(&p)?;
            let data = lock(&p.data);
            let from = p.expect.offset.max(offset);
            let to = (p.expect.offset + u64::from(p.expect.length)).min(end);
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                &data[(from - p.expect.offset) as usize..(to - p.expect.offset) as usize],
            );
        }
        Ok(())
    }

    /// Write `data` at `offset` (`NBD_CMD_WRITE`). Unlike a read, a write cannot be widened:
    /// its offset and end must be multiples of the server's minimum block size (or the end
    /// the export's end), else a Usage error. Split at the server's maximum, every piece sent
    /// before the first is awaited.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let pieces = self
            .write_requests(Command::Write, offset, data.len() as u64)?
            .into_iter()
            .map(|expect| {
                let at = (expect.offset - offset) as usize;
                self.submit(expect, 0, &data[at..at + expect.length as usize])
            })
            .collect::<Result<Vec<_>>>()?;
        pieces.iter().try_for_each(|p| self.wait(p))
    }

    /// Make `len` bytes at `offset` read as zeros (`NBD_CMD_WRITE_ZEROES`, which the caller
    /// checked the server advertises), with a write's alignment rules. No command flags: the
    /// server may punch holes, so a sparse image behind it stays sparse.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let pieces = self
            .write_requests(Command::WriteZeroes, offset, len)?
            .into_iter()
            .map(|expect| self.submit(expect, 0, &[]))
            .collect::<Result<Vec<_>>>()?;
        pieces.iter().try_for_each(|p| self.wait(p))
    }

    /// `NBD_CMD_FLUSH` (which the caller checked the server advertises): every write the
    /// server acknowledged is on stable storage when this returns.
    pub fn flush(&self) -> Result<()> {
        let expect = Expect {
            command: Command::Flush,
            offset: 0,
            length: 0,
        };
        let p = self.submit(expect, 0, &[])?;
        self.wait(&p)
    }

    /// The end of `offset..offset+len`, which must lie within the export.
    fn end_of(&self, command: Command, offset: u64, len: u64) -> Result<u64> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::usage(format!(
                    "{}: {} at offset {offset} ({len} bytes) past the end of the {}-byte export",
                    self.shared.name,
                    command.name(),
                    self.size
                ))
            })
    }

    /// `start..end` as requests of `command` of at most the longest request each.
    fn split(&self, command: Command, start: u64, end: u64) -> Vec<Expect> {
        let mut pieces = Vec::new();
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(self.max_request);
            // `max_request` is at most 32 MiB, so the length fits the request's u32.
            pieces.push(Expect {
                command,
                offset: pos,
                length: len as u32,
            });
            pos += len;
        }
        pieces
    }

    /// The requests of a write-like `command` over `offset..offset+len`: within the export
    /// and aligned to the server's minimum block size.
    fn write_requests(&self, command: Command, offset: u64, len: u64) -> Result<Vec<Expect>> {
        let end = self.end_of(command, offset, len)?;
        let aligned = |x: u64| x.is_multiple_of(self.align);
        if !aligned(offset) || !(aligned(end) || end == self.size) {
            return Err(Error::usage(format!(
                "{}: {} at offset {offset} ({len} bytes) is not aligned to the server's \
                 minimum block size of {} bytes",
                self.shared.name,
                command.name(),
                self.align
            )));
        }
        Ok(self.split(command, offset, end))
    }

    /// The extents of `context` from `offset`, for about `len` bytes (the server may
    /// answer for less, or for more in the last extent).
    pub fn block_status(&self, context: u32, offset: u64, len: u32) -> Result<Vec<Extent>> {
        let expect = Expect {
            command: Command::BlockStatus,
            offset,
            length: len,
        };
        let p = self.submit(expect, context, &[])?;
        self.wait(&p)?;
        let extents = lock(&p.state).extents.take();
        // The receiver refuses to finish a successful block status without them.
        extents.ok_or_else(|| {
            Error::integrity(format!(
                "{}: block status without extents",
                self.shared.name
            ))
        })
    }

    /// Register and send one request, followed by `payload` (a write's data).
    fn submit(&self, expect: Expect, context: u32, payload: &[u8]) -> Result<Arc<Pending>> {
        let cookie = self.cookies.fetch_add(1, Ordering::Relaxed);
        let data_len = match expect.command {
            Command::Read => expect.length as usize,
            _ => 0,
        };
        let pending = Arc::new(Pending {
            expect,
            context,
            data: Mutex::new(vec![0u8; data_len]),
            state: Mutex::new(State::default()),
            done: Condvar::new(),
        });
        {
            let mut t = lock(&self.shared.table);
            if let Some((kind, msg)) = &t.dead {
                return Err(Error::new(*kind, msg.clone()));
            }
            t.pending.insert(cookie, Arc::clone(&pending));
        }
        let request = encode_request(expect.command.code(), cookie, expect.offset, expect.length);
        let sent = {
            let mut w = lock(&self.writer);
            w.write_all(&request).and_then(|()| w.write_all(payload))
        };
        if let Err(e) = sent {
            let msg = format!(
                "{}: connection lost: sending a request failed: {e}",
                self.shared.name
            );
            self.shared.fail(ErrorKind::Io, &msg);
            return Err(Error::new(ErrorKind::Io, msg).with_source(e));
        }
        Ok(pending)
    }

    /// Wait for `p` to finish, at most the timeout (then the connection is given up).
    fn wait(&self, p: &Pending) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut st = lock(&p.state);
        while !st.done {
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                let msg = format!(
                    "{}: no reply within {} s to {}; connection closed",
                    self.shared.name,
                    self.timeout.as_secs_f64(),
                    describe(&p.expect)
                );
                self.shared.fail(ErrorKind::Io, &msg);
                return Err(Error::new(ErrorKind::Io, msg));
            }
            st = p
                .done
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Client {
    /// Soft disconnect (`NBD_CMD_DISC`), then close, so the server is free for the next
    /// client (qemu-nbd serves one at a time by default) when this returns.
    fn drop(&mut self) {
        let _ = lock(&self.writer).write_all(&encode_request(proto::CMD_DISC, 0, 0, 0));
        self.shared.fail(
            ErrorKind::Io,
            &format!("{}: connection closed", self.shared.name),
        );
        if let Some(r) = self.receiver.take() {
            let _ = r.join();
        }
    }
}

impl Shared {
    /// Give the connection up: every request in flight and every later one fails with
    /// `msg`, and the socket is shut down (which ends the receiver). The first call wins.
    fn fail(&self, kind: ErrorKind, msg: &str) {
        let ((kind, msg), drained) = {
            let mut t = lock(&self.table);
            let dead = t.dead.get_or_insert_with(|| (kind, msg.to_owned())).clone();
            let drained: Vec<Arc<Pending>> = t.pending.drain().map(|(_, p)| p).collect();
            (dead, drained)
        };
        for p in drained {
            let mut st = lock(&p.state);
            st.error
                .get_or_insert_with(|| Error::new(kind, msg.clone()));
            st.done = true;
            p.done.notify_all();
        }
        self.control.shutdown();
    }

    fn lookup(&self, cookie: u64) -> Result<Arc<Pending>> {
        lock(&self.table)
            .pending
            .get(&cookie)
            .cloned()
            .ok_or_else(|| {
                Error::integrity(format!(
                    "malformed reply: cookie {cookie} matches no request in flight"
                ))
            })
    }

    /// Mark `cookie` finished (its state already filled in).
    fn finish(&self, cookie: u64, p: &Pending) {
        lock(&self.table).pending.remove(&cookie);
        let mut st = lock(&p.state);
        st.done = true;
        p.done.notify_all();
    }
}

/// The receiver thread: read replies until the connection fails or is closed.
fn receive(shared: &Shared, mut stream: Stream) {
    let e = loop {
        if let Err(e) = receive_one(shared, &mut stream) {
            break e;
        }
    };
    let msg = if e.kind() == ErrorKind::Integrity {
        format!("{}: {}; connection closed", shared.name, e.context())
    } else {
        format!("{}: connection lost: {}", shared.name, e.context())
    };
    shared.fail(e.kind(), &msg);
}

/// Read and dispatch one reply message. Any error is fatal to the connection.
fn receive_one(shared: &Shared, s: &mut Stream) -> Result<()> {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    read_exact(s, &mut h[..MAGIC_LEN])?;
    let len = reply_header_len([h[0], h[1], h[2], h[3]])?;
    read_exact(s, &mut h[MAGIC_LEN..len])?;
    let header = ReplyHeader::parse(&h[..len])?;
    let cookie = header.cookie();
    let p = shared.lookup(cookie)?;
    let expect = p.expect;
    match header {
        ReplyHeader::Simple { error: 0, .. } => match expect.command {
            Command::Read => {
                read_exact(s, &mut lock(&p.data))?;
                lock(&p.state).coverage.add(0, expect.length)?;
            }
            Command::BlockStatus => {
                return Err(Error::integrity(
                    "malformed reply: simple reply without error to a block-status request",
                ))
            }
            // A bare acknowledgement is the whole answer to a write, zeroing or flush.
            Command::Write | Command::WriteZeroes | Command::Flush => {}
        },
        ReplyHeader::Simple { error, .. } => {
            lock(&p.state).error = Some(server_error(&shared.name, &expect, error, "", None));
        }
        ReplyHeader::Chunk(h) => {
            let mut prefix = vec![0u8; h.prefix_len(&expect)?];
            read_exact(s, &mut prefix)?;
            match Chunk::parse(&h, &prefix, &expect)? {
                Chunk::Data { offset, len } => {
                    let at = (offset - expect.offset) as usize;
                    read_exact(s, &mut lock(&p.data)[at..at + len as usize])?;
                    lock(&p.state).coverage.add(at as u32, len)?;
                }
                Chunk::Hole { offset, len } => {
                    let at = (offset - expect.offset) as usize;
                    lock(&p.data)[at..at + len as usize].fill(0);
                    lock(&p.state).coverage.add(at as u32, len)?;
                }
                Chunk::Status { context, extents } => {
                    let mut st = lock(&p.state);
                    if context == p.context {
                        if st.extents.is_some() {
                            return Err(Error::integrity(format!(
                                "malformed reply: two block-status chunks for context {context}"
                            )));
                        }
                        st.extents = Some(extents);
                    }
                }
                Chunk::Error {
                    code,
                    message,
                    offset,
                } => {
                    let e = server_error(&shared.name, &expect, code, &message, offset);
                    lock(&p.state).error.get_or_insert(e);
                }
                Chunk::None => {}
            }
            if !h.done {
                return Ok(());
            }
        }
    }
    check_complete(&p)?;
    shared.finish(cookie, &p);
    Ok(())
}

/// A reply marked done without an error must have answered the whole request.
fn check_complete(p: &Pending) -> Result<()> {
    let st = lock(&p.state);
    if st.error.is_some() {
        return Ok(());
    }
    let e = &p.expect;
    match e.command {
        Command::Read if st.coverage.covered() != u64::from(e.length) => {
            Err(Error::integrity(format!(
                "malformed reply: {} ended after {} bytes",
                describe(e),
                st.coverage.covered()
            )))
        }
        Command::BlockStatus if st.extents.is_none() => Err(Error::integrity(format!(
            "malformed reply: {} ended without extents for context {}",
            describe(e),
            p.context
        ))),
        _ => Ok(()),
    }
}

fn read_exact(s: &mut Stream, buf: &mut [u8]) -> Result<()> {
    s.read_exact(buf).map_err(|e| {
        let msg = if e.kind() == io::ErrorKind::UnexpectedEof {
            "server closed the connection"
        } else {
            "reading from the server failed"
        };
        Error::io(msg, e)
    })
}

/// "the read at offset X (N bytes)".
fn describe(e: &Expect) -> String {
    format!(
        "the {} at offset {} ({} bytes)",
        e.command.name(),
        e.offset,
        e.length
    )
}

/// A request the server failed: an Io error for that request alone.
fn server_error(name: &str, e: &Expect, code: u32, message: &str, at: Option<u64>) -> Error {
    let at = at.map(|o| format!(" at offset {o}")).unwrap_or_default();
    let said = if message.is_empty() {
        String::new()
    } else {
        format!(": {message:?}")
    };
    Error::new(
        ErrorKind::Io,
        format!(
            "{name}: server failed {}{at} with {}{said}",
            describe(e),
            proto::error_name(code)
        ),
    )
}

#[cfg(test)]
mod tests {
    //! The client against a scripted server on a socket pair: the cases qemu-nbd never
    //! produces (replies out of order, error chunks, malformed and partial replies, a drop).
    use super::*;
    use std::os::unix::net::UnixStream;

    fn client(size: u64) -> (Client, UnixStream) {
        client_with(size, BlockLimits::default())
    }

    fn client_with(size: u64, limits: BlockLimits) -> (Client, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let c = Client::start(
            Stream::Unix(a),
            "NBD export test".into(),
            Duration::from_secs(5),
            size,
            limits,
        )
        .expect("start");
        (c, b)
    }

    /// 512-byte minimum, 1 MiB maximum requests.
    const SPLIT: BlockLimits = BlockLimits {
        min: 512,
        preferred: 4096,
        max: 1 << 20,
    };

    /// Read one request: (command, cookie, offset, length).
    fn request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
        let mut b = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut b).expect("request");
        assert_eq!(&b[0..4], &proto::REQUEST_MAGIC.to_be_bytes());
        let be = |r: std::ops::Range<usize>| b[r].iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
        (be(6..8) as u16, be(8..16), be(16..24), be(24..28) as u32)
    }

    fn chunk(cookie: u64, done: bool, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(u16::from(done).to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend((payload.len() as u32).to_be_bytes());
        b.extend(payload);
        b
    }

    fn data(cookie: u64, done: bool, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let payload = [offset.to_be_bytes().as_slice(), bytes].concat();
        chunk(cookie, done, proto::REPLY_TYPE_OFFSET_DATA, &payload)
    }

    #[test]
    fn out_of_order_replies_and_a_server_error() {
        let (c, mut s) = client(1 << 20);
        std::thread::scope(|scope| {
            let first = scope.spawn(|| {
                let mut b = vec![1u8; 4096];
                c.read(0, &mut b).map(|()| b)
            });
            let r1 = request(&mut s);
            let second = scope.spawn(|| {
                let mut b = vec![1u8; 100];
                c.read(8192, &mut b).map(|()| b)
            });
            let r2 = request(&mut s);
            assert_eq!(
                (r1.0, r1.2, r1.3, r2.2, r2.3),
                (proto::CMD_READ, 0, 4096, 8192, 100)
            );
            // The second first; the first as a hole then data, out of order.
            s.write_all(&data(r2.1, true, 8192, &[7; 100])).unwrap();
            let hole = [0u64.to_be_bytes().as_slice(), &2048u32.to_be_bytes()].concat();
            s.write_all(&data(r1.1, false, 2048, &[9; 2048])).unwrap();
            s.write_all(&chunk(r1.1, true, proto::REPLY_TYPE_OFFSET_HOLE, &hole))
                .unwrap();
            assert_eq!(second.join().unwrap().unwrap(), vec![7; 100]);
            let b = first.join().unwrap().unwrap();
            assert!(b[..2048].iter().all(|&x| x == 0) && b[2048..].iter().all(|&x| x == 9));
        });
        // An error chunk fails that read only.
        std::thread::scope(|scope| {
            let failing = scope.spawn(|| c.read(512, &mut [0u8; 512]));
            let r = request(&mut s);
            let mut p = 5u32.to_be_bytes().to_vec();
            p.extend(4u16.to_be_bytes());
            p.extend(b"boom");
            s.write_all(&chunk(r.1, true, proto::REPLY_TYPE_ERROR, &p))
                .unwrap();
            let e = failing.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            let msg = e.to_string();
            assert!(
                msg.contains("read at offset 512")
                    && msg.contains("NBD_EIO")
                    && msg.contains("boom"),
                "{msg}"
            );
            let ok = scope.spawn(|| c.read(0, &mut [0u8; 10]));
            let r = request(&mut s);
            s.write_all(&data(r.1, true, 0, &[3; 10])).unwrap();
            ok.join().unwrap().expect("still usable");
        });
    }

    #[test]
    fn malformed_reply_fails_every_request() {
        let (c, mut s) = client(1 << 20);
        std::thread::scope(|scope| {
            let a = scope.spawn(|| c.read(0, &mut [0u8; 4096]));
            let ra = request(&mut s);
            let b = scope.spawn(|| c.read(65536, &mut [0u8; 4096]));
            request(&mut s);
            // Two chunks for the same bytes.
            s.write_all(&data(ra.1, false, 0, &[1; 2048])).unwrap();
            s.write_all(&data(ra.1, true, 1024, &[1; 2048])).unwrap();
            for r in [a.join().unwrap(), b.join().unwrap()] {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
                assert!(e.to_string().contains("overlaps an earlier chunk"), "{e}");
            }
        });
        let e = c.read(0, &mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
    }

    #[test]
    fn partial_read_and_unknown_cookie_are_integrity() {
        let (c, mut s) = client(1 << 20);
        std::thread::scope(|scope| {
            let a = scope.spawn(|| c.read(0, &mut [0u8; 4096]));
            let r = request(&mut s);
            s.write_all(&data(r.1, true, 0, &[1; 1000])).unwrap();
            let e = a.join().unwrap().unwrap_err();
            assert!(e.to_string().contains("ended after 1000 bytes"), "{e}");
        });
        let (c, mut s) = client(1 << 20);
        std::thread::scope(|scope| {
            let a = scope.spawn(|| c.read(0, &mut [0u8; 16]));
            let r = request(&mut s);
            s.write_all(&data(r.1 + 99, true, 0, &[1; 16])).unwrap();
            let e = a.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Integrity);
            assert!(e.to_string().contains("matches no request"), "{e}");
        });
    }

    #[test]
    fn dropped_connection_fails_reads_in_flight_and_later() {
        let (c, mut s) = client(1 << 20);
        std::thread::scope(|scope| {
            let a = scope.spawn(|| c.read(0, &mut [0u8; 4096]));
            let r = request(&mut s);
            // Half a data chunk, then the server goes away.
            s.write_all(&data(r.1, true, 0, &[1; 4096])[..100]).unwrap();
            drop(s);
            let e = a.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            assert!(
                e.to_string().contains("NBD export test: connection lost"),
                "{e}"
            );
        });
        let e = c.read(0, &mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    /// Read a write's payload of `len` bytes.
    fn payload(s: &mut UnixStream, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        s.read_exact(&mut b).expect("payload");
        b
    }

    fn ack(cookie: u64) -> Vec<u8> {
        let mut b = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(0u32.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b
    }

    #[test]
    fn writes_split_carry_their_data_and_fail_alone() {
        let (c, mut s) = client_with(4 << 20, SPLIT);
        // 1.5 MiB: two requests, each followed by its own bytes, both sent at once.
        let bytes: Vec<u8> = (0..3 << 19).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|scope| {
            let w = scope.spawn(|| c.write(1 << 20, &bytes));
            let r1 = request(&mut s);
            let p1 = payload(&mut s, r1.3);
            let r2 = request(&mut s);
            let p2 = payload(&mut s, r2.3);
            assert_eq!(
                (r1.0, r1.2, r1.3, r2.0, r2.2, r2.3),
                (
                    proto::CMD_WRITE,
                    1 << 20,
                    1 << 20,
                    proto::CMD_WRITE,
                    2 << 20,
                    1 << 19
                )
            );
            assert_eq!([p1, p2].concat(), bytes);
            // Acknowledged out of order; one as a simple reply, one as a NONE chunk.
            s.write_all(&chunk(r2.1, true, proto::REPLY_TYPE_NONE, &[]))
                .unwrap();
            s.write_all(&ack(r1.1)).unwrap();
            w.join().unwrap().expect("write");
            // Zeroes and flush: no payload.
            let z = scope.spawn(|| c.write_zeroes(0, 4096));
            let r = request(&mut s);
            assert_eq!((r.0, r.2, r.3), (proto::CMD_WRITE_ZEROES, 0, 4096));
            s.write_all(&ack(r.1)).unwrap();
            z.join().unwrap().expect("write zeroes");
            let f = scope.spawn(|| c.flush());
            let r = request(&mut s);
            assert_eq!((r.0, r.2, r.3), (proto::CMD_FLUSH, 0, 0));
            s.write_all(&ack(r.1)).unwrap();
            f.join().unwrap().expect("flush");
            // A server error (out of space) fails that write only.
            let w = scope.spawn(|| c.write(0, &[1u8; 512]));
            let r = request(&mut s);
            payload(&mut s, r.3);
            let mut e = 28u32.to_be_bytes().to_vec();
            e.extend(0u16.to_be_bytes());
            s.write_all(&chunk(r.1, true, proto::REPLY_TYPE_ERROR, &e))
                .unwrap();
            let e = w.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            assert!(
                e.to_string().contains("write at offset 0 (512 bytes)")
                    && e.to_string().contains("NBD_ENOSPC"),
                "{e}"
            );
        });
        // Writes cannot be widened: unaligned ones, and any past the end, are refused unsent.
        let e = c.write(100, &[0u8; 512]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        assert!(e.to_string().contains("minimum block size of 512"), "{e}");
        let e = c.write_zeroes(4 << 20, 512).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        // A data chunk in reply to a write breaks the protocol: the connection is given up.
        std::thread::scope(|scope| {
            let w = scope.spawn(|| c.write(0, &[2u8; 512]));
            let r = request(&mut s);
            payload(&mut s, r.3);
            s.write_all(&data(r.1, true, 0, &[0; 16])).unwrap();
            let e = w.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
        });
    }

    #[test]
    fn block_status_keeps_its_context_and_reads_split_and_align() {
        let (c, mut s) = client_with(3 << 20, SPLIT);
        std::thread::scope(|scope| {
            let st = scope.spawn(|| c.block_status(2, 0, 1 << 20));
            let r = request(&mut s);
            assert_eq!((r.0, r.2, r.3), (proto::CMD_BLOCK_STATUS, 0, 1 << 20));
            for (ctx, flags) in [(1u32, 9u32), (2, 3)] {
                let p = [
                    ctx.to_be_bytes(),
                    4096u32.to_be_bytes(),
                    flags.to_be_bytes(),
                ]
                .concat();
                s.write_all(&chunk(r.1, ctx == 2, proto::REPLY_TYPE_BLOCK_STATUS, &p))
                    .unwrap();
            }
            assert_eq!(
                st.join().unwrap().unwrap(),
                vec![Extent {
                    len: 4096,
                    flags: 3
                }]
            );
            // 1.5 MiB from offset 100: widened to 512-byte blocks, split at 1 MiB.
            let rd = scope.spawn(|| {
                let mut b = vec![0u8; 3 << 19];
                c.read(100, &mut b).map(|()| b)
            });
            let p1 = request(&mut s);
            let p2 = request(&mut s);
            assert_eq!(
                (p1.2, p1.3, p2.2, p2.3),
                (0, 1 << 20, 1 << 20, (1 << 19) + 512)
            );
            s.write_all(&data(p2.1, true, p2.2, &vec![2; p2.3 as usize]))
                .unwrap();
            s.write_all(&data(p1.1, true, 0, &vec![1; 1 << 20]))
                .unwrap();
            let b = rd.join().unwrap().unwrap();
            let split = (1 << 20) - 100;
            assert!(b[..split].iter().all(|&x| x == 1) && b[split..].iter().all(|&x| x == 2));
        });
    }
}
