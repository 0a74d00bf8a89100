//! The DOS/MBR partition table and its chain of extended boot records (EBRs).
//!
//! Sector 0 holds four 16-byte entries at byte 446 and `55 AA` at 510. An extended entry
//! (type 0x05, 0x0f or 0x85) is a container: its first sector is an EBR whose entry 0 is a
//! logical partition (LBA relative to that EBR) and whose entry 1 links to the next EBR (LBA
//! relative to the extended partition's start). The chain is followed at most
//! [`MAX_LOGICAL`] steps and never revisits an EBR, so a looping chain ends with a problem.

use super::disk::{le16, le32, Disk};
use super::model::{MbrRole, MbrTable, Partition, Problem};
use super::types::{is_mbr_extended, mbr_name, MBR_PROTECTIVE};
use crate::error::Result;

/// Most EBRs followed (Linux itself stops far earlier in practice).
pub const MAX_LOGICAL: usize = 128;

/// What sector 0 turned out to be.
#[derive(Debug)]
pub enum Mbr {
    /// Not a partition table (no `55 AA`, invalid status bytes, or a volume boot sector).
    Absent,
    /// A protective (or hybrid) MBR: an 0xEE entry says the disk is GPT.
    Protective,
    /// A DOS partition table.
    Table(MbrTable),
}

/// One 16-byte partition entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    status: u8,
    kind: u8,
    lba: u32,
    sectors: u32,
}

fn entries(sector: &[u8]) -> [Entry; 4] {
    std::array::from_fn(|i| {
        let at = 446 + 16 * i;
        Entry {
            status: sector.get(at).copied().unwrap_or(0),
            kind: sector.get(at + 4).copied().unwrap_or(0),
            lba: le32(sector, at + 8),
            sectors: le32(sector, at + 12),
        }
    })
}

fn has_boot_signature(sector: &[u8]) -> bool {
    le16(sector, 510) == 0xaa55
}

/// A FAT or NTFS boot sector: jump instruction plus a plausible BIOS parameter block. Such a
/// sector also ends in `55 AA`, and its boot code where an MBR has entries can pass the
/// status-byte test, so an MBR without entries that looks like this is taken for a volume.
fn looks_like_boot_sector(s: &[u8]) -> bool {
    let jump =
        matches!((s.first(), s.get(2)), (Some(0xeb), Some(0x90))) || s.first() == Some(&0xe9);
    let bytes_per_sector = le16(s, 11);
    let per_cluster = s.get(13).copied().unwrap_or(0);
    jump && matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) && per_cluster.is_power_of_two()
}

/// Parse sector 0 (`sector0`, 512 bytes) with LBAs in units of `sector_size`, following the
/// EBR chain of an extended partition.
pub fn parse(
    disk: &Disk,
    sector0: &[u8],
    sector_size: u32,
    problems: &mut Vec<Problem>,
) -> Result<Mbr> {
    if !has_boot_signature(sector0) {
        return Ok(Mbr::Absent);
    }
    let table = entries(sector0);
    if table.iter().any(|e| e.status != 0 && e.status != 0x80) {
        return Ok(Mbr::Absent);
    }
    if table.iter().any(|e| e.kind == MBR_PROTECTIVE) {
        return Ok(Mbr::Protective);
    }
    if table.iter().all(|e| e.kind == 0) && looks_like_boot_sector(sector0) {
        return Ok(Mbr::Absent);
    }
    let ss = u64::from(sector_size);
    let mut partitions = Vec::new();
    for (i, e) in table.iter().enumerate() {
        if e.kind == 0 {
            continue;
        }
        let index = i as u32 + 1;
        if e.lba == 0 || e.sectors == 0 {
            problems.push(Problem {
                structure: "MBR partition entry".into(),
                offset: 446 + 16 * i as u64,
                message: format!(
                    "entry {index} of type 0x{:02x} starts at LBA {} with {} sectors; ignored",
                    e.kind, e.lba, e.sectors
                ),
            });
            continue;
        }
        let extended = is_mbr_extended(e.kind);
        let role = if extended {
            MbrRole::Extended
        } else {
            MbrRole::Primary
        };
        partitions.push(partition(index, e, u64::from(e.lba), ss, role));
        if extended {
            logical(disk, e, ss, &mut partitions, problems)?;
        }
    }
    for p in partitions.iter().filter(|p| p.last_byte >= disk.size()) {
        problems.push(Problem {
            structure: "MBR partition".into(),
            offset: p.first_byte,
            message: format!(
                "partition {} ends at byte {}, past the end of the disk ({} bytes)",
                p.index,
                p.last_byte,
                disk.size()
            ),
        });
    }
    Ok(Mbr::Table(MbrTable {
        sector_size,
        disk_signature: format!("0x{:08x}", le32(sector0, 440)),
        partitions,
    }))
}

/// The partition of entry `e` starting at absolute LBA `start`.
fn partition(index: u32, e: &Entry, start: u64, ss: u64, role: MbrRole) -> Partition {
    Partition {
        index,
        type_code: format!("0x{:02x}", e.kind),
        type_name: mbr_name(e.kind).map(str::to_string),
        guid: None,
        name: None,
        first_byte: start * ss,
        last_byte: (start + u64::from(e.sectors)) * ss - 1,
        attributes: u64::from(e.status),
        mbr_role: Some(role),
    }
}

