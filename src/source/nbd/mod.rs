//! NBD exports as sources: `nbd://HOST[:PORT]/EXPORT` and `nbd+unix:///EXPORT?socket=PATH`.
//!
//! This is how libvirt and oVirt expose a running VM's disk and its changes (a backup job
//! exports the disk with `qemu:dirty-bitmap:NAME`), and how every format QEMU reads (vmdk,
//! vhdx, vdi, ...) reaches us: through `qemu-nbd`.
//!
//! Model: one connection, negotiated with fixed newstyle ([`handshake`]) and read with
//! structured replies and pipelined requests ([`client`]); the wire format is in [`proto`].
//! - reads: [`ReadAt`] from many reader threads at once, each request in flight on the one
//!   connection; holes come back as hole chunks and cost no transfer;
//! - data ranges: `NBD_CMD_BLOCK_STATUS` over `base:allocation`; extents flagged
//!   `NBD_STATE_ZERO` read as zeros and are left out (an extent that is only a hole is kept:
//!   the protocol does not promise it reads as zeros);
//! - bitmaps: listed at the handshake (`NBD_OPT_LIST_META_CONTEXT "qemu:dirty-bitmap:"`);
//!   `dirty_ranges(name)` is block status over `qemu:dirty-bitmap:NAME`. NBD carries no
//!   bitmap granularity and no enabled state: an export offers a disabled bitmap as readily
//!   as an enabled one, so the source reports that state as unknown, never as enabled.
//!
//! Meta contexts can only be chosen before `NBD_OPT_GO`, and qemu-nbd serves **one client at
//! a time** by default (`--shared=1`: a second connection waits until the first closes), and
//! without `--persistent` it exits when that client leaves. So the handshake selects every
//! bitmap the server lists along with `base:allocation`, and one connection serves the whole
//! backup. Only a bitmap the server did not list (see [`NbdOptions::bitmap`]) makes
//! `dirty_ranges` wait for reads in flight, close the connection, and open a new one that
//! negotiates `base:allocation` and that bitmap; reads then continue on the new connection
//! (whose export size must be unchanged).

pub mod client;
pub mod handshake;
pub mod proto;
pub mod stream;
pub mod url;
pub mod writer;

use super::{whole_range, Access, BitmapInfo, ReadAt, Source, SourceKind};
use crate::changes::ChangeList;
use crate::error::{Error, ErrorKind, Result};
use client::Client;
use handshake::{Negotiated, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX};
use std::ops::Range;
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;
use stream::Stream;
use url::{Endpoint, NbdUrl};

pub use url::is_nbd_url;

/// The largest block-status request: 4 GiB less 64 KiB, a multiple of any minimum block size
/// (a power of two up to 64 KiB) that fits the request's 32-bit length.
const STATUS_STEP: u64 = (1 << 32) - (1 << 16);

/// How to open an NBD source.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// How long to wait for the server: connecting, each handshake step, each reply.
    pub timeout: Duration,
    /// A dirty bitmap to negotiate at open even if the server does not list it, so
    /// `dirty_ranges` of it needs no reconnect (listed bitmaps always are).
    pub bitmap: Option<String>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            timeout: Duration::from_secs(60),
            bitmap: None,
        }
    }
}

/// An NBD export.
pub struct NbdSource {
    url: String,
    target: NbdUrl,
    timeout: Duration,
    size: u64,
    sector_size: u32,
    /// `None` only after a failed reconnect.
    conn: RwLock<Option<Connection>>,
}

/// A connection and what its handshake settled.
struct Connection {
    client: Client,
    negotiated: Negotiated,
}

impl NbdSource {
    /// Connect to `url` and negotiate. Errors name the URL: malformed URL (Usage), TLS or
    /// oldstyle servers (Unsupported), unknown export (NotFound), network (Io), a server
    /// breaking the protocol (Integrity).
    pub fn open(url: &str, opts: &NbdOptions) -> Result<NbdSource> {
        let target = url::parse(url)?;
        let conn = connect(url, &target, opts.timeout, opts.bitmap.as_deref())?;
        let n = &conn.negotiated;
        Ok(NbdSource {
            url: url.to_owned(),
            size: n.size,
            sector_size: sector_size(n.limits.min),
            target,
            timeout: opts.timeout,
            conn: RwLock::new(Some(conn)),
        })
    }

