//! The qcow2 header (versions 2 and 3) and the header extensions this reader uses.
//!
//! The header sits at offset 0 and, with its extensions, within the first cluster:
//! fixed fields (72 bytes in v2; v3 adds feature bitmasks, `header_length` and optional fields
//! such as `compression_type`), then extensions (type u32, length u32, data padded to 8) up to
//! a type-0 terminator, then (optionally) the backing file name. Parsing is pure: it takes the
//! bytes read from the start of the file and the file's size, and checks every offset and
//! count against both, so a damaged header is an error naming the field, never a panic.
//!
//! Feature policy (incompatible bits must be understood to read an image at all):
//! dirty (bit 0) is accepted — only refcounts may be stale, and they are never read here;
//! corrupt (bit 1) is refused as [`ErrorKind::Integrity`]; external data file (bit 2) and
//! any unknown bit are [`ErrorKind::Unsupported`]; compression type (bit 3) selects zstd;
//! extended L2 entries (bit 4) switch the L2 entry layout to subclusters.

use super::be::Fields;
use super::tables::Geometry;
use super::{integrity, unsupported};
use crate::error::{Error, ErrorKind, Result};

/// The magic every qcow2 image starts with.
pub(super) const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Largest cluster QEMU reads: 2 MiB.
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
const MIN_CLUSTER_BITS: u32 = 9;
/// QEMU's limit on the active L1 table; also bounds what opening an image allocates.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_BACKING_NAME: usize = 1023;
const V2_HEADER_LEN: usize = 72;
/// QEMU counts the virtual disk in sectors of this size, dropping a partial last one.
const SECTOR: u64 = 512;
const V3_MIN_HEADER_LEN: usize = 104;
/// QEMU's limits on the bitmap directory: at most 65535 bitmaps of at most 1 KiB each.
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;
const BITMAP_ENTRY_MIN: u64 = 24;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const FEATURE_NAME_ENTRY: usize = 48;
const BITMAPS_EXT_LEN: usize = 24;

/// How compressed clusters are compressed (one method per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    /// Raw deflate (no zlib header), QEMU's default.
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

/// Where the bitmap directory is, from the bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BitmapDirectory {
    /// Number of entries.
    pub count: u32,
    /// Bytes, all entries included.
    pub size: u64,
    /// File offset (cluster-aligned, within the file).
    pub offset: u64,
}

/// What the image says about persistent bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bitmaps {
    /// No bitmaps extension.
    None,
    /// The extension exists but its autoclear bit is clear: a program without bitmap
    /// support wrote the image, so no bitmap in it can be trusted.
    Inconsistent,
    /// Bitmaps to read.
    Directory(BitmapDirectory),
}

/// The parsed header: what reading the image needs.
#[derive(Debug)]
pub(super) struct Header {
    /// Cluster size, L2 entry layout and file size.
    pub geo: Geometry,
    /// Virtual disk size in bytes: the header's `size` rounded down to whole 512-byte
    /// sectors, as QEMU reads it (the guest never sees a partial last sector, and
    /// `qemu-img convert` writes none).
    pub size: u64,
    /// File offset of the active L1 table (cluster-aligned; its entries that map `size` lie
    /// within the file).
    pub l1_offset: u64,
    /// The compression of compressed clusters.
    pub compression: Compression,
    /// The backing file name as stored (not NUL-terminated; relative to the image's folder).
    pub backing_file: Option<Vec<u8>>,
    /// The backing file's format, from the backing format extension.
    pub backing_format: Option<String>,
    /// Persistent dirty bitmaps.
    pub bitmaps: Bitmaps,
}

/// Extensions collected while walking the extension area.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    /// (feature type, bit, name) from the feature name table, for messages.
    feature_names: Vec<(u8, u8, String)>,
    /// The bitmaps extension, unvalidated: (file offset of its data, data).
    bitmaps: Option<(usize, [u8; BITMAPS_EXT_LEN])>,
}

