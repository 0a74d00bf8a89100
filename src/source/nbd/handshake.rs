//! The NBD handshake (fixed newstyle) up to the transmission phase.
//!
//! ```text
//! S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags      (oldstyle magic here: refused)
//! C: u32 client flags (FIXED_NEWSTYLE, NO_ZEROES if offered)
//! C: STRUCTURED_REPLY                 S: ACK | ERR_UNSUP (then plain reads, no block status)
//! C: LIST_META_CONTEXT export ["qemu:dirty-bitmap:"]   S: META_CONTEXT(name)* ACK
//! C: SET_META_CONTEXT export [base:allocation, qemu:dirty-bitmap:NAME for each listed]
//!                                     S: META_CONTEXT(id, name)* ACK
//! C: GO export [INFO_BLOCK_SIZE]      S: INFO(EXPORT: size, flags) INFO(BLOCK_SIZE)? ACK
//!                                     | ERR_UNKNOWN: C: LIST  S: SERVER(name)* ACK (for the error)
//! ```
//!
//! Each option gets its replies before the next is sent. Option replies are bounded
//! ([`MAX_OPTION_REPLY`] bytes, [`MAX_REPLIES`] per option); a failure after the greeting
//! ends with `NBD_OPT_ABORT`, the soft disconnect the protocol asks clients to use. Errors
//! here do not name the URL: the caller adds it.

use super::url::MAX_NAME;
use crate::error::{Error, ErrorKind, Result};
use std::io::{self, Read, Write};

/// "NBDMAGIC", the first 8 bytes from any NBD server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle magic (no export names, no options).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// `NBD_FLAG_FIXED_NEWSTYLE` (handshake flags).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES` (handshake flags).
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// `NBD_FLAG_C_FIXED_NEWSTYLE` (client flags).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES` (client flags).
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;
/// `NBD_OPT_EXPORT_NAME`: the old way to pick an export; no reply but the export's data.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_INFO`: as `NBD_OPT_GO` without entering transmission.
pub const OPT_INFO: u32 = 6;

/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks error replies.
pub const REP_ERR_BIT: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the option is unknown.
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
/// `NBD_REP_ERR_POLICY`: refused by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
/// `NBD_REP_ERR_INVALID`: the option's data is malformed.
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
/// `NBD_REP_ERR_TLS_REQD`: TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
/// `NBD_REP_ERR_TOO_BIG`: the option's data is longer than the server accepts.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

/// `NBD_INFO_EXPORT`: u64 size, u16 transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`: u32 minimum, preferred, maximum block size.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The longest option reply accepted: a 4096-byte string plus fixed fields, with room.
pub const MAX_OPTION_REPLY: u32 = 16 << 10;
/// Most replies accepted for one option (contexts listed, infos sent).
pub const MAX_REPLIES: usize = 4096;
/// The largest export size accepted (offsets must fit an `i64` everywhere downstream).
pub const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;

/// The namespace prefix of QEMU's dirty-bitmap contexts.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// The standard allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The server's block size constraints (`NBD_INFO_BLOCK_SIZE`), or the protocol's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// Offsets and lengths must be multiples of this (a power of two, at most 64 KiB).
    pub min: u32,
    /// Efficient request size.
    pub preferred: u32,
    /// Longest request (0xffffffff: no limit of its own).
    pub max: u32,
}

impl Default for BlockLimits {
    /// What the protocol says to assume when the server sends none.
    fn default() -> Self {
        BlockLimits {
            min: 1,
            preferred: 4096,
            max: u32::MAX,
        }
    }
}

/// What the handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints.
    pub limits: BlockLimits,
    /// Whether structured replies (and so block status) are in use.
    pub structured: bool,
    /// Metadata contexts granted by SET_META_CONTEXT: (name, id).
    pub contexts: Vec<(String, u32)>,
    /// Dirty bitmaps the server lists for the export (names without the prefix); `None`
    /// when it could not list them (no structured replies, or the option is unsupported).
    pub bitmaps: Option<Vec<String>>,
}

