//! BitLocker: the volume header (first sector) and the three FVE metadata blocks it points to.
//!
//! Source: libbde's "BitLocker Drive Encryption (BDE) format" (libyal/libbde,
//! documentation/), sections "Volume header", "FVE metadata block header" (versions 1 and 2),
//! "FVE metadata header" and "Encryption methods"; where that document leaves a field
//! unknown, dislocker's `metadata.priv.h` (the conversion states) and its sector reader
//! `inouts/sectors.c` (which bytes are decrypted) decide.
//! ```text
//!            bytes 0..3  3..11       FVE metadata block offsets (from the volume start)
//! Vista      EB 52 90    "-FVE-FS-"  block 1 = cluster number (u64 @56) x sectors/cluster
//!                                    (@13) x bytes/sector (@11); blocks 2, 3 from block 1
//! Windows 7+ EB 58 90    "-FVE-FS-"  BitLocker GUID @160, three u64 offsets @176, 184, 192
//! To Go      EB 58 90    "MSWIN4.1"  BitLocker GUID @424, three u64 offsets @440, 448, 456
//! ```
//! To Go is recognised by its GUID @424 whatever the OEM name @3 (libbde checks no name
//! there either). Each FVE metadata block starts with a 64-byte block header ("-FVE-FS-",
//! version 1 for Vista or 2, the conversion state @12, the three block offsets @32; version
//! 2 adds the encrypted size @16, the count of relocated boot sectors @28 and their offset
//! @56), then the 48-byte metadata header (size, version 1, header size 48, size copy,
//! volume GUID @16, encryption method @36, low 16 bits). Only these headers are read:
//! never key material.
//!
//! Which bytes are ciphertext (what dislocker decrypts):
//! - version 2 (Windows 7+, To Go): `[header sectors, encrypted size)` from the volume
//!   start. The first sectors (@28; 16 on Windows 7, megabytes of FAT discovery volume on
//!   To Go) are plaintext; their originals live, encrypted, at @56. Bytes past the
//!   encrypted size are plaintext: a conversion in progress or paused encrypts (and
//!   decrypts) from the front, so the state @12 needs no separate reading.
//! - version 1 (Vista): everything after the first 16 sectors.
//!
//! The three FVE metadata blocks (64 KiB each) lie inside that range and are counted with
//! it; a "used disk space only" volume's never-written free clusters too (see
//! [`super::BitLockerInfo::used_space_only`]). A sector with a BitLocker signature is always
//! reported as a BitLocker volume, even when its metadata is damaged: its bytes are
//! ciphertext either way, and the backup needs to know.

use super::disk::{array, field, guid, le16, le32, le64, Disk};
use super::model::{
    BitLockerInfo, BitLockerVariant, CopyState, EncryptedVolume, FveBlock, Location, Problem,
    VolumeFormat,
};
use crate::error::Result;
use std::ops::Range;

/// Signature of the Vista and Windows 7+ volume headers and of every FVE metadata block.
pub const SIGNATURE: &[u8; 8] = b"-FVE-FS-";
/// The BitLocker identifier 4967D63B-2E29-4AD8-8399-F6A339E3D001, as stored.
pub const BITLOCKER_GUID: [u8; 16] = [
    0x3b, 0xd6, 0x67, 0x49, 0x29, 0x2e, 0xd8, 0x4a, 0x83, 0x99, 0xf6, 0xa3, 0x39, 0xe3, 0xd0, 0x01,
];
/// The identifier of "used disk space only" volumes (92A84D3B-DD80-4D0E-9E4E-B1E3284EAED8;
/// dislocker's "EOW", encrypt on write), which carries the same three offsets.
pub const USED_SPACE_ONLY_GUID: [u8; 16] = [
    0x3b, 0x4d, 0xa8, 0x92, 0x80, 0xdd, 0x0e, 0x4d, 0x9e, 0x4e, 0xb1, 0xe3, 0x28, 0x4e, 0xae, 0xd8,
];
/// Block header plus metadata header: all that is read of each FVE block.
pub const BLOCK_HEAD_LEN: usize = 64 + 48;
/// Vista's boot entry point.
const VISTA_JUMP: [u8; 3] = [0xeb, 0x52, 0x90];
/// Sectors at a Vista volume's start that are never encrypted (the volume header and the
/// 15 sectors after it).
const VISTA_PLAIN_SECTORS: u64 = 16;

fn is_bitlocker_guid(g: [u8; 16]) -> bool {
    g == BITLOCKER_GUID || g == USED_SPACE_ONLY_GUID
}

