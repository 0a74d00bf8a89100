//! The server's side of the fixed newstyle handshake, up to the transmission phase.
//!
//! ```text
//! S: "NBDMAGIC" "IHAVEOPT" FIXED_NEWSTYLE|NO_ZEROES
//! C: client flags (FIXED_NEWSTYLE required; unknown flags end the connection)
//! C: option*  S: replies   STRUCTURED_REPLY, LIST, LIST/SET_META_CONTEXT (base:allocation),
//!                          INFO, ABORT; anything else NBD_REP_ERR_UNSUP
//! C: GO (or EXPORT_NAME)   S: INFO(EXPORT) INFO(BLOCK_SIZE) ACK  -> transmission
//! ```
//! The whole handshake must finish within [`HANDSHAKE_TIMEOUT`] and [`MAX_OPTIONS`] options,
//! so a client that stalls or loops cannot hold a connection slot.

use std::io::Write;
use std::time::{Duration, Instant};

use super::export::Export;
use super::socket::{read_full, Stop};
use super::wire::{
    option_len, option_reply, parse_export_query, parse_meta_query, OptionError, MAX_OPTION_LEN,
    MAX_REQUEST,
};
use crate::source::nbd::handshake::{
    BASE_ALLOCATION, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
    IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,
};
use crate::source::nbd::stream::Stream;

/// Time a client has from connecting to entering transmission.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options accepted in one handshake.
pub const MAX_OPTIONS: usize = 256;
/// The context id of `base:allocation`.
pub const ALLOCATION_ID: u32 = 1;
/// Option data longer than this is not drained but ends the connection.
const MAX_DRAIN: u32 = 1 << 20;

/// What the handshake settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index of the export.
    pub export: usize,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected for this export.
    pub allocation: bool,
}

/// The export `name` asks for: by name, or the first for "".
fn find(exports: &[Export], name: &str) -> Option<usize> {
    if name.is_empty() {
        return (!exports.is_empty()).then_some(0);
    }
    exports.iter().position(|e| e.name == name)
}

fn unknown(exports: &[Export], name: &str) -> OptionError {
    let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    OptionError {
        reply: REP_ERR_UNKNOWN,
        message: format!("no export named {name:?}; served: {}", names.join(", ")),
    }
}