/// Parse the header of `image` from `first` (the first bytes of the file, at least one
/// cluster or the whole file if shorter) and the file's size.
///
/// Errors: no magic -> [`ErrorKind::Usage`]; an unknown version, encryption, an external
/// data file, an unknown compression type or incompatible feature ->
/// [`ErrorKind::Unsupported`]; anything out of bounds or contradictory ->
/// [`ErrorKind::Integrity`].
pub(super) fn parse(image: &str, first: &[u8], file_size: u64) -> Result<Header> {
    if first.get(..MAGIC.len()) != Some(&MAGIC[..]) {
        return Err(Error::usage(format!(
            "{image} is not a qcow2 image (it does not start with QFI\\xfb)"
        )));
    }
    let f = Fields {
        bytes: first,
        base: 0,
        image,
        what: "header",
    };
    let version = f.u32(4, "version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("qcow2 image {image}: version {version} is not supported (only 2 and 3)"),
        ));
    }
    let backing_offset = f.u64(8, "backing_file_offset")?;
    let backing_len = f.u32(16, "backing_file_size")?;
    let cluster_bits = f.u32(20, "cluster_bits")?;
    let size = f.u64(24, "size")?;
    let crypt_method = f.u32(32, "crypt_method")?;
    let l1_entries = f.u32(36, "l1_size")?;
    let l1_offset = f.u64(40, "l1_table_offset")?;
    let (incompatible, autoclear, header_len) = if version == 2 {
        (0, 0, V2_HEADER_LEN)
    } else {
        (
            f.u64(72, "incompatible_features")?,
            f.u64(88, "autoclear_features")?,
            f.u32(100, "header_length")? as usize,
        )
    };

    if cluster_bits < MIN_CLUSTER_BITS {
        return Err(f.error(
            20,
            "cluster_bits",
            format_args!("{cluster_bits} is below 9"),
        ));
    }
    if cluster_bits > MAX_CLUSTER_BITS {
        return Err(unsupported(
            image,
            format_args!("clusters of 2^{cluster_bits} bytes (QEMU's limit is 2 MiB)"),
        ));
    }
    let cluster_size = 1usize << cluster_bits;
    match crypt_method {
        0 => {}
        1 => return Err(unsupported(image, "AES encryption (crypt_method 1)")),
        2 => return Err(unsupported(image, "LUKS encryption (crypt_method 2)")),
        other => return Err(unsupported(image, format_args!("crypt_method {other}"))),
    }
    if version == 3
        && (header_len < V3_MIN_HEADER_LEN || header_len % 8 != 0 || header_len > cluster_size)
    {
        return Err(f.error(
            100,
            "header_length",
            format_args!(
                "{header_len} is not a multiple of 8 between {V3_MIN_HEADER_LEN} and the cluster size {cluster_size}"
            ),
        ));
    }

    // Extensions end where the backing file name starts, or at the end of the first cluster.
    let mut ext_end = cluster_size.min(first.len());
    if backing_offset != 0 {
        ext_end = ext_end.min(usize::try_from(backing_offset).unwrap_or(usize::MAX));
    }
    let ext = extensions(image, first, header_len, ext_end)?;

    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let bit = unknown.trailing_zeros();
        let name = ext
            .feature_names
            .iter()
            .find(|(kind, b, _)| *kind == 0 && u32::from(*b) == bit)
            .map(|(_, _, name)| format!(" \"{name}\""))
            .unwrap_or_default();
        return Err(unsupported(
            image,
            format_args!("incompatible feature bit {bit}{name}"),
        ));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(integrity(
            image,
            "QEMU marked the image corrupt (incompatible feature bit 1): its metadata may be \
             inconsistent; check and repair it with `qemu-img check -r all` first",
        ));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(unsupported(
            image,
            "external data file (incompatible feature bit 2)",
        ));
    }
    let compression = compression(&f, incompatible, header_len)?;
    let extended_l2 = incompatible & INCOMPAT_EXTENDED_L2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(f.error(
            20,
            "cluster_bits",
            format_args!("{cluster_bits} is below 14, the minimum with extended L2 entries"),
        ));
    }

    let geo = Geometry {
        cluster_bits,
        extended_l2,
        file_size,
    };
    check_l1(&f, &geo, size, l1_entries, l1_offset)?;
    let backing_file = backing_name(&f, backing_offset, backing_len, cluster_size)?;
    let bitmaps = match ext.bitmaps {
        None => Bitmaps::None,
        Some(_) if autoclear & AUTOCLEAR_BITMAPS == 0 => Bitmaps::Inconsistent,
        Some((at, data)) => Bitmaps::Directory(bitmap_directory(
            image,
            at,
            &data,
            cluster_size as u64,
            file_size,
        )?),
    };
    Ok(Header {
        geo,
        size: size - size % SECTOR,
        l1_offset,
        compression,
        backing_file,
        backing_format: ext.backing_format,
        bitmaps,
    })
}

