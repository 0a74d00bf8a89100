//! The NBD transmission-phase wire format: request encoding and the reply parser.
//!
//! Everything here is a pure function over bytes, so the fuzz target (`fuzz/fuzz_targets/
//! nbd_reply.rs`) drives exactly the code the client runs. The client reads a reply in three
//! steps, each bounded before anything is allocated:
//!
//! ```text
//!  4 bytes magic ── reply_header_len ──▶ 16 (simple) or 20 (structured chunk)
//!  header        ── ReplyHeader::parse ─▶ cookie, error / chunk type, flags, length
//!  chunk prefix  ── ChunkHeader::prefix_len(request) ─▶ how many payload bytes to parse
//!                   (all of it, except the data of OFFSET_DATA, which is streamed into the
//!                    caller's buffer) ── Chunk::parse ─▶ Data | Hole | Status | Error | None
//! ```
//!
//! Every length the server sends is checked against the request it answers (a data chunk
//! lies within the requested range) or a fixed cap (block-status and error chunks), so a
//! hostile server cannot make the client allocate more than the client asked for. Numbers are
//! big-endian ("network byte order") throughout. The protocol is the NBD project's
//! `doc/proto.md`; docs/ARCHITECTURE.md ("NBD source") lists every field used here.

use crate::error::{Error, Result};

/// `NBD_REQUEST_MAGIC`, first field of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: a 16-byte simple reply header.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: a 20-byte structured reply chunk header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of a request: magic, flags, type, cookie, offset, length.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header: magic, error, cookie.
pub const SIMPLE_HEADER_LEN: usize = 16;
/// Size of a structured chunk header: magic, flags, type, cookie, length.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes read before the header kind is known.
pub const MAGIC_LEN: usize = 4;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`: the request is followed by `length` bytes of data.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: soft disconnect, no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`: offset and length 0.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`: the range may be discarded (no payload).
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_WRITE_ZEROES`: make `length` bytes read as zeros (no payload).
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_FLAG_HAS_FLAGS` (transmission flags, from `NBD_INFO_EXPORT`): the other bits mean
/// something.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`: the export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`: the server accepts `NBD_CMD_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_WRITE_ZEROES`: the server accepts `NBD_CMD_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_FUA`: the server honours `NBD_CMD_FLAG_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_SEND_TRIM`: the server accepts `NBD_CMD_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_DF`: the server honours `NBD_CMD_FLAG_DF` on reads.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`: every connection sees the others' writes once flushed.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// `NBD_CMD_FLAG_FUA`: the write is durable when acknowledged.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_DF`: answer a read with one data chunk, no holes.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: block status with one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// `NBD_EPERM`: the export is read-only.
pub const EPERM: u32 = 1;
/// `NBD_EIO`: the data could not be read.
pub const EIO: u32 = 5;
/// `NBD_EINVAL`: a malformed or out-of-range request (and what the client takes an
/// unexpected error value as).
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`: a write past the end of the export.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`: a request longer than the server serves.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`: a command the server does not support.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// `NBD_REPLY_TYPE_NONE`: an empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: u64 offset, then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: u64 offset, u32 size of a range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: u32 context id, then (u32 length, u32 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks error chunk types.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`: u32 error, u16 message length, message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: as ERROR, then the u64 offset it concerns.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// `NBD_STATE_HOLE` (base:allocation): not allocated; says nothing about the contents.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` (base:allocation): reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `NBD_STATE_DIRTY` (qemu:dirty-bitmap:NAME): written since the bitmap was cleared.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Most extents accepted in one block-status chunk (qemu sends at most 128 Ki, nbdkit 1 Mi):
/// bounds the chunk the client buffers to 8 MiB.
pub const MAX_EXTENTS: usize = 1 << 20;
/// The longest error chunk accepted: a 4096-byte message (the protocol's string limit) plus
/// the fixed fields, with room for fields of error types defined later.
pub const MAX_ERROR_CHUNK: u32 = 6 + 4096 + 64;
/// The longest error message kept in an error chunk (longer ones are a protocol violation).
pub const MAX_MESSAGE: usize = 4096;