/// Run the handshake on `s`; `Ok(None)` when the client ended it (ABORT, close, a protocol
/// violation that leaves nothing to answer).
pub fn negotiate(s: &mut Stream, exports: &[Export]) -> Result<Option<Session>, Stop> {
    let deadline = Some(Instant::now() + HANDSHAKE_TIMEOUT);
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend(IHAVEOPT.to_be_bytes());
    greeting.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    let mut b4 = [0u8; 4];
    read_full(s, &mut b4, deadline)?;
    let client = u32::from_be_bytes(b4);
    if client & CLIENT_FIXED_NEWSTYLE == 0
        || client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
    {
        tracing::debug!(client_flags = client, "serve: client flags refused");
        return Ok(None);
    }
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta: Option<usize> = None;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        read_full(s, &mut h, deadline)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if magic != IHAVEOPT {
            tracing::debug!(magic, "serve: option without IHAVEOPT");
            return Ok(None);
        }
        let data = match option_len(len) {
            Ok(n) => {
                let mut d = vec![0u8; n];
                read_full(s, &mut d, deadline)?;
                d
            }
            Err(e) if len <= MAX_DRAIN => {
                let mut d = vec![0u8; len as usize];
                read_full(s, &mut d, deadline)?;
                s.write_all(&error_reply(option, &e))?;
                continue;
            }
            Err(e) => {
                // Too long to drain: answer, then hang up.
                s.write_all(&error_reply(option, &e))?;
                return Ok(None);
            }
        };
        let answer = match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(i) = find(exports, &name) else {
                    return Ok(None);
                };
                let e = &exports[i];
                let mut b = e.size().to_be_bytes().to_vec();
                b.extend(e.flags().to_be_bytes());
                if !no_zeroes {
                    b.extend([0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Some(session(i, structured, meta)));
            }
            OPT_ABORT => {
                let _ = s.write_all(&option_reply(option, REP_ACK, &[]));
                return Ok(None);
            }
            OPT_LIST if data.is_empty() => {
                let mut out = Vec::new();
                for e in exports {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend(e.name.as_bytes());
                    out.extend(option_reply(option, REP_SERVER, &d));
                }
                out.extend(option_reply(option, REP_ACK, &[]));
                Ok(out)
            }
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                structured = true;
                Ok(option_reply(option, REP_ACK, &[]))
            }
            OPT_LIST | OPT_STRUCTURED_REPLY => Err(OptionError {
                reply: REP_ERR_INVALID,
                message: "this option carries no data".into(),
            }),
            OPT_INFO | OPT_GO => match parse_export_query(&data) {
                Err(e) => Err(e),
                Ok(q) => match find(exports, &q.name) {
                    None => Err(unknown(exports, &q.name)),
                    Some(i) => {
                        s.write_all(&export_info(option, &exports[i]))?;
                        if option == OPT_GO {
                            return Ok(Some(session(i, structured, meta)));
                        }
                        Ok(Vec::new())
                    }
                },
            },
            OPT_SET_META_CONTEXT if !structured => Err(OptionError {
                reply: REP_ERR_INVALID,
                message: "negotiate structured replies before SET_META_CONTEXT".into(),
            }),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => match parse_meta_query(&data) {
                Err(e) => Err(e),
                Ok(q) => match find(exports, &q.name) {
                    None => Err(unknown(exports, &q.name)),
                    Some(i) => {
                        let list = option == OPT_LIST_META_CONTEXT;
                        let wanted = (list && q.queries.is_empty())
                            || q.queries
                                .iter()
                                .any(|c| c == BASE_ALLOCATION || c == "base:");
                        let mut out = Vec::new();
                        if wanted {
                            let mut d = (if list { 0 } else { ALLOCATION_ID })
                                .to_be_bytes()
                                .to_vec();
                            d.extend(BASE_ALLOCATION.as_bytes());
                            out.extend(option_reply(option, REP_META_CONTEXT, &d));
                        }
                        if !list {
                            meta = wanted.then_some(i);
                        }
                        out.extend(option_reply(option, REP_ACK, &[]));
                        Ok(out)
                    }
                },
            },
            _ => Err(OptionError {
                reply: REP_ERR_UNSUP,
                message: format!("option {option} is not supported"),
            }),
        };
        match answer {
            Ok(bytes) => s.write_all(&bytes)?,
            Err(e) => s.write_all(&error_reply(option, &e))?,
        }
    }
    tracing::debug!(limit = MAX_OPTIONS, "serve: too many options");
    Ok(None)
}

fn session(export: usize, structured: bool, meta: Option<usize>) -> Session {
    Session {
        export,
        structured,
        allocation: structured && meta == Some(export),
    }
}

fn error_reply(option: u32, e: &OptionError) -> Vec<u8> {
    option_reply(option, e.reply, e.message.as_bytes())
}

/// INFO(EXPORT), INFO(BLOCK_SIZE), ACK: the answer to GO and INFO.
fn export_info(option: u32, e: &Export) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend(e.size().to_be_bytes());
    d.extend(e.flags().to_be_bytes());
    let mut out = option_reply(option, REP_INFO, &d);
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend(1u32.to_be_bytes());
    d.extend(4096u32.to_be_bytes());
    d.extend(MAX_REQUEST.to_be_bytes());
    out.extend(option_reply(option, REP_INFO, &d));
    out.extend(option_reply(option, REP_ACK, &[]));
    out
}

const _: () = assert!(MAX_OPTION_LEN < MAX_DRAIN);