    fn conn(&self) -> RwLockReadGuard<'_, Option<Connection>> {
        self.conn.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Block status of `context` over the whole export: the ranges whose flags `keep`
    /// accepts, merged. Requests go in [`STATUS_STEP`] pieces, each following on from
    /// where the server's extents ended.
    fn walk(
        &self,
        c: &Connection,
        context: u32,
        keep: impl Fn(u32) -> bool,
    ) -> Result<Vec<Range<u64>>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let len = (self.size - pos).min(STATUS_STEP) as u32;
            for e in c.client.block_status(context, pos, len)? {
                if pos >= self.size {
                    break;
                }
                // The last extent may run past the request, even past the export.
                let end = pos.saturating_add(u64::from(e.len)).min(self.size);
                if keep(e.flags) {
                    match ranges.last_mut() {
                        Some(last) if last.end == pos => last.end = end,
                        _ => ranges.push(pos..end),
                    }
                }
                pos = end;
            }
        }
        Ok(ranges)
    }

    /// The Usage error for a bitmap the server does not offer, listing those it does.
    fn no_bitmap(&self, name: &str, offered: Option<&[String]>) -> Error {
        let offers = match offered {
            Some([]) => "it offers none (qemu-nbd exports one with --bitmap=NAME)".to_owned(),
            Some(list) => format!("it offers: {}", list.join(", ")),
            None => "the server does not list its bitmaps".to_owned(),
        };
        Error::usage(format!(
            "NBD export {} has no dirty bitmap {name:?}; {offers}",
            self.url
        ))
    }
}

/// The sector size of an export whose minimum block size is `min`. NBD does not carry the
/// disk's logical sector size; a minimum of 1024 to 4096 is taken as one (a 4Kn disk exported
/// by qemu-nbd says 4096), anything else as 512. A larger minimum is the server's I/O granule
/// (nbdkit's blocksize-policy, a 64 KiB storage block), never a sector: taken as the sector
/// size, it made the partition-table scan refuse the disk, losing its layout.
fn sector_size(min: u32) -> u32 {
    if (1024..=4096).contains(&min) {
        min
    } else {
        512
    }
}

/// Connect, negotiate `base:allocation` (and `bitmap`), and start the client.
fn connect(
    url: &str,
    target: &NbdUrl,
    timeout: Duration,
    bitmap: Option<&str>,
) -> Result<Connection> {
    let place = match &target.endpoint {
        Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        Endpoint::Unix(p) => p.display().to_string(),
    };
    let mut stream = Stream::connect(&target.endpoint, timeout).map_err(|e| {
        // No socket, or nobody listening: most often a qemu-nbd that already served its one
        // client (`inspect`, an earlier backup) and exited.
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is the server running? qemu-nbd serves one client and exits unless started with --persistent)"
            }
            _ => "",
        };
        Error::io(format!("NBD export {url}: cannot connect to {place}{hint}"), e)
    })?;
    stream
        .set_timeouts(Some(timeout), Some(timeout))
        .map_err(|e| Error::io(format!("NBD export {url}: cannot set socket timeouts"), e))?;
    let mut contexts = vec![BASE_ALLOCATION.to_owned()];
    contexts.extend(bitmap.map(|b| format!("{DIRTY_BITMAP_PREFIX}{b}")));
    let negotiated = handshake::negotiate(&mut stream, &target.export, &contexts)
        .map_err(|e| e.within(format!("NBD export {url}")))?;
    let client = Client::start(
        stream,
        format!("NBD export {url}"),
        timeout,
        negotiated.size,
        negotiated.limits,
    )?;
    Ok(Connection { client, negotiated })
}

