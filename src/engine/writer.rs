//! The single writer of a backup: takes worker outcomes in any order, appends new frames to
//! the current pack, hands full packs to its uploader threads, and builds the new snapshot's
//! slot, extent and pack tables. Only the writer touches these tables, so they need no lock.
//!
//! ```text
//! writer: fill pack ─► seal ─► rendezvous ─┬─► uploader 1: put pack, then its segment
//!                                          ├─► uploader 2: …
//!                                          └─► uploader N (N = Store::puts_in_flight)
//!         ◄── the N + 1 pack buffers, reused ──────────────┘
//! ```
//! Memory: N packs uploading plus the one filling (the channel holds none: a sealed pack
//! waits in the writer until an uploader is free), in N + 1 buffers made once. Each uploader
//! writes its pack's checkpoint segment after the pack, so with several in flight a segment
//! still names only durable packs, whatever order they finish in ([`super::uncommitted`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::known::Known;
use super::overlay::{Overlaid, Piece};
use super::uncommitted::{put_logged, UncommittedPacks};
use crate::crypto::{ExtentId, GenerationKeys};
use crate::error::{Error, ErrorKind, Result};
use crate::vault::checkpoint::{self, Checkpoint};
use crate::vault::frame::Binding;
use crate::vault::manifest::{ExtentLoc, Overlay, Slot, ZERO};
use crate::vault::pack::{PackId, PackWriter, TARGET_SIZE};

/// A sealed pack on its way to the store, with the checkpoint segment that records it once
/// it is durable: (pack id, pack bytes, segment key, segment bytes).
type Upload = (PackId, Vec<u8>, String, Vec<u8>);

/// Tables of the snapshot being written.
pub struct Tables {
    /// One entry per slot.
    pub slots: Vec<Slot>,
    /// Referenced extents.
    pub extents: Vec<ExtentLoc>,
    /// Referenced packs.
    pub packs: Vec<(PackId, u64)>,
}

/// Builds [`Tables`] and the packs behind them.
pub struct Writer<'a> {
    binding: Binding,
    keys: Arc<GenerationKeys>,
    generation: u32,
    known: &'a Known,
    /// The run's state, copied into each pack's checkpoint segment.
    run: Checkpoint,
    /// The extents of the pack being filled, for its checkpoint segment.
    pack_extents: Vec<ExtentLoc>,
    tables: Tables,
    extent_index: HashMap<ExtentId, u32>,
    pack_index: HashMap<PackId, u32>,
    current: Option<(PackWriter, u32)>,
    uploaders: Uploaders,
    /// Bytes of frames new to the snapshot (not in the parent): uploaded or resumed.
    pub bytes_stored: u64,
    /// Bytes of frames this run sealed and uploaded itself.
    pub bytes_uploaded: u64,
}

impl<'a> Writer<'a> {
    /// A writer for a disk of `slot_count` slots, referencing what `known` holds; the packs
    /// it stores go to the store of `packs`, recorded there as the run's uncommitted ones,
    /// each followed by its checkpoint segment (`run`: the run's state, sealed with `keys`).
    pub fn new(
        packs: &UncommittedPacks,
        binding: Binding,
        keys: Arc<GenerationKeys>,
        slot_count: usize,
        known: &'a Known,
        run: Checkpoint,
    ) -> Result<Self> {
        let uploaders = Uploaders::start(packs)?;
        Ok(Writer {
            binding,
            keys,
            generation: run.generation,
            known,
            run,
            pack_extents: Vec::new(),
            tables: Tables {
                slots: vec![Slot::Zero; slot_count],
                extents: Vec::new(),
                packs: Vec::new(),
            },
            extent_index: HashMap::new(),
            pack_index: HashMap::new(),
            current: None,
            uploaders,
            bytes_stored: 0,
            bytes_uploaded: 0,
        })
    }

    /// Slot `slot` is all zeros.
    pub fn zero(&mut self, slot: u64) {
        self.tables.slots[slot as usize] = Slot::Zero;
    }

    /// Slot `slot` holds content the parent already stores.
    pub fn known(&mut self, slot: u64, id: &ExtentId) -> Result<()> {
        let e = self.extent_for(id).ok_or_else(|| {
            Error::new(
                ErrorKind::Io,
                format!("extent {id} reported known but absent from the parent"),
            )
        })?;
        self.tables.slots[slot as usize] = Slot::Extent(e);
        Ok(())
    }

