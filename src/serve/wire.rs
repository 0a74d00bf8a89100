//! The server's side of the NBD wire: parsers for what a client sends (option payloads,
//! request headers) and encoders for what the server answers. Pure functions over bytes, so
//! the fuzz target (`fuzz/fuzz_targets/nbd_request.rs`) drives exactly the code the server
//! runs. Every length a client sends is checked before anything is allocated: an option's data
//! against [`MAX_OPTION_LEN`], a name against the protocol's 4096-byte string limit, a write's
//! payload against [`MAX_REQUEST`]. Constants are shared with the client
//! (`source::nbd::proto`, `source::nbd::handshake`).

use crate::source::nbd::handshake::{OPTION_REPLY_MAGIC, REP_ERR_INVALID, REP_ERR_TOO_BIG};
use crate::source::nbd::proto::{
    CHUNK_HEADER_LEN, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, ENOTSUP, EOVERFLOW, EPERM, REQUEST_LEN, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// Longest option data accepted (a GO with a maximal name and every info type fits).
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Longest name or metadata query (the protocol's string limit).
pub const MAX_STRING: usize = 4096;
/// Most metadata queries in one option.
pub const MAX_QUERIES: usize = 128;
/// Longest read or write served in one request (also the `NBD_INFO_BLOCK_SIZE` maximum).
pub const MAX_REQUEST: u32 = 32 << 20;

/// An option refused: the error reply type and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    /// `NBD_REP_ERR_*`.
    pub reply: u32,
    /// Why, sent as the error reply's text.
    pub message: String,
}

fn invalid(message: impl Into<String>) -> OptionError {
    OptionError {
        reply: REP_ERR_INVALID,
        message: message.into(),
    }
}

/// The data length of an option header, refused when over [`MAX_OPTION_LEN`] (the caller
/// then reads and drops the data, or disconnects).
pub fn option_len(len: u32) -> Result<usize, OptionError> {
    if len > MAX_OPTION_LEN {
        return Err(OptionError {
            reply: REP_ERR_TOO_BIG,
            message: format!("option data of {len} bytes; at most {MAX_OPTION_LEN} accepted"),
        });
    }
    Ok(len as usize)
}

/// Reads fields off option data, each bounded by what is left.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], OptionError> {
        if self.0.len() < n {
            return Err(invalid(format!("option data ends inside the {what}")));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self, what: &str) -> Result<u16, OptionError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, OptionError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u32 length then that many bytes of UTF-8.
    fn string(&mut self, what: &str) -> Result<String, OptionError> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING {
            return Err(invalid(format!(
                "{what} of {len} bytes; at most {MAX_STRING}"
            )));
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid(format!("{what} is not UTF-8")))
    }

    fn end(&self) -> Result<(), OptionError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(invalid(format!(
                "{} bytes after the option's fields",
                self.0.len()
            )))
        }
    }
}

/// `NBD_OPT_GO` / `NBD_OPT_INFO` data: an export name and the info types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    /// Export name ("" asks for the default export).
    pub name: String,
    /// `NBD_INFO_*` types requested.
    pub infos: Vec<u16>,
}

/// Parse GO / INFO data.
pub fn parse_export_query(data: &[u8]) -> Result<ExportQuery, OptionError> {
    let mut f = Fields(data);
    let name = f.string("export name")?;
    let n = f.u16("info request count")? as usize;
    let infos = (0..n)
        .map(|_| f.u16("info requests"))
        .collect::<Result<Vec<_>, _>>()?;
    f.end()?;
    Ok(ExportQuery { name, infos })
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    /// Export name.
    pub name: String,
    /// Context names or prefixes ("base:").
    pub queries: Vec<String>,
}

/// Parse LIST / SET_META_CONTEXT data.
pub fn parse_meta_query(data: &[u8]) -> Result<MetaQuery, OptionError> {
    let mut f = Fields(data);
    let name = f.string("export name")?;
    let n = f.u32("query count")? as usize;
    if n > MAX_QUERIES {
        return Err(invalid(format!(
            "{n} metadata queries; at most {MAX_QUERIES}"
        )));
    }
    let queries = (0..n)
        .map(|_| f.string("metadata query"))
        .collect::<Result<Vec<_>, _>>()?;
    f.end()?;
    Ok(MetaQuery { name, queries })
}

/// A request header as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// Echoed in the reply.
    pub cookie: u64,
    /// Export offset.
    pub offset: u64,
    /// Bytes.
    pub length: u32,
}

/// Parse a request header; `None` when its magic is wrong (the stream cannot be resynced:
/// the server disconnects).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    (u32_at(0) == REQUEST_MAGIC).then(|| Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64_at(8),
        offset: u64_at(16),
        length: u32_at(24),
    })
}

/// What a request asks for, once checked against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read the range.
    Read,
    /// Write the range; `length` payload bytes follow the header.
    Write,
    /// Make the range read as zeros (trim does the same here: it is always allowed to).
    Zero,
    /// Make written data durable.
    Flush,
    /// Block status over the range (clipped to the export).
    BlockStatus,
    /// Soft disconnect.
    Disconnect,
}

