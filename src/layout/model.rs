//! What a scan finds: the partition table, the encrypted volumes and the problems met, as
//! plain data that serialises to the `inspect --json` document and into a backup manifest.
//!
//! Byte offsets are absolute (from the start of the disk) everywhere, whatever unit the
//! on-disk structure used (LBAs, clusters, offsets relative to a volume), so a reader of the
//! JSON needs no sector size to use them. Ranges are half-open `[start, end)` except the
//! partitions' `first_byte`/`last_byte`, which are inclusive as partition tables store them.

use crate::ranges::{merged, subtract};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The layout of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Size of the disk in bytes, as the caller gave it.
    pub disk_size: u64,
    /// The partition table found, if any.
    pub table: PartitionTable,
    /// Encrypted volumes, in disk order (the whole disk, or partitions by index).
    pub volumes: Vec<EncryptedVolume>,
    /// Damaged or unrecognised structures met on the way; the scan carries on past them.
    pub problems: Vec<Problem>,
}

/// A structure that is damaged, inconsistent or not understood, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Which structure, e.g. "GPT backup header", "LUKS2 header", "EBR".
    pub structure: String,
    /// Absolute byte offset of the structure.
    pub offset: u64,
    /// What is wrong with it.
    pub message: String,
}

/// The partitioning scheme of the disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "lowercase")]
pub enum PartitionTable {
    /// No partition table: the disk is one volume (or unknown content).
    None,
    /// A DOS/MBR table, with logical partitions from the EBR chain.
    Mbr(MbrTable),
    /// A GUID partition table (behind a protective MBR).
    Gpt(GptTable),
}

impl PartitionTable {
    /// The partitions, empty when there is no table.
    pub fn partitions(&self) -> &[Partition] {
        match self {
            PartitionTable::None => &[],
            PartitionTable::Mbr(t) => &t.partitions,
            PartitionTable::Gpt(t) => &t.partitions,
        }
    }
}

/// An MBR partition table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MbrTable {
    /// Logical sector size the LBAs were read in: the caller's hint, else 512 (an MBR does
    /// not record it).
    pub sector_size: u32,
    /// The 32-bit disk signature at byte 440, as `0x` and 8 hex digits.
    pub disk_signature: String,
    /// Primary (1-4), extended containers and logical (5 and up) partitions.
    pub partitions: Vec<Partition>,
}

/// A GUID partition table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptTable {
    /// Logical sector size, found from where the "EFI PART" signature lies (LBA 1).
    pub sector_size: u32,
    /// The disk GUID.
    pub disk_guid: String,
    /// First byte partitions may use.
    pub first_usable_byte: u64,
    /// Last byte (inclusive) partitions may use.
    pub last_usable_byte: u64,
    /// The primary header at LBA 1 and its entry array (CRCs checked).
    pub primary: CopyState,
    /// The backup header at the last LBA and its entry array, checked against the primary.
    pub backup: CopyState,
    /// Which copy the partitions were read from.
    pub used: GptCopy,
    /// The partitions in use (type GUID not zero), by entry index.
    pub partitions: Vec<Partition>,
}

/// One of the two GPT copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GptCopy {
    /// The header at LBA 1.
    Primary,
    /// The header at the last LBA.
    Backup,
}

/// The state of one copy of a redundant structure (GPT header, LUKS2 header, FVE block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyState {
    /// Present, and every check passed.
    Ok,
    /// Not there at all (no signature where it belongs).
    Missing,
    /// There, but failing its own checks (checksum, field values): why.
    Damaged(String),
    /// Valid on its own but disagreeing with the other copy: how.
    Mismatch(String),
}

/// Role of an MBR partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MbrRole {
    /// One of the four entries of the MBR.
    Primary,
    /// A primary entry holding the EBR chain (a container; not probed for volumes).
    Extended,
    /// A partition described by an EBR.
    Logical,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partition {
    /// Number as Linux names it: MBR 1-4 primary, 5+ logical; GPT entry index + 1.
    pub index: u32,
    /// The type: MBR `0x83`, GPT the type GUID.
    pub type_code: String,
    /// A human name for common types.
    pub type_name: Option<String>,
    /// GPT: the partition's unique GUID.
    pub guid: Option<String>,
    /// GPT: the partition name (UTF-16 in the entry).
    pub name: Option<String>,
    /// First byte of the partition.
    pub first_byte: u64,
    /// Last byte of the partition (inclusive).
    pub last_byte: u64,
    /// GPT: the 64 attribute bits; MBR: the status byte (0x80 = active).
    pub attributes: u64,
    /// MBR: primary, extended or logical; `None` for GPT.
    pub mbr_role: Option<MbrRole>,
}

