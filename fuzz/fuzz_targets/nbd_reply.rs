//! `nbd_reply`: what an NBD server sends (`source::nbd::proto` and `source::nbd::handshake`).
//!
//! The first byte picks a mode:
//! 0. transmission replies: a request (read, block status, write, write-zeroes or flush,
//!    offset, length) from the next 13 bytes, then the rest as the server's byte stream, split
//!    the way the client splits it (magic -> header -> bounded prefix -> chunk -> streamed
//!    data). Beyond "no panic": a prefix is never longer than the chunk nor than the caps,
//!    data and holes lie within the request, read coverage never exceeds the request,
//!    extents are nonzero, and a write-like request accepts no data, hole or status chunk;
//! 1. option replies: `parse_reply_header`, `parse_info`, `parse_meta_context`, with the
//!    length and block-size rules checked on what they accept;
//! 2. a whole handshake (`negotiate`) against the input as the server's side: it must end
//!    (the input runs out) and, on success, report what the protocol allows.
#![no_main]

use blockvault::source::nbd::handshake::{self, Info, MAX_OPTION_REPLY};
use blockvault::source::nbd::proto::{
    reply_header_len, Chunk, ChunkHeader, Command, Coverage, Expect, ReplyHeader, CHUNK_HEADER_LEN,
    MAGIC_LEN, MAX_ERROR_CHUNK, MAX_EXTENTS, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, STRUCTURED_REPLY_MAGIC,
};
use blockvault_fuzz::{outcome, write_seeds};
use libfuzzer_sys::fuzz_target;

fn chunk(flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend(flags.to_be_bytes());
    b.extend(kind.to_be_bytes());
    b.extend(1u64.to_be_bytes());
    b.extend((payload.len() as u32).to_be_bytes());
    b.extend(payload);
    b
}

fn seeds() -> Vec<Vec<u8>> {
    // Mode 0, read of 4096 bytes at 0: a data chunk, then a final hole.
    let mut read = vec![0u8, 0];
    read.extend(0u64.to_be_bytes());
    read.extend(4096u32.to_be_bytes());
    read.extend(chunk(
        0,
        REPLY_TYPE_OFFSET_DATA,
        &[&0u64.to_be_bytes()[..], &[7u8; 1024]].concat(),
    ));
    read.extend(chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        &[&1024u64.to_be_bytes()[..], &3072u32.to_be_bytes()].concat(),
    ));
    // Mode 0, block status: two extents of context 1.
    let mut status = vec![0u8, 1];
    status.extend(0u64.to_be_bytes());
    status.extend((1u32 << 20).to_be_bytes());
    let mut p = 1u32.to_be_bytes().to_vec();
    for (len, flags) in [(65536u32, 3u32), (1 << 20, 0)] {
        p.extend(len.to_be_bytes());
        p.extend(flags.to_be_bytes());
    }
    status.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &p));
    // Mode 2: a greeting that offers fixed newstyle, then an ACK to STRUCTURED_REPLY.
    let mut hs = vec![2u8];
    hs.extend(handshake::NBDMAGIC.to_be_bytes());
    hs.extend(handshake::IHAVEOPT.to_be_bytes());
    hs.extend(3u16.to_be_bytes());
    hs.extend(handshake::OPTION_REPLY_MAGIC.to_be_bytes());
    hs.extend(handshake::OPT_STRUCTURED_REPLY.to_be_bytes());
    hs.extend(handshake::REP_ACK.to_be_bytes());
    hs.extend(0u32.to_be_bytes());
    // Mode 0, a write of 4096 bytes at 8192 acknowledged by a NONE chunk.
    let mut write = vec![0u8, 2];
    write.extend(8192u64.to_be_bytes());
    write.extend(4096u32.to_be_bytes());
    write.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]));
    vec![read, status, write, hs]
}

