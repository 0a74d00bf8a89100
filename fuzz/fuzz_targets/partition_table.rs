//! `partition_table`: `layout::scan` of the input as a disk image: MBRs, EBR chains, GPTs
//! with 512- or 4096-byte sectors.
//!
//! Each input is scanned twice:
//! 1. raw, as a disk of exactly its length;
//! 2. with the GPT CRC32s fixed up (every "EFI PART" header at LBA 1 or the last LBA, for
//!    both sector sizes: entry array CRC, then header CRC), so the field checks, the
//!    primary/backup comparison and the entry parser are reached; every GPT partition
//!    reported must then be whole sectors of the size the table was found with.
//!
//! Beyond "no panic": the properties of `layout_disk::properties` (JSON round trip,
//! ciphertext ranges sorted and on the disk, volumes inside the disk).
#![no_main]

#[path = "layout_disk.rs"]
mod layout_disk;

use blockvault::layout::PartitionTable;
use blockvault_fuzz::{outcome, write_seeds};
use libfuzzer_sys::fuzz_target;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recompute the CRCs of every GPT header in `img` (independently of the library: UEFI
/// 2.x, 5.3.2: CRC32 of the entry array, then of `header_size` bytes with the CRC zeroed).
fn fix_gpt_crcs(img: &mut [u8]) {
    for ss in [512usize, 4096] {
        let lbas = img.len() / ss;
        for lba in [1, lbas.saturating_sub(1)] {
            let at = lba * ss;
            if lba == 0 || at + ss > img.len() || &img[at..at + 8] != b"EFI PART" {
                continue;
            }
            let (entries_lba, n, size) = (
                le64(img, at + 72),
                u64::from(le32(img, at + 80)),
                u64::from(le32(img, at + 84)),
            );
            let array = entries_lba
                .checked_mul(ss as u64)
                .zip(n.checked_mul(size))
                .filter(|(off, len)| *len <= 1 << 20 && off + len <= img.len() as u64);
            if let Some((off, len)) = array {
                let crc = crc32fast::hash(&img[off as usize..(off + len) as usize]);
                img[at + 88..at + 92].copy_from_slice(&crc.to_le_bytes());
            }
            let header_size = (le32(img, at + 12) as usize).clamp(92, ss);
            img[at + 16..at + 20].fill(0);
            let crc = crc32fast::hash(&img[at..at + header_size]);
            img[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// A GPT disk of `lbas` sectors of `ss` bytes with two partitions, both copies (CRCs are
/// filled in by `fix_gpt_crcs`).
fn gpt_seed(ss: usize, lbas: usize) -> Vec<u8> {
    let mut img = vec![0u8; ss * lbas];
    // Protective MBR.
    img[446 + 4] = 0xee;
    img[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    img[446 + 12..446 + 16].copy_from_slice(&(lbas as u32 - 1).to_le_bytes());
    img[510..512].copy_from_slice(&[0x55, 0xaa]);
    let entry_lbas = (16384 / ss).max(1);
    let last = lbas - 1;
    for (lba, alternate, entries) in [(1, last, 2), (last, 1, last - entry_lbas)] {
        let h = &mut img[lba * ss..lba * ss + 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&(lba as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(alternate as u64).to_le_bytes());
        h[40..48].copy_from_slice(&((2 + entry_lbas) as u64).to_le_bytes());
        h[48..56].copy_from_slice(&((last - 1 - entry_lbas) as u64).to_le_bytes());
        h[56..72].copy_from_slice(b"fuzz disk guid..");
        h[72..80].copy_from_slice(&(entries as u64).to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        let e = &mut img[entries * ss..entries * ss + 256];
        for (i, first) in [(0usize, 2 + entry_lbas), (1, 3 + entry_lbas)] {
            let e = &mut e[128 * i..128 * (i + 1)];
            e[..16].copy_from_slice(b"type guid.......");
            e[16..32].copy_from_slice(b"unique guid.....");
            e[32..40].copy_from_slice(&(first as u64).to_le_bytes());
            e[40..48].copy_from_slice(&(first as u64).to_le_bytes());
            e[56..58].copy_from_slice(&[b'p', 0]);
        }
    }
    fix_gpt_crcs(&mut img);
    img
}

/// An MBR disk with a primary, an extended partition and two logical ones.
fn mbr_seed() -> Vec<u8> {
    let mut img = vec![0u8; 64 * 512];
    let entry = |s: &mut [u8], i: usize, kind: u8, lba: u32, n: u32| {
        let at = 446 + 16 * i;
        s[at + 4] = kind;
        s[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
        s[at + 12..at + 16].copy_from_slice(&n.to_le_bytes());
        s[510..512].copy_from_slice(&[0x55, 0xaa]);
    };
    entry(&mut img[..512], 0, 0x83, 1, 7);
    entry(&mut img[..512], 1, 0x05, 8, 40);
    entry(&mut img[8 * 512..9 * 512], 0, 0x82, 1, 10);
    entry(&mut img[8 * 512..9 * 512], 1, 0x05, 20, 20);
    entry(&mut img[28 * 512..29 * 512], 0, 0x07, 1, 10);
    img
}

fn seeds() -> Vec<Vec<u8>> {
    vec![mbr_seed(), gpt_seed(512, 80), gpt_seed(4096, 16)]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let r = layout_disk::scan(data, data.len() as u64);
        outcome("scan(raw)", &r);

        let mut fixed = data.to_vec();
        fix_gpt_crcs(&mut fixed);
        let r = layout_disk::scan(&fixed, fixed.len() as u64);
        outcome("scan(gpt crcs fixed)", &r);
        if let Ok(layout) = &r {
            if let PartitionTable::Gpt(t) = &layout.table {
                let ss = u64::from(t.sector_size);
                for p in &t.partitions {
                    assert_eq!(p.first_byte % ss, 0);
                    assert_eq!((p.last_byte + 1) % ss, 0);
                    assert!(p.first_byte <= p.last_byte);
                }
            }
        }
    }
);
