//! NBD exports written to: where a restore goes when its target is an `nbd://` or
//! `nbd+unix://` URL, so it lands in whatever a server serves (a qcow2 or vmdk behind
//! qemu-nbd, a LUN, a running VM's disk exported writable).
//!
//! The same connection, handshake and pipelined client as a source ([`super::connect`]);
//! what differs is the commands: `NBD_CMD_WRITE` for data, `NBD_CMD_WRITE_ZEROES` for zeros
//! when the server advertises it (else zeros are written as data), `NBD_CMD_FLUSH` at the end
//! when it advertises that. A read-only export is refused at open, before anything is sent.

use super::proto::{FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_WRITE_ZEROES};
use super::{connect, url, Connection, NbdOptions};
use crate::error::{Error, Result};

/// Zeros sent as data to a server without `NBD_CMD_WRITE_ZEROES`, this many at a time.
const ZERO_CHUNK: usize = 1 << 20;

/// An NBD export opened for writing.
pub struct NbdWriter {
    url: String,
    conn: Connection,
    /// Transmission flags (0 when the server set no `NBD_FLAG_HAS_FLAGS`).
    flags: u16,
}

impl NbdWriter {
    /// Connect to `url` and negotiate, as [`super::NbdSource::open`] does. A read-only
    /// export is a Usage error naming the URL.
    pub fn open(url_text: &str, opts: &NbdOptions) -> Result<NbdWriter> {
        let target = url::parse(url_text)?;
        let conn = connect(url_text, &target, opts.timeout, None)?;
        let flags = match conn.negotiated.flags {
            f if f & FLAG_HAS_FLAGS != 0 => f,
            _ => 0,
        };
        if flags & FLAG_READ_ONLY != 0 {
            return Err(Error::usage(format!(
                "NBD export {url_text} is read-only (served with qemu-nbd -r or nbdkit -r?); \
                 a restore needs a writable export"
            )));
        }
        Ok(NbdWriter {
            url: url_text.to_owned(),
            conn,
            flags,
        })
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.conn.negotiated.size
    }

    /// The server's minimum block size: write offsets and lengths are multiples of it.
    pub fn min_block(&self) -> u64 {
        u64::from(self.conn.negotiated.limits.min.max(1))
    }

    /// Fill `buf` from `offset` (to see what the export holds before writing over it).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.conn.client.read(offset, buf)
    }

    /// Write `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.conn.client.write(offset, data)
    }

    /// Make `len` bytes at `offset` read as zeros: `NBD_CMD_WRITE_ZEROES` where the server
    /// offers it (it may then punch holes), else zeros written as data.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.flags & FLAG_SEND_WRITE_ZEROES != 0 {
            return self.conn.client.write_zeroes(offset, len);
        }
        static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(ZERO_CHUNK as u64);
            self.conn.client.write(pos, &ZEROS[..n as usize])?;
            pos += n;
        }
        Ok(())
    }

    /// Ask the server to make every acknowledged write durable (`NBD_CMD_FLUSH`); nothing
    /// when it does not offer flushes (it then writes through, or cannot say).
    pub fn flush(&self) -> Result<()> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            tracing::debug!(url = %self.url, "server offers no NBD_CMD_FLUSH");
            return Ok(());
        }
        self.conn.client.flush()
    }
}