/// Follow the EBR chain of extended entry `ext`, appending logical partitions 5, 6, ...
fn logical(
    disk: &Disk,
    ext: &Entry,
    ss: u64,
    out: &mut Vec<Partition>,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let ext_start = u64::from(ext.lba);
    let ext_end = ext_start + u64::from(ext.sectors);
    let mut ebr = ext_start;
    let mut seen = Vec::new();
    let mut index = 5;
    let mut problem = |offset: u64, message: String| {
        problems.push(Problem {
            structure: "EBR".into(),
            offset,
            message,
        })
    };
    for _ in 0..MAX_LOGICAL {
        let at = ebr * ss;
        if seen.contains(&ebr) {
            problem(
                at,
                "the EBR chain loops back to this EBR; chain ends".into(),
            );
            return Ok(());
        }
        seen.push(ebr);
        if ebr >= ext_end {
            problem(
                at,
                format!("EBR at LBA {ebr} lies outside the extended partition"),
            );
            return Ok(());
        }
        let Some(sector) = disk.bytes(at, 512, "EBR")? else {
            problem(at, "EBR lies past the end of the disk".into());
            return Ok(());
        };
        if !has_boot_signature(&sector) {
            problem(at, "no 55 AA signature; EBR chain ends here".into());
            return Ok(());
        }
        let [part, link, ..] = entries(&sector);
        if part.kind != 0 && part.sectors != 0 && part.lba != 0 {
            let start = ebr + u64::from(part.lba);
            if start + u64::from(part.sectors) > ext_end {
                problem(
                    at,
                    format!("logical partition {index} ends past its extended partition"),
                );
            }
            out.push(partition(index, &part, start, ss, MbrRole::Logical));
            index += 1;
        } else if part.kind != 0 {
            problem(
                at,
                format!(
                    "logical entry of type 0x{:02x} at relative LBA {} with {} sectors; ignored",
                    part.kind, part.lba, part.sectors
                ),
            );
        }
        if link.kind == 0 {
            return Ok(());
        }
        if !is_mbr_extended(link.kind) {
            problem(
                at,
                format!(
                    "link entry has type 0x{:02x}, not extended; chain ends",
                    link.kind
                ),
            );
            return Ok(());
        }
        ebr = ext_start + u64::from(link.lba);
    }
    problem(
        ext_start * ss,
        format!("more than {MAX_LOGICAL} EBRs; the rest are not read"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_entry(s: &mut [u8], i: usize, status: u8, kind: u8, lba: u32, sectors: u32) {
        let at = 446 + 16 * i;
        s[at] = status;
        s[at + 4] = kind;
        s[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
        s[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
        s[510] = 0x55;
        s[511] = 0xaa;
    }

    fn scan_image(img: &[u8]) -> (Mbr, Vec<Problem>) {
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let disk = Disk::new(&read, img.len() as u64);
        let mut problems = vec![];
        let mbr = parse(&disk, &img[..512], 512, &mut problems).unwrap();
        (mbr, problems)
    }

    #[test]
    fn looping_ebr_chain_ends_with_a_problem() {
        let mut img = vec![0u8; 64 * 512];
        put_entry(&mut img, 0, 0, 0x05, 8, 40);
        // EBR at LBA 8: logical at +2 (4 sectors), link back to itself (relative LBA 0).
        let ebr = &mut img[8 * 512..9 * 512];
        put_entry(ebr, 0, 0, 0x83, 2, 4);
        put_entry(ebr, 1, 0, 0x05, 0, 8);
        let (mbr, problems) = scan_image(&img);
        let Mbr::Table(t) = mbr else {
            panic!("{mbr:?}")
        };
        assert_eq!(t.partitions.len(), 2, "{:?}", t.partitions);
        assert_eq!(t.partitions[1].index, 5);
        assert_eq!(t.partitions[1].first_byte, 10 * 512);
        assert!(problems[0].message.contains("loops"), "{problems:?}");
    }

    #[test]
    fn bad_status_bytes_and_boot_sectors_are_not_tables() {
        let mut img = vec![0u8; 4096];
        put_entry(&mut img, 0, 0x12, 0x83, 1, 2);
        assert!(matches!(scan_image(&img).0, Mbr::Absent));

        let mut vbr = vec![0u8; 4096];
        vbr[..3].copy_from_slice(&[0xeb, 0x52, 0x90]);
        vbr[11..13].copy_from_slice(&512u16.to_le_bytes());
        vbr[13] = 8;
        vbr[510] = 0x55;
        vbr[511] = 0xaa;
        assert!(matches!(scan_image(&vbr).0, Mbr::Absent));
    }

    #[test]
    fn entries_past_the_disk_and_empty_entries_are_reported() {
        let mut img = vec![0u8; 4096];
        put_entry(&mut img, 0, 0x80, 0x83, 2, u32::MAX);
        put_entry(&mut img, 1, 0, 0x07, 0, 5);
        let (mbr, problems) = scan_image(&img);
        let Mbr::Table(t) = mbr else {
            panic!("{mbr:?}")
        };
        assert_eq!(t.partitions.len(), 1);
        assert_eq!(
            t.partitions[0].last_byte,
            (2 + u64::from(u32::MAX)) * 512 - 1
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn ebr_past_the_disk_end() {
        let mut img = vec![0u8; 4096];
        put_entry(&mut img, 0, 0, 0x0f, 100, 50);
        let (mbr, problems) = scan_image(&img);
        let Mbr::Table(t) = mbr else {
            panic!("{mbr:?}")
        };
        assert_eq!(t.partitions.len(), 1);
        assert!(
            problems.iter().any(|p| p.message.contains("past the end")),
            "{problems:?}"
        );
    }
}
