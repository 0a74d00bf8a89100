//! The answer to one request, as the bytes to send ([`Reply`]): computed whole before any
//! of it is written, so requests answered on several threads never interleave their bytes.
//! A read's data is not copied into it: its parts are the snapshot reader's cached slots.
//!
//! A read with structured replies answers the snapshot's holes with `OFFSET_HOLE` chunks and
//! the rest with `OFFSET_DATA` (one data chunk for the whole range with `NBD_CMD_FLAG_DF`); a
//! range that fails to read ends the reply with an `ERROR_OFFSET` chunk, `NBD_EIO`, whose
//! message names the object and the range. Without structured replies a read is a simple
//! reply and the data, or a simple reply carrying the error.

use super::export::Export;
use super::negotiate::{Session, ALLOCATION_ID};
use super::parts::Reply;
use super::wire::{chunk_header, error_payload, simple_reply, Op, Request, RequestError};
use crate::source::nbd::proto::{
    CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_REQ_ONE, EINVAL, EIO, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
};

/// Most extents in one block-status reply (the reply may cover less than asked).
pub const MAX_STATUS_EXTENTS: usize = 1 << 16;

/// What `r` (checked: `op` is what it asks) gets from `export`; `payload` is a write's data.
pub fn answer(
    export: &Export,
    session: &Session,
    r: &Request,
    op: Op,
    payload: Option<Vec<u8>>,
) -> Reply {
    let done = match op {
        Op::Read => return read(export, session, r),
        Op::BlockStatus => return status(export, session, r),
        Op::Write => export.write(r.offset, payload.as_deref().unwrap_or_default()),
        Op::Zero => export.zero(r.offset, u64::from(r.length)),
        Op::Flush => export.flush(),
        Op::Disconnect => Ok(()),
    };
    let done = done.and_then(|()| {
        if r.flags & CMD_FLAG_FUA != 0 && matches!(op, Op::Write | Op::Zero) {
            export.flush()
        } else {
            Ok(())
        }
    });
    match done {
        Ok(()) => simple_reply(0, r.cookie).into(),
        Err(e) => refusal(export, session, r, &eio(e), None),
    }
}

/// `r` refused with `e` (an error chunk with structured replies, at `offset` when the error
/// is about one; else a simple reply).
pub fn refusal(
    export: &Export,
    session: &Session,
    r: &Request,
    e: &RequestError,
    offset: Option<u64>,
) -> Reply {
    tracing::debug!(export = %export.name, errno = e.errno, message = %e.message, "serve: request refused");
    if !session.structured {
        return simple_reply(e.errno, r.cookie).into();
    }
    let kind = if offset.is_some() {
        REPLY_TYPE_ERROR_OFFSET
    } else {
        REPLY_TYPE_ERROR
    };
    let payload = error_payload(e.errno, &e.message, offset);
    let mut b =
        Reply::from(chunk_header(REPLY_FLAG_DONE, kind, r.cookie, payload.len() as u32).to_vec());
    b.push_owned(payload);
    b
}

fn eio(e: crate::Error) -> RequestError {
    RequestError {
        errno: EIO,
        message: e.to_string(),
    }
}

fn read(export: &Export, session: &Session, r: &Request) -> Reply {
    let range = r.offset..r.offset + u64::from(r.length);
    if !session.structured {
        return match export.read(r.offset, r.length as usize) {
            Ok(data) => {
                let mut b = Reply::from(simple_reply(0, r.cookie));
                b.append(data);
                b
            }
            Err(e) => refusal(export, session, r, &eio(e), None),
        };
    }
    if range.is_empty() {
        return chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, 0)
            .to_vec()
            .into();
    }
    let runs = if r.flags & CMD_FLAG_DF != 0 {
        vec![(range, false)]
    } else {
        export.read_runs(range)
    };
    let last = runs.len() - 1;
    let mut b = Reply::default();
    for (n, (run, hole)) in runs.into_iter().enumerate() {
        let flags = if n == last { REPLY_FLAG_DONE } else { 0 };
        let len = (run.end - run.start) as u32;
        if hole {
            b.push(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, r.cookie, 12));
            b.push(&run.start.to_be_bytes());
            b.push(&len.to_be_bytes());
            continue;
        }
        match export.read(run.start, len as usize) {
            Ok(data) => {
                b.push(&chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    r.cookie,
                    8 + len,
                ));
                b.push(&run.start.to_be_bytes());
                b.append(data);
            }
            Err(e) => {
                // The chunks before this run stand; the error chunk ends the reply.
                b.append(refusal(export, session, r, &eio(e), Some(run.start)));
                return b;
            }
        }
    }
    b
}

fn status(export: &Export, session: &Session, r: &Request) -> Reply {
    if !session.allocation {
        let e = RequestError {
            errno: EINVAL,
            message: "block status needs the base:allocation context (SET_META_CONTEXT)".into(),
        };
        return refusal(export, session, r, &e, None);
    }
    let end = (r.offset + u64::from(r.length)).min(export.size());
    let mut extents = export.status(r.offset..end);
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
    let mut b = Reply::from(
        chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            r.cookie,
            payload.len() as u32,
        )
        .to_vec(),
    );
    b.push_owned(payload);
    b
}
