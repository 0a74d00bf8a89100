//! The transmission phase of one connection: the connection's thread reads requests (and
//! writes' payloads) and hands them to up to [`IN_FLIGHT`] workers, which answer them in
//! parallel and in any order ([`reply`]), each reply written whole under the socket's lock.
//! NBD lets a server answer out of order: clients match replies to requests by cookie, and
//! a flush covers the writes already answered, which is what the overlay's flush does.
//!
//! Requests in flight hold at most [`IN_FLIGHT_BYTES`] of reply or payload buffers (a larger
//! single request waits until it is alone), so memory per connection stays bounded whatever
//! a client queues. Refused requests (out of range, too long, writes to a read-only export,
//! unknown commands) get an error and the connection goes on; a header with a wrong magic,
//! or a write too long to drain, ends it, after the requests already in flight are answered
//! (`NBD_CMD_DISC` ends it the same way). No thread ever waits for the client without
//! looking at the stop flag: a client that stops reading its replies holds one connection,
//! never the server's shutdown.

use std::sync::{Condvar, Mutex};

use crossbeam_channel::{bounded, SendTimeoutError, Sender};

use super::export::Export;
use super::negotiate::Session;
use super::parts::Reply;
use super::reply;
use super::socket::{read_full, write_full, Stop, POLL};
use super::wire::{check_request, parse_request, Op, Request, MAX_REQUEST};
use crate::source::nbd::proto::{CMD_WRITE, REQUEST_LEN};
use crate::source::nbd::stream::Stream;
use crate::util::lock;

/// Requests of one connection answered at once: enough to keep both cores decoding for one
/// client (fio or a guest with a queue depth of 32), and to overlap fetches from object
/// storage, whose latency is not CPU.
pub const IN_FLIGHT: usize = 8;

/// Bytes of read replies and write payloads one connection holds at once.
pub const IN_FLIGHT_BYTES: usize = 64 << 20;

/// A checked request on its way to a worker.
struct Job {
    r: Request,
    op: Op,
    payload: Option<Vec<u8>>,
    /// Its share of [`IN_FLIGHT_BYTES`], given back once the reply is sent.
    cost: usize,
}

/// Serve requests on `s` until the client disconnects or a signal stops the server.
pub fn transmit(s: &mut Stream, export: &Export, session: &Session) -> Result<(), Stop> {
    // Writes time out too from here on, so a worker blocked on a client that does not read
    // sees the stop flag (the handshake's small replies never fill the socket's buffer).
    s.set_timeouts(Some(POLL), Some(POLL))?;
    let replies = Replies {
        s: Mutex::new(s.try_clone()?),
        ended: Mutex::new(None),
    };
    let budget = Budget {
        left: Mutex::new(IN_FLIGHT_BYTES),
        freed: Condvar::new(),
    };
    let ended = std::thread::scope(|scope| {
        let (tx, rx) = bounded::<Job>(IN_FLIGHT);
        for n in 0..IN_FLIGHT {
            let (rx, replies, budget) = (rx.clone(), &replies, &budget);
            std::thread::Builder::new()
                .name(format!("bv-serve-req{n}"))
                .spawn_scoped(scope, move || {
                    for job in rx {
                        replies.send(&reply::answer(export, session, &job.r, job.op, job.payload));
                        budget.give(job.cost);
                    }
                })?;
        }
        drop(rx);
        requests(s, export, session, &tx, &replies, &budget)
        // Leaving the scope drops `tx`: the workers answer what is queued, then end.
    });
    match replies.ended() {
        Some(stop) => Err(stop),
        None => ended,
    }
}

/// Read requests until the client ends the connection, handing the checked ones to the
/// workers through `tx`.
fn requests(
    s: &mut Stream,
    export: &Export,
    session: &Session,
    tx: &Sender<Job>,
    replies: &Replies,
    budget: &Budget,
) -> Result<(), Stop> {
    loop {
        if replies.failed() {
            return Ok(());
        }
        let mut h = [0u8; REQUEST_LEN];
        read_full(s, &mut h, None)?;
        let Some(r) = parse_request(&h) else {
            tracing::debug!(export = %export.name, "serve: request without the request magic; disconnecting");
            return Ok(());
        };
        let op = match check_request(&r, export.size(), export.writable()) {
            Err(e) => {
                let too_long = r.kind == CMD_WRITE && r.length > MAX_REQUEST;
                if r.kind == CMD_WRITE && !too_long {
                    let mut drop = vec![0u8; r.length as usize];
                    read_full(s, &mut drop, None)?;
                }
                replies.send(&reply::refusal(export, session, &r, &e, None));
                if too_long {
                    return Ok(());
                }
                continue;
            }
            Ok(Op::Disconnect) => return Ok(()),
            Ok(op) => op,
        };
        let cost = match op {
            Op::Read | Op::Write => (r.length as usize).min(IN_FLIGHT_BYTES),
            _ => 0,
        };
        budget.take(cost)?;
        let payload = if op == Op::Write {
            let mut data = vec![0u8; r.length as usize];
            read_full(s, &mut data, None)?;
            Some(data)
        } else {
            None
        };
        let mut job = Job {
            r,
            op,
            payload,
            cost,
        };
        loop {
            match tx.send_timeout(job, POLL) {
                Ok(()) => break,
                Err(SendTimeoutError::Timeout(j)) => {
                    if crate::interrupt::requested().is_some() {
                        return Err(Stop::Signal);
                    }
                    job = j;
                }
                Err(SendTimeoutError::Disconnected(_)) => return Ok(()),
            }
        }
    }
}

/// The connection's writing side: one reply at a time, and how writing ended if it did.
struct Replies {
    s: Mutex<Stream>,
    ended: Mutex<Option<Stop>>,
}

impl Replies {
    /// Send one whole reply; after a failure (the client gone, a signal) nothing more is
    /// sent, and the socket is shut so the reading thread stops too.
    fn send(&self, reply: &Reply) {
        let mut slices = reply.io_slices();
        let mut s = lock(&self.s);
        if self.failed() {
            return;
        }
        if let Err(stop) = write_full(&mut s, &mut slices) {
            s.shutdown();
            *lock(&self.ended) = Some(stop);
        }
    }

    fn failed(&self) -> bool {
        lock(&self.ended).is_some()
    }

    fn ended(&self) -> Option<Stop> {
        lock(&self.ended).take()
    }
}

/// [`IN_FLIGHT_BYTES`] shared by the requests in flight.
struct Budget {
    left: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    /// Wait until `n` bytes are free (watching the stop flag), and hold them.
    fn take(&self, n: usize) -> Result<(), Stop> {
        let mut left = lock(&self.left);
        while *left < n {
            left = self
                .freed
                .wait_timeout(left, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if crate::interrupt::requested().is_some() {
                return Err(Stop::Signal);
            }
        }
        *left -= n;
        Ok(())
    }

    fn give(&self, n: usize) {
        *lock(&self.left) += n;
        self.freed.notify_one();
    }
}
