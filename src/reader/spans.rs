//! Neighbouring frames fetched together. A backup writes the frames of consecutive slots one
//! after another into its packs, so a restore that wants a run of slots wants a run of bytes
//! of one pack: one ranged read of that run replaces a request per frame, which on object
//! storage is what a restore waits on (each GET pays a round trip and the store's own
//! per-request work, for a frame of a few hundred KiB).
//!
//! ```text
//!  slots i..j ─► [`batches`]: consecutive slots whose frames lie in one pack, each within
//!                MAX_GAP of the others (workers finish slots out of order, so neighbours
//!                are near, not always adjacent), the run of bytes covering them at most
//!                MAX_SPAN long
//!            ─► Batch::fetch: one ranged read (a failure leaves each frame to its own read,
//!                so errors still name the piece they hit)
//!            ─► each frame copied out of the span and checked exactly as if read alone
//! ```
//! Nothing here is trusted more than a frame read alone: the span only saves requests.

use std::ops::Range;

use crate::vault::manifest::{Manifest, Slot};
use crate::vault::pack::PackId;
use crate::vault::Vault;

use super::slot::slot_frames;

/// Longest run of bytes fetched at once: restore threads each hold one, so memory stays
/// threads x MAX_SPAN (32 MiB with 8 threads).
pub const MAX_SPAN: u64 = 4 << 20;

/// Farthest a frame may lie from the bytes a batch already covers to join it: a backup's
/// workers finish neighbouring slots a few frames apart, and fetching a frame or two no
/// slot of the batch wants (another snapshot's, in a pack an incremental shares) costs less
/// than another request.
pub const MAX_GAP: u64 = 1 << 20;

/// Consecutive slots read together, and the bytes to fetch for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Slot indexes.
    pub slots: Range<usize>,
    /// The pack and byte range holding every frame of those slots; `None` when the slots'
    /// frames are not in one pack (each frame is then read alone).
    pub read: Option<(PackId, Range<u64>)>,
}

/// Bytes of one pack fetched with one ranged read.
pub struct Span {
    pack: PackId,
    offset: u64,
    bytes: Vec<u8>,
}

impl Span {
    /// The `len` bytes at `offset` of `pack`, if this span holds them.
    pub fn frame(&self, pack: &PackId, offset: u64, len: usize) -> Option<&[u8]> {
        if *pack != self.pack || offset < self.offset {
            return None;
        }
        let start = (offset - self.offset) as usize;
        self.bytes.get(start..start.checked_add(len)?)
    }
}

impl Batch {
    /// Fetch the batch's span, or `None` when it has none or the read failed (each frame is
    /// then read alone, and reports its own error).
    pub fn fetch(&self, vault: &Vault) -> Option<Span> {
        let (pack, range) = self.read.as_ref()?;
        let key = pack.object_key();
        match vault
            .store()
            .get_range(&key, range.start, (range.end - range.start) as usize)
        {
            Ok(bytes) => Some(Span {
                pack: *pack,
                offset: range.start,
                bytes,
            }),
            Err(e) => {
                tracing::debug!(pack = %key, range = ?range, error = %e, "span read failed: frames read alone");
                None
            }
        }
    }
}

/// The run being built.
struct Open {
    slots: Range<usize>,
    pack: u32,
    bytes: Range<u64>,
}

/// Split `slots` of `m` into batches, in order: a slot joins the open batch when its frames
/// lie in the batch's pack within [`MAX_GAP`] of the bytes it covers, and the span covering
/// both stays within [`MAX_SPAN`]; zero slots join any batch.
pub fn batches(m: &Manifest, slots: Range<usize>) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut open: Option<Open> = None;
    let close = |o: Open, out: &mut Vec<Batch>| {
        out.push(Batch {
            slots: o.slots,
            read: Some((m.packs[o.pack as usize].0, o.bytes)),
        });
    };
    for i in slots.clone() {
        if matches!(m.slots[i], Slot::Zero) {
            match &mut open {
                Some(o) => o.slots.end = i + 1,
                None => out.push(Batch {
                    slots: i..i + 1,
                    read: None,
                }),
            }
            continue;
        }
        let Some((pack, bytes)) = frames_of(m, i) else {
            // Frames in several packs, or far apart in one: read alone, as its own batch.
            if let Some(o) = open.take() {
                close(o, &mut out);
            }
            out.push(Batch {
                slots: i..i + 1,
                read: None,
            });
            continue;
        };
        if let Some(o) = &mut open {
            let joined = o.bytes.start.min(bytes.start)..o.bytes.end.max(bytes.end);
            let near = bytes.start <= o.bytes.end + MAX_GAP && o.bytes.start <= bytes.end + MAX_GAP;
            if o.pack == pack && near && joined.end - joined.start <= MAX_SPAN {
                o.slots.end = i + 1;
                o.bytes = joined;
                continue;
            }
        }
        if let Some(o) = open.replace(Open {
            slots: i..i + 1,
            pack,
            bytes,
        }) {
            close(o, &mut out);
        }
    }
    if let Some(o) = open {
        close(o, &mut out);
    }
    out
}