/// Walk the extension area `[start, end)` of `first`.
fn extensions(image: &str, first: &[u8], start: usize, end: usize) -> Result<Extensions> {
    let area = Fields {
        bytes: first.get(..end).unwrap_or(first),
        base: 0,
        image,
        what: "header extension area",
    };
    let mut ext = Extensions::default();
    let mut pos = start;
    while pos < end {
        let kind = area.u32(pos, "extension type")?;
        if kind == EXT_END {
            break;
        }
        let len = area.u32(pos + 4, "extension length")? as usize;
        let data = area.bytes(pos + 8, len, "extension data")?;
        match kind {
            EXT_BACKING_FORMAT => {
                ext.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_NAMES => {
                ext.feature_names = data
                    .chunks_exact(FEATURE_NAME_ENTRY)
                    .filter_map(|e| match e {
                        [kind, bit, name @ ..] => {
                            let name = name.split(|&b| b == 0).next().unwrap_or_default();
                            Some((*kind, *bit, String::from_utf8_lossy(name).into_owned()))
                        }
                        _ => None,
                    })
                    .collect();
            }
            EXT_BITMAPS => {
                let data: [u8; BITMAPS_EXT_LEN] = data.try_into().map_err(|_| {
                    area.error(
                        pos + 4,
                        "bitmaps extension length",
                        format_args!("{len}, not {BITMAPS_EXT_LEN}"),
                    )
                })?;
                ext.bitmaps = Some((pos + 8, data));
            }
            // Unknown extensions can be ignored; the full disk encryption pointer and the
            // external data file name only matter with features refused elsewhere.
            _ => {}
        }
        // `len` fits in the area, so this cannot overflow.
        pos += 8 + len.next_multiple_of(8);
    }
    Ok(ext)
}

/// The compression type: zlib unless incompatible bit 3 says the optional header field at
/// byte 104 names another.
fn compression(f: &Fields, incompatible: u64, header_len: usize) -> Result<Compression> {
    let field = if header_len > 104 {
        f.u8(104, "compression_type")?
    } else {
        0
    };
    match (incompatible & INCOMPAT_COMPRESSION != 0, field) {
        (false, 0) => Ok(Compression::Zlib),
        (false, t) => Err(f.error(
            104,
            "compression_type",
            format_args!("{t} without incompatible feature bit 3"),
        )),
        (true, 0) => Err(f.error(
            104,
            "compression_type",
            "zlib (0) or missing, but incompatible feature bit 3 says it is not zlib",
        )),
        (true, 1) => Ok(Compression::Zstd),
        (true, t) => Err(unsupported(
            f.image,
            format_args!("compression type {t} (only zlib and zstd are read)"),
        )),
    }
}

/// Check the active L1 table: it covers the virtual size, fits QEMU's limit and the file.
fn check_l1(f: &Fields, geo: &Geometry, size: u64, entries: u32, offset: u64) -> Result<()> {
    let needed = geo.l1_entries_for(size);
    if u64::from(entries) < needed {
        return Err(f.error(
            36,
            "l1_size",
            format_args!("{entries} entries cannot map the virtual size {size} ({needed} needed)"),
        ));
    }
    let bytes = u64::from(entries) * 8;
    if bytes > MAX_L1_BYTES {
        return Err(unsupported(
            f.image,
            format_args!("an L1 table of {entries} entries (QEMU's limit is 32 MiB)"),
        ));
    }
    if entries > 0 && !offset.is_multiple_of(geo.cluster_size()) {
        return Err(f.error(
            40,
            "l1_table_offset",
            format_args!("{offset} is not cluster-aligned"),
        ));
    }
    if entries > 0
        && offset
            .checked_add(bytes)
            .is_none_or(|end| end > geo.file_size)
    {
        return Err(f.error(
            40,
            "l1_table_offset",
            format_args!(
                "the L1 table at {offset} ({bytes} bytes) ends past the end of the file ({} bytes)",
                geo.file_size
            ),
        ));
    }
    Ok(())
}

/// The backing file name, which QEMU keeps within the first cluster.
fn backing_name(f: &Fields, offset: u64, len: u32, cluster_size: usize) -> Result<Option<Vec<u8>>> {
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    let len = len as usize;
    if len > MAX_BACKING_NAME {
        return Err(f.error(
            16,
            "backing_file_size",
            format_args!("{len} is over {MAX_BACKING_NAME} bytes"),
        ));
    }
    let start = usize::try_from(offset)
        .ok()
        .filter(|&o| o + len <= cluster_size)
        .ok_or_else(|| {
            f.error(
                8,
                "backing_file_offset",
                format_args!("the {len}-byte name at {offset} does not fit in the first cluster"),
            )
        })?;
    Ok(Some(f.bytes(start, len, "backing file name")?.to_vec()))
}

/// Validate the bitmaps extension (at file offset `at`) of a consistent image.
fn bitmap_directory(
    image: &str,
    at: usize,
    data: &[u8; BITMAPS_EXT_LEN],
    cluster_size: u64,
    file_size: u64,
) -> Result<BitmapDirectory> {
    let f = Fields {
        bytes: data,
        base: at as u64,
        image,
        what: "bitmaps extension",
    };
    let count = f.u32(0, "nb_bitmaps")?;
    let reserved = f.u32(4, "reserved")?;
    let size = f.u64(8, "bitmap_directory_size")?;
    let offset = f.u64(16, "bitmap_directory_offset")?;
    if count == 0 || count > MAX_BITMAPS {
        return Err(f.error(0, "nb_bitmaps", format_args!("{count} is not in 1..=65535")));
    }
    if reserved != 0 {
        return Err(f.error(4, "reserved", format_args!("{reserved:#x} is not zero")));
    }
    if size > MAX_BITMAP_DIRECTORY || size < u64::from(count) * BITMAP_ENTRY_MIN {
        return Err(f.error(
            8,
            "bitmap_directory_size",
            format_args!("{size} does not fit {count} entries within QEMU's 64 MiB limit"),
        ));
    }
    if offset % cluster_size != 0 || offset.saturating_add(size) > file_size {
        return Err(f.error(
            16,
            "bitmap_directory_offset",
            format_args!(
                "{offset} is not cluster-aligned or the directory ends past the end of the file ({file_size} bytes)"
            ),
        ));
    }
    Ok(BitmapDirectory {
        count,
        size,
        offset,
    })
}