impl Negotiated {
    /// The id of a granted context.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }
}

/// One decoded `NBD_REP_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(BlockLimits),
    /// A type this client did not ask for or does not know (ignored, as the protocol asks).
    Other(u16),
}

fn bad(what: String) -> Error {
    Error::integrity(format!("malformed handshake: {what}"))
}

/// Negotiate `export` with `contexts` and every dirty bitmap the server lists selected, on
/// a fresh connection.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &str,
    contexts: &[String],
) -> Result<Negotiated> {
    greet(s)?;
    let r = options(s, export, contexts).map_err(|e| match e.kind() {
        ErrorKind::NotFound => with_offers(s, e),
        _ => e,
    });
    if r.is_err() {
        // The soft disconnect; the server may already be gone, so errors are moot.
        let _ = send_option(s, OPT_ABORT, &[]);
    }
    r
}

/// The server's greeting and our flags.
fn greet<S: Read + Write>(s: &mut S) -> Result<()> {
    let mut b = [0u8; 18];
    read(s, &mut b[..16], "the greeting")?;
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(bad(format!(
            "greeting starts with {magic:#018x}, not NBDMAGIC: is this an NBD server?"
        )));
    }
    let style = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
    match style {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "server uses the oldstyle handshake, which has no export names, block status or \
                 structured replies; serve the disk with newstyle negotiation (qemu-nbd does by default)",
            ))
        }
        m => return Err(bad(format!("greeting magic {m:#018x} is neither IHAVEOPT nor oldstyle"))),
    }
    read(s, &mut b[16..18], "the handshake flags")?;
    let flags = u16::from_be_bytes([b[16], b[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "server does not offer fixed newstyle negotiation (needed for NBD_OPT_GO and block status)",
        ));
    }
    let mut ours = CLIENT_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        ours |= CLIENT_NO_ZEROES;
    }
    write(s, &ours.to_be_bytes())
}

fn options<S: Read + Write>(s: &mut S, export: &str, contexts: &[String]) -> Result<Negotiated> {
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (rep, data) = read_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = match rep {
        REP_ACK => true,
        // Every option but STARTTLS gets this from a TLS-only server: say so now, not after
        // a warning that structured replies were refused.
        REP_ERR_TLS_REQD => return Err(refused(export, rep, &data)),
        r if r & REP_ERR_BIT != 0 => {
            tracing::warn!(export, reply = %reply_name(r), message = %text(&data),
                "server refuses structured replies: reads only, no block status");
            false
        }
        r => return Err(unexpected(OPT_STRUCTURED_REPLY, r)),
    };
    let (bitmaps, contexts) = if structured {
        let listed = meta_contexts(
            s,
            OPT_LIST_META_CONTEXT,
            export,
            &[DIRTY_BITMAP_PREFIX.into()],
        )?;
        let bitmaps = listed.map(|l| {
            l.into_iter()
                .filter_map(|(name, _)| name.strip_prefix(DIRTY_BITMAP_PREFIX).map(str::to_owned))
                .collect()
        });
        let wanted = with_bitmaps(contexts, bitmaps.as_deref().unwrap_or_default());
        let granted = meta_contexts(s, OPT_SET_META_CONTEXT, export, &wanted)?;
        (bitmaps, granted.unwrap_or_default())
    } else {
        (None, Vec::new())
    };
    let (size, flags, limits) = go(s, export)?;
    Ok(Negotiated {
        size,
        flags,
        limits,
        structured,
        contexts,
        bitmaps,
    })
}

/// `contexts` and the context of every bitmap in `bitmaps` not already among them. Selecting
/// every listed bitmap up front means reading one later needs no second connection, which a
/// server that serves a single one refuses (qemu-nbd without `--persistent` exits when its
/// first client leaves).
fn with_bitmaps(contexts: &[String], bitmaps: &[String]) -> Vec<String> {
    let mut all = contexts.to_vec();
    for b in bitmaps {
        let c = format!("{DIRTY_BITMAP_PREFIX}{b}");
        if !all.contains(&c) {
            all.push(c);
        }
    }
    all
}

