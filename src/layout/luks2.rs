//! LUKS version 2: two copies of (4096-byte binary header + JSON area), each checksummed.
//!
//! ```text
//! volume start  primary:   "LUKS\xba\xbe" v2 | hdr_size | seqid | ... | csum ‖ JSON area
//! + hdr_size    secondary: "SKUL\xba\xbe" v2 | hdr_size | seqid | ... | csum ‖ JSON area
//! ```
//! `hdr_size` (binary header plus JSON area) is one of 16 KiB, 32 KiB, ... 4 MiB, which are
//! therefore also the only places a secondary can be. Each copy's checksum (algorithm named
//! in `csum_alg`, sha256 by default) is over its whole `hdr_size` bytes with the 64-byte
//! checksum field zeroed. A copy is used only if its checksum holds; of two, the one with the
//! higher sequence id (the primary on a tie), as cryptsetup does. When the primary is
//! invalid and no secondary lies where its `hdr_size` says (or it has none), every legal
//! secondary offset is tried.
//!
//! From the JSON: the data segments give the payload. A segment flagged `backup-*` is not
//! data: it describes the old, new or moved layout of a reencryption in progress. Of the
//! data segments, `crypt` ones hold ciphertext and `linear` ones plaintext: while
//! `cryptsetup reencrypt --encrypt` runs (or after it was interrupted) the volume is part
//! plaintext, and right after `--init-only` all of it, so the payload is the extent of the
//! `crypt` data segments (empty if there are none) and the `linear` ones inside it are
//! listed as plaintext. A re-keying reencryption has only `crypt` data segments (old key
//! and new): all ciphertext. The cipher comes from the first `crypt` data segment (else the
//! `backup-final` one: the cipher being moved to), the volume key size from a keyslot its
//! digest names (never the 1-byte `reencrypt` keyslot).

use super::disk::{ascii, be16, be64, field, Disk};
use super::model::{
    CopyState, EncryptedVolume, Location, Luks2Copy, Luks2Headers, LuksCopy, Problem, VolumeFormat,
};
use crate::error::Result;
use ring::digest;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;

/// Magic of the primary copy (also LUKS1's).
pub const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
/// Magic of the secondary copy.
pub const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
/// Size of the binary header that precedes the JSON area.
pub const BINARY_LEN: u64 = 4096;
/// The legal `hdr_size` values, hence the legal secondary offsets: 16 KiB to 4 MiB.
pub const HEADER_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];
/// Where the checksum field lies in the binary header.
const CSUM: Range<usize> = 448..512;

/// The parts of the JSON metadata used here; everything else is ignored.
#[derive(Debug, Deserialize)]
struct Metadata {
    #[serde(default)]
    keyslots: BTreeMap<String, Keyslot>,
    segments: BTreeMap<String, Segment>,
    #[serde(default)]
    digests: BTreeMap<String, Digest>,
}

#[derive(Debug, Deserialize)]
struct Keyslot {
    #[serde(rename = "type", default)]
    kind: String,
    key_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct Segment {
    #[serde(rename = "type")]
    kind: String,
    offset: String,
    size: String,
    encryption: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
}

impl Segment {
    /// Whether the segment maps the volume's data (rather than describing a reencryption's
    /// old, new or moved layout).
    fn is_data(&self) -> bool {
        !self.flags.iter().any(|f| f.starts_with("backup-"))
    }
}

/// A digest: which keyslots hold the key that which segments are encrypted with.
#[derive(Debug, Deserialize)]
struct Digest {
    #[serde(default)]
    keyslots: Vec<String>,
    #[serde(default)]
    segments: Vec<String>,
}

/// A copy whose checksum and fields hold.
#[derive(Debug)]
struct Valid {
    seqid: u64,
    hdr_size: u64,
    uuid: Option<String>,
    meta: Metadata,
}

/// One copy as read from the disk.
#[derive(Debug)]
enum Copy {
    Missing,
    Damaged {
        why: String,
        seqid: Option<u64>,
        hdr_size: Option<u64>,
    },
    Valid(Valid),
}

impl Copy {
    fn hdr_size(&self) -> Option<u64> {
        match self {
            Copy::Missing => None,
            Copy::Damaged { hdr_size, .. } => *hdr_size,
            Copy::Valid(v) => Some(v.hdr_size),
        }
    }
    fn seqid(&self) -> Option<u64> {
        match self {
            Copy::Missing => None,
            Copy::Damaged { seqid, .. } => *seqid,
            Copy::Valid(v) => Some(v.seqid),
        }
    }
    fn state(&self) -> CopyState {
        match self {
            Copy::Missing => CopyState::Missing,
            Copy::Damaged { why, .. } => CopyState::Damaged(why.clone()),
            Copy::Valid(_) => CopyState::Ok,
        }
    }
}

fn checksum_algorithm(name: &str) -> Option<&'static digest::Algorithm> {
    Some(match name {
        "sha1" => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        "sha256" => &digest::SHA256,
        "sha384" => &digest::SHA384,
        "sha512" => &digest::SHA512,
        _ => return None,
    })
}

