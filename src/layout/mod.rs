//! Disk layout detection: the partition table (MBR, GPT) and the encrypted volumes (LUKS1,
//! LUKS2, BitLocker) of a disk, from its headers alone.
//!
//! `inspect` prints the result; a backup records it in its manifest and stores the
//! volumes' ciphertext ([`Layout::ciphertext_ranges`]) without a compression attempt.
//!
//! ```text
//!  read(offset, buf) ──► Disk (bounds, 64 MiB read budget)
//!        │
//!   sector 0 ── LUKS / BitLocker signature? ─► no table: the whole disk is the volume
//!        │
//!   mbr::parse ── DOS table ──► primary + logical partitions (EBR chain)
//!        │     └─ 0xEE entry / no MBR ─► gpt::probe ("EFI PART" at 512 or 4096)
//!        ▼
//!   each partition start (or byte 0) ─► luks1 | bitlocker | luks2 (primary, else secondary)
//! ```
//!
//! Invariants: the scan never panics and reads only headers, each bounded (entry arrays
//! 1 MiB, LUKS2 headers 4 MiB, EBR chains 128, volumes probed 256, all reads 64 MiB in total);
//! damaged or contradictory structures become [`Problem`]s and the scan carries on, so a
//! disk with a damaged GPT copy or LUKS2 header is still described. An error means the
//! caller's `read` failed, or the disk's structures asked for more reads than the budget.
//! Nothing here decrypts or reads key material.
//!
//! Formats, byte by byte: docs/ARCHITECTURE.md, "Disk layout detection".

mod bitlocker;
mod disk;
mod gpt;
mod luks1;
mod luks2;
mod mbr;
mod model;
mod render;
mod types;

pub use model::*;

use crate::error::{Error, Result};
use disk::{be16, field, Disk};
use mbr::Mbr;
use std::ops::Range;

/// Most partitions probed for encrypted volumes (a GPT may list thousands of entries).
pub const MAX_VOLUME_PROBES: usize = 256;

/// What the caller knows about the disk that its bytes do not say.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Logical sector size of the device (BLKSSZGET), used for MBR LBAs, which an MBR does
    /// not record; 512 when `None`. A GPT's sector size is always found from the disk.
    pub mbr_sector_size: Option<u32>,
}

/// Scan a disk of `size` bytes, reading it through `read(offset, buf)` (which fills `buf`
/// with the bytes at `offset`; the scan never asks for bytes past `size`).
pub fn scan(read: &dyn Fn(u64, &mut [u8]) -> Result<()>, size: u64) -> Result<Layout> {
    scan_with(read, size, &ScanOptions::default())
}

/// [`scan`] with options.
pub fn scan_with(
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    size: u64,
    opts: &ScanOptions,
) -> Result<Layout> {
    let mbr_sector_size = opts.mbr_sector_size.unwrap_or(512);
    if !matches!(mbr_sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(Error::usage(format!(
            "sector size {mbr_sector_size} is not 512, 1024, 2048 or 4096"
        )));
    }
    let disk = Disk::new(read, size);
    let mut problems = Vec::new();
    let table = partition_table(&disk, mbr_sector_size, &mut problems)?;
    let mut candidates: Vec<(Location, Range<u64>)> = match &table {
        PartitionTable::None => vec![(Location::Disk, 0..size)],
        t => t
            .partitions()
            .iter()
            .filter(|p| p.mbr_role != Some(MbrRole::Extended))
            .map(|p| {
                let r = p.range();
                let location = Location::Partition { index: p.index };
                (location, r.start.min(size)..r.end.min(size))
            })
            .filter(|(_, r)| r.start < r.end)
            .collect(),
    };
    if candidates.len() > MAX_VOLUME_PROBES {
        problems.push(Problem {
            structure: "partition table".into(),
            offset: 0,
            message: format!(
                "{} partitions; only the first {MAX_VOLUME_PROBES} are probed for volumes",
                candidates.len()
            ),
        });
        candidates.truncate(MAX_VOLUME_PROBES);
    }
    let mut volumes = Vec::new();
    for (location, range) in candidates {
        if let Some(v) = probe_volume(&disk, location, range, &mut problems)? {
            volumes.push(v);
        }
    }
    Ok(Layout {
        disk_size: size,
        table,
        volumes,
        problems,
    })
}

/// Whether a volume header (rather than a partition table) sits at the start of `sector`:
/// LUKS's magic, or a BitLocker header, whose `55 AA` and boot code could pass for an MBR.
fn starts_a_volume(sector: &[u8]) -> bool {
    field(sector, 0, 6) == luks2::MAGIC_PRIMARY || bitlocker::variant(sector).is_some()
}