/// The commands this client sends and so the replies it can expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`: data, hole and error chunks (or a simple reply followed by data).
    Read,
    /// `NBD_CMD_BLOCK_STATUS`: one status chunk per negotiated context, or errors.
    BlockStatus,
    /// `NBD_CMD_WRITE`: a simple reply, or a NONE or error chunk; never data.
    Write,
    /// `NBD_CMD_WRITE_ZEROES`: as a write.
    WriteZeroes,
    /// `NBD_CMD_FLUSH`: as a write.
    Flush,
}

impl Command {
    /// The request type on the wire.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Write => CMD_WRITE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::Flush => CMD_FLUSH,
        }
    }

    /// How messages name it.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::BlockStatus => "block status",
            Command::Write => "write",
            Command::WriteZeroes => "write-zeroes",
            Command::Flush => "flush",
        }
    }

    /// Whether a successful reply carries anything (data, extents): reads and block status.
    /// The others are answered by a bare acknowledgement.
    pub fn answers_with_content(self) -> bool {
        matches!(self, Command::Read | Command::BlockStatus)
    }
}

/// What the parser needs to know of the request a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The command sent.
    pub command: Command,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub length: u32,
}

/// One request, 28 bytes on the wire.
pub fn encode_request(command: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // b[4..6]: command flags, none used (no REQ_ONE: several extents per reply are cheaper).
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// The header of one reply message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: the whole answer (plus `length` bytes of data for a successful read).
    Simple {
        /// The request's cookie.
        cookie: u64,
        /// 0, or an `NBD_E*` error value.
        error: u32,
    },
    /// One chunk of a structured reply.
    Chunk(ChunkHeader),
}

/// The header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_DONE`: no more chunks for this cookie.
    pub done: bool,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload bytes that follow.
    pub length: u32,
}

/// A decoded chunk. Data bytes are not part of it: they follow in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `len` bytes of data for export offset `offset` follow.
    Data {
        /// Export offset of the first byte.
        offset: u64,
        /// Bytes of data following the prefix.
        len: u32,
    },
    /// `len` bytes at `offset` read as zeros.
    Hole {
        /// Export offset.
        offset: u64,
        /// Bytes (nonzero).
        len: u32,
    },
    /// Extents for one metadata context, consecutive from the request's offset.
    Status {
        /// The context id from `NBD_OPT_SET_META_CONTEXT`.
        context: u32,
        /// One or more extents.
        extents: Vec<Extent>,
    },
    /// The request failed (wholly, or at `offset`).
    Error {
        /// The `NBD_E*` value (0 is turned into `NBD_EINVAL`, as the protocol asks).
        code: u32,
        /// The server's message, lossily decoded.
        message: String,
        /// For `NBD_REPLY_TYPE_ERROR_OFFSET`: where.
        offset: Option<u64>,
    },
}

/// One block-status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes it covers (nonzero).
    pub len: u32,
    /// Status flags, meaning defined by the context.
    pub flags: u32,
}

/// A malformed reply: names the field and what was wrong.
fn bad(what: String) -> Error {
    Error::integrity(format!("malformed reply: {what}"))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The header length announced by a reply's first four bytes.
pub fn reply_header_len(magic: [u8; MAGIC_LEN]) -> Result<usize> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_HEADER_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
        m => Err(bad(format!(
            "reply magic {m:#010x} is neither simple nor structured"
        ))),
    }
}