/// Read and check the copy that should be at `rel` bytes into `volume` (never reading past
/// the volume's end: what lies there belongs to the next partition).
fn read_copy(disk: &Disk, volume: &Range<u64>, rel: u64, magic: &[u8; 6]) -> Result<Copy> {
    let len = volume.end.saturating_sub(volume.start);
    if rel.saturating_add(BINARY_LEN) > len {
        return Ok(Copy::Missing);
    }
    let at = volume.start + rel;
    let Some(mut bin) = disk.bytes(at, BINARY_LEN as usize, "LUKS2 binary header")? else {
        return Ok(Copy::Missing);
    };
    if field(&bin, 0, 6) != magic {
        return Ok(Copy::Missing);
    }
    let seqid = Some(be64(&bin, 16));
    let size = be64(&bin, 8);
    let hdr_size = HEADER_SIZES.contains(&size).then_some(size);
    let damaged = |why: String| {
        Ok(Copy::Damaged {
            why,
            seqid,
            hdr_size,
        })
    };
    let version = be16(&bin, 6);
    if version != 2 {
        return damaged(format!("version {version}, expected 2"));
    }
    let Some(hdr_size) = hdr_size else {
        return damaged(format!(
            "header size {size} is not a power of two in 16 KiB..4 MiB"
        ));
    };
    let hdr_offset = be64(&bin, 256);
    if hdr_offset != rel {
        return damaged(format!(
            "header says it is at offset {hdr_offset}, found at offset {rel}"
        ));
    }
    if rel + hdr_size > len {
        return damaged(format!("header size {hdr_size} runs past the volume end"));
    }
    let json_len = (hdr_size - BINARY_LEN) as usize;
    let Some(json) = disk.bytes(at + BINARY_LEN, json_len, "LUKS2 JSON area")? else {
        return damaged("the JSON area runs past the end of the disk".into());
    };
    let alg_name = ascii(&bin, 72, 32).unwrap_or_default();
    let Some(alg) = checksum_algorithm(&alg_name) else {
        return damaged(format!("checksum algorithm {alg_name:?} is not supported"));
    };
    let stored = field(&bin, CSUM.start, alg.output_len()).to_vec();
    bin[CSUM].fill(0);
    let mut ctx = digest::Context::new(alg);
    ctx.update(&bin);
    ctx.update(&json);
    if ctx.finish().as_ref() != stored.as_slice() {
        return damaged(format!("{alg_name} checksum does not match the header"));
    }
    let text = json.split(|&b| b == 0).next().unwrap_or(&[]);
    let meta: Metadata = match serde_json::from_slice(text) {
        Ok(m) => m,
        Err(e) => return damaged(format!("JSON area: {e}")),
    };
    Ok(Copy::Valid(Valid {
        seqid: be64(&bin, 16),
        hdr_size,
        uuid: ascii(&bin, 168, 40).filter(|u| !u.is_empty()),
        meta,
    }))
}