/// Most export names quoted in an error.
const MAX_NAMES_SHOWN: usize = 20;

/// An unknown-export error `e`, followed by the exports the server lists (`NBD_OPT_LIST`),
/// so a mistyped name can be put right; as it was if the server will not list them.
fn with_offers<S: Read + Write>(s: &mut S, e: Error) -> Error {
    let Ok(Some(names)) = list_exports(s) else {
        return e;
    };
    let offers = if names.is_empty() {
        "it lists no exports".to_owned()
    } else {
        let mut shown: Vec<String> = names
            .iter()
            .take(MAX_NAMES_SHOWN)
            .map(|n| format!("{n:?}"))
            .collect();
        if names.len() > MAX_NAMES_SHOWN {
            shown.push(format!("and {} more", names.len() - MAX_NAMES_SHOWN));
        }
        format!("it offers: {}", shown.join(", "))
    };
    Error::new(e.kind(), format!("{}; {offers}", e.context()))
}

/// The export names from `NBD_OPT_LIST`, or `None` if the server refuses the option.
fn list_exports<S: Read + Write>(s: &mut S) -> Result<Option<Vec<String>>> {
    send_option(s, OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let (rep, data) = read_reply(s, OPT_LIST)?;
        match rep {
            REP_SERVER => {
                if names.len() >= MAX_REPLIES {
                    return Err(bad(format!(
                        "more than {MAX_REPLIES} exports in reply to NBD_OPT_LIST"
                    )));
                }
                names.push(parse_server(&data)?);
            }
            REP_ACK => return Ok(Some(names)),
            r if r & REP_ERR_BIT != 0 => return Ok(None),
            r => return Err(unexpected(OPT_LIST, r)),
        }
    }
}

/// Decode an `NBD_REP_SERVER` payload: u32 name length, name, then details (ignored).
pub fn parse_server(d: &[u8]) -> Result<String> {
    let len = d
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .filter(|&n| n <= MAX_NAME && n <= d.len() - 4)
        .ok_or_else(|| bad(format!("NBD_REP_SERVER of {} bytes", d.len())))?;
    Ok(String::from_utf8_lossy(&d[4..4 + len]).into_owned())
}

/// LIST or SET_META_CONTEXT: the contexts returned, or `None` if the server refused the
/// option (other than for an unknown export, which is an error).
fn meta_contexts<S: Read + Write>(
    s: &mut S,
    option: u32,
    export: &str,
    queries: &[String],
) -> Result<Option<Vec<(String, u32)>>> {
    let mut data = Vec::new();
    put_string(&mut data, export)?;
    data.extend((queries.len() as u32).to_be_bytes());
    for q in queries {
        put_string(&mut data, q)?;
    }
    send_option(s, option, &data)?;
    let mut found = Vec::new();
    loop {
        let (rep, data) = read_reply(s, option)?;
        match rep {
            REP_META_CONTEXT => {
                if found.len() >= MAX_REPLIES {
                    return Err(bad(format!(
                        "more than {MAX_REPLIES} metadata contexts in reply to {}",
                        option_name(option)
                    )));
                }
                let (id, name) = parse_meta_context(&data)?;
                found.push((name, id));
            }
            REP_ACK => return Ok(Some(found)),
            REP_ERR_UNKNOWN => return Err(refused(export, rep, &data)),
            r if r & REP_ERR_BIT != 0 => {
                tracing::warn!(export, option = option_name(option), reply = %reply_name(r),
                    message = %text(&data), "server refuses the option");
                return Ok(None);
            }
            r => return Err(unexpected(option, r)),
        }
    }
}