impl Partition {
    /// The partition's bytes, half-open.
    pub fn range(&self) -> Range<u64> {
        self.first_byte..self.last_byte.saturating_add(1)
    }
}

/// Where an encrypted volume was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "lowercase")]
pub enum Location {
    /// At byte 0 of a disk without a partition table.
    Disk,
    /// At the start of partition `index`.
    Partition {
        /// The partition's index (as in [`Partition::index`]).
        index: u32,
    },
}

/// An encrypted volume: what it is and which bytes are ciphertext.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncryptedVolume {
    /// The whole disk or a partition.
    pub location: Location,
    /// The volume's bytes on the disk (the partition, or the whole disk).
    pub volume: Range<u64>,
    /// The format and its format-specific details.
    pub format: VolumeFormat,
    /// Block cipher, e.g. `aes`; `None` when the header does not say (damaged, unknown).
    pub cipher: Option<String>,
    /// Mode and IV scheme, e.g. `xts-plain64`, `cbc-essiv:sha256`, `cbc-elephant`.
    pub mode: Option<String>,
    /// Key size in bits as the format states it: LUKS the whole volume key (both XTS halves:
    /// `aes-xts-plain64` with 512 bits is AES-256), BitLocker the AES key size its method
    /// names (XTS-AES-128 is 128).
    pub key_bits: Option<u32>,
    /// The extent of the ciphertext on the disk: from its first byte to the end of its last;
    /// empty (`start == end`) when nothing is encrypted (yet, or any more); `None` if unknown.
    /// The bytes in [`EncryptedVolume::plaintext`] lie inside it but are not ciphertext.
    pub payload: Option<Range<u64>>,
    /// Plaintext ranges inside `payload`, sorted: the `linear` segments of a LUKS2 volume
    /// whose encryption (`cryptsetup reencrypt --encrypt`) is in progress. Listed rather than
    /// folded into `payload`, so no report ever counts plaintext as ciphertext.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plaintext: Vec<Range<u64>>,
    /// The volume UUID (LUKS) or volume identifier GUID (BitLocker).
    pub uuid: Option<String>,
    /// Size of the volume as its own header records it, when it does.
    pub volume_size: Option<u64>,
}

/// Which encryption format, with what only that format has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum VolumeFormat {
    /// LUKS version 1 (one header, no checksum).
    Luks1,
    /// LUKS version 2 (two checksummed header copies).
    Luks2(Luks2Headers),
    /// BitLocker (Vista, Windows 7 and later, To Go).
    BitLocker(BitLockerInfo),
}

/// The two LUKS2 header copies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Luks2Headers {
    /// Binary header plus JSON area size, from the copy used.
    pub header_size: u64,
    /// The primary copy at the volume start.
    pub primary: Luks2Copy,
    /// The secondary copy at `header_size` from the volume start.
    pub secondary: Luks2Copy,
    /// Which copy the details were read from: the valid one with the higher sequence id.
    pub used: LuksCopy,
}

/// One LUKS2 header copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Luks2Copy {
    /// Absolute byte offset of the copy (where it was looked for, if missing).
    pub offset: u64,
    /// Checksum and field checks.
    pub state: CopyState,
    /// The sequence id, when the binary header could be read.
    pub seqid: Option<u64>,
}

/// One of the two LUKS2 header copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LuksCopy {
    /// At the volume start.
    Primary,
    /// After the primary.
    Secondary,
}