/// A request refused: the NBD errno and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// `NBD_E*`.
    pub errno: u32,
    /// Why (sent as an error chunk's message with structured replies).
    pub message: String,
}

/// Check `r` against an export of `size` bytes: the range within it (block status may reach
/// past the end; the reply is clipped), lengths within [`MAX_REQUEST`], writes only when
/// `writable`. A refused write still has its payload on the wire: the caller drains it.
pub fn check_request(r: &Request, size: u64, writable: bool) -> Result<Op, RequestError> {
    let err = |errno, message: String| Err(RequestError { errno, message });
    let op = match r.kind {
        CMD_READ => Op::Read,
        CMD_WRITE => Op::Write,
        CMD_WRITE_ZEROES | CMD_TRIM => Op::Zero,
        CMD_FLUSH => Op::Flush,
        CMD_BLOCK_STATUS => Op::BlockStatus,
        CMD_DISC => Op::Disconnect,
        k => return err(ENOTSUP, format!("command {k} is not supported")),
    };
    let end = r.offset.checked_add(u64::from(r.length));
    match op {
        Op::Flush | Op::Disconnect => {}
        Op::BlockStatus => {
            if r.length == 0 || r.offset >= size {
                return err(
                    EINVAL,
                    format!(
                        "block status of {} bytes at {} on a {size}-byte export",
                        r.length, r.offset
                    ),
                );
            }
        }
        Op::Read | Op::Write | Op::Zero => {
            if matches!(op, Op::Read | Op::Write) && r.length > MAX_REQUEST {
                return err(
                    EOVERFLOW,
                    format!("{} bytes in one request; at most {MAX_REQUEST}", r.length),
                );
            }
            if end.is_none_or(|e| e > size) {
                return err(
                    EINVAL,
                    format!(
                        "{} bytes at {} run past the end of the {size}-byte export",
                        r.length, r.offset
                    ),
                );
            }
            if op != Op::Read && !writable {
                return err(EPERM, "the export is read-only".into());
            }
        }
    }
    Ok(op)
}

/// An option reply: magic, option, reply type, data length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend(OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend(option.to_be_bytes());
    b.extend(reply.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    b
}

/// A simple reply header (the data of a successful read follows it).
pub fn simple_reply(errno: u32, cookie: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend(SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend(errno.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b
}

/// A structured chunk header for `len` payload bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An error chunk's payload: errno, message (cut to the protocol's limit), and for
/// `NBD_REPLY_TYPE_ERROR_OFFSET` the offset.
pub fn error_payload(errno: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = errno.to_be_bytes().to_vec();
    b.extend((end as u16).to_be_bytes());
    b.extend(&message.as_bytes()[..end]);
    if let Some(o) = offset {
        b.extend(o.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend(name.as_bytes());
        b.extend((infos.len() as u16).to_be_bytes());
        for i in infos {
            b.extend(i.to_be_bytes());
        }
        b
    }

    #[test]
    fn export_queries_parse_and_refuse_trailing_or_short_data() {
        let q = parse_export_query(&go("vm@12ab", &[3])).unwrap();
        assert_eq!(
            q,
            ExportQuery {
                name: "vm@12ab".into(),
                infos: vec![3]
            }
        );
        let mut long = go("a", &[]);
        long.push(0);
        assert_eq!(
            parse_export_query(&long).unwrap_err().reply,
            REP_ERR_INVALID
        );
        assert!(parse_export_query(&[0, 0, 0, 9, b'a']).is_err());
        assert!(parse_export_query(&u32::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn requests_are_checked_against_the_export() {
        let r = |kind, offset, length| Request {
            flags: 0,
            kind,
            cookie: 7,
            offset,
            length,
        };
        assert_eq!(
            check_request(&r(CMD_READ, 0, 4096), 8192, false),
            Ok(Op::Read)
        );
        assert_eq!(
            check_request(&r(CMD_READ, 4096, 4097), 8192, false)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert_eq!(
            check_request(&r(CMD_READ, u64::MAX, 2), 8192, false)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert_eq!(
            check_request(&r(CMD_READ, 0, u32::MAX), 1 << 40, false)
                .unwrap_err()
                .errno,
            EOVERFLOW
        );
        assert_eq!(
            check_request(&r(CMD_WRITE, 0, 512), 8192, false)
                .unwrap_err()
                .errno,
            EPERM
        );
        assert_eq!(
            check_request(&r(CMD_WRITE, 0, 512), 8192, true),
            Ok(Op::Write)
        );
        assert_eq!(
            check_request(&r(CMD_BLOCK_STATUS, 4096, u32::MAX), 8192, false),
            Ok(Op::BlockStatus)
        );
        assert_eq!(
            check_request(&r(99, 0, 0), 8192, false).unwrap_err().errno,
            ENOTSUP
        );
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_request(&b).unwrap().length, 512);
        b[0] ^= 1;
        assert!(parse_request(&b).is_none());
    }
}