/// Where the volume header keeps its BitLocker GUID, if its layout has one.
fn guid_offset(variant: BitLockerVariant) -> Option<usize> {
    match variant {
        BitLockerVariant::Vista => None,
        BitLockerVariant::Win7 => Some(160),
        BitLockerVariant::ToGo => Some(424),
    }
}

/// The conversion state @12 of an FVE block header, named as dislocker's `state_types`.
fn state_name(code: u16) -> String {
    match code {
        1 => "decrypted".into(),
        2 => "converting".into(),
        4 => "encrypted".into(),
        5 => "paused".into(),
        n => format!("unknown ({n})"),
    }
}

/// Which BitLocker header `sector` (the volume's first 512 bytes) is, if any.
pub fn variant(sector: &[u8]) -> Option<BitLockerVariant> {
    let signature = field(sector, 3, 8);
    if signature == SIGNATURE {
        Some(if field(sector, 0, 3) == VISTA_JUMP {
            BitLockerVariant::Vista
        } else {
            BitLockerVariant::Win7
        })
    } else if is_bitlocker_guid(array(sector, 424)) {
        Some(BitLockerVariant::ToGo)
    } else {
        None
    }
}

/// Name, cipher, mode and AES key bits of an FVE encryption method.
pub fn method(code: u16) -> Option<(&'static str, &'static str, &'static str, u32)> {
    Some(match code {
        0x8000 => ("AES-128-CBC-diffuser", "aes", "cbc-elephant", 128),
        0x8001 => ("AES-256-CBC-diffuser", "aes", "cbc-elephant", 256),
        0x8002 => ("AES-128-CBC", "aes", "cbc", 128),
        0x8003 => ("AES-256-CBC", "aes", "cbc", 256),
        0x8004 => ("XTS-AES-128", "aes", "xts", 128),
        0x8005 => ("XTS-AES-256", "aes", "xts", 256),
        _ => return None,
    })
}

/// What a valid FVE block header says.
struct Block {
    offsets: [u64; 3],
    version: u16,
    state: u16,
    encrypted_size: u64,
    volume_header_sectors: u32,
    volume_header_offset: u64,
    volume_guid: String,
    method: u16,
}

/// Check the block header and metadata header in `b` ([`BLOCK_HEAD_LEN`] bytes).
fn check_block(b: &[u8]) -> Result<Block, String> {
    if field(b, 0, 8) != SIGNATURE {
        return Err("no -FVE-FS- signature".into());
    }
    let version = le16(b, 10);
    if !matches!(version, 1 | 2) {
        return Err(format!("block header version {version}, expected 1 or 2"));
    }
    let (size, meta_version, header_size, size_copy) =
        (le32(b, 64), le32(b, 68), le32(b, 72), le32(b, 76));
    if meta_version != 1 || header_size != 48 {
        return Err(format!(
            "metadata header version {meta_version} size {header_size}, expected version 1 \
             size 48"
        ));
    }
    if size < 48 || size != size_copy {
        return Err(format!(
            "metadata sizes {size} and {size_copy} disagree or are < 48"
        ));
    }
    Ok(Block {
        offsets: [le64(b, 32), le64(b, 40), le64(b, 48)],
        version,
        state: le16(b, 12),
        encrypted_size: le64(b, 16),
        volume_header_sectors: le32(b, 28),
        volume_header_offset: le64(b, 56),
        volume_guid: guid(b, 80),
        method: le16(b, 100),
    })
}

/// Read FVE block at `rel` bytes into `volume`.
fn read_block(disk: &Disk, volume: &Range<u64>, rel: u64) -> Result<Result<Block, String>> {
    let at = volume.start.checked_add(rel).filter(|&at| {
        at.checked_add(BLOCK_HEAD_LEN as u64)
            .is_some_and(|end| end <= volume.end)
    });
    let Some(at) = at else {
        return Ok(Err(format!("offset {rel} lies outside the volume")));
    };
    Ok(
        match disk.bytes(at, BLOCK_HEAD_LEN, "FVE metadata block")? {
            Some(b) => check_block(&b),
            None => Err("lies past the end of the disk".into()),
        },
    )
}

/// Bytes per cluster of a Vista (NTFS-style) header: sectors per cluster is either the count
/// or, above 0x80, a negative power of two.
fn vista_cluster_bytes(sector: &[u8], bytes_per_sector: u16) -> Option<u64> {
    let spc = u32::from(*sector.get(13)?);
    let sectors = match spc {
        0 => return None,
        1..=0x80 => u64::from(spc),
        _ => 1u64.checked_shl(256 - spc).filter(|&s| s <= 1 << 16)?,
    };
    Some(sectors * u64::from(bytes_per_sector))
}

