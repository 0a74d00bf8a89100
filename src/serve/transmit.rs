//! The transmission phase of one connection: requests read one at a time, each answered in
//! full before the next is read (a connection is one thread; clients get parallelism from
//! several connections, which `NBD_FLAG_CAN_MULTI_CONN` allows).
//!
//! A read with structured replies answers the snapshot's holes with `OFFSET_HOLE` chunks and
//! the rest with `OFFSET_DATA` (one data chunk for the whole range with `NBD_CMD_FLAG_DF`); a
//! range that fails to read ends the reply with an `ERROR_OFFSET` chunk, `NBD_EIO`, whose
//! message names the object and the range. Refused requests (out of range, too long, writes
//! to a read-only export, unknown commands) get an error and the connection goes on; a header
//! with a wrong magic, or a write too long to drain, ends it.

use std::io::Write;

use super::export::Export;
use super::negotiate::{Session, ALLOCATION_ID};
use super::socket::{read_full, Stop};
use super::wire::{
    check_request, chunk_header, error_payload, parse_request, simple_reply, Op, Request,
    RequestError, MAX_REQUEST,
};
use crate::source::nbd::proto::{
    CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_REQ_ONE, CMD_WRITE, EIO, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_LEN,
};
use crate::source::nbd::stream::Stream;

/// Most extents in one block-status reply (the reply may cover less than asked).
pub const MAX_STATUS_EXTENTS: usize = 1 << 16;

/// Serve requests on `s` until the client disconnects or a signal stops the server.
pub fn transmit(s: &mut Stream, export: &Export, session: &Session) -> Result<(), Stop> {
    let mut conn = Conn { s, export, session };
    loop {
        let mut h = [0u8; REQUEST_LEN];
        read_full(conn.s, &mut h, None)?;
        let Some(r) = parse_request(&h) else {
            tracing::debug!(export = %export.name, "serve: request without the request magic; disconnecting");
            return Ok(());
        };
        match check_request(&r, export.size(), export.writable()) {
            Err(e) => {
                if r.kind == CMD_WRITE {
                    if r.length > MAX_REQUEST {
                        conn.error(&r, &e, None)?;
                        return Ok(());
                    }
                    let mut drop = vec![0u8; r.length as usize];
                    read_full(conn.s, &mut drop, None)?;
                }
                conn.error(&r, &e, None)?;
            }
            Ok(Op::Disconnect) => return Ok(()),
            Ok(op) => conn.serve(&r, op)?,
        }
    }
}

struct Conn<'s, 'e, 'a> {
    s: &'s mut Stream,
    export: &'e Export<'a>,
    session: &'s Session,
}

impl Conn<'_, '_, '_> {
    fn serve(&mut self, r: &Request, op: Op) -> Result<(), Stop> {
        let eio = |e: crate::Error| RequestError {
            errno: EIO,
            message: e.to_string(),
        };
        let done = match op {
            Op::Read => return self.read(r),
            Op::BlockStatus => return self.status(r),
            Op::Write => {
                let mut data = vec![0u8; r.length as usize];
                read_full(self.s, &mut data, None)?;
                self.export.write(r.offset, &data)
            }
            Op::Zero => self.export.zero(r.offset, u64::from(r.length)),
            Op::Flush => self.export.flush(),
            Op::Disconnect => Ok(()),
        };
        let done = done.and_then(|()| {
            if r.flags & CMD_FLAG_FUA != 0 && matches!(op, Op::Write | Op::Zero) {
                self.export.flush()
            } else {
                Ok(())
            }
        });
        match done {
            Ok(()) => Ok(self.s.write_all(&simple_reply(0, r.cookie))?),
            Err(e) => self.error(r, &eio(e), None),
        }
    }

    /// Refuse `r` with `e` (an error chunk with structured replies, else a simple reply).
    fn error(&mut self, r: &Request, e: &RequestError, offset: Option<u64>) -> Result<(), Stop> {
        tracing::debug!(export = %self.export.name, errno = e.errno, message = %e.message, "serve: request refused");
        if !self.session.structured {
            return Ok(self.s.write_all(&simple_reply(e.errno, r.cookie))?);
        }
        let kind = if offset.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        };
        let payload = error_payload(e.errno, &e.message, offset);
        let mut b = chunk_header(REPLY_FLAG_DONE, kind, r.cookie, payload.len() as u32).to_vec();
        b.extend(payload);
        Ok(self.s.write_all(&b)?)
    }

    fn read(&mut self, r: &Request) -> Result<(), Stop> {
        let range = r.offset..r.offset + u64::from(r.length);
        if !self.session.structured {
            let mut buf = vec![0u8; r.length as usize];
            return match self.export.read(r.offset, &mut buf) {
                Ok(()) => {
                    self.s.write_all(&simple_reply(0, r.cookie))?;
                    Ok(self.s.write_all(&buf)?)
                }
                Err(e) => self.error(
                    r,
                    &RequestError {
                        errno: EIO,
                        message: e.to_string(),
                    },
                    None,
                ),
            };
        }
        if range.is_empty() {
            return Ok(self.s.write_all(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                r.cookie,
                0,
            ))?);
        }
        let runs = if r.flags & CMD_FLAG_DF != 0 {
            vec![(range, false)]
        } else {
            self.export.read_runs(range)
        };
        let last = runs.len() - 1;
        for (n, (run, hole)) in runs.into_iter().enumerate() {
            let flags = if n == last { REPLY_FLAG_DONE } else { 0 };
            let len = (run.end - run.start) as u32;
            if hole {
                let mut b = chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, r.cookie, 12).to_vec();
                b.extend(run.start.to_be_bytes());
                b.extend(len.to_be_bytes());
                self.s.write_all(&b)?;
                continue;
            }
            let mut b = vec![0u8; 20 + 8 + len as usize];
            if let Err(e) = self.export.read(run.start, &mut b[28..]) {
                let e = RequestError {
                    errno: EIO,
                    message: e.to_string(),
                };
                return self.error(r, &e, Some(run.start));
            }
            b[..20].copy_from_slice(&chunk_header(
                flags,
                REPLY_TYPE_OFFSET_DATA,
                r.cookie,
                8 + len,
            ));
            b[20..28].copy_from_slice(&run.start.to_be_bytes());
            self.s.write_all(&b)?;
        }
        Ok(())
    }

    fn status(&mut self, r: &Request) -> Result<(), Stop> {
        if !self.session.allocation {
            let e = RequestError {
                errno: crate::source::nbd::proto::EINVAL,
                message: "block status needs the base:allocation context (SET_META_CONTEXT)".into(),
            };
            return self.error(r, &e, None);
        }
        let end = (r.offset + u64::from(r.length)).min(self.export.size());
        let mut extents = self.export.status(r.offset..end);
        let keep = if r.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_STATUS_EXTENTS
        };
        extents.truncate(keep);
        let mut payload = ALLOCATION_ID.to_be_bytes().to_vec();
        for (len, flags) in extents {
            payload.extend((len as u32).to_be_bytes());
            payload.extend(flags.to_be_bytes());
        }
        let mut b = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            payload.len() as u32,
        )
        .to_vec();
        b.extend(payload);
        Ok(self.s.write_all(&b)?)
    }
}
