//! Reading the virtual disk: each cluster of a request is looked up in its L2 table and read
//! from where it lives — data clusters from the image file, compressed clusters inflated,
//! zero clusters as zeros, unallocated clusters from the backing file (or zeros).

use super::compress::inflate;
use super::image::Image;
use super::integrity;
use super::tables::{for_each_run, Cluster, Unit};
use crate::error::{Error, Result};
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// Data units contiguous both in the request and in the image file, read with one pread
/// (an image written sequentially keeps whole requests contiguous, which matters most for
/// small clusters: 256 of 4 KiB per 1 MiB read).
struct DataRun {
    /// Where the run starts in the request buffer.
    at: usize,
    len: usize,
    /// Disk offset, for messages.
    pos: u64,
    /// File offset.
    host: u64,
}

impl Image {
    /// Fill `buf` with the disk's bytes at `offset`; bytes past the virtual size read as
    /// zeros (a backing file shorter than the image above it).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.header.size;
        let cluster_size = self.header.geo.cluster_size();
        let mut pending = None;
        let mut done = 0;
        while done < buf.len() {
            let pos = offset.saturating_add(done as u64);
            if pos >= size {
                buf[done..].fill(0);
                break;
            }
            let in_cluster = pos % cluster_size;
            let n = (cluster_size - in_cluster)
                .min(size - pos)
                .min((buf.len() - done) as u64) as usize;
            self.read_in_cluster(pos, buf, done..done + n, &mut pending)?;
            done += n;
        }
        match pending {
            Some(run) => self.read_data(run, buf),
            None => Ok(()),
        }
    }

    /// Fill `buf[span]`, which lies within the cluster holding guest offset `pos`; data
    /// units join `pending` when they continue it, and are read when they do not.
    fn read_in_cluster(
        &self,
        pos: u64,
        buf: &mut [u8],
        span: Range<usize>,
        pending: &mut Option<DataRun>,
    ) -> Result<()> {
        let geo = &self.header.geo;
        let Some(table) = self.l2_table_for(pos)? else {
            return self.read_below(pos, &mut buf[span]);
        };
        let index = ((pos >> geo.cluster_bits) & ((1 << geo.l2_bits()) - 1)) as usize;
        let in_cluster = pos % geo.cluster_size();
        let cluster_start = pos - in_cluster;
        match table.cluster(geo, index, &self.path)? {
            Cluster::Compressed { host, len } => {
                self.read_compressed(pos, host, len, &mut buf[span])
            }
            Cluster::Standard { host, alloc, zero } => {
                let end = in_cluster + span.len() as u64;
                for_each_run(geo, alloc, zero, in_cluster, end, |run, unit| {
                    let at = span.start + (run.start - in_cluster) as usize;
                    let len = (run.end - run.start) as usize;
                    let pos = cluster_start + run.start;
                    match unit {
                        Unit::Data => {
                            let host = host + run.start;
                            match pending {
                                Some(p) if p.at + p.len == at && p.host + p.len as u64 == host => {
                                    p.len += len;
                                    Ok(())
                                }
                                _ => match pending.replace(DataRun { at, len, pos, host }) {
                                    Some(previous) => self.read_data(previous, buf),
                                    None => Ok(()),
                                },
                            }
                        }
                        Unit::Zero => {
                            buf[at..at + len].fill(0);
                            Ok(())
                        }
                        Unit::Unallocated => self.read_below(pos, &mut buf[at..at + len]),
                    }
                })
            }
        }
    }

    /// Read unallocated guest bytes at `pos` from the backing file, or zeros.
    fn read_below(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            Some(backing) => backing.read(pos, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Read a run of data units into `buf`. Bytes past the end of the file read as zeros, as
    /// QEMU reads them (each cluster starts inside the file: checked when its L2 entry was
    /// decoded).
    fn read_data(&self, run: DataRun, buf: &mut [u8]) -> Result<()> {
        let part = &mut buf[run.at..run.at + run.len];
        let mut done = 0;
        while done < part.len() {
            match self.file.read_at(&mut part[done..], run.host + done as u64) {
                Ok(0) => {
                    part[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "cannot read qcow2 image {} at file offset {} (disk offset {})",
                            self.path,
                            run.host + done as u64,
                            run.pos + done as u64
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Inflate the compressed cluster holding guest offset `pos` (`len` bytes at `host`)
    /// and copy the part `chunk` covers; a whole-cluster chunk is inflated in place.
    fn read_compressed(&self, pos: u64, host: u64, len: u64, chunk: &mut [u8]) -> Result<()> {
        let geo = &self.header.geo;
        // The last sector of the last compressed cluster may run past the end of the file.
        let mut input = vec![0; len.min(geo.file_size - host) as usize];
        self.read_meta(host, &mut input, "compressed cluster")?;
        let failed = |problem: String| {
            integrity(
                &self.path,
                format_args!(
                    "compressed cluster at disk offset {} (file offset {host}): {problem}",
                    pos - pos % geo.cluster_size()
                ),
            )
        };
        if chunk.len() as u64 == geo.cluster_size() {
            return inflate(self.header.compression, &input, chunk).map_err(failed);
        }
        let mut cluster = vec![0; geo.cluster_size() as usize];
        inflate(self.header.compression, &input, &mut cluster).map_err(failed)?;
        let from = (pos % geo.cluster_size()) as usize;
        chunk.copy_from_slice(&cluster[from..from + chunk.len()]);
        Ok(())
    }
}