impl ReplyHeader {
    /// Parse a whole header (magic included), 16 or 20 bytes as [`reply_header_len`] said.
    pub fn parse(b: &[u8]) -> Result<Self> {
        let magic: [u8; MAGIC_LEN] = b
            .get(..MAGIC_LEN)
            .and_then(|m| m.try_into().ok())
            .ok_or_else(|| bad(format!("reply header of {} bytes", b.len())))?;
        let want = reply_header_len(magic)?;
        if b.len() != want {
            return Err(bad(format!(
                "reply header of {} bytes, its magic announces {want}",
                b.len()
            )));
        }
        Ok(if want == SIMPLE_HEADER_LEN {
            ReplyHeader::Simple {
                error: be32(b, 4),
                cookie: be64(b, 8),
            }
        } else {
            ReplyHeader::Chunk(ChunkHeader {
                // Unknown flags are ignored, as the protocol asks.
                done: be16(b, 4) & REPLY_FLAG_DONE != 0,
                kind: be16(b, 6),
                cookie: be64(b, 8),
                length: be32(b, 16),
            })
        })
    }

    /// The cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple { cookie, .. } => *cookie,
            ReplyHeader::Chunk(h) => h.cookie,
        }
    }
}

impl ChunkHeader {
    /// How many payload bytes [`Chunk::parse`] needs: the whole payload, except for
    /// OFFSET_DATA where only the 8-byte offset is parsed and the data is streamed. Checks
    /// the length against the chunk type and the request before any byte is read.
    pub fn prefix_len(&self, expect: &Expect) -> Result<usize> {
        let len = self.length;
        let name = type_name(self.kind);
        let only_for = |command: Command, n: usize| -> Result<usize> {
            if expect.command == command {
                Ok(n)
            } else {
                Err(bad(format!(
                    "chunk type {name} in a reply to a {} request",
                    expect.command.name()
                )))
            }
        };
        match self.kind {
            REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(bad(format!("chunk type {name} with length {len}, not 0")));
                }
                if !self.done {
                    return Err(bad(format!("chunk type {name} without the DONE flag")));
                }
                Ok(0)
            }
            REPLY_TYPE_OFFSET_DATA => {
                if len < 9 || u64::from(len) - 8 > u64::from(expect.length) {
                    return Err(bad(format!(
                        "chunk type {name} length {len}: must be 9 to {} for a {}-byte read",
                        u64::from(expect.length) + 8,
                        expect.length
                    )));
                }
                only_for(Command::Read, 8)
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if len != 12 {
                    return Err(bad(format!("chunk type {name} length {len}, not 12")));
                }
                only_for(Command::Read, 12)
            }
            REPLY_TYPE_BLOCK_STATUS => {
                only_for(Command::BlockStatus, 0)?;
                let extents = (len.saturating_sub(4) / 8) as usize;
                if len < 12 || !(len - 4).is_multiple_of(8) || extents > MAX_EXTENTS {
                    return Err(bad(format!(
                        "chunk type {name} length {len}: must be 4 + 8 x (1 to {MAX_EXTENTS})"
                    )));
                }
                Ok(len as usize)
            }
            kind if kind & REPLY_TYPE_ERROR_BIT != 0 => {
                let min = if kind == REPLY_TYPE_ERROR_OFFSET {
                    14
                } else {
                    6
                };
                if len < min || len > MAX_ERROR_CHUNK {
                    return Err(bad(format!(
                        "chunk type {name} length {len}: must be {min} to {MAX_ERROR_CHUNK}"
                    )));
                }
                Ok(len as usize)
            }
            kind => Err(bad(format!("unknown chunk type {kind}"))),
        }
    }
}

