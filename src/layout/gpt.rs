//! The GUID partition table: primary header at LBA 1, backup header at the last LBA, each
//! with its own copy of the partition entry array.
//!
//! The logical sector size is not recorded anywhere in a GPT; it is found by looking for the
//! "EFI PART" signature at byte 512 (512-byte sectors) and then at byte 4096 (4 KiB sectors),
//! the two sizes disks use. Each copy is checked on its own (signature, header size, header
//! CRC32, its own LBA, entry size and count, usable range, entry array CRC32) and then the
//! backup against the primary. Partitions come from the primary if it is valid, else from the
//! backup; a copy that fails is reported, not fatal.

use super::disk::{array, field, guid, le32, le64, Disk};
use super::model::{CopyState, GptCopy, GptTable, Partition, Problem};
use super::types::gpt_name;
use crate::error::Result;

/// "EFI PART".
pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The logical sector sizes probed, in order.
pub const SECTOR_SIZES: [u32; 2] = [512, 4096];
/// Largest entry array read (the usual one is 128 entries of 128 bytes, 16 KiB).
pub const MAX_ENTRY_BYTES: u64 = 1 << 20;
/// Size of the header fields defined by UEFI 2.x; `header_size` may not be smaller.
const MIN_HEADER: u32 = 92;

/// A header that passed its own checks.
#[derive(Debug, Clone)]
struct Header {
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: String,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// One copy as read from the disk.
enum Copy {
    Missing,
    Damaged(String),
    Valid(Header, Vec<u8>),
}

impl Copy {
    fn state(&self) -> CopyState {
        match self {
            Copy::Missing => CopyState::Missing,
            Copy::Damaged(why) => CopyState::Damaged(why.clone()),
            Copy::Valid(..) => CopyState::Ok,
        }
    }
}

/// Read and check the header that should sit at `lba` and its entry array.
fn read_copy(disk: &Disk, lba: u64, ss: u32) -> Result<Copy> {
    let ss64 = u64::from(ss);
    let Some(at) = lba.checked_mul(ss64) else {
        return Ok(Copy::Missing);
    };
    let Some(h) = disk.bytes(at, ss as usize, "GPT header")? else {
        return Ok(Copy::Missing);
    };
    if field(&h, 0, 8) != SIGNATURE {
        return Ok(Copy::Missing);
    }
    let damaged = |why: String| Ok(Copy::Damaged(why));
    let header_size = le32(&h, 12);
    if !(MIN_HEADER..=ss).contains(&header_size) {
        return damaged(format!(
            "header size {header_size} outside {MIN_HEADER}..={ss}"
        ));
    }
    let stored_crc = le32(&h, 16);
    let mut zeroed = field(&h, 0, header_size as usize).to_vec();
    zeroed[16..20].fill(0);
    let crc = crc32fast::hash(&zeroed);
    if crc != stored_crc {
        return damaged(format!(
            "header CRC32 is 0x{stored_crc:08x}, the header hashes to 0x{crc:08x}"
        ));
    }
    let my_lba = le64(&h, 24);
    if my_lba != lba {
        return damaged(format!(
            "header says it is at LBA {my_lba}, found at LBA {lba}"
        ));
    }
    let total_lbas = disk.size() / ss64;
    let header = Header {
        alternate_lba: le64(&h, 32),
        first_usable: le64(&h, 40),
        last_usable: le64(&h, 48),
        disk_guid: guid(&h, 56),
        num_entries: le32(&h, 80),
        entry_size: le32(&h, 84),
        entries_crc: le32(&h, 88),
    };
    if header.first_usable > header.last_usable || header.last_usable >= total_lbas {
        return damaged(format!(
            "usable LBAs {}..={} do not fit a disk of {total_lbas} LBAs",
            header.first_usable, header.last_usable
        ));
    }
    if header.entry_size < 128 || !header.entry_size.is_power_of_two() {
        return damaged(format!(
            "partition entry size {} is not 128 times a power of two",
            header.entry_size
        ));
    }
    let array_bytes = u64::from(header.num_entries) * u64::from(header.entry_size);
    if array_bytes > MAX_ENTRY_BYTES {
        return damaged(format!(
            "{} entries of {} bytes exceed the {MAX_ENTRY_BYTES}-byte limit",
            header.num_entries, header.entry_size
        ));
    }
    let entries_lba = le64(&h, 72);
    let entries = match entries_lba.checked_mul(ss64) {
        Some(off) => disk.bytes(off, array_bytes as usize, "GPT partition entries")?,
        None => None,
    };
    let Some(entries) = entries else {
        return damaged(format!(
            "partition entry array at LBA {entries_lba} runs past the end of the disk"
        ));
    };
    let crc = crc32fast::hash(&entries);
    if crc != header.entries_crc {
        return damaged(format!(
            "partition entry array CRC32 is 0x{:08x}, the array at LBA {entries_lba} hashes \
             to 0x{crc:08x}",
            header.entries_crc
        ));
    }
    Ok(Copy::Valid(header, entries))
}

/// How the backup differs from the primary, if it does.
fn compare(primary: &Header, backup: &Header) -> Option<String> {
    let fields = [
        ("alternate LBA", 1, backup.alternate_lba),
        (
            "first usable LBA",
            primary.first_usable,
            backup.first_usable,
        ),
        ("last usable LBA", primary.last_usable, backup.last_usable),
        (
            "entry count",
            primary.num_entries.into(),
            backup.num_entries.into(),
        ),
        (
            "entry size",
            primary.entry_size.into(),
            backup.entry_size.into(),
        ),
        (
            "entry array CRC32",
            primary.entries_crc.into(),
            backup.entries_crc.into(),
        ),
    ];
    if primary.disk_guid != backup.disk_guid {
        return Some(format!(
            "disk GUID {} differs from the primary's {}",
            backup.disk_guid, primary.disk_guid
        ));
    }
    fields
        .iter()
        .find(|(_, want, got)| want != got)
        .map(|(name, want, got)| format!("{name} is {got}, the primary says {want}"))
}

/// Look for a GPT; `None` if neither copy has a signature at either sector size.
pub fn probe(disk: &Disk, problems: &mut Vec<Problem>) -> Result<Option<GptTable>> {
    let mut found = None;
    for ss in SECTOR_SIZES {
        let primary = read_copy(disk, 1, ss)?;
        if !matches!(primary, Copy::Missing) {
            found = Some((ss, primary));
            break;
        }
    }
    let (ss, primary) = match found {
        Some(f) => f,
        None => {
            // No primary signature: a backup alone still identifies the table.
            let mut backup_only = None;
            for ss in SECTOR_SIZES {
                if let Some(last) = (disk.size() / u64::from(ss)).checked_sub(1) {
                    if !matches!(read_copy(disk, last, ss)?, Copy::Missing) {
                        backup_only = Some(ss);
                        break;
                    }
                }
            }
            match backup_only {
                Some(ss) => (ss, Copy::Missing),
                None => return Ok(None),
            }
        }
    };
    let ss64 = u64::from(ss);
    let Some(last_lba) = (disk.size() / ss64).checked_sub(1) else {
        return Ok(None);
    };
    let backup = read_copy(disk, last_lba, ss)?;
    let backup_state = match (&primary, &backup) {
        (Copy::Valid(p, _), Copy::Valid(b, _)) => match compare(p, b) {
            Some(why) => CopyState::Mismatch(why),
            None => CopyState::Ok,
        },
        (Copy::Valid(p, _), Copy::Missing) if p.alternate_lba != last_lba => {
            match read_copy(disk, p.alternate_lba, ss)? {
                Copy::Valid(..) => CopyState::Mismatch(format!(
                    "the backup header is at LBA {}, not at the last LBA {last_lba} (was the \
                     disk grown?)",
                    p.alternate_lba
                )),
                _ => CopyState::Missing,
            }
        }
        _ => backup.state(),
    };
    let mut report = |what: &str, lba: u64, state: &CopyState| {
        let message = match state {
            CopyState::Ok => return,
            CopyState::Missing => "missing".to_string(),
            CopyState::Damaged(why) => format!("damaged: {why}"),
            CopyState::Mismatch(why) => format!("disagrees with the primary: {why}"),
        };
        problems.push(Problem {
            structure: format!("GPT {what} header"),
            offset: lba * ss64,
            message,
        });
    };
    let primary_state = primary.state();
    report("primary", 1, &primary_state);
    report("backup", last_lba, &backup_state);
    let (used, header, entries) = match (primary, backup) {
        (Copy::Valid(h, e), _) => (GptCopy::Primary, h, e),
        (_, Copy::Valid(h, e)) => (GptCopy::Backup, h, e),
        _ => return Ok(None),
    };
    let partitions = partitions(&header, &entries, ss64, disk.size(), problems);
    Ok(Some(GptTable {
        sector_size: ss,
        disk_guid: header.disk_guid,
        first_usable_byte: header.first_usable * ss64,
        last_usable_byte: (header.last_usable + 1) * ss64 - 1,
        primary: primary_state,
        backup: backup_state,
        used,
        partitions,
    }))
}

/// The partitions in use in a checked entry array.
fn partitions(
    h: &Header,
    entries: &[u8],
    ss: u64,
    disk_size: u64,
    problems: &mut Vec<Problem>,
) -> Vec<Partition> {
    let mut out = Vec::new();
    for (i, e) in entries.chunks_exact(h.entry_size as usize).enumerate() {
        if array::<16>(e, 0) == [0; 16] {
            continue;
        }
        let index = i as u32 + 1;
        let (first_lba, last_lba) = (le64(e, 32), le64(e, 40));
        let bytes = (first_lba.checked_mul(ss))
            .zip(last_lba.checked_add(1).and_then(|l| l.checked_mul(ss)));
        let mut problem = |message: String| {
            problems.push(Problem {
                structure: "GPT partition entry".into(),
                offset: first_lba.saturating_mul(ss),
                message,
            })
        };
        let Some((first_byte, end)) = bytes.filter(|_| first_lba <= last_lba) else {
            problem(format!(
                "partition {index} spans LBAs {first_lba}..={last_lba}; ignored"
            ));
            continue;
        };
        if first_lba < h.first_usable || last_lba > h.last_usable {
            problem(format!(
                "partition {index} (LBAs {first_lba}..={last_lba}) lies outside the usable LBAs \
                 {}..={}",
                h.first_usable, h.last_usable
            ));
        }
        if end > disk_size {
            problem(format!(
                "partition {index} ends at byte {end}, past the end of the disk"
            ));
        }
        let units: Vec<u16> = field(e, 56, 72)
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let type_code = guid(e, 0);
        out.push(Partition {
            index,
            type_name: gpt_name(&type_code).map(str::to_string),
            type_code,
            guid: Some(guid(e, 16)),
            name: Some(String::from_utf16_lossy(&units)),
            first_byte,
            last_byte: end - 1,
            attributes: le64(e, 48),
            mbr_role: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-copy GPT image (primary only) with `num` entries of `size` bytes.
    fn image(num: u32, size: u32, fix_crc: bool) -> Vec<u8> {
        let mut img = vec![0u8; 64 * 512];
        let h = &mut img[512..1024];
        h[..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&63u64.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&62u64.to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&num.to_le_bytes());
        h[84..88].copy_from_slice(&size.to_le_bytes());
        if fix_crc {
            let crc = crc32fast::hash(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
        }
        img
    }

    fn probe_image(img: &[u8]) -> (Option<GptTable>, Vec<Problem>) {
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let disk = Disk::new(&read, img.len() as u64);
        let mut problems = vec![];
        let t = probe(&disk, &mut problems).unwrap();
        (t, problems)
    }

    #[test]
    fn header_crc_is_checked() {
        let (t, problems) = probe_image(&image(0, 128, false));
        assert!(t.is_none());
        assert!(problems[0].message.contains("header CRC32"), "{problems:?}");
    }

    #[test]
    fn huge_entry_arrays_are_refused_before_reading() {
        let (t, problems) = probe_image(&image(u32::MAX, 128, true));
        assert!(t.is_none());
        assert!(problems[0].message.contains("exceed"), "{problems:?}");
        let (_, problems) = probe_image(&image(4, 100, true));
        assert!(
            problems[0].message.contains("entry size 100"),
            "{problems:?}"
        );
    }

    #[test]
    fn empty_table_without_backup() {
        // Zero entries: the empty array's CRC32 is 0, which the header holds.
        let (t, problems) = probe_image(&image(0, 128, true));
        let t = t.unwrap();
        assert_eq!(t.primary, CopyState::Ok);
        assert_eq!(t.backup, CopyState::Missing);
        assert!(t.partitions.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