/// NBD_OPT_GO: size, transmission flags and block limits.
fn go<S: Read + Write>(s: &mut S, export: &str) -> Result<(u64, u16, BlockLimits)> {
    let mut data = Vec::new();
    put_string(&mut data, export)?;
    data.extend(1u16.to_be_bytes());
    data.extend(INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut export_info = None;
    let mut limits = BlockLimits::default();
    for _ in 0..MAX_REPLIES {
        let (rep, data) = read_reply(s, OPT_GO)?;
        match rep {
            REP_INFO => match parse_info(&data)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(l) => limits = l,
                Info::Other(_) => {}
            },
            REP_ACK => {
                let (size, flags) = export_info
                    .ok_or_else(|| bad("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()))?;
                return Ok((size, flags, limits));
            }
            r if r & REP_ERR_BIT != 0 => return Err(refused(export, r, &data)),
            r => return Err(unexpected(OPT_GO, r)),
        }
    }
    Err(bad(format!(
        "more than {MAX_REPLIES} replies to NBD_OPT_GO"
    )))
}

/// Decode an option reply header (20 bytes) to the option it answers: (reply type, length).
pub fn parse_reply_header(b: &[u8; 20], option: u32) -> Result<(u32, u32)> {
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
    if magic != OPTION_REPLY_MAGIC {
        return Err(bad(format!("option reply magic {magic:#x}")));
    }
    let echoed = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    if echoed != option {
        return Err(bad(format!(
            "reply for option {echoed} while {} is pending",
            option_name(option)
        )));
    }
    let rep = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
    let len = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    if len > MAX_OPTION_REPLY {
        return Err(bad(format!(
            "reply to {} of {len} bytes (at most {MAX_OPTION_REPLY})",
            option_name(option)
        )));
    }
    Ok((rep, len))
}

/// Decode an `NBD_REP_INFO` payload.
pub fn parse_info(d: &[u8]) -> Result<Info> {
    if d.len() < 2 {
        return Err(bad(format!("NBD_REP_INFO of {} bytes", d.len())));
    }
    let kind = u16::from_be_bytes([d[0], d[1]]);
    let be32 = |at: usize| u32::from_be_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
    match kind {
        INFO_EXPORT => {
            if d.len() != 12 {
                return Err(bad(format!("NBD_INFO_EXPORT of {} bytes, not 12", d.len())));
            }
            let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
            if size > MAX_EXPORT_SIZE {
                return Err(bad(format!("export size {size} exceeds 2^63 - 1")));
            }
            Ok(Info::Export {
                size,
                flags: u16::from_be_bytes([d[10], d[11]]),
            })
        }
        INFO_BLOCK_SIZE => {
            if d.len() != 14 {
                return Err(bad(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes, not 14",
                    d.len()
                )));
            }
            let l = BlockLimits {
                min: be32(2),
                preferred: be32(6),
                max: be32(10),
            };
            if !l.min.is_power_of_two() || l.min > 65536 {
                return Err(bad(format!(
                    "minimum block size {}: must be a power of two up to 65536",
                    l.min
                )));
            }
            if l.max < l.min || (l.max != u32::MAX && !l.max.is_multiple_of(l.min)) {
                return Err(bad(format!(
                    "maximum block size {}: must be a multiple of the minimum {}",
                    l.max, l.min
                )));
            }
            Ok(Info::BlockSize(l))
        }
        k => Ok(Info::Other(k)),
    }
}

/// Decode an `NBD_REP_META_CONTEXT` payload: (id, name).
pub fn parse_meta_context(d: &[u8]) -> Result<(u32, String)> {
    if d.len() < 4 || d.len() - 4 > MAX_NAME {
        return Err(bad(format!("NBD_REP_META_CONTEXT of {} bytes", d.len())));
    }
    let id = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let name = std::str::from_utf8(&d[4..])
        .map_err(|_| bad("metadata context name is not UTF-8".into()))?;
    Ok((id, name.to_owned()))
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend(IHAVEOPT.to_be_bytes());
    b.extend(option.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    write(s, &b)
}

fn read_reply<S: Read>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>)> {
    let what = format!("the reply to {}", option_name(option));
    let mut h = [0u8; 20];
    read(s, &mut h, &what)?;
    let (rep, len) = parse_reply_header(&h, option)?;
    let mut data = vec![0u8; len as usize];
    read(s, &mut data, &what)?;
    Ok((rep, data))
}

fn put_string(out: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > MAX_NAME {
        return Err(Error::usage(format!(
            "name of {} bytes exceeds the protocol's {MAX_NAME}",
            s.len()
        )));
    }
    out.extend((s.len() as u32).to_be_bytes());
    out.extend(s.as_bytes());
    Ok(())
}

fn read<S: Read>(s: &mut S, buf: &mut [u8], what: &str) -> Result<()> {
    s.read_exact(buf).map_err(|e| io_error(e, what))
}

fn write<S: Write>(s: &mut S, b: &[u8]) -> Result<()> {
    s.write_all(b)
        .and_then(|()| s.flush())
        .map_err(|e| io_error(e, "sending an option"))
}

fn io_error(e: io::Error, what: &str) -> Error {
    let msg = match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            format!("server closed the connection while we awaited {what}")
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
            "no answer while we awaited {what} (timed out; note that qemu-nbd serves one client \
             at a time unless started with --shared=N)"
        ),
        _ => format!("handshake failed while we awaited {what}"),
    };
    Error::new(ErrorKind::Io, msg).with_source(e)
}

