//! LUKS version 1: one 592-byte big-endian header at the volume start, no checksum.
//!
//! Read here: cipher name (byte 8, 32 bytes), cipher mode (40, 32), payload offset in 512-byte
//! sectors (104, u32), key bytes (108, u32) and UUID (168, 40). Without a checksum, damage is
//! caught by field checks only: printable names, a key size cryptsetup could have written,
//! a payload that starts inside the volume.

use super::disk::{ascii, be32};
use super::model::{EncryptedVolume, Location, Problem, VolumeFormat};
use std::ops::Range;

/// Header length.
pub const HEADER_LEN: usize = 592;
/// Largest master key cryptsetup accepts (bytes).
const MAX_KEY_BYTES: u32 = 128;

/// Parse the LUKS1 header `h` (at least [`HEADER_LEN`] bytes, magic and version already
/// checked) of the volume `volume`; damage is a problem and no volume.
pub fn parse(
    h: &[u8],
    location: Location,
    volume: Range<u64>,
    problems: &mut Vec<Problem>,
) -> Option<EncryptedVolume> {
    let mut problem = |message: String| {
        problems.push(Problem {
            structure: "LUKS1 header".into(),
            offset: volume.start,
            message,
        });
        None
    };
    let (Some(cipher), Some(mode)) = (ascii(h, 8, 32), ascii(h, 40, 32)) else {
        return problem("cipher name or mode is not printable ASCII".into());
    };
    if cipher.is_empty() || mode.is_empty() {
        return problem("cipher name or mode is empty".into());
    }
    let key_bytes = be32(h, 108);
    if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
        return problem(format!(
            "key size {key_bytes} bytes is outside 1..={MAX_KEY_BYTES}"
        ));
    }
    let payload_sectors = be32(h, 104);
    let payload_start = volume.start + u64::from(payload_sectors) * 512;
    if payload_start > volume.end {
        return problem(format!(
            "payload offset {payload_sectors} sectors lies past the volume end (byte {})",
            volume.end
        ));
    }
    let payload = Some(payload_start..volume.end);
    Some(EncryptedVolume {
        location,
        format: VolumeFormat::Luks1,
        cipher: Some(cipher),
        mode: Some(mode),
        key_bits: Some(key_bytes * 8),
        payload,
        plaintext: vec![],
        uuid: ascii(h, 168, 40).filter(|u| !u.is_empty()),
        volume_size: None,
        volume,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cipher: &[u8], key_bytes: u32, payload: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..6].copy_from_slice(b"LUKS\xba\xbe");
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        h[8..8 + cipher.len()].copy_from_slice(cipher);
        h[40..43].copy_from_slice(b"xts");
        h[104..108].copy_from_slice(&payload.to_be_bytes());
        h[108..112].copy_from_slice(&key_bytes.to_be_bytes());
        h
    }

    #[test]
    fn damaged_fields_are_problems() {
        let mut problems = vec![];
        let cases: [(&[u8], u32, u32); 4] = [
            (b"aes", 32, 8),
            (b"a\x07s", 32, 8),
            (b"aes", 0, 8),
            (b"aes", 32, 1 << 20),
        ];
        let found: Vec<bool> = cases
            .iter()
            .map(|(c, k, p)| {
                parse(
                    &header(c, *k, *p),
                    Location::Disk,
                    0..1 << 20,
                    &mut problems,
                )
                .is_some()
            })
            .collect();
        assert_eq!(found, [true, false, false, false]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[2].message.contains("past the volume end"));
    }
}