/// BitLocker details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitLockerInfo {
    /// Which volume-header layout.
    pub variant: BitLockerVariant,
    /// Bytes per sector from the volume header's BIOS parameter block.
    pub bytes_per_sector: u16,
    /// Encryption method code from the FVE metadata header (0x8000-0x8005 known).
    pub method_code: u16,
    /// Its name: AES-128-CBC-diffuser, AES-256-CBC, XTS-AES-128, ...
    pub method: String,
    /// The three FVE metadata blocks, in the order the header lists them.
    pub metadata_blocks: Vec<FveBlock>,
    /// FVE block header version 2: bytes encrypted from the volume start; what lies past
    /// them is plaintext (a conversion in progress or paused).
    pub encrypted_size: Option<u64>,
    /// FVE block header version 2: absolute offset of the relocated original boot sectors.
    pub volume_header_offset: Option<u64>,
    /// FVE block header version 2: size of that relocated region (its sector count times
    /// the bytes per sector).
    #[serde(default)]
    pub volume_header_size: Option<u64>,
    /// The conversion state the FVE block header records: `encrypted`, `converting`,
    /// `paused`, `decrypted`, or `unknown (N)`; empty when no block could be read.
    #[serde(default)]
    pub state: String,
    /// The volume header carries the "used disk space only" identifier: clusters that were
    /// free when encryption started were never encrypted and may still hold plaintext,
    /// which no header records (only the file system knows which clusters they are).
    #[serde(default)]
    pub used_space_only: bool,
}

/// One FVE metadata block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FveBlock {
    /// Absolute byte offset.
    pub offset: u64,
    /// Signature, version and header checks; agreement with the volume header.
    pub state: CopyState,
}

/// The BitLocker volume-header layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BitLockerVariant {
    /// Windows Vista: NTFS-like header, FVE block 1 named by cluster number.
    Vista,
    /// Windows 7 and later: FAT32-like header with the three FVE block offsets.
    Win7,
    /// BitLocker To Go on a FAT volume: `MSWIN4.1` header with the offsets near its end.
    ToGo,
}

impl Layout {
    /// The bytes that hold ciphertext, sorted and merged, so a backup can store them without
    /// a compression attempt (ciphertext does not shrink). A volume whose payload is unknown
    /// contributes its whole range: better to skip compressing a few header bytes than to
    /// spend CPU on megabytes of random data. A volume's listed plaintext is left out.
    pub fn ciphertext_ranges(&self) -> Vec<Range<u64>> {
        merged(
            self.volumes
                .iter()
                .flat_map(|v| {
                    let payload = v.payload.clone().unwrap_or_else(|| v.volume.clone());
                    subtract(payload, &v.plaintext)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(volume: Range<u64>, payload: Option<Range<u64>>) -> EncryptedVolume {
        EncryptedVolume {
            location: Location::Disk,
            volume,
            format: VolumeFormat::Luks1,
            cipher: None,
            mode: None,
            key_bits: None,
            payload,
            plaintext: vec![],
            uuid: None,
            volume_size: None,
        }
    }

    #[test]
    fn ciphertext_ranges_are_sorted_and_merged() {
        let layout = Layout {
            disk_size: 1000,
            table: PartitionTable::None,
            volumes: vec![
                volume(500..900, Some(600..900)),
                volume(0..100, Some(10..100)),
                volume(100..300, None),
                volume(300..400, Some(400..400)),
                volume(850..1000, Some(850..950)),
            ],
            problems: vec![],
        };
        assert_eq!(layout.ciphertext_ranges(), vec![10..300, 600..950]);
    }

    #[test]
    fn listed_plaintext_is_not_ciphertext() {
        let mut v = volume(0..1000, Some(100..900));
        v.plaintext = vec![700..800, 50..150, 400..500, 850..2000];
        let layout = Layout {
            disk_size: 1000,
            table: PartitionTable::None,
            volumes: vec![v],
            problems: vec![],
        };
        assert_eq!(
            layout.ciphertext_ranges(),
            vec![150..400, 500..700, 800..850]
        );
    }

    #[test]
    fn json_round_trip() {
        let layout = Layout {
            disk_size: 1 << 20,
            table: PartitionTable::None,
            volumes: vec![EncryptedVolume {
                format: VolumeFormat::Luks2(Luks2Headers {
                    header_size: 16384,
                    primary: Luks2Copy {
                        offset: 0,
                        state: CopyState::Damaged("checksum".into()),
                        seqid: Some(3),
                    },
                    secondary: Luks2Copy {
                        offset: 16384,
                        state: CopyState::Ok,
                        seqid: Some(3),
                    },
                    used: LuksCopy::Secondary,
                }),
                ..volume(0..1 << 20, Some(4096..1 << 20))
            }],
            problems: vec![Problem {
                structure: "LUKS2 header".into(),
                offset: 0,
                message: "checksum".into(),
            }],
        };
        let json = serde_json::to_string(&layout).unwrap();
        let back: Layout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, layout);
    }
}