/// An error reply to GO or a context option: the export is named, the server's text kept.
fn refused(export: &str, rep: u32, data: &[u8]) -> Error {
    let msg = text(data);
    let said = if msg.is_empty() {
        String::new()
    } else {
        format!(": server says {msg:?}")
    };
    let (kind, what) = match rep {
        REP_ERR_UNKNOWN => (
            ErrorKind::NotFound,
            format!("server has no export {export:?}"),
        ),
        REP_ERR_TLS_REQD => (
            ErrorKind::Unsupported,
            format!("export {export:?} requires TLS, which is not supported"),
        ),
        REP_ERR_UNSUP => (
            ErrorKind::Unsupported,
            "server does not support NBD_OPT_GO (too old)".into(),
        ),
        REP_ERR_POLICY => (
            ErrorKind::Usage,
            format!("server's policy refuses export {export:?}"),
        ),
        r => (
            ErrorKind::Io,
            format!("server refused export {export:?} with {}", reply_name(r)),
        ),
    };
    Error::new(kind, format!("{what}{said}"))
}

fn unexpected(option: u32, rep: u32) -> Error {
    bad(format!(
        "reply type {} to {}",
        reply_name(rep),
        option_name(option)
    ))
}

/// A server's message, lossily decoded, at most 4096 bytes kept.
fn text(d: &[u8]) -> String {
    String::from_utf8_lossy(&d[..d.len().min(MAX_NAME)])
        .trim()
        .to_owned()
}

fn option_name(o: u32) -> String {
    match o {
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        o => format!("option {o}"),
    }
}