/// Describe the BitLocker volume whose first sector `sector` has header `variant`.
pub fn probe(
    disk: &Disk,
    location: Location,
    volume: Range<u64>,
    sector: &[u8],
    variant: BitLockerVariant,
    problems: &mut Vec<Problem>,
) -> Result<EncryptedVolume> {
    let start = volume.start;
    let mut problem = |structure: &str, offset: u64, message: String| {
        problems.push(Problem {
            structure: structure.into(),
            offset,
            message,
        })
    };
    let bytes_per_sector = le16(sector, 11);
    let sector_ok = matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096);
    if !sector_ok {
        problem(
            "BitLocker volume header",
            start,
            format!("{bytes_per_sector} bytes per sector is not 512, 1024, 2048 or 4096"),
        );
    }
    // The offsets the volume header gives (Vista: only block 1's, via its cluster number).
    let listed: Option<Vec<u64>> = match variant {
        BitLockerVariant::Vista => vista_cluster_bytes(sector, bytes_per_sector)
            .filter(|_| sector_ok)
            .and_then(|c| le64(sector, 56).checked_mul(c))
            .map(|o| vec![o]),
        BitLockerVariant::Win7 if is_bitlocker_guid(array(sector, 160)) => Some(vec![
            le64(sector, 176),
            le64(sector, 184),
            le64(sector, 192),
        ]),
        BitLockerVariant::ToGo => Some(vec![
            le64(sector, 440),
            le64(sector, 448),
            le64(sector, 456),
        ]),
        BitLockerVariant::Win7 => None,
    };
    let Some(mut offsets) = listed else {
        problem(
            "BitLocker volume header",
            start,
            "the FVE metadata block offsets cannot be found (no BitLocker identifier at byte \
             160, or an invalid cluster size)"
                .into(),
        );
        return Ok(bare(location, volume, variant, bytes_per_sector));
    };
    let mut blocks = Vec::new();
    let mut first_valid: Option<Block> = None;
    let mut i = 0;
    while i < offsets.len() {
        let rel = offsets[i];
        let state = match read_block(disk, &volume, rel)? {
            Err(why) => CopyState::Damaged(why),
            Ok(b) => {
                if offsets.len() == 1 {
                    // Vista: blocks 2 and 3 are named by block 1.
                    offsets.extend_from_slice(&b.offsets[1..]);
                }
                let state = if b.offsets[..] != offsets[..] {
                    CopyState::Mismatch(format!(
                        "the block lists offsets {:?}, the volume header {:?}",
                        b.offsets, offsets
                    ))
                } else {
                    CopyState::Ok
                };
                first_valid.get_or_insert(b);
                state
            }
        };
        let at = start.saturating_add(rel);
        match &state {
            CopyState::Ok => {}
            CopyState::Damaged(why) | CopyState::Mismatch(why) => {
                problem("FVE metadata block", at, why.clone())
            }
            CopyState::Missing => problem("FVE metadata block", at, "missing".into()),
        }
        blocks.push(FveBlock { offset: at, state });
        i += 1;
    }
    let Some(block) = first_valid else {
        problem(
            "BitLocker volume",
            start,
            "no valid FVE metadata block; encryption method unknown".into(),
        );
        let mut v = bare(location, volume, variant, bytes_per_sector);
        if let VolumeFormat::BitLocker(info) = &mut v.format {
            info.metadata_blocks = blocks;
        }
        return Ok(v);
    };
    let known = method(block.method);
    if known.is_none() {
        problem(
            "FVE metadata header",
            start,
            format!("unknown encryption method 0x{:04x}", block.method),
        );
    }
    let len = volume.end.saturating_sub(volume.start);
    let bps = u64::from(bytes_per_sector);
    let v2 = block.version >= 2;
    let (plain_head, encrypted) = if v2 {
        (
            u64::from(block.volume_header_sectors) * bps,
            block.encrypted_size,
        )
    } else {
        (VISTA_PLAIN_SECTORS * bps, len)
    };
    if encrypted > len {
        problem(
            "FVE metadata block header",
            start,
            format!("encrypted size {encrypted} exceeds the volume's {len} bytes; clamped"),
        );
    }
    let relocated = v2.then(|| start.saturating_add(block.volume_header_offset));
    if let Some(at) = relocated.filter(|at| at.saturating_add(plain_head) > volume.end) {
        problem(
            "FVE metadata block header",
            start,
            format!(
                "the relocated boot sectors (bytes {at}, {plain_head} long) run past the volume \
                 end (byte {})",
                volume.end
            ),
        );
    }
    let end = start + encrypted.min(len);
    let first = start.saturating_add(plain_head).min(end);
    let used_space_only =
        guid_offset(variant).is_some_and(|at| array::<16>(sector, at) == USED_SPACE_ONLY_GUID);
    Ok(EncryptedVolume {
        location,
        format: VolumeFormat::BitLocker(BitLockerInfo {
            variant,
            bytes_per_sector,
            method_code: block.method,
            method: known.map_or_else(
                || format!("unknown (0x{:04x})", block.method),
                |m| m.0.into(),
            ),
            metadata_blocks: blocks,
            encrypted_size: v2.then_some(block.encrypted_size),
            volume_header_offset: relocated,
            volume_header_size: v2.then_some(plain_head),
            state: state_name(block.state),
            used_space_only,
        }),
        cipher: known.map(|m| m.1.into()),
        mode: known.map(|m| m.2.into()),
        key_bits: known.map(|m| m.3),
        payload: Some(first..end),
        plaintext: vec![],
        uuid: Some(block.volume_guid),
        volume_size: header_volume_size(sector, variant, bytes_per_sector),
        volume,
    })
}