/// Slot `i`'s frames when they all lie in one pack within [`MAX_SPAN`]: that pack (its index
/// in `m`) and the bytes covering them.
fn frames_of(m: &Manifest, i: usize) -> Option<(u32, Range<u64>)> {
    let mut frames = slot_frames(m, i).map(|e| &m.extents[e as usize]);
    let first = frames.next()?;
    let start = u64::from(first.offset);
    let mut bytes = start..start + u64::from(first.len);
    for x in frames {
        if x.pack != first.pack {
            return None;
        }
        let start = u64::from(x.offset);
        bytes = bytes.start.min(start)..bytes.end.max(start + u64::from(x.len));
    }
    (bytes.end - bytes.start <= MAX_SPAN).then_some((first.pack, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ExtentId;
    use crate::vault::info::SnapshotInfo;
    use crate::vault::manifest::{ChangeSource, ExtentLoc, Overlay, SnapshotId, Stats, ZERO};

    const MIB: u32 = 1 << 20;

    /// A manifest of `slots` over packs 0 and 1, with `frames`: (pack, offset, len).
    fn manifest(frames: &[(u32, u32, u32)], slots: Vec<Slot>) -> Manifest {
        Manifest {
            id: SnapshotId([1; 16]),
            generation: 0,
            created: 0,
            sequence: 1,
            disk_name: "d".into(),
            source: "s".into(),
            parent: None,
            disk_size: slots.len() as u64 * u64::from(MIB),
            slot_size: MIB,
            change_source: ChangeSource::HashCompare,
            change_detail: String::new(),
            seals_in_generation: 0,
            stats: Stats::default(),
            digest: [0; 32],
            packs: vec![(PackId([1; 32]), 64 << 20), (PackId([2; 32]), 64 << 20)],
            extents: frames
                .iter()
                .enumerate()
                .map(|(i, &(pack, offset, len))| ExtentLoc {
                    id: ExtentId([i as u8; 32]),
                    pack,
                    offset,
                    len,
                    plain_len: MIB,
                })
                .collect(),
            slots,
            layout: String::new(),
            info: SnapshotInfo::default(),
        }
    }

    fn read(pack: u8, bytes: Range<u64>) -> Option<(PackId, Range<u64>)> {
        Some((PackId([pack; 32]), bytes))
    }

    #[test]
    fn neighbours_in_one_pack_share_a_read_and_zero_slots_join_it() {
        let m = manifest(
            &[(0, 40, 1000), (0, 1040, 2000), (0, 3040, 500)],
            vec![
                Slot::Extent(0),
                Slot::Zero,
                Slot::Extent(1),
                Slot::Extent(2),
                Slot::Zero,
            ],
        );
        assert_eq!(
            batches(&m, 0..5),
            vec![Batch {
                slots: 0..5,
                read: read(1, 40..3540)
            }]
        );
        // Frames written out of slot order still share the read.
        let m = manifest(
            &[(0, 1040, 2000), (0, 40, 1000)],
            vec![Slot::Extent(0), Slot::Extent(1)],
        );
        assert_eq!(batches(&m, 0..2)[0].read, read(1, 40..3040));
        // A part of the disk: only its slots.
        assert_eq!(
            batches(&m, 1..2),
            vec![Batch {
                slots: 1..2,
                read: read(1, 40..1040)
            }]
        );
    }

    #[test]
    fn another_pack_a_wide_gap_or_a_long_span_starts_a_new_read() {
        let far = 2040 + MAX_GAP as u32 + 1;
        let m = manifest(
            &[(0, 40, 1000), (1, 1040, 1000), (1, far, 1000)],
            vec![Slot::Extent(0), Slot::Extent(1), Slot::Extent(2)],
        );
        assert_eq!(
            batches(&m, 0..3),
            vec![
                Batch {
                    slots: 0..1,
                    read: read(1, 40..1040)
                },
                Batch {
                    slots: 1..2,
                    read: read(2, 1040..2040)
                },
                Batch {
                    slots: 2..3,
                    read: read(2, far as u64..far as u64 + 1000)
                },
            ]
        );
        let frames: Vec<(u32, u32, u32)> = (0..6).map(|i| (0, 40 + i * MIB, MIB)).collect();
        let m = manifest(&frames, (0..6).map(Slot::Extent).collect());
        let b = batches(&m, 0..6);
        assert_eq!(
            b.iter().map(|b| b.slots.clone()).collect::<Vec<_>>(),
            vec![0..4, 4..6]
        );
        assert!(b.iter().all(|b| b.read.as_ref().unwrap().1.end
            - b.read.as_ref().unwrap().1.start
            <= MAX_SPAN));
    }

    #[test]
    fn a_slot_over_two_packs_is_read_alone() {
        let m = manifest(
            &[(0, 40, 1000), (0, 1040, 1000), (1, 40, 100)],
            vec![
                Slot::Extent(0),
                Slot::overlaid(
                    ExtentId([9; 32]),
                    1,
                    vec![Overlay {
                        offset: 0,
                        len: 4096,
                        extent: 2,
                    }],
                ),
                Slot::overlaid(
                    ExtentId([9; 32]),
                    ZERO,
                    vec![Overlay {
                        offset: 0,
                        len: 4096,
                        extent: 2,
                    }],
                ),
            ],
        );
        assert_eq!(
            batches(&m, 0..3),
            vec![
                Batch {
                    slots: 0..1,
                    read: read(1, 40..1040)
                },
                Batch {
                    slots: 1..2,
                    read: None
                },
                Batch {
                    slots: 2..3,
                    read: read(2, 40..140)
                },
            ]
        );
    }

    #[test]
    fn a_span_gives_only_the_bytes_it_holds() {
        let s = Span {
            pack: PackId([1; 32]),
            offset: 100,
            bytes: (0..50).collect(),
        };
        assert_eq!(
            s.frame(&PackId([1; 32]), 110, 5),
            Some(&[10, 11, 12, 13, 14][..])
        );
        assert_eq!(
            s.frame(&PackId([1; 32]), 140, 10).map(<[u8]>::len),
            Some(10)
        );
        assert_eq!(s.frame(&PackId([1; 32]), 140, 11), None);
        assert_eq!(s.frame(&PackId([1; 32]), 99, 2), None);
        assert_eq!(s.frame(&PackId([2; 32]), 110, 5), None);
    }
}