/// Look for a LUKS2 volume at the start of `volume`: its primary copy, or (when that is
/// gone) a secondary at any legal offset. `None` if neither copy has its magic.
pub fn probe(
    disk: &Disk,
    location: Location,
    volume: Range<u64>,
    problems: &mut Vec<Problem>,
) -> Result<Option<EncryptedVolume>> {
    let start = volume.start;
    let primary = read_copy(disk, &volume, 0, MAGIC_PRIMARY)?;
    let mut secondary = match primary.hdr_size() {
        Some(size) => (size, read_copy(disk, &volume, size, MAGIC_SECONDARY)?),
        None => (HEADER_SIZES[0], Copy::Missing),
    };
    // An invalid primary may name the wrong size (or none): then try every legal offset.
    if !matches!(primary, Copy::Valid(_)) && matches!(secondary.1, Copy::Missing) {
        for rel in HEADER_SIZES {
            let copy = read_copy(disk, &volume, rel, MAGIC_SECONDARY)?;
            if !matches!(copy, Copy::Missing) {
                secondary = (rel, copy);
                break;
            }
        }
    }
    let (secondary_rel, secondary) = secondary;
    if matches!((&primary, &secondary), (Copy::Missing, Copy::Missing)) {
        return Ok(None);
    }
    let mut primary_state = primary.state();
    let mut secondary_state = secondary.state();
    let (primary_seqid, secondary_seqid) = (primary.seqid(), secondary.seqid());
    let (used, valid) = match (primary, secondary) {
        (Copy::Valid(p), Copy::Valid(s)) => {
            if s.seqid > p.seqid {
                primary_state = older(p.seqid, s.seqid);
                (LuksCopy::Secondary, s)
            } else {
                if s.seqid < p.seqid {
                    secondary_state = older(s.seqid, p.seqid);
                }
                (LuksCopy::Primary, p)
            }
        }
        (Copy::Valid(p), _) => (LuksCopy::Primary, p),
        (_, Copy::Valid(s)) => (LuksCopy::Secondary, s),
        _ => {
            problems.push(Problem {
                structure: "LUKS2 header".into(),
                offset: start,
                message: format!(
                    "no valid header copy: primary {}, secondary at +{secondary_rel} {}",
                    describe(&primary_state),
                    describe(&secondary_state)
                ),
            });
            return Ok(None);
        }
    };
    for (what, rel, state) in [
        ("primary", 0, &primary_state),
        ("secondary", secondary_rel, &secondary_state),
    ] {
        if *state != CopyState::Ok {
            problems.push(Problem {
                structure: format!("LUKS2 {what} header"),
                offset: start + rel,
                message: describe(state),
            });
        }
    }
    let headers = Luks2Headers {
        header_size: valid.hdr_size,
        primary: Luks2Copy {
            offset: start,
            state: primary_state,
            seqid: primary_seqid,
        },
        secondary: Luks2Copy {
            offset: start + secondary_rel,
            state: secondary_state,
            seqid: secondary_seqid,
        },
        used,
    };
    Ok(Some(volume_from(
        valid, headers, location, volume, problems,
    )))
}

fn older(mine: u64, other: u64) -> CopyState {
    CopyState::Mismatch(format!(
        "sequence id {mine} is older than the other copy's {other}"
    ))
}

fn describe(state: &CopyState) -> String {
    match state {
        CopyState::Ok => "ok".into(),
        CopyState::Missing => "missing".into(),
        CopyState::Damaged(why) => format!("damaged: {why}"),
        CopyState::Mismatch(why) => format!("out of date: {why}"),
    }
}

/// Sort JSON object keys ("0", "1", "10") as the numbers they are.
fn by_id<T>(map: &BTreeMap<String, T>) -> Vec<(&str, &T)> {
    let mut items: Vec<(u64, &str, &T)> = map
        .iter()
        .map(|(k, v)| (k.parse().unwrap_or(u64::MAX), k.as_str(), v))
        .collect();
    items.sort_by_key(|(n, ..)| *n);
    items.into_iter().map(|(_, k, v)| (k, v)).collect()
}

/// The volume key size in bits of segment `id`: a keyslot that its digest names (by id),
/// else (no digests: a hand-made header) any keyslot; never a `reencrypt` keyslot, whose
/// 1-byte "key" is not the volume key.
fn key_bits(meta: &Metadata, id: &str) -> Option<u32> {
    let named: Vec<&String> = meta
        .digests
        .values()
        .filter(|d| d.segments.iter().any(|s| s == id))
        .flat_map(|d| &d.keyslots)
        .collect();
    by_id(&meta.keyslots)
        .into_iter()
        .filter(|(k, slot)| {
            slot.kind != "reencrypt" && (meta.digests.is_empty() || named.iter().any(|n| n == k))
        })
        .find_map(|(_, slot)| slot.key_size)
        .and_then(|bytes| bytes.checked_mul(8))
}

