//! `bitlocker`: `layout::scan` of a disk holding a BitLocker volume at byte 0 (the Vista,
//! Windows 7+ and To Go volume headers, the FVE metadata block and metadata headers).
//!
//! The first input byte picks a mode; the rest is the start of a 4 MiB disk (zeros past the
//! input; modes 1-3 take one more byte first and use at least 64 KiB of image):
//! - 0: as it is;
//! - 1, 2, 3: with a Vista, Windows 7+ or To Go volume header forced into sector 0 (boot
//!   jump, signature, BitLocker GUID, bytes per sector picked by the next byte) and each FVE
//!   block offset it names (for Vista: cluster number, and blocks 2 and 3 from block 1)
//!   moved inside the image past sector 0 with "-FVE-FS-" written there, so the block and
//!   metadata header checks see arbitrary bytes behind a real signature.
//!
//! Beyond "no panic": in modes 1-3 exactly one volume is reported, of the forced variant,
//! with at most three FVE blocks (exactly three outside Vista).
#![no_main]

#[path = "layout_disk.rs"]
mod layout_disk;

use blockvault::layout::{BitLockerVariant, VolumeFormat};
use blockvault_fuzz::{outcome, write_seeds};
use libfuzzer_sys::fuzz_target;

const MIN_IMAGE: usize = 64 << 10;
const DISK: u64 = 4 << 20;
const BLOCK_HEAD: usize = 64 + 48;
/// 4967D63B-2E29-4AD8-8399-F6A339E3D001 in on-disk order.
const GUID: [u8; 16] = [
    0x3b, 0xd6, 0x67, 0x49, 0x29, 0x2e, 0xd8, 0x4a, 0x83, 0x99, 0xf6, 0xa3, 0x39, 0xe3, 0xd0, 0x01,
];

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Move an offset inside the image, past sector 0, with room for a block head (offsets
/// already there stay, so valid seeds pass through unchanged).
fn inside(img: &[u8], offset: u64) -> u64 {
    let max = (img.len() - BLOCK_HEAD) as u64;
    if (512..=max).contains(&offset) {
        offset
    } else {
        512 + offset % (max - 511)
    }
}

/// Force a volume header of `variant` into `img` and signatures at its FVE block offsets.
fn force(img: &mut [u8], variant: BitLockerVariant, bps_pick: u8) {
    let bps = [512u16, 1024, 2048, 4096][usize::from(bps_pick % 4)];
    img[11..13].copy_from_slice(&bps.to_le_bytes());
    img[510..512].copy_from_slice(&[0x55, 0xaa]);
    let (jump, signature, offsets_at): (_, &[u8; 8], Option<usize>) = match variant {
        BitLockerVariant::Vista => ([0xeb, 0x52, 0x90], b"-FVE-FS-", None),
        BitLockerVariant::Win7 => ([0xeb, 0x58, 0x90], b"-FVE-FS-", Some(160)),
        BitLockerVariant::ToGo => ([0xeb, 0x58, 0x90], b"MSWIN4.1", Some(424)),
    };
    img[..3].copy_from_slice(&jump);
    img[3..11].copy_from_slice(signature);
    let mut blocks = Vec::new();
    match offsets_at {
        Some(at) => {
            img[at..at + 16].copy_from_slice(&GUID);
            for i in 0..3 {
                let o = inside(img, le64(img, at + 16 + 8 * i));
                set64(img, at + 16 + 8 * i, o);
                blocks.push(o);
            }
        }
        None => {
            // One sector per cluster, so block 1 is cluster number x bytes per sector.
            img[13] = 1;
            let o = inside(img, le64(img, 56)) / u64::from(bps) * u64::from(bps);
            let o = o.max(u64::from(bps));
            set64(img, 56, o / u64::from(bps));
            blocks.push(o);
        }
    }
    for (n, &o) in blocks.clone().iter().enumerate() {
        let o = o as usize;
        if o + BLOCK_HEAD > img.len() {
            continue;
        }
        img[o..o + 8].copy_from_slice(b"-FVE-FS-");
        if n == 0 && offsets_at.is_none() {
            // Vista: blocks 2 and 3 are named by block 1.
            for i in 1..3 {
                let b = inside(img, le64(img, o + 32 + 8 * i));
                set64(img, o + 32 + 8 * i, b);
                img[b as usize..b as usize + 8].copy_from_slice(b"-FVE-FS-");
            }
        }
    }
}

/// A block with a valid block header (version 2) and metadata header naming `method`.
fn block(offsets: [u64; 3], method: u16) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_HEAD];
    b[..8].copy_from_slice(b"-FVE-FS-");
    b[10..12].copy_from_slice(&2u16.to_le_bytes());
    set64(&mut b, 16, 1 << 20);
    for (i, o) in offsets.iter().enumerate() {
        set64(&mut b, 32 + 8 * i, *o);
    }
    for (at, v) in [
        (64, 48u32),
        (68, 1),
        (72, 48),
        (76, 48),
        (100, u32::from(method)),
    ] {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (mode, variant, method) in [
        (1u8, BitLockerVariant::Vista, 0x8000u16),
        (2, BitLockerVariant::Win7, 0x8004),
        (3, BitLockerVariant::ToGo, 0x8003),
    ] {
        let mut img = vec![0u8; MIN_IMAGE];
        let offsets = [8192u64, 16384, 32768];
        // What `force` reads as offsets: Vista's field @56 too (it becomes a cluster number).
        let at = match variant {
            BitLockerVariant::Vista => 56,
            BitLockerVariant::Win7 => 176,
            BitLockerVariant::ToGo => 440,
        };
        for (i, o) in offsets.iter().enumerate() {
            set64(&mut img, at + 8 * i, *o);
            let o = *o as usize;
            img[o..o + BLOCK_HEAD].copy_from_slice(&block(offsets, method));
        }
        force(&mut img, variant, 0);
        out.push([&[mode, 0][..], &img].concat());
    }
    out
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        let variant = match mode % 4 {
            1 => Some(BitLockerVariant::Vista),
            2 => Some(BitLockerVariant::Win7),
            3 => Some(BitLockerVariant::ToGo),
            _ => None,
        };
        let (pick, rest) = match (variant, rest.split_first()) {
            (Some(_), Some((&pick, rest))) => (pick, rest),
            _ => (0, rest),
        };
        let mut img = rest.to_vec();
        if let Some(variant) = variant {
            img.resize(img.len().max(MIN_IMAGE), 0);
            force(&mut img, variant, pick);
        }
        let size = DISK.max(img.len() as u64);
        let r = layout_disk::scan(&img, size);
        outcome(&format!("scan(mode {})", mode % 4), &r);
        let Some(variant) = variant else {
            return;
        };
        let layout = r.expect("a BitLocker header never exhausts the read budget");
        assert_eq!(layout.volumes.len(), 1, "{layout:?}");
        let VolumeFormat::BitLocker(info) = &layout.volumes[0].format else {
            panic!("{layout:?}");
        };
        assert_eq!(info.variant, variant);
        assert!(info.metadata_blocks.len() <= 3);
        if variant != BitLockerVariant::Vista {
            assert_eq!(info.metadata_blocks.len(), 3, "{info:?}");
        }
    }
);
