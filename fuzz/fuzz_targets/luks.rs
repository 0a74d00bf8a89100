//! `luks`: `layout::scan` of a disk holding a LUKS volume at byte 0 (LUKS1 header, LUKS2
//! binary headers, JSON metadata, the secondary-header search).
//!
//! The first input byte picks a mode; the rest is used as:
//! 0. the disk image itself (an 8 MiB disk, zeros past the input): LUKS1 fields, LUKS2
//!    binary-header checks (checksums fail unless the input carries a right one);
//! 1. the JSON area of a LUKS2 header pair with correct SHA-256 checksums, so the JSON
//!    parser and segment/keyslot logic see arbitrary metadata behind valid checksums;
//! 2. the primary's binary header and JSON area (magic, version, size, offset and checksum
//!    fixed up; header size 16 KiB << next byte % 9) plus a matching secondary;
//! 3. as 2 with the primary left out, so the secondary is found by searching.
//!
//! Beyond "no panic" (and the `layout_disk::properties`): in modes 1-3 a volume, if found,
//! is LUKS2 and was read from a copy that passed its checks (the primary in modes 1-2, the
//! secondary in mode 3).
#![no_main]

#[path = "layout_disk.rs"]
mod layout_disk;

use blockvault::layout::{CopyState, LuksCopy, VolumeFormat};
use blockvault_fuzz::{outcome, write_seeds};
use libfuzzer_sys::fuzz_target;
use ring::digest;

const BIN: usize = 4096;

/// One LUKS2 header copy of `hdr_size` bytes meant for offset `rel`: `bin` (up to 4096
/// bytes) as the binary header with the fields the format fixes forced, `json` as the JSON
/// area, and a correct SHA-256 checksum (LUKS2 on-disk format, "Binary header").
fn luks2_copy(bin: &[u8], json: &[u8], hdr_size: usize, rel: usize) -> Vec<u8> {
    let mut h = vec![0u8; hdr_size];
    let n = bin.len().min(BIN);
    h[..n].copy_from_slice(&bin[..n]);
    let magic: &[u8; 6] = if rel == 0 {
        b"LUKS\xba\xbe"
    } else {
        b"SKUL\xba\xbe"
    };
    h[..6].copy_from_slice(magic);
    h[6..8].copy_from_slice(&2u16.to_be_bytes());
    h[8..16].copy_from_slice(&(hdr_size as u64).to_be_bytes());
    h[72..104].fill(0);
    h[72..78].copy_from_slice(b"sha256");
    h[256..264].copy_from_slice(&(rel as u64).to_be_bytes());
    let n = json.len().min(hdr_size - BIN - 1);
    h[BIN..BIN + n].copy_from_slice(&json[..n]);
    h[448..512].fill(0);
    let d = digest::digest(&digest::SHA256, &h);
    h[448..480].copy_from_slice(d.as_ref());
    h
}

/// Primary (unless `secondary_only`) and secondary copies, back to back.
fn luks2_pair(bin: &[u8], json: &[u8], hdr_size: usize, secondary_only: bool) -> Vec<u8> {
    let mut img = if secondary_only {
        vec![0u8; hdr_size]
    } else {
        luks2_copy(bin, json, hdr_size, 0)
    };
    img.extend_from_slice(&luks2_copy(bin, json, hdr_size, hdr_size));
    img
}

const JSON: &[u8] = br#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},"area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},"kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"AAAA"}}},"tokens":{},"segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}},"digests":{},"config":{"json_size":"12288","keyslots_size":"16744448"}}"#;

fn luks1_header() -> Vec<u8> {
    let mut h = vec![0u8; 592];
    h[..6].copy_from_slice(b"LUKS\xba\xbe");
    h[6..8].copy_from_slice(&1u16.to_be_bytes());
    h[8..11].copy_from_slice(b"aes");
    h[40..51].copy_from_slice(b"xts-plain64");
    h[72..78].copy_from_slice(b"sha256");
    h[104..108].copy_from_slice(&4096u32.to_be_bytes());
    h[108..112].copy_from_slice(&64u32.to_be_bytes());
    h[168..204].copy_from_slice(b"00000000-1111-2222-3333-444444444444");
    h
}

fn seeds() -> Vec<Vec<u8>> {
    let mut mode2 = vec![2u8, 0];
    let mut bin = vec![0u8; BIN];
    bin[16..24].copy_from_slice(&3u64.to_be_bytes());
    mode2.extend_from_slice(&bin);
    mode2.extend_from_slice(JSON);
    let mut mode3 = mode2.clone();
    mode3[0] = 3;
    vec![
        [&[0u8][..], &luks1_header()].concat(),
        [&[0u8][..], &luks2_pair(&bin, JSON, 16 << 10, false)].concat(),
        [&[1u8][..], JSON].concat(),
        mode2,
        mode3,
    ]
}

const DISK: u64 = 8 << 20;

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        let (image, expect) = match mode % 4 {
            0 => (rest.to_vec(), None),
            1 => (luks2_pair(&[], rest, 16 << 10, false), Some(LuksCopy::Primary)),
            m => {
                let Some((&shift, rest)) = rest.split_first() else {
                    return;
                };
                let hdr_size = (16usize << 10) << (shift % 9);
                let (bin, json) = rest.split_at(rest.len().min(BIN));
                let secondary_only = m == 3;
                let used = if secondary_only { LuksCopy::Secondary } else { LuksCopy::Primary };
                (luks2_pair(bin, json, hdr_size, secondary_only), Some(used))
            }
        };
        let size = DISK.max(image.len() as u64);
        let r = layout_disk::scan(&image, size);
        outcome(&format!("scan(mode {})", mode % 4), &r);
        let Some(expect) = expect else {
            return;
        };
        let layout = r.expect("valid header copies never exhaust the read budget");
        for v in &layout.volumes {
            let VolumeFormat::Luks2(h) = &v.format else {
                panic!("a LUKS2 header pair read as {v:?}");
            };
            assert_eq!(h.used, expect);
            let used = match expect {
                LuksCopy::Primary => &h.primary,
                LuksCopy::Secondary => &h.secondary,
            };
            assert_eq!(used.state, CopyState::Ok, "{h:?}");
        }
    }
);