fn reply_name(r: u32) -> String {
    let name = match r {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        0x8000_0003 => "NBD_REP_ERR_INVALID",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG",
        r => return format!("reply {r:#x}"),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: what it sends, and what the client wrote.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn script(parts: &[&[u8]]) -> Script {
        Script {
            input: io::Cursor::new(parts.concat()),
            output: Vec::new(),
        }
    }

    fn reply(option: u32, rep: u32, data: &[u8]) -> Vec<u8> {
        let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend(option.to_be_bytes());
        b.extend(rep.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        b
    }

    fn greeting(flags: u16) -> Vec<u8> {
        [
            NBDMAGIC.to_be_bytes().as_slice(),
            &IHAVEOPT.to_be_bytes(),
            &flags.to_be_bytes(),
        ]
        .concat()
    }

    fn info_export(size: u64) -> Vec<u8> {
        [
            INFO_EXPORT.to_be_bytes().as_slice(),
            &size.to_be_bytes(),
            &3u16.to_be_bytes(),
        ]
        .concat()
    }

    fn context(id: u32, name: &str) -> Vec<u8> {
        [id.to_be_bytes().as_slice(), name.as_bytes()].concat()
    }

    #[test]
    fn full_negotiation() {
        let limits = [
            3u16.to_be_bytes().as_slice(),
            &512u32.to_be_bytes(),
            &4096u32.to_be_bytes(),
            &(32u32 << 20).to_be_bytes(),
        ]
        .concat();
        let mut s = script(&[
            &greeting(3),
            &reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]),
            &reply(
                OPT_LIST_META_CONTEXT,
                REP_META_CONTEXT,
                &context(0, "qemu:dirty-bitmap:b0"),
            ),
            &reply(
                OPT_LIST_META_CONTEXT,
                REP_META_CONTEXT,
                &context(0, "qemu:dirty-bitmap:b1"),
            ),
            &reply(OPT_LIST_META_CONTEXT, REP_ACK, &[]),
            &reply(
                OPT_SET_META_CONTEXT,
                REP_META_CONTEXT,
                &context(5, BASE_ALLOCATION),
            ),
            &reply(OPT_SET_META_CONTEXT, REP_ACK, &[]),
            &reply(OPT_GO, REP_INFO, &[9, 9, 1]),
            &reply(OPT_GO, REP_INFO, &limits),
            &reply(OPT_GO, REP_INFO, &info_export(1 << 30)),
            &reply(OPT_GO, REP_ACK, &[]),
        ]);
        let n = negotiate(&mut s, "disk", &[BASE_ALLOCATION.into()]).unwrap();
        assert_eq!(n.size, 1 << 30);
        assert_eq!(
            n.limits,
            BlockLimits {
                min: 512,
                preferred: 4096,
                max: 32 << 20
            }
        );
        assert!(n.structured);
        assert_eq!(n.context(BASE_ALLOCATION), Some(5));
        assert_eq!(n.bitmaps, Some(vec!["b0".to_string(), "b1".to_string()]));
        // Both listed bitmaps were asked for along with base:allocation.
        let set = [
            IHAVEOPT.to_be_bytes().as_slice(),
            &OPT_SET_META_CONTEXT.to_be_bytes(),
        ]
        .concat();
        let at = s.output.windows(12).position(|w| w == set).expect("SET");
        let names = String::from_utf8_lossy(&s.output[at..]);
        assert!(
            names.contains("qemu:dirty-bitmap:b0") && names.contains("qemu:dirty-bitmap:b1"),
            "{names}"
        );
        // Client flags: fixed newstyle and no zeroes; then STRUCTURED_REPLY with no data.
        assert_eq!(&s.output[0..4], &3u32.to_be_bytes());
        assert_eq!(&s.output[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&s.output[12..16], &OPT_STRUCTURED_REPLY.to_be_bytes());
        assert_eq!(&s.output[16..20], &0u32.to_be_bytes());
    }

    #[test]
    fn unknown_export_names_it_and_aborts() {
        let mut s = script(&[
            &greeting(1),
            &reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
            &reply(OPT_GO, REP_ERR_UNKNOWN, b"export 'nope' not present"),
        ]);
        let e = negotiate(&mut s, "nope", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(
            e.to_string().contains("no export \"nope\"") && e.to_string().contains("not present"),
            "{e}"
        );
        // Without NO_ZEROES offered, only FIXED_NEWSTYLE is sent; the last option is ABORT.
        assert_eq!(&s.output[0..4], &1u32.to_be_bytes());
        let tail = &s.output[s.output.len() - 8..];
        assert_eq!(tail, [OPT_ABORT.to_be_bytes(), 0u32.to_be_bytes()].concat());
    }

    #[test]
    fn an_unknown_export_lists_those_offered() {
        let server = |name: &str| {
            [
                (name.len() as u32).to_be_bytes().as_slice(),
                name.as_bytes(),
                b"details",
            ]
            .concat()
        };
        let mut s = script(&[
            &greeting(1),
            &reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
            &reply(OPT_GO, REP_ERR_UNKNOWN, b""),
            &reply(OPT_LIST, REP_SERVER, &server("disk1")),
            &reply(OPT_LIST, REP_SERVER, &server("vm disk")),
            &reply(OPT_LIST, REP_ACK, &[]),
        ]);
        let e = negotiate(&mut s, "disk", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "server has no export \"disk\"; it offers: \"disk1\", \"vm disk\""
        );
        let tail = &s.output[s.output.len() - 8..];
        assert_eq!(tail, [OPT_ABORT.to_be_bytes(), 0u32.to_be_bytes()].concat());
        assert!(parse_server(&[0, 0, 0, 9, b'x']).is_err());
        assert!(parse_server(&[0, 0]).is_err());
        assert_eq!(parse_server(&server("")).unwrap(), "");
    }

    #[test]
    fn a_tls_only_server_is_refused_at_the_first_option() {
        let mut s = script(&[
            &greeting(3),
            &reply(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, b"TLS is required"),
        ]);
        let e = negotiate(&mut s, "disk", &[BASE_ALLOCATION.into()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(
            e.to_string().contains("export \"disk\" requires TLS")
                && e.to_string().contains("TLS is required"),
            "{e}"
        );
        let tail = &s.output[s.output.len() - 8..];
        assert_eq!(tail, [OPT_ABORT.to_be_bytes(), 0u32.to_be_bytes()].concat());
    }

    #[test]
    fn oldstyle_and_garbage_are_refused() {
        let old = [
            NBDMAGIC.to_be_bytes().as_slice(),
            &OLDSTYLE_MAGIC.to_be_bytes(),
            &[0; 20],
        ]
        .concat();
        let e = negotiate(&mut script(&[&old]), "", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("oldstyle"), "{e}");
        let e = negotiate(&mut script(&[b"HTTP/1.1 400 Bad Request\r\n"]), "", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        assert!(e.to_string().contains("NBDMAGIC"), "{e}");
        let e = negotiate(&mut script(&[&greeting(0)]), "", &[]).unwrap_err();
        assert!(e.to_string().contains("fixed newstyle"), "{e}");
        let e = negotiate(&mut script(&[&greeting(1)[..10]]), "", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("closed the connection"), "{e}");
    }

    #[test]
    fn replies_are_bounded_and_checked() {
        let mut h = [0u8; 20];
        h[..20].copy_from_slice(&reply(OPT_GO, REP_INFO, &[])[..20]);
        assert_eq!(parse_reply_header(&h, OPT_GO).unwrap(), (REP_INFO, 0));
        assert!(parse_reply_header(&h, OPT_ABORT)
            .unwrap_err()
            .to_string()
            .contains("option 7"));
        h[16..20].copy_from_slice(&(MAX_OPTION_REPLY + 1).to_be_bytes());
        assert!(parse_reply_header(&h, OPT_GO).is_err());
        h[0] = 1;
        assert!(parse_reply_header(&h, OPT_GO)
            .unwrap_err()
            .to_string()
            .contains("magic"));

        assert!(parse_info(&[0]).is_err());
        assert!(parse_info(&info_export(u64::MAX)).is_err());
        assert!(parse_info(&info_export(5)[..11]).is_err());
        let limits = |min: u32, max: u32| {
            [
                3u16.to_be_bytes().as_slice(),
                &min.to_be_bytes(),
                &4096u32.to_be_bytes(),
                &max.to_be_bytes(),
            ]
            .concat()
        };
        assert!(parse_info(&limits(3, 4096)).is_err());
        assert!(parse_info(&limits(1 << 17, 1 << 20)).is_err());
        assert!(parse_info(&limits(512, 1000)).is_err());
        assert!(parse_info(&limits(512, u32::MAX)).is_ok());
        assert_eq!(parse_info(&[0, 9]).unwrap(), Info::Other(9));
        assert!(parse_meta_context(&[0, 0, 0]).is_err());
        assert!(parse_meta_context(&[0, 0, 0, 1, 0xff]).is_err());
        assert_eq!(
            parse_meta_context(&context(4, "base:allocation")).unwrap(),
            (4, BASE_ALLOCATION.into())
        );
    }
}