/// The size the volume header's BIOS parameter block records, if it does: Vista keeps NTFS's
/// 64-bit sector count @40; the FAT32-style headers the 16-bit (@19) or 32-bit (@32) count,
/// which Windows 7+ leaves zero.
fn header_volume_size(sector: &[u8], variant: BitLockerVariant, bps: u16) -> Option<u64> {
    let sectors = match variant {
        BitLockerVariant::Vista => le64(sector, 40),
        _ => match le16(sector, 19) {
            0 => u64::from(le32(sector, 32)),
            n => u64::from(n),
        },
    };
    (sectors > 0)
        .then(|| sectors.checked_mul(u64::from(bps)))
        .flatten()
}

/// A BitLocker volume whose metadata could not be read: its bytes are still all ciphertext as
/// far as the backup is concerned.
fn bare(
    location: Location,
    volume: Range<u64>,
    variant: BitLockerVariant,
    bytes_per_sector: u16,
) -> EncryptedVolume {
    EncryptedVolume {
        location,
        format: VolumeFormat::BitLocker(BitLockerInfo {
            variant,
            bytes_per_sector,
            method_code: 0,
            method: "unknown".into(),
            metadata_blocks: vec![],
            encrypted_size: None,
            volume_header_offset: None,
            volume_header_size: None,
            state: String::new(),
            used_space_only: false,
        }),
        cipher: None,
        mode: None,
        key_bits: None,
        payload: None,
        plaintext: vec![],
        uuid: None,
        volume_size: None,
        volume,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_image(img: &[u8]) -> (EncryptedVolume, Vec<Problem>) {
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let disk = Disk::new(&read, img.len() as u64);
        let mut problems = vec![];
        let variant = variant(&img[..512]).unwrap();
        let v = probe(
            &disk,
            Location::Disk,
            0..img.len() as u64,
            &img[..512],
            variant,
            &mut problems,
        )
        .unwrap();
        (v, problems)
    }

    #[test]
    fn hostile_offsets_and_cluster_sizes() {
        let mut img = vec![0u8; 8192];
        img[..3].copy_from_slice(&[0xeb, 0x58, 0x90]);
        img[3..11].copy_from_slice(SIGNATURE);
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[160..176].copy_from_slice(&BITLOCKER_GUID);
        img[176..184].copy_from_slice(&u64::MAX.to_le_bytes());
        img[184..192].copy_from_slice(&8150u64.to_le_bytes());
        let (v, problems) = probe_image(&img);
        assert_eq!(v.payload, None);
        let VolumeFormat::BitLocker(info) = &v.format else {
            panic!()
        };
        assert_eq!(info.metadata_blocks.len(), 3);
        assert!(
            problems
                .iter()
                .any(|p| p.message.contains("outside the volume")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.message.contains("no -FVE-FS-")),
            "{problems:?}"
        );

        let mut vista = vec![0u8; 8192];
        vista[..3].copy_from_slice(&VISTA_JUMP);
        vista[3..11].copy_from_slice(SIGNATURE);
        vista[11..13].copy_from_slice(&512u16.to_le_bytes());
        vista[13] = 0xff; // 2 sectors per cluster; the cluster number below overflows
        vista[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        let (v, problems) = probe_image(&vista);
        assert_eq!(v.cipher, None);
        assert!(
            problems[0].message.contains("cannot be found"),
            "{problems:?}"
        );
    }

    #[test]
    fn method_names() {
        assert_eq!(method(0x8000).unwrap().0, "AES-128-CBC-diffuser");
        assert_eq!(method(0x8005).unwrap().0, "XTS-AES-256");
        assert!(method(0x8006).is_none());
        assert_eq!(
            vista_cluster_bytes(&[0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xf4], 512),
            Some(4096 * 512)
        );
    }
}