impl Chunk {
    /// Decode a chunk from its header and the `prefix_len` bytes that follow it.
    pub fn parse(h: &ChunkHeader, prefix: &[u8], expect: &Expect) -> Result<Chunk> {
        let want = h.prefix_len(expect)?;
        if prefix.len() != want {
            return Err(bad(format!(
                "chunk type {} given {} payload bytes, needs {want}",
                type_name(h.kind),
                prefix.len()
            )));
        }
        let request_end = expect.offset.saturating_add(u64::from(expect.length));
        let within = |what: &str, offset: u64, len: u32| -> Result<()> {
            let end = offset.checked_add(u64::from(len));
            if offset < expect.offset || end.is_none_or(|e| e > request_end) {
                return Err(bad(format!(
                    "{what} at offset {offset} ({len} bytes) outside the request {}+{}",
                    expect.offset, expect.length
                )));
            }
            Ok(())
        };
        Ok(match h.kind {
            REPLY_TYPE_NONE => Chunk::None,
            REPLY_TYPE_OFFSET_DATA => {
                let offset = be64(prefix, 0);
                let len = h.length - 8;
                within("data chunk", offset, len)?;
                Chunk::Data { offset, len }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let offset = be64(prefix, 0);
                let len = be32(prefix, 8);
                if len == 0 {
                    return Err(bad(format!("hole chunk at offset {offset} of size 0")));
                }
                within("hole chunk", offset, len)?;
                Chunk::Hole { offset, len }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context = be32(prefix, 0);
                let mut extents = Vec::with_capacity((prefix.len() - 4) / 8);
                for (i, d) in prefix[4..].chunks_exact(8).enumerate() {
                    let e = Extent {
                        len: be32(d, 0),
                        flags: be32(d, 4),
                    };
                    if e.len == 0 {
                        return Err(bad(format!(
                            "block-status extent {i} of context {context} has length 0"
                        )));
                    }
                    extents.push(e);
                }
                Chunk::Status { context, extents }
            }
            kind => {
                // Error chunks (prefix_len admits no other type).
                let code = match be32(prefix, 0) {
                    0 => EINVAL,
                    c => c,
                };
                let msg_len = usize::from(be16(prefix, 4));
                let fixed = if kind == REPLY_TYPE_ERROR_OFFSET {
                    14
                } else {
                    6
                };
                if msg_len > MAX_MESSAGE || fixed + msg_len > prefix.len() {
                    return Err(bad(format!(
                        "error chunk message length {msg_len} with chunk length {}",
                        prefix.len()
                    )));
                }
                let message = String::from_utf8_lossy(&prefix[6..6 + msg_len]).into_owned();
                let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
                    if prefix.len() != fixed + msg_len {
                        return Err(bad(format!(
                            "error-offset chunk length {} with message length {msg_len}",
                            prefix.len()
                        )));
                    }
                    let offset = be64(prefix, 6 + msg_len);
                    within("error offset", offset, 0)?;
                    Some(offset)
                } else {
                    None
                };
                Chunk::Error {
                    code,
                    message,
                    offset,
                }
            }
        })
    }
}

/// A chunk type's protocol name, for messages.
pub fn type_name(kind: u16) -> String {
    match kind {
        REPLY_TYPE_NONE => "NONE".into(),
        REPLY_TYPE_OFFSET_DATA => "OFFSET_DATA".into(),
        REPLY_TYPE_OFFSET_HOLE => "OFFSET_HOLE".into(),
        REPLY_TYPE_BLOCK_STATUS => "BLOCK_STATUS".into(),
        REPLY_TYPE_ERROR => "ERROR".into(),
        REPLY_TYPE_ERROR_OFFSET => "ERROR_OFFSET".into(),
        k => format!("{k}"),
    }
}

/// An `NBD_E*` error value as text, e.g. `NBD_EIO (input/output error)`.
pub fn error_name(code: u32) -> String {
    let (name, text) = match code {
        1 => ("NBD_EPERM", "operation not permitted"),
        5 => ("NBD_EIO", "input/output error"),
        12 => ("NBD_ENOMEM", "cannot allocate memory"),
        22 => ("NBD_EINVAL", "invalid argument"),
        28 => ("NBD_ENOSPC", "no space left on device"),
        75 => ("NBD_EOVERFLOW", "value too large"),
        95 => ("NBD_ENOTSUP", "operation not supported"),
        108 => ("NBD_ESHUTDOWN", "server is shutting down"),
        c => return format!("error {c} (unknown to the protocol, taken as invalid argument)"),
    };
    format!("{name} ({text})")
}