fn volume_from(
    valid: Valid,
    headers: Luks2Headers,
    location: Location,
    volume: Range<u64>,
    problems: &mut Vec<Problem>,
) -> EncryptedVolume {
    let mut problem = |message: String| {
        problems.push(Problem {
            structure: "LUKS2 segment".into(),
            offset: volume.start,
            message,
        })
    };
    let segments = by_id(&valid.meta.segments);
    let mut crypt: Vec<Range<u64>> = Vec::new();
    let mut linear: Vec<Range<u64>> = Vec::new();
    let mut fixed_end = Some(0u64);
    for (id, s) in segments.iter().filter(|(_, s)| s.is_data()) {
        let ranges = match s.kind.as_str() {
            "crypt" => &mut crypt,
            "linear" => &mut linear,
            other => {
                problem(format!(
                    "segment {id} has type {other:?}, neither crypt nor linear; ignored"
                ));
                continue;
            }
        };
        let offset = s.offset.parse::<u64>().ok();
        let size = match s.size.as_str() {
            "dynamic" => None,
            text => text.parse::<u64>().ok(),
        };
        let Some(first) = offset.and_then(|o| volume.start.checked_add(o)) else {
            problem(format!(
                "segment {id} offset {:?} is not a byte count",
                s.offset
            ));
            continue;
        };
        let end = match size {
            Some(size) => first.saturating_add(size),
            None if s.size == "dynamic" => volume.end,
            None => {
                problem(format!(
                    "segment {id} size {:?} is not a byte count",
                    s.size
                ));
                continue;
            }
        };
        fixed_end = fixed_end.zip(size).map(|(e, _)| e.max(end - volume.start));
        if end > volume.end || first > end {
            problem(format!(
                "segment {id} bytes {first}..{end} run past the volume end (byte {})",
                volume.end
            ));
        }
        let first = first.min(volume.end);
        ranges.push(first..end.clamp(first, volume.end));
    }
    let no_data = crypt.is_empty() && linear.is_empty();
    if no_data {
        problem("no crypt or linear data segment in the metadata".into());
    }
    let first_of = |ranges: &[Range<u64>]| ranges.iter().map(|r| r.start).min();
    let payload = match (first_of(&crypt), crypt.iter().map(|r| r.end).max()) {
        (Some(first), Some(end)) => Some(first..end),
        // Nothing encrypted yet: an empty payload where the data starts.
        _ => first_of(&linear).map(|at| at..at),
    };
    let mut plaintext: Vec<Range<u64>> = match &payload {
        Some(p) => linear
            .iter()
            .map(|r| r.start.max(p.start)..r.end.min(p.end))
            .filter(|r| r.start < r.end)
            .collect(),
        None => vec![],
    };
    plaintext.sort_by_key(|r| r.start);
    // The cipher of the data, else (nothing encrypted yet) of the layout being moved to.
    let cipher_segment = segments
        .iter()
        .find(|(_, s)| s.kind == "crypt" && s.is_data())
        .or_else(|| {
            segments
                .iter()
                .find(|(_, s)| s.kind == "crypt" && s.flags.iter().any(|f| f == "backup-final"))
        });
    let (cipher, mode) = match cipher_segment.and_then(|(_, s)| s.encryption.as_deref()) {
        Some(spec) => match spec.split_once('-') {
            Some((c, m)) => (Some(c.to_string()), Some(m.to_string())),
            None => (Some(spec.to_string()), None),
        },
        None => (None, None),
    };
    let key_bits = cipher_segment.and_then(|(id, _)| key_bits(&valid.meta, id));
    EncryptedVolume {
        location,
        format: VolumeFormat::Luks2(headers),
        cipher,
        mode,
        key_bits,
        payload,
        plaintext,
        uuid: valid.uuid,
        volume_size: fixed_end.filter(|_| !no_data),
        volume,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LUKS2 primary + secondary of 16 KiB each with `json`, checksummed with sha256.
    fn image(json: &str, fix_checksums: bool) -> Vec<u8> {
        let mut img = vec![0u8; 64 << 10];
        for (rel, magic) in [(0usize, MAGIC_PRIMARY), (16 << 10, MAGIC_SECONDARY)] {
            let h = &mut img[rel..rel + (16 << 10)];
            h[..6].copy_from_slice(magic);
            h[6..8].copy_from_slice(&2u16.to_be_bytes());
            h[8..16].copy_from_slice(&(16u64 << 10).to_be_bytes());
            h[16..24].copy_from_slice(&7u64.to_be_bytes());
            h[72..78].copy_from_slice(b"sha256");
            h[168..172].copy_from_slice(b"abcd");
            h[256..264].copy_from_slice(&(rel as u64).to_be_bytes());
            h[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
            if fix_checksums {
                let d = digest::digest(&digest::SHA256, h);
                h[448..480].copy_from_slice(d.as_ref());
            }
        }
        img
    }

    fn probe_image(img: &[u8]) -> (Option<EncryptedVolume>, Vec<Problem>) {
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let disk = Disk::new(&read, img.len() as u64);
        let mut problems = vec![];
        let v = probe(&disk, Location::Disk, 0..img.len() as u64, &mut problems).unwrap();
        (v, problems)
    }

    const JSON: &str = r#"{"keyslots":{"10":{"key_size":16},"2":{"key_size":32}},
        "segments":{"0":{"type":"crypt","offset":"32768","size":"dynamic",
        "encryption":"aes-cbc-essiv:sha256","sector_size":512}}}"#;

    #[test]
    fn a_valid_header_pair() {
        let (v, problems) = probe_image(&image(JSON, true));
        let v = v.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(v.cipher.as_deref(), Some("aes"));
        assert_eq!(v.mode.as_deref(), Some("cbc-essiv:sha256"));
        assert_eq!(v.key_bits, Some(256), "keyslot 2 comes before keyslot 10");
        assert_eq!(v.payload, Some(32768..65536));
        assert_eq!(v.uuid.as_deref(), Some("abcd"));
    }

    #[test]
    fn bad_checksums_and_json_are_reported() {
        let (v, problems) = probe_image(&image(JSON, false));
        assert!(v.is_none());
        assert!(
            problems[0].message.contains("sha256 checksum"),
            "{problems:?}"
        );

        let (v, problems) = probe_image(&image(r#"{"segments":[1,2]}"#, true));
        assert!(v.is_none());
        assert!(problems[0].message.contains("JSON area"), "{problems:?}");
    }

    #[test]
    fn a_primary_naming_the_wrong_size_does_not_hide_the_secondary() {
        let mut img = image(JSON, true);
        img[8..16].copy_from_slice(&(64u64 << 10).to_be_bytes()); // primary now fails its checksum
        let (v, problems) = probe_image(&img);
        let v = v.unwrap();
        let VolumeFormat::Luks2(h) = &v.format else {
            panic!()
        };
        assert_eq!(
            (h.used, h.secondary.offset),
            (LuksCopy::Secondary, 16 << 10)
        );
        assert!(matches!(&h.primary.state, CopyState::Damaged(_)), "{h:?}");
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn linear_segments_are_plaintext_and_backup_segments_no_data() {
        // A decryption half done around a plaintext middle: crypt, linear, crypt; and the
        // layouts a reencryption keeps on the side, which map no data.
        let json = r#"{"segments":{
            "0":{"type":"crypt","offset":"32768","size":"8192","encryption":"aes-xts-plain64"},
            "1":{"type":"linear","offset":"40960","size":"8192"},
            "2":{"type":"crypt","offset":"49152","size":"dynamic","encryption":"aes-xts-plain64"},
            "3":{"type":"linear","offset":"16384","size":"dynamic","flags":["backup-final"]},
            "4":{"type":"crypt","offset":"20000","size":"dynamic","encryption":"x-y",
                 "flags":["backup-previous"]}},
            "keyslots":{"0":{"type":"reencrypt","key_size":1},"1":{"type":"luks2","key_size":64}},
            "digests":{"0":{"keyslots":["1"],"segments":["0","2","4"]}}}"#;
        let (v, problems) = probe_image(&image(json, true));
        let v = v.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(v.payload, Some(32768..65536));
        assert_eq!(v.plaintext, vec![40960..49152]);
        assert_eq!(v.key_bits, Some(512));
        assert_eq!(v.cipher.as_deref(), Some("aes"));
    }

    #[test]
    fn segments_past_the_volume_end_are_clamped() {
        let json = r#"{"segments":{"0":{"type":"crypt","offset":"65000","size":"99999",
            "encryption":"serpent-xts-plain64"}},"keyslots":{}}"#;
        let (v, problems) = probe_image(&image(json, true));
        let v = v.unwrap();
        assert_eq!(v.payload, Some(65000..65536));
        assert_eq!(v.key_bits, None);
        assert!(
            problems[0].message.contains("past the volume end"),
            "{problems:?}"
        );
    }
}