    /// Slot `slot` is the parent's pieces plus new overlays. `give` takes each new frame's
    /// buffer back once it is in the pack.
    pub fn overlaid(&mut self, slot: u64, o: Overlaid, give: &dyn Fn(Vec<u8>)) -> Result<()> {
        let index = |w: &mut Self, id: Option<ExtentId>| -> Result<u32> {
            let Some(id) = id else { return Ok(ZERO) };
            w.extent_for(&id).ok_or_else(|| {
                Error::new(
                    ErrorKind::Io,
                    format!("parent extent {id} missing from the parent's table"),
                )
            })
        };
        let base = index(self, o.base)?;
        let mut overlays = Vec::with_capacity(o.parent_overlays.len() + o.new.len());
        for (offset, len, id) in o.parent_overlays {
            overlays.push(Overlay {
                offset,
                len,
                extent: index(self, id)?,
            });
        }
        for n in o.new {
            let extent = match n.piece {
                Piece::Zero => ZERO,
                Piece::Known(id) => index(self, Some(id))?,
                Piece::New { id, frame } => {
                    let e = self.add_frame(id, n.len, &frame);
                    give(frame);
                    e?
                }
            };
            overlays.push(Overlay {
                offset: n.offset,
                len: n.len,
                extent,
            });
        }
        self.tables.slots[slot as usize] = Slot::overlaid(o.content, base, overlays);
        Ok(())
    }

    /// Index of an extent in the new tables, carrying it over from the parent or from a
    /// resumed run's pack if needed.
    pub fn extent_for(&mut self, id: &ExtentId) -> Option<u32> {
        if let Some(&e) = self.extent_index.get(id) {
            return Some(e);
        }
        let loc = *self.known.extents.get(id)?;
        let (pack_id, size) = self.known.packs[loc.pack as usize];
        if self.known.is_resumed(loc.pack) {
            // New to the snapshot, though not uploaded by this run.
            self.bytes_stored += loc.len as u64;
        }
        let pack = *self.pack_index.entry(pack_id).or_insert_with(|| {
            self.tables.packs.push((pack_id, size));
            (self.tables.packs.len() - 1) as u32
        });
        Some(self.push_extent(ExtentLoc { pack, ..loc }))
    }

    fn push_extent(&mut self, loc: ExtentLoc) -> u32 {
        let e = self.tables.extents.len() as u32;
        self.tables.extents.push(loc);
        self.extent_index.insert(loc.id, e);
        e
    }

    /// Slot `slot` holds new content sealed in `frame`. A duplicate of content already in
    /// this job (two workers raced on equal slots) is dropped and referenced instead.
    pub fn new_extent(
        &mut self,
        slot: u64,
        id: ExtentId,
        plain_len: u32,
        frame: &[u8],
    ) -> Result<()> {
        let e = self.add_frame(id, plain_len, frame)?;
        self.tables.slots[slot as usize] = Slot::Extent(e);
        Ok(())
    }

    /// Append a frame (unless its content is already referenced) and return its extent index.
    pub fn add_frame(&mut self, id: ExtentId, plain_len: u32, frame: &[u8]) -> Result<u32> {
        if let Some(e) = self.extent_for(&id) {
            return Ok(e);
        }
        if self.current.is_none() {
            // Reserve the pack's table entry now; its id is known only when it is finished.
            self.tables.packs.push((PackId([0; 32]), 0));
            let idx = (self.tables.packs.len() - 1) as u32;
            let buf = self.uploaders.spare.try_recv().unwrap_or_default();
            self.current = Some((
                PackWriter::new(&self.binding.disk_id, self.generation, buf),
                idx,
            ));
        }
        let (pack, idx) = self.current.as_mut().expect("set above");
        let offset = pack.add(id, frame);
        let loc = ExtentLoc {
            id,
            pack: *idx,
            offset,
            len: frame.len() as u32,
            plain_len,
        };
        self.pack_extents.push(ExtentLoc { pack: 0, ..loc });
        self.bytes_stored += frame.len() as u64;
        self.bytes_uploaded += frame.len() as u64;
        let full = pack.len() >= TARGET_SIZE;
        let e = self.push_extent(loc);
        if full {
            self.flush()?;
        }
        Ok(e)
    }

    /// Seal and hand the current pack to the uploader.
    fn flush(&mut self) -> Result<()> {
        let Some((pack, idx)) = self.current.take() else {
            return Ok(());
        };
        let (id, bytes) = pack.finish(&self.binding, &self.keys)?;
        self.tables.packs[idx as usize] = (id, bytes.len() as u64);
        self.pack_index.insert(id, idx);
        let segment = Checkpoint {
            pack: id,
            pack_size: bytes.len() as u64,
            extents: std::mem::take(&mut self.pack_extents),
            ..self.run.clone()
        }
        .seal(&self.binding, &self.keys)?;
        let segment_key = checkpoint::object_key(&self.binding.disk_id, &id);
        tracing::debug!(pack = %id, bytes = bytes.len(), "writer: pack sealed, handed to an uploader");
        self.uploaders.send((id, bytes, segment_key, segment))
    }

