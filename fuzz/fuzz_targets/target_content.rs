//! `target_content`: what a restore finds on a device or NBD export before writing over it
//! (`restore::target::occupied::holds_data`), over the input as the disk's first bytes.
//!
//! The first 4 bytes give the disk's size in 512-byte units (at least the input's length),
//! the rest is the disk's start; zeros follow. Beyond "no panic": no read outside the disk,
//! and the verdict agrees with an independent look: data found exactly when the first or the
//! last MiB holds a non-zero byte.
#![no_main]

use blockvault::restore::target::occupied::holds_data;
use blockvault::Result;
use blockvault_fuzz::{outcome, write_seeds};
use libfuzzer_sys::fuzz_target;

const MIB: u64 = 1 << 20;

fn seeds() -> Vec<Vec<u8>> {
    // A 2 MiB disk starting with an ext4 superblock magic; one with an MBR signature.
    let mut ext4 = (4096u32).to_le_bytes().to_vec();
    ext4.resize(4 + 2048, 0);
    ext4[4 + 1080..4 + 1082].copy_from_slice(&[0x53, 0xef]);
    let mut mbr = (4096u32).to_le_bytes().to_vec();
    mbr.resize(4 + 512, 0);
    mbr[4 + 446 + 4] = 0x83;
    mbr[4 + 446 + 8] = 1;
    mbr[4 + 446 + 12] = 8;
    mbr[4 + 510..4 + 512].copy_from_slice(&[0x55, 0xaa]);
    vec![ext4, mbr]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((head, image)) = data.split_first_chunk::<4>() else {
            return;
        };
        let size = (u64::from(u32::from_le_bytes(*head)) * 512).max(image.len() as u64);
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            assert!(off + buf.len() as u64 <= size, "read past the {size}-byte disk");
            buf.fill(0);
            let start = (off as usize).min(image.len());
            let end = (off as usize).saturating_add(buf.len()).min(image.len());
            buf[..end - start].copy_from_slice(&image[start..end]);
            Ok(())
        };
        let r = holds_data(&read, size);
        outcome("holds_data", &r);
        let found = r.expect("reads never fail here, so neither may the probe");
        let nonzero = |from: u64, to: u64| {
            image
                .iter()
                .enumerate()
                .any(|(i, &b)| b != 0 && (from..to).contains(&(i as u64)))
        };
        let expect = nonzero(0, MIB.min(size)) || nonzero(size - MIB.min(size), size);
        assert_eq!(found.is_some(), expect, "{found:?}");
    }
);