/// Mode 0: the client's split of a reply stream.
fn replies(data: &[u8]) {
    if data.len() < 13 {
        return;
    }
    let command = match data[0] % 5 {
        0 => Command::Read,
        1 => Command::BlockStatus,
        2 => Command::Write,
        3 => Command::WriteZeroes,
        _ => Command::Flush,
    };
    let offset = u64::from_be_bytes(data[1..9].try_into().unwrap());
    let mut length = u32::from_be_bytes(data[9..13].try_into().unwrap());
    if command == Command::Read {
        // The client never reads more than 32 MiB in one request.
        length = length.min(32 << 20);
    }
    let expect = Expect {
        command,
        offset,
        length,
    };
    let mut coverage = Coverage::default();
    let mut rest = &data[13..];
    while rest.len() >= MAGIC_LEN {
        let Ok(n) = reply_header_len(rest[..MAGIC_LEN].try_into().unwrap()) else {
            return;
        };
        let Some(h) = rest.get(..n) else { return };
        let header = ReplyHeader::parse(h).expect("a header of the announced length parses");
        rest = &rest[n..];
        let h: ChunkHeader = match header {
            ReplyHeader::Simple { error, .. } => {
                if error == 0 && command == Command::Read {
                    rest = &rest[rest.len().min(length as usize)..];
                }
                continue;
            }
            ReplyHeader::Chunk(h) => h,
        };
        assert!(n == CHUNK_HEADER_LEN);
        let prefix_len = match h.prefix_len(&expect) {
            Ok(p) => p,
            Err(e) => {
                outcome("prefix_len", &Err::<(), _>(e));
                return;
            }
        };
        assert!(prefix_len <= h.length as usize);
        assert!(prefix_len <= 4 + 8 * MAX_EXTENTS || prefix_len <= MAX_ERROR_CHUNK as usize);
        let Some(prefix) = rest.get(..prefix_len) else {
            return;
        };
        rest = &rest[prefix_len..];
        let parsed = Chunk::parse(&h, prefix, &expect);
        outcome("chunk", &parsed);
        if !command.answers_with_content() {
            assert!(
                matches!(parsed, Ok(Chunk::None | Chunk::Error { .. }) | Err(_)),
                "a {} accepted {parsed:?}",
                command.name()
            );
        }
        let end = offset.saturating_add(u64::from(length));
        match parsed {
            Ok(Chunk::Data { offset: at, len }) => {
                assert!(at >= offset && at + u64::from(len) <= end);
                assert_eq!(u64::from(len) + 8, u64::from(h.length));
                if coverage.add((at - offset) as u32, len).is_err() {
                    return;
                }
                rest = &rest[rest.len().min(len as usize)..];
            }
            Ok(Chunk::Hole { offset: at, len }) => {
                assert!(len > 0 && at >= offset && at + u64::from(len) <= end);
                if coverage.add((at - offset) as u32, len).is_err() {
                    return;
                }
            }
            Ok(Chunk::Status { extents, .. }) => {
                assert!(!extents.is_empty() && extents.len() <= MAX_EXTENTS);
                assert!(extents.iter().all(|e| e.len > 0));
            }
            Ok(Chunk::Error {
                message,
                offset: at,
                ..
            }) => {
                assert!(message.len() <= 3 * 4096);
                if let Some(at) = at {
                    assert!(at >= offset && at <= end);
                }
            }
            Ok(Chunk::None) => assert!(h.done),
            Err(_) => return,
        }
        assert!(coverage.covered() <= u64::from(length));
    }
}

/// Mode 1: option replies.
fn options(data: &[u8]) {
    if let Some(h) = data.get(..20) {
        let option = u32::from(data[0] & 15);
        if let Ok((_, len)) = handshake::parse_reply_header(h.try_into().unwrap(), option) {
            assert!(len <= MAX_OPTION_REPLY);
        }
    }
    match handshake::parse_info(data) {
        Ok(Info::BlockSize(l)) => {
            assert!(l.min.is_power_of_two() && l.min <= 65536 && l.max >= l.min);
        }
        Ok(Info::Export { size, .. }) => assert!(size <= handshake::MAX_EXPORT_SIZE),
        _ => {}
    }
    if let Ok((_, name)) = handshake::parse_meta_context(data) {
        assert!(name.len() <= 4096);
    }
}

/// The input as the server's side of a connection; what the client writes is dropped.
struct Server<'a>(&'a [u8]);

impl std::io::Read for Server<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl std::io::Write for Server<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Mode 2: a whole handshake.
fn negotiate(data: &[u8]) {
    let contexts = [
        "base:allocation".to_string(),
        "qemu:dirty-bitmap:b0".to_string(),
    ];
    let r = handshake::negotiate(&mut Server(data), "disk", &contexts);
    outcome("negotiate", &r);
    if let Ok(n) = r {
        assert!(n.size <= handshake::MAX_EXPORT_SIZE);
        assert!(n.limits.min.is_power_of_two() && n.limits.max >= n.limits.min);
        assert!(n.structured || (n.contexts.is_empty() && n.bitmaps.is_none()));
    }
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        match data.split_first() {
            Some((0, rest)) => replies(rest),
            Some((1, rest)) => options(rest),
            Some((2, rest)) => negotiate(rest),
            _ => {}
        }
    }
);