    /// Write the last pack and wait until every pack is durable; returns the tables.
    pub fn finish(mut self) -> Result<Tables> {
        self.flush()?;
        self.uploaders.join()?;
        tracing::debug!(
            packs = self.tables.packs.len(),
            extents = self.tables.extents.len(),
            bytes_stored = self.bytes_stored,
            "writer: every pack durable"
        );
        Ok(std::mem::replace(
            &mut self.tables,
            Tables {
                slots: Vec::new(),
                extents: Vec::new(),
                packs: Vec::new(),
            },
        ))
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        // On an error path, let the uploaders finish what they have so no thread outlives
        // the job.
        let _ = self.uploaders.join();
    }
}

/// The uploader threads and the channels to and from them.
struct Uploaders {
    /// Sealed packs to store; `None` once closed.
    packs: Option<Sender<Upload>>,
    /// Buffers of stored packs, back for reuse.
    spare: Receiver<Vec<u8>>,
    threads: Vec<JoinHandle<Result<()>>>,
    /// Set by an uploader that failed: the others take no new pack, and the writer stops
    /// handing them out and reports that uploader's error.
    failed: Arc<AtomicBool>,
}

impl Uploaders {
    /// As many uploaders as the store of `packs` keeps writes in flight
    /// ([`Store::puts_in_flight`](crate::vault::store::Store::puts_in_flight)).
    fn start(packs: &UncommittedPacks) -> Result<Self> {
        let (store, log) = (packs.store(), packs.log());
        let n = store.puts_in_flight().max(1);
        // A rendezvous: a sealed pack waits in the writer (which then fills nothing) until an
        // uploader takes it, so at most n + 1 packs are in memory.
        let (tx, rx) = bounded::<Upload>(0);
        // The n + 1 pack buffers, made up front and passed around: the writer takes one for
        // each pack and an uploader gives it back once stored, so a buffer an upload frees
        // while the writer fills never adds to them (one per pack was 32 MiB of page faults;
        // spares kept beside the n + 1 grew RSS by a pack each).
        let (spare_tx, spare) = bounded::<Vec<u8>>(n + 1);
        for _ in 0..=n {
            let _ = spare_tx.try_send(Vec::new());
        }
        let failed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (store, log, rx, spare_tx, failed) = (
                store.clone(),
                log.clone(),
                rx.clone(),
                spare_tx.clone(),
                failed.clone(),
            );
            let upload = move || -> Result<()> {
                for (id, bytes, segment_key, segment) in rx {
                    if failed.load(Ordering::Acquire) {
                        // Another uploader failed: its error is the one reported.
                        return Ok(());
                    }
                    // A stop asked for by a signal: no new pack (those being written finish,
                    // with their checkpoint segments).
                    let stored = crate::interrupt::check().and_then(|()| {
                        put_logged(&*store, &log, id, bytes, (&segment_key, &segment))
                    });
                    match stored {
                        Ok(bytes) => {
                            tracing::debug!(pack = %id, bytes = bytes.len(), "uploader: pack stored");
                            let _ = spare_tx.try_send(bytes);
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Release);
                            return Err(e);
                        }
                    }
                }
                Ok(())
            };
            let thread = std::thread::Builder::new()
                .name(format!("bv-upload-{i}"))
                .spawn(upload)
                .map_err(|e| Error::io("starting the pack uploader threads", e))?;
            threads.push(thread);
        }
        tracing::debug!(uploaders = n, "writer: pack uploaders started");
        Ok(Uploaders {
            packs: Some(tx),
            spare,
            threads,
            failed,
        })
    }

    /// Hand a sealed pack to the first free uploader, waiting for one.
    fn send(&mut self, upload: Upload) -> Result<()> {
        let sent = match &self.packs {
            Some(tx) if !self.failed.load(Ordering::Acquire) => tx.send(upload).is_ok(),
            _ => false,
        };
        if sent {
            return Ok(());
        }
        // An uploader stopped: its error is the one to report.
        Err(self
            .join()
            .err()
            .unwrap_or_else(|| Error::new(ErrorKind::Io, "pack uploaders stopped")))
    }

    /// Close the channel and wait for every uploader: the first error, if any.
    fn join(&mut self) -> Result<()> {
        self.packs.take();
        let mut first = Ok(());
        for h in self.threads.drain(..) {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "pack uploader panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