fn partition_table(
    disk: &Disk,
    mbr_sector_size: u32,
    problems: &mut Vec<Problem>,
) -> Result<PartitionTable> {
    let Some(sector0) = disk.bytes(0, 512, "sector 0")? else {
        return Ok(PartitionTable::None);
    };
    if starts_a_volume(&sector0) {
        return Ok(PartitionTable::None);
    }
    let protective = match mbr::parse(disk, &sector0, mbr_sector_size, problems)? {
        Mbr::Table(t) => return Ok(PartitionTable::Mbr(t)),
        Mbr::Protective => true,
        Mbr::Absent => false,
    };
    let gpt = gpt::probe(disk, problems)?;
    let message = match (&gpt, protective) {
        (Some(_), true) | (None, false) => None,
        (Some(_), false) => Some("no protective MBR in front of the GPT"),
        (None, true) => Some("protective MBR (type 0xee) but no valid GPT header"),
    };
    if let Some(message) = message {
        problems.push(Problem {
            structure: "MBR".into(),
            offset: 0,
            message: message.into(),
        });
    }
    Ok(gpt.map_or(PartitionTable::None, PartitionTable::Gpt))
}

/// Identify the encrypted volume starting at `volume.start`, if there is one.
fn probe_volume(
    disk: &Disk,
    location: Location,
    volume: Range<u64>,
    problems: &mut Vec<Problem>,
) -> Result<Option<EncryptedVolume>> {
    let head_len = luks1::HEADER_LEN.max(512);
    if volume.end - volume.start < head_len as u64 {
        return Ok(None);
    }
    let Some(head) = disk.bytes(volume.start, head_len, "volume header")? else {
        return Ok(None);
    };
    if field(&head, 0, 6) == luks2::MAGIC_PRIMARY && be16(&head, 6) == 1 {
        return Ok(luks1::parse(&head, location, volume, problems));
    }
    if let Some(variant) = bitlocker::variant(&head) {
        return bitlocker::probe(disk, location, volume, &head, variant, problems).map(Some);
    }
    luks2::probe(disk, location, volume, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_bytes(img: &[u8]) -> Layout {
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        scan(&read, img.len() as u64).unwrap()
    }

    #[test]
    fn protective_mbr_without_a_gpt_is_reported() {
        let mut img = vec![0u8; 1 << 20];
        img[446 + 4] = 0xee;
        img[446 + 8] = 1;
        img[446 + 12..446 + 16].copy_from_slice(&2047u32.to_le_bytes());
        img[510..512].copy_from_slice(&[0x55, 0xaa]);
        let layout = scan_bytes(&img);
        assert_eq!(layout.table, PartitionTable::None);
        assert_eq!(layout.problems.len(), 1, "{:?}", layout.problems);
        assert!(layout.problems[0].message.contains("no valid GPT header"));
    }

    #[test]
    fn ebr_chains_stop_at_max_logical() {
        // Each EBR names a one-sector logical partition and links to the next, forever.
        let mut img = vec![0u8; 1 << 20];
        let put = |img: &mut [u8], sector: usize, i: usize, kind: u8, lba: u32, n: u32| {
            let at = sector * 512 + 446 + 16 * i;
            img[at + 4] = kind;
            img[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
            img[at + 12..at + 16].copy_from_slice(&n.to_le_bytes());
            img[sector * 512 + 510..sector * 512 + 512].copy_from_slice(&[0x55, 0xaa]);
        };
        put(&mut img, 0, 0, 0x83, 1, 1);
        put(&mut img, 0, 1, 0x05, 2, 2000);
        for k in 0..=mbr::MAX_LOGICAL as u32 {
            put(&mut img, 2 + 2 * k as usize, 0, 0x83, 1, 1);
            put(&mut img, 2 + 2 * k as usize, 1, 0x05, 2 * (k + 1), 2);
        }
        let layout = scan_bytes(&img);
        // 1 primary + 1 extended + 128 logical.
        assert_eq!(layout.table.partitions().len(), 130);
        assert!(layout
            .problems
            .iter()
            .any(|p| p.message.contains("more than 128 EBRs")));
    }

    #[test]
    fn at_most_max_volume_probes_partitions_are_probed() {
        // A GPT (primary only) with 300 one-sector partitions.
        let mut img = vec![0u8; 1 << 20];
        img[446 + 4] = 0xee;
        img[446 + 8] = 1;
        img[510..512].copy_from_slice(&[0x55, 0xaa]);
        for i in 0..300u64 {
            let e = 1024 + 128 * i as usize;
            img[e..e + 16].copy_from_slice(&[0x11; 16]);
            img[e + 32..e + 40].copy_from_slice(&(200 + i).to_le_bytes());
            img[e + 40..e + 48].copy_from_slice(&(200 + i).to_le_bytes());
        }
        let entries_crc = crc32fast::hash(&img[1024..1024 + 512 * 128]);
        let h = &mut img[512..1024];
        h[..8].copy_from_slice(b"EFI PART");
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&2047u64.to_le_bytes());
        h[40..48].copy_from_slice(&130u64.to_le_bytes());
        h[48..56].copy_from_slice(&2000u64.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&512u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        let layout = scan_bytes(&img);
        assert_eq!(layout.table.partitions().len(), 300);
        let messages: Vec<&str> = layout.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "missing",
                "300 partitions; only the first 256 are probed for volumes"
            ]
        );
    }
}
