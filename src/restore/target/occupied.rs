//! Whether a device or export holds data a restore would destroy, and what: the reason a
//! restore over it needs `--force`, as over a non-empty file.
//!
//! Checks, on the first and last MiB: any non-zero byte means data. What the data is comes
//! from the headers: a partition table or an encrypted volume ([`crate::layout`]), else a
//! filesystem's magic (ext2/3/4, XFS, btrfs, NTFS, FAT, swap), else just where the first
//! non-zero byte is. A device of zeros (new, or wiped with `blkdiscard -z`) is written
//! without asking.
//!
//! The bytes come from whatever the target holds, so this is a parser of untrusted input
//! (fuzzed by `fuzz/fuzz_targets/target_content.rs`): it never reads past the disk and never
//! panics.

use crate::error::{ErrorKind, Result};
use crate::layout::{self, PartitionTable, VolumeFormat};

/// How much of each end of the disk is looked at.
const LOOK: u64 = 1 << 20;

/// What the `size`-byte disk read by `read` holds, if anything: "an ext4 filesystem", "a GPT
/// partition table with 2 partitions", "non-zero bytes in its last MiB, the first at offset N".
pub fn holds_data(
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    size: u64,
) -> Result<Option<String>> {
    let head_len = size.min(LOOK);
    let mut head = vec![0u8; head_len as usize];
    read(0, &mut head)?;
    let tail_at = size - size.min(LOOK);
    let mut tail = vec![0u8; (size - tail_at) as usize];
    read(tail_at, &mut tail)?;
    let first = |b: &[u8]| b.iter().position(|&x| x != 0);
    let (head_at, tail_nonzero) = (first(&head), first(&tail));
    if head_at.is_none() && tail_nonzero.is_none() {
        return Ok(None);
    }
    if let Some(what) = headers(read, size, &head)? {
        return Ok(Some(what));
    }
    Ok(Some(match (head_at, tail_nonzero) {
        (Some(at), _) => format!("non-zero bytes in its first MiB, the first at offset {at}"),
        (None, Some(at)) => format!(
            "non-zero bytes in its last MiB, the first at offset {}",
            tail_at + at as u64
        ),
        (None, None) => unreachable!("checked above"),
    }))
}

/// A partition table, an encrypted volume or a filesystem recognised from its header.
fn headers(
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    size: u64,
    head: &[u8],
) -> Result<Option<String>> {
    let l = match layout::scan(read, size) {
        Ok(l) => l,
        // Structures too contorted to describe (past the scan's read budget) are still
        // data: the caller says where the first non-zero byte is instead.
        Err(e) if e.kind() == ErrorKind::Integrity => {
            return Ok(filesystem(head).map(str::to_owned))
        }
        Err(e) => return Err(e),
    };
    let table = |scheme: &str| {
        let n = l.table.partitions().len();
        let s = if n == 1 { "" } else { "s" };
        format!("a {scheme} partition table with {n} partition{s}")
    };
    match &l.table {
        PartitionTable::Mbr(_) => return Ok(Some(table("MBR"))),
        PartitionTable::Gpt(_) => return Ok(Some(table("GPT"))),
        PartitionTable::None => {}
    }
    if let Some(v) = l.volumes.first() {
        return Ok(Some(match v.format {
            VolumeFormat::Luks1 => "a LUKS1 volume".into(),
            VolumeFormat::Luks2(_) => "a LUKS2 volume".into(),
            VolumeFormat::BitLocker(_) => "a BitLocker volume".into(),
        }));
    }
    Ok(filesystem(head).map(str::to_owned))
}

/// The filesystem (or swap area) whose magic is in `head`, the disk's first bytes.
fn filesystem(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    let le32 = |offset: usize| {
        head.get(offset..offset + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    // ext2/3/4: superblock at 1024, s_magic 0xEF53 at +56; the features say which.
    if at(1024 + 56, &[0x53, 0xef]) {
        const COMPAT_HAS_JOURNAL: u32 = 0x4;
        const INCOMPAT_EXT4: u32 = 0x40 | 0x80 | 0x200; // extents, 64bit, flex_bg
        return Some(if le32(1024 + 0x60) & INCOMPAT_EXT4 != 0 {
            "an ext4 filesystem"
        } else if le32(1024 + 0x5c) & COMPAT_HAS_JOURNAL != 0 {
            "an ext3 filesystem"
        } else {
            "an ext2 filesystem"
        });
    }
    if at(0, b"XFSB") {
        return Some("an XFS filesystem");
    }
    if at(0x10040, b"_BHRfS_M") {
        return Some("a btrfs filesystem");
    }
    if at(3, b"NTFS    ") {
        return Some("an NTFS filesystem");
    }
    if at(510, &[0x55, 0xaa]) && (at(0x36, b"FAT1") || at(0x52, b"FAT32")) {
        return Some("a FAT filesystem");
    }
    // Swap: the signature ends the first page, whatever the page size was.
    [4096, 8192, 16384, 65536]
        .iter()
        .any(|page| at(page - 10, b"SWAPSPACE2") || at(page - 10, b"SWAP-SPACE"))
        .then_some("a swap area")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(img: &[u8]) -> Option<String> {
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        holds_data(&read, img.len() as u64).unwrap()
    }

    #[test]
    fn zeros_hold_nothing_and_stray_bytes_are_placed() {
        let mut img = vec![0u8; 4 << 20];
        assert_eq!(check(&img), None);
        assert_eq!(check(&[]), None);
        img[(4 << 20) - 5] = 1;
        assert_eq!(
            check(&img).unwrap(),
            format!(
                "non-zero bytes in its last MiB, the first at offset {}",
                (4 << 20) - 5
            )
        );
        // Bytes between the two ends are not looked at.
        img[(4 << 20) - 5] = 0;
        img[2 << 20] = 1;
        assert_eq!(check(&img), None);
        img[700] = 9;
        assert_eq!(
            check(&img).unwrap(),
            "non-zero bytes in its first MiB, the first at offset 700"
        );
        // A disk smaller than a MiB: both ends are the whole disk.
        assert!(check(&[0, 0, 3]).unwrap().contains("offset 2"));
    }

    #[test]
    fn filesystems_by_magic() {
        let mut img = vec![0u8; 2 << 20];
        img[1024 + 56..1024 + 58].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(check(&img).unwrap(), "an ext2 filesystem");
        img[1024 + 0x5c] = 0x4;
        assert_eq!(check(&img).unwrap(), "an ext3 filesystem");
        img[1024 + 0x60] = 0x40;
        assert_eq!(check(&img).unwrap(), "an ext4 filesystem");
        let mut x = vec![0u8; 2 << 20];
        x[..4].copy_from_slice(b"XFSB");
        assert_eq!(check(&x).unwrap(), "an XFS filesystem");
        let mut b = vec![0u8; 2 << 20];
        b[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(check(&b).unwrap(), "a btrfs filesystem");
        let mut s = vec![0u8; 2 << 20];
        s[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(check(&s).unwrap(), "a swap area");
    }
}