impl Source for NbdSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Nbd
    }

    fn name(&self) -> &str {
        &self.url
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// See [`sector_size`].
    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// Any: reads are widened to the server's minimum block size internally.
    fn alignment(&self) -> usize {
        1
    }

    fn data_ranges(&self) -> Result<Vec<Range<u64>>> {
        let g = self.conn();
        let c = connected(&g, &self.url)?;
        match c.negotiated.context(BASE_ALLOCATION) {
            Some(id) => self.walk(c, id, |flags| flags & proto::STATE_ZERO == 0),
            // No block status: everything may be data.
            None => Ok(whole_range(self.size)),
        }
    }

    fn access(&self) -> Access<'_> {
        Access::Translated(self)
    }

    /// The bitmaps the server listed, and any selected at open that it did not list. NBD
    /// carries no granularity and no enabled state (`None`: an export offers a disabled
    /// bitmap too); the dirty bytes come from block status over the contexts negotiated at
    /// open. qemu-nbd refuses to export a bitmap left in use, so none is.
    fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let g = self.conn();
        let c = connected(&g, &self.url)?;
        let n = &c.negotiated;
        let mut names: Vec<&str> = n.bitmaps.iter().flatten().map(String::as_str).collect();
        for (context, _) in &n.contexts {
            if let Some(name) = context.strip_prefix(DIRTY_BITMAP_PREFIX) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
            .into_iter()
            .map(|name| {
                let context = n.context(&format!("{DIRTY_BITMAP_PREFIX}{name}"));
                let dirty_bytes = match context {
                    Some(id) => Some(ChangeList::new(1, self.walk(c, id, is_dirty)?).bytes()),
                    None => None,
                };
                Ok(BitmapInfo {
                    name: name.to_owned(),
                    granularity: None,
                    enabled: None,
                    in_use: false,
                    dirty_bytes,
                })
            })
            .collect()
    }

    fn dirty_ranges(&self, name: &str) -> Result<ChangeList> {
        let context = format!("{DIRTY_BITMAP_PREFIX}{name}");
        {
            let g = self.conn();
            let c = connected(&g, &self.url)?;
            if let Some(id) = c.negotiated.context(&context) {
                return Ok(ChangeList::new(1, self.walk(c, id, is_dirty)?));
            }
            if !c.negotiated.structured {
                return Err(Error::usage(format!(
                    "NBD export {} has no dirty bitmaps: the server refused structured replies",
                    self.url
                )));
            }
            if let Some(list) = &c.negotiated.bitmaps {
                if !list.iter().any(|b| b == name) {
                    return Err(self.no_bitmap(name, Some(list)));
                }
            }
        }
        // Reconnect with the bitmap's context: waits for reads in flight (write lock), and
        // closes the old connection before opening the new one.
        let mut g = self.conn.write().unwrap_or_else(|e| e.into_inner());
        let reuse = g.as_ref().and_then(|c| c.negotiated.context(&context));
        if reuse.is_none() {
            *g = None;
            let c = connect(&self.url, &self.target, self.timeout, Some(name)).map_err(|e| {
                e.within(format!(
                    "reconnecting to select dirty bitmap {name:?}, which the server did not \
                     list (a server serving one connection, like qemu-nbd without \
                     --persistent, cannot be reconnected to)"
                ))
            })?;
            if c.negotiated.size != self.size {
                return Err(Error::new(
                    ErrorKind::SourceChanged,
                    format!(
                        "NBD export {} changed size from {} to {} bytes while open",
                        self.url, self.size, c.negotiated.size
                    ),
                ));
            }
            *g = Some(c);
        }
        let c = connected(&g, &self.url)?;
        let id = c
            .negotiated
            .context(&context)
            .ok_or_else(|| self.no_bitmap(name, c.negotiated.bitmaps.as_deref()))?;
        Ok(ChangeList::new(1, self.walk(c, id, is_dirty)?))
    }
}

impl ReadAt for NbdSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let g = self.conn();
        connected(&g, &self.url)?.client.read(offset, buf)
    }
}

/// A `qemu:dirty-bitmap:` extent flagged dirty (bit 0).
fn is_dirty(flags: u32) -> bool {
    flags & proto::STATE_DIRTY != 0
}

fn connected<'a>(g: &'a Option<Connection>, url: &str) -> Result<&'a Connection> {
    g.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::Io,
            format!("NBD export {url}: not connected (reconnecting for a dirty bitmap failed)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use crate::error::ErrorKind;
    use crate::source::{open, OpenOptions};

    #[test]
    fn sector_size_is_the_minimum_block_size_only_where_that_is_a_sector_size() {
        let got: Vec<u32> = [1, 512, 1024, 4096, 8192, 65536]
            .into_iter()
            .map(super::sector_size)
            .collect();
        assert_eq!(got, [512, 512, 1024, 4096, 512, 512]);
    }

    #[test]
    fn open_dispatches_nbd_urls_before_any_file_lookup() {
        let opts = OpenOptions::default();
        let e = open("nbds://host/disk", &opts).err().expect("TLS");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = open("nbd+unix:///disk", &opts).err().expect("no socket");
        assert_eq!(e.kind(), ErrorKind::Usage);
        assert!(e.to_string().contains("socket=PATH"), "{e}");
        let e = open("nbd+unix:///disk?socket=/nonexistent/nbd.sock", &opts)
            .err()
            .expect("no server");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(
            e.to_string()
                .contains("cannot connect to /nonexistent/nbd.sock"),
            "{e}"
        );
    }
}