/// The parts of a read request that replies have filled: sorted, merged, disjoint ranges of
/// offsets relative to the request. Detects overlapping chunks (a protocol violation that
/// could hide missing data) and tells whether the whole request was covered.
#[derive(Debug, Default)]
pub struct Coverage {
    ranges: Vec<std::ops::Range<u32>>,
}

/// Most disjoint pieces a read reply may be split into at once (contiguous chunks merge, so
/// an in-order server never has more than one): bounds the bookkeeping per request.
pub const MAX_PIECES: usize = 4096;

impl Coverage {
    /// Record `start..start+len` (relative to the request); an overlap with what is
    /// already covered, or too many disjoint pieces, is an Integrity error.
    pub fn add(&mut self, start: u32, len: u32) -> Result<()> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad(format!("content chunk {start}+{len} overflows")))?;
        let i = self.ranges.partition_point(|r| r.end <= start);
        if self.ranges.get(i).is_some_and(|r| r.start < end) {
            return Err(bad(format!(
                "content chunk at request offset {start} ({len} bytes) overlaps an earlier chunk"
            )));
        }
        let joins_prev = i > 0 && self.ranges[i - 1].end == start;
        let joins_next = self.ranges.get(i).is_some_and(|r| r.start == end);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i - 1].end = self.ranges[i].end;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].end = end,
            (false, true) => self.ranges[i].start = start,
            (false, false) => {
                if self.ranges.len() >= MAX_PIECES {
                    return Err(bad(format!(
                        "read reply split into more than {MAX_PIECES} disjoint pieces"
                    )));
                }
                self.ranges.insert(i, start..end);
            }
        }
        Ok(())
    }

    /// Bytes covered so far.
    pub fn covered(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.end - r.start)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const READ: Expect = Expect {
        command: Command::Read,
        offset: 4096,
        length: 8192,
    };
    const STATUS: Expect = Expect {
        command: Command::BlockStatus,
        offset: 0,
        length: 1 << 20,
    };

    fn chunk(kind: u16, done: bool, length: u32) -> ChunkHeader {
        ChunkHeader {
            done,
            kind,
            cookie: 7,
            length,
        }
    }

    fn parse(h: ChunkHeader, payload: &[u8], e: &Expect) -> Result<Chunk> {
        let n = h.prefix_len(e)?;
        Chunk::parse(&h, &payload[..n], e)
    }

    #[test]
    fn request_layout() {
        let r = encode_request(CMD_BLOCK_STATUS, 0x0102_0304_0506_0708, 1 << 40, 65536);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[4..8], &[0, 0, 0, 7]);
        assert_eq!(&r[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&r[16..24], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&r[24..28], &[0, 1, 0, 0]);
    }

    #[test]
    fn headers() {
        let mut s = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        s.extend(5u32.to_be_bytes());
        s.extend(9u64.to_be_bytes());
        assert_eq!(reply_header_len(s[..4].try_into().unwrap()).unwrap(), 16);
        assert_eq!(
            ReplyHeader::parse(&s).unwrap(),
            ReplyHeader::Simple {
                cookie: 9,
                error: 5
            }
        );
        let mut c = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        c.extend(0x8001u16.to_be_bytes()); // DONE plus an unknown flag, ignored
        c.extend(REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        c.extend(3u64.to_be_bytes());
        c.extend(100u32.to_be_bytes());
        let h = ReplyHeader::parse(&c).unwrap();
        assert_eq!(h, ReplyHeader::Chunk(chunk(1, true, 100).with_cookie(3)));
        assert_eq!(h.cookie(), 3);
        let e = ReplyHeader::parse(&[0xde, 0xad, 0xbe, 0xef]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(e.to_string().contains("magic 0xdeadbeef"), "{e}");
        assert!(ReplyHeader::parse(&c[..19]).is_err());
        assert!(ReplyHeader::parse(&[]).is_err());
    }

    impl ChunkHeader {
        fn with_cookie(mut self, cookie: u64) -> Self {
            self.cookie = cookie;
            self
        }
    }

    #[test]
    fn data_and_holes_stay_within_the_request() {
        let mut p = 6144u64.to_be_bytes().to_vec();
        assert_eq!(
            parse(chunk(REPLY_TYPE_OFFSET_DATA, false, 8 + 2048), &p, &READ).unwrap(),
            Chunk::Data {
                offset: 6144,
                len: 2048
            }
        );
        // One byte past the end of the request.
        let e = parse(chunk(REPLY_TYPE_OFFSET_DATA, false, 8 + 6145), &p, &READ).unwrap_err();
        assert!(e.to_string().contains("outside the request"), "{e}");
        // Longer than the whole request: refused before reading the payload.
        let e = chunk(REPLY_TYPE_OFFSET_DATA, false, 8 + 8193)
            .prefix_len(&READ)
            .unwrap_err();
        assert!(e.to_string().contains("OFFSET_DATA length 8201"), "{e}");
        assert!(chunk(REPLY_TYPE_OFFSET_DATA, false, 8)
            .prefix_len(&READ)
            .is_err());
        p.extend(100u32.to_be_bytes());
        assert_eq!(
            parse(chunk(REPLY_TYPE_OFFSET_HOLE, true, 12), &p, &READ).unwrap(),
            Chunk::Hole {
                offset: 6144,
                len: 100
            }
        );
        let before = [0u64.to_be_bytes().as_slice(), &1u32.to_be_bytes()].concat();
        assert!(parse(chunk(REPLY_TYPE_OFFSET_HOLE, true, 12), &before, &READ).is_err());
        let empty = [5000u64.to_be_bytes().as_slice(), &0u32.to_be_bytes()].concat();
        assert!(parse(chunk(REPLY_TYPE_OFFSET_HOLE, true, 12), &empty, &READ).is_err());
        let wrap = [u64::MAX.to_be_bytes().as_slice(), &9u32.to_be_bytes()].concat();
        assert!(parse(chunk(REPLY_TYPE_OFFSET_HOLE, true, 12), &wrap, &READ).is_err());
        // Read chunks in a block-status reply and the reverse.
        assert!(chunk(REPLY_TYPE_OFFSET_HOLE, true, 12)
            .prefix_len(&STATUS)
            .is_err());
        assert!(chunk(REPLY_TYPE_BLOCK_STATUS, true, 12)
            .prefix_len(&READ)
            .is_err());
    }

    #[test]
    fn block_status_extents() {
        let mut p = 2u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, 3u32), (1 << 20, 0)] {
            p.extend(len.to_be_bytes());
            p.extend(flags.to_be_bytes());
        }
        assert_eq!(
            parse(chunk(REPLY_TYPE_BLOCK_STATUS, true, 20), &p, &STATUS).unwrap(),
            Chunk::Status {
                context: 2,
                extents: vec![
                    Extent {
                        len: 4096,
                        flags: 3
                    },
                    Extent {
                        len: 1 << 20,
                        flags: 0
                    }
                ]
            }
        );
        for bad_len in [4, 8, 13, 4 + 8 * (MAX_EXTENTS as u32 + 1)] {
            assert!(chunk(REPLY_TYPE_BLOCK_STATUS, true, bad_len)
                .prefix_len(&STATUS)
                .is_err());
        }
        p[4..8].copy_from_slice(&0u32.to_be_bytes());
        let e = parse(chunk(REPLY_TYPE_BLOCK_STATUS, true, 20), &p, &STATUS).unwrap_err();
        assert!(
            e.to_string().contains("extent 0 of context 2 has length 0"),
            "{e}"
        );
    }

    #[test]
    fn errors_and_none() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend(3u16.to_be_bytes());
        p.extend(b"bad");
        assert_eq!(
            parse(chunk(REPLY_TYPE_ERROR, true, 9), &p, &READ).unwrap(),
            Chunk::Error {
                code: 5,
                message: "bad".into(),
                offset: None
            }
        );
        // The message may not run past the chunk.
        assert!(parse(chunk(REPLY_TYPE_ERROR, true, 8), &p, &READ).is_err());
        p.extend(5000u64.to_be_bytes());
        assert_eq!(
            parse(chunk(REPLY_TYPE_ERROR_OFFSET, true, 17), &p, &READ).unwrap(),
            Chunk::Error {
                code: 5,
                message: "bad".into(),
                offset: Some(5000)
            }
        );
        // An unknown error type is an error too; a zero code is read as EINVAL.
        p[0..4].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            parse(chunk(REPLY_TYPE_ERROR_BIT | 77, false, 17), &p, &STATUS).unwrap(),
            Chunk::Error {
                code: 22,
                message: "bad".into(),
                offset: None
            }
        );
        assert!(chunk(REPLY_TYPE_ERROR, true, 5).prefix_len(&READ).is_err());
        assert!(chunk(REPLY_TYPE_ERROR, true, MAX_ERROR_CHUNK + 1)
            .prefix_len(&READ)
            .is_err());
        assert_eq!(
            parse(chunk(REPLY_TYPE_NONE, true, 0), &[], &READ).unwrap(),
            Chunk::None
        );
        assert!(chunk(REPLY_TYPE_NONE, false, 0).prefix_len(&READ).is_err());
        assert!(chunk(REPLY_TYPE_NONE, true, 1).prefix_len(&READ).is_err());
        let e = chunk(42, true, 0).prefix_len(&READ).unwrap_err();
        assert!(e.to_string().contains("unknown chunk type 42"), "{e}");
        assert!(error_name(5).starts_with("NBD_EIO"));
        assert!(error_name(1234).contains("1234"));
    }

    #[test]
    fn writes_are_answered_by_none_or_errors_only() {
        for command in [Command::Write, Command::WriteZeroes, Command::Flush] {
            let e = Expect {
                command,
                offset: 4096,
                length: 8192,
            };
            assert_eq!(
                parse(chunk(REPLY_TYPE_NONE, true, 0), &[], &e).unwrap(),
                Chunk::None
            );
            let mut p = 28u32.to_be_bytes().to_vec();
            p.extend(4u16.to_be_bytes());
            p.extend(b"full");
            assert_eq!(
                parse(chunk(REPLY_TYPE_ERROR, true, 10), &p, &e).unwrap(),
                Chunk::Error {
                    code: 28,
                    message: "full".into(),
                    offset: None
                }
            );
            for (kind, len) in [
                (REPLY_TYPE_OFFSET_DATA, 8 + 100),
                (REPLY_TYPE_OFFSET_HOLE, 12),
                (REPLY_TYPE_BLOCK_STATUS, 12),
            ] {
                let err = chunk(kind, true, len).prefix_len(&e).unwrap_err();
                assert!(
                    err.to_string()
                        .contains(&format!("in a reply to a {} request", command.name())),
                    "{err}"
                );
            }
            assert!(!command.answers_with_content());
        }
        assert_eq!(
            [Command::Write, Command::WriteZeroes, Command::Flush].map(Command::code),
            [CMD_WRITE, CMD_WRITE_ZEROES, CMD_FLUSH]
        );
    }

    #[test]
    fn coverage_merges_and_refuses_overlap() {
        let mut c = Coverage::default();
        c.add(100, 50).unwrap();
        c.add(0, 50).unwrap();
        c.add(50, 50).unwrap();
        assert_eq!(c.ranges, vec![0..150]);
        c.add(200, 10).unwrap();
        c.add(150, 50).unwrap();
        assert_eq!(c.ranges, vec![0..210]);
        assert_eq!(c.covered(), 210);
        assert!(c.add(209, 2).is_err());
        assert!(c.add(u32::MAX, 2).is_err());
        let mut many = Coverage::default();
        for i in 0..MAX_PIECES as u32 {
            many.add(i * 2, 1).unwrap();
        }
        assert!(many.add(MAX_PIECES as u32 * 2, 1).is_err());
    }
}
