//! Disk layout detection (`blockvault::layout`) against images made by the real tools:
//! partition tables by `sfdisk` (util-linux, Debian package fdisk), 4 KiB-sector tables by
//! `sfdisk` on a loop device with 4096-byte logical sectors, LUKS1/LUKS2 by `cryptsetup
//! luksFormat` (Debian package cryptsetup-bin). What the tools report (`sfdisk --json`,
//! `cryptsetup luksDump`) is the expected answer. BitLocker headers are built here from the
//! published format (libbde's "BitLocker Drive Encryption (BDE) format"), since no tool on
//! Linux writes them.
//!
//! A missing tool prints "SKIP <test>: <why>" and the test returns; under CI=true it fails.

mod common;

use blockvault::layout::{
    self, BitLockerVariant, CopyState, EncryptedVolume, GptCopy, Location, LuksCopy, MbrRole,
    PartitionTable, ScanOptions, VolumeFormat,
};
use common::layout_tools::*;
use common::tools::tools;
use common::MIB;
use serde_json::Value;
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Partition tables
// ---------------------------------------------------------------------------------------------

#[test]
fn mbr_with_logical_partitions() {
    let test = "mbr_with_logical_partitions";
    if !tools(test, &[SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "mbr.img", 64 * MIB);
    sfdisk(
        &img,
        "label: dos\nlabel-id: 0x12345678\n\
         start=2048, size=16384, type=83, bootable\n\
         start=18432, size=90112, type=5\n\
         start=20480, size=16384, type=82\n\
         start=38912, size=16384, type=7\n",
    );
    let layout = scan_file(&img);
    let PartitionTable::Mbr(t) = &layout.table else {
        panic!("{}", layout.render())
    };
    assert_eq!(t.sector_size, 512);
    assert_eq!(t.disk_signature, "0x12345678");
    assert_same_partitions(&layout, &sfdisk_json(&img));
    let roles: Vec<_> = t.partitions.iter().map(|p| p.mbr_role.unwrap()).collect();
    use MbrRole::*;
    assert_eq!(roles, [Primary, Extended, Logical, Logical]);
    assert_eq!(t.partitions[2].type_name.as_deref(), Some("Linux swap"));
    assert!(
        layout.volumes.is_empty() && layout.problems.is_empty(),
        "{layout:#?}"
    );
}

#[test]
fn gpt_both_copies_checked() {
    let test = "gpt_both_copies_checked";
    if !tools(test, &[SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "gpt.img", 64 * MIB);
    sfdisk(
        &img,
        "label: gpt\nlabel-id: 11111111-2222-3333-4444-555555555555\n\
         size=8MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\", \
         attrs=\"RequiredPartition\"\n\
         size=24MiB, type=CA7D7CCB-63ED-4C53-861C-1742536059CC, name=\"crypt root\"\n\
         size=8MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, attrs=\"LegacyBIOSBootable GUID:60,63\"\n",
    );
    let sf = sfdisk_json(&img);
    let layout = scan_file(&img);
    let PartitionTable::Gpt(t) = &layout.table else {
        panic!("{}", layout.render())
    };
    assert_eq!(t.sector_size, 512);
    assert_eq!(t.disk_guid, "11111111-2222-3333-4444-555555555555");
    assert_eq!(t.first_usable_byte, sf["firstlba"].as_u64().unwrap() * 512);
    assert_eq!(
        t.last_usable_byte,
        (sf["lastlba"].as_u64().unwrap() + 1) * 512 - 1
    );
    assert_eq!(
        (&t.primary, &t.backup, t.used),
        (&CopyState::Ok, &CopyState::Ok, GptCopy::Primary)
    );
    assert_same_partitions(&layout, &sf);
    assert_eq!(t.partitions[0].type_name.as_deref(), Some("EFI System"));
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
    let partitions = t.partitions.clone();

    // The backup header (the last sector) wiped: reported missing, partitions unchanged.
    let no_backup = copy(&img, dir.path(), "no-backup.img");
    put(&no_backup, 64 * MIB - 512, &[0u8; 512]);
    let l = scan_file(&no_backup);
    let PartitionTable::Gpt(t) = &l.table else {
        panic!()
    };
    assert_eq!(
        (&t.primary, &t.backup),
        (&CopyState::Ok, &CopyState::Missing)
    );
    assert_eq!(t.partitions, partitions);
    assert_eq!(l.problems[0].structure, "GPT backup header");
    assert_eq!(l.problems[0].offset, 64 * MIB - 512);

    // One byte of the backup header changed: its CRC fails.
    let bad_backup = copy(&img, dir.path(), "bad-backup.img");
    common::flip_byte(&bad_backup, 64 * MIB - 512 + 60);
    let l = scan_file(&bad_backup);
    let PartitionTable::Gpt(t) = &l.table else {
        panic!()
    };
    assert!(
        matches!(&t.backup, CopyState::Damaged(w) if w.contains("header CRC32")),
        "{t:?}"
    );

    // The primary header damaged: partitions come from the backup.
    let bad_primary = copy(&img, dir.path(), "bad-primary.img");
    common::flip_byte(&bad_primary, 512 + 60);
    let l = scan_file(&bad_primary);
    let PartitionTable::Gpt(t) = &l.table else {
        panic!()
    };
    assert!(
        matches!(&t.primary, CopyState::Damaged(w) if w.contains("header CRC32")),
        "{t:?}"
    );
    assert_eq!(t.used, GptCopy::Backup);
    assert_eq!(t.partitions, partitions);

    // The primary entry array damaged (partition 2's name): its CRC fails.
    let bad_entries = copy(&img, dir.path(), "bad-entries.img");
    common::flip_byte(&bad_entries, 1024 + 128 + 56);
    let l = scan_file(&bad_entries);
    let PartitionTable::Gpt(t) = &l.table else {
        panic!()
    };
    assert!(
        matches!(&t.primary, CopyState::Damaged(w) if w.contains("partition entry array CRC32")),
        "{t:?}"
    );
    assert_eq!((t.used, &t.partitions), (GptCopy::Backup, &partitions));
}

#[test]
fn gpt_and_mbr_on_4096_byte_sectors() {
    let test = "gpt_and_mbr_on_4096_byte_sectors";
    if !tools(test, &[SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "4kn.img", 64 * MIB);
    let Some(dev) = loop_4k(&img, test) else {
        return;
    };
    sfdisk(
        &dev.path,
        "label: gpt\nsize=8MiB, name=\"first\"\nsize=16MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n",
    );
    let sf = sfdisk_json(&dev.path);
    assert_eq!(sf["sectorsize"], 4096);
    // The scan reads the backing file, which says nothing about sectors: the GPT does.
    let layout = scan_file(&img);
    let PartitionTable::Gpt(t) = &layout.table else {
        panic!("{}", layout.render())
    };
    assert_eq!(t.sector_size, 4096);
    assert_eq!((&t.primary, &t.backup), (&CopyState::Ok, &CopyState::Ok));
    assert_same_partitions(&layout, &sf);

    // An MBR does not record its sector size: the device's (BLKSSZGET) is passed in.
    sfdisk(
        &dev.path,
        "label: dos\nstart=256, size=2048, type=83\nstart=2304, size=4096, type=5\n\
         start=2560, size=1024, type=8e\n",
    );
    let sf = sfdisk_json(&dev.path);
    let layout = scan_file_with(
        &img,
        &ScanOptions {
            mbr_sector_size: Some(4096),
        },
    );
    let PartitionTable::Mbr(t) = &layout.table else {
        panic!("{}", layout.render())
    };
    assert_eq!(t.sector_size, 4096);
    assert_same_partitions(&layout, &sf);
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
}

// ---------------------------------------------------------------------------------------------
// LUKS
// ---------------------------------------------------------------------------------------------

#[test]
fn luks1_on_a_whole_file() {
    let test = "luks1_on_a_whole_file";
    if !tools(test, &[CRYPTSETUP]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, extra, cipher, mode, bits) in [
        ("xts.img", &[][..], "aes", "xts-plain64", 512),
        (
            "cbc.img",
            &["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"][..],
            "aes",
            "cbc-essiv:sha256",
            256,
        ),
    ] {
        let mut args = vec!["--type", "luks1"];
        args.extend_from_slice(extra);
        let img = luks_format(dir.path(), name, 4 * MIB, &args);
        let dump = run("cryptsetup", &["luksDump", img.to_str().unwrap()], "");
        let layout = scan_file(&img);
        assert_eq!(layout.table, PartitionTable::None);
        let v = only_volume(&layout);
        assert_eq!(v.format, VolumeFormat::Luks1);
        assert_eq!(v.location, Location::Disk);
        assert_eq!(v.volume, 0..4 * MIB);
        assert_eq!(v.cipher.as_deref(), Some(cipher));
        assert_eq!(dump_field(&dump, "Cipher name:"), cipher);
        assert_eq!(v.mode.as_deref(), Some(mode));
        assert_eq!(dump_field(&dump, "Cipher mode:"), mode);
        assert_eq!(v.key_bits, Some(bits));
        assert_eq!(dump_field(&dump, "MK bits:"), bits.to_string());
        let payload_sectors: u64 = dump_field(&dump, "Payload offset:").parse().unwrap();
        assert_eq!(v.payload, Some(payload_sectors * 512..4 * MIB));
        assert_eq!(v.uuid.as_deref(), Some(dump_field(&dump, "UUID:").as_str()));
        assert_eq!(
            layout.ciphertext_ranges(),
            vec![payload_sectors * 512..4 * MIB]
        );
        assert!(layout.problems.is_empty(), "{:?}", layout.problems);
    }
}

/// Check a LUKS2 volume at `start..end` of a disk against `cryptsetup luksDump` of the file
/// it was formatted in.
fn assert_matches_dump(v: &EncryptedVolume, luks_file: &Path, start: u64, end: u64) {
    let path = luks_file.to_str().unwrap();
    let meta: Value = serde_json::from_str(&run(
        "cryptsetup",
        &["luksDump", "--dump-json-metadata", path],
        "",
    ))
    .unwrap();
    let segment = &meta["segments"]["0"];
    let offset: u64 = segment["offset"].as_str().unwrap().parse().unwrap();
    assert_eq!(segment["size"], "dynamic");
    assert_eq!(v.volume, start..end);
    assert_eq!(v.payload, Some(start + offset..end));
    let (cipher, mode) = segment["encryption"]
        .as_str()
        .unwrap()
        .split_once('-')
        .unwrap();
    assert_eq!(
        (v.cipher.as_deref(), v.mode.as_deref()),
        (Some(cipher), Some(mode))
    );
    let key_size = meta["keyslots"]["0"]["key_size"].as_u64().unwrap() as u32;
    assert_eq!(v.key_bits, Some(key_size * 8));
    let uuid = run("cryptsetup", &["luksUUID", path], "");
    assert_eq!(v.uuid.as_deref(), Some(uuid.trim()));
}

#[test]
fn luks2_in_a_gpt_partition() {
    let test = "luks2_in_a_gpt_partition";
    if !tools(test, &[CRYPTSETUP, SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let luks = luks_format(dir.path(), "luks2.img", 24 * MIB, &["--type", "luks2"]);
    let img = image(dir.path(), "disk.img", 64 * MIB);
    sfdisk(
        &img,
        "label: gpt\nsize=8MiB\nsize=24MiB, type=CA7D7CCB-63ED-4C53-861C-1742536059CC\nsize=8MiB\n",
    );
    let sf = sfdisk_json(&img);
    let start = sf["partitions"][1]["start"].as_u64().unwrap() * 512;
    let end = start + 24 * MIB;
    dd(&luks, &img, start);

    let layout = scan_file(&img);
    assert_same_partitions(&layout, &sf);
    let v = only_volume(&layout);
    assert_eq!(v.location, Location::Partition { index: 2 });
    assert_matches_dump(v, &luks, start, end);
    let h = luks2_headers(v);
    assert_eq!(h.header_size, 16384);
    assert_eq!(
        (&h.primary.state, &h.secondary.state),
        (&CopyState::Ok, &CopyState::Ok)
    );
    assert_eq!(
        (h.primary.offset, h.secondary.offset),
        (start, start + 16384)
    );
    assert_eq!(h.primary.seqid, h.secondary.seqid);
    assert_eq!(h.used, LuksCopy::Primary);
    assert_eq!(layout.ciphertext_ranges(), vec![v.payload.clone().unwrap()]);
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);

    let text = layout.render();
    for needle in [
        "GPT, 512-byte sectors",
        "partition 2",
        "LUKS2",
        "xts-plain64",
        "Linux LUKS",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
}

#[test]
fn luks2_damaged_primary_found_through_the_secondary() {
    let test = "luks2_damaged_primary_found_through_the_secondary";
    if !tools(test, &[CRYPTSETUP]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A non-default header size, so the secondary is at 64 KiB, and another cipher.
    let luks = luks_format(
        dir.path(),
        "luks2.img",
        20 * MIB,
        &[
            "--type",
            "luks2",
            "--luks2-metadata-size",
            "64k",
            "--cipher",
            "aes-cbc-essiv:sha256",
            "--key-size",
            "256",
        ],
    );
    let layout = scan_file(&luks);
    let v = only_volume(&layout);
    assert_matches_dump(v, &luks, 0, 20 * MIB);
    assert_eq!(luks2_headers(v).secondary.offset, 64 << 10);

    // One byte of the primary's JSON area changed: its checksum fails, the secondary is used.
    let json_damaged = copy(&luks, dir.path(), "json-damaged.img");
    common::flip_byte(&json_damaged, 4096 + 20);
    let layout = scan_file(&json_damaged);
    let v = only_volume(&layout);
    assert_matches_dump(v, &luks, 0, 20 * MIB);
    let h = luks2_headers(v);
    assert!(
        matches!(&h.primary.state, CopyState::Damaged(w) if w.contains("sha256 checksum")),
        "{h:?}"
    );
    assert_eq!(
        (&h.secondary.state, h.used),
        (&CopyState::Ok, LuksCopy::Secondary)
    );
    assert_eq!(layout.problems.len(), 1, "{:?}", layout.problems);
    assert_eq!(layout.problems[0].structure, "LUKS2 primary header");

    // The whole primary binary header wiped: its size is unknown, the secondary is found by
    // trying every legal offset.
    let wiped = copy(&luks, dir.path(), "wiped.img");
    put(&wiped, 0, &[0u8; 4096]);
    let layout = scan_file(&wiped);
    assert_eq!(layout.table, PartitionTable::None);
    let v = only_volume(&layout);
    assert_matches_dump(v, &luks, 0, 20 * MIB);
    let h = luks2_headers(v);
    assert_eq!(
        (&h.primary.state, h.primary.seqid),
        (&CopyState::Missing, None)
    );
    assert_eq!(
        (h.secondary.offset, h.used),
        (64 << 10, LuksCopy::Secondary)
    );
    assert_eq!(h.header_size, 64 << 10);
    // cryptsetup agrees that the volume is still there.
    let dump = run("cryptsetup", &["luksDump", wiped.to_str().unwrap()], "");
    assert_eq!(dump_field(&dump, "UUID:"), v.uuid.clone().unwrap());

    // Both copies damaged: no volume, a problem naming both.
    let both = copy(&json_damaged, dir.path(), "both.img");
    common::flip_byte(&both, (64 << 10) + 4096 + 20);
    let layout = scan_file(&both);
    assert!(layout.volumes.is_empty(), "{}", layout.render());
    let p = &layout.problems[0];
    assert_eq!((p.structure.as_str(), p.offset), ("LUKS2 header", 0));
    assert!(p.message.contains("no valid header copy"), "{p:?}");
}

// ---------------------------------------------------------------------------------------------
// BitLocker, built from the published format
// ---------------------------------------------------------------------------------------------

/// Write a BitLocker volume of `variant` into `img` at `start` (`len` bytes, the last MiB
/// not yet encrypted); its FVE block offsets.
fn write_bitlocker(
    img: &Path,
    start: u64,
    len: u64,
    variant: BitLockerVariant,
    method: u16,
    guid: &'static str,
) -> [u64; 3] {
    let bde = Bde {
        method,
        volume_guid: guid,
        encrypted_size: len - MIB,
        ..Bde::new(variant, len)
    };
    bde.write(img, start);
    bde.blocks
}

#[test]
fn bitlocker_variants_in_mbr_partitions() {
    let test = "bitlocker_variants_in_mbr_partitions";
    if !tools(test, &[SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "bitlocker.img", 32 * MIB);
    sfdisk(
        &img,
        "label: dos\nstart=2048, size=8192, type=7\nstart=10240, size=8192, type=7\n\
         start=18432, size=8192, type=c\nstart=26624, size=8192, type=83\n",
    );
    let sf = sfdisk_json(&img);
    let starts: Vec<u64> = (0..4)
        .map(|i| sf["partitions"][i]["start"].as_u64().unwrap() * 512)
        .collect();
    let len = 4 * MIB;
    let cases = [
        (
            BitLockerVariant::Vista,
            0x8000,
            "AES-128-CBC-diffuser",
            "cbc-elephant",
            128,
        ),
        (BitLockerVariant::Win7, 0x8004, "XTS-AES-128", "xts", 128),
        (BitLockerVariant::ToGo, 0x8003, "AES-256-CBC", "cbc", 256),
    ];
    let guids = [
        "0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9",
        "11223344-5566-7788-99AA-BBCCDDEEFF00",
        "DEADBEEF-0000-1111-2222-333344445555",
    ];
    let mut block_offsets = vec![];
    for (i, (variant, method, ..)) in cases.iter().enumerate() {
        block_offsets.push(write_bitlocker(
            &img, starts[i], len, *variant, *method, guids[i],
        ));
    }
    // Windows 7 volume: block 3 damaged. To Go volume: block 2 lists other offsets.
    put(&img, starts[1] + block_offsets[1][2], b"-FVE-XX-");
    put(
        &img,
        starts[2] + block_offsets[2][1] + 48,
        &7u64.to_le_bytes(),
    );

    let layout = scan_file(&img);
    assert_same_partitions(&layout, &sf);
    assert_eq!(layout.volumes.len(), 3, "{}", layout.render());
    for (i, v) in layout.volumes.iter().enumerate() {
        let (variant, method, name, mode, bits) = cases[i];
        let b = bitlocker_info(v);
        assert_eq!(
            v.location,
            Location::Partition {
                index: i as u32 + 1
            }
        );
        assert_eq!(v.volume, starts[i]..starts[i] + len);
        assert_eq!(
            (b.variant, b.method_code, b.method.as_str()),
            (variant, method, name)
        );
        assert_eq!(b.bytes_per_sector, 512);
        assert_eq!(v.cipher.as_deref(), Some("aes"));
        assert_eq!((v.mode.as_deref(), v.key_bits), (Some(mode), Some(bits)));
        assert_eq!(v.uuid.as_deref(), Some(guids[i]));
        let offsets: Vec<u64> = b.metadata_blocks.iter().map(|m| m.offset).collect();
        let want: Vec<u64> = block_offsets[i].iter().map(|o| starts[i] + o).collect();
        assert_eq!(offsets, want);
        // The first 16 sectors are plaintext: Vista's header and the 15 after it, or (v2)
        // the 16 "volume header sectors" the block header counts, encrypted elsewhere.
        let head = 16 * 512;
        if variant == BitLockerVariant::Vista {
            assert_eq!((b.encrypted_size, b.volume_header_offset), (None, None));
            assert_eq!(v.payload, Some(starts[i] + head..starts[i] + len));
            assert_eq!(v.volume_size, Some(len));
        } else {
            assert_eq!(b.encrypted_size, Some(len - MIB));
            assert_eq!(b.volume_header_size, Some(head));
            assert_eq!(v.payload, Some(starts[i] + head..starts[i] + len - MIB));
            assert_eq!(
                b.volume_header_offset,
                Some(starts[i] + block_offsets[i][2] + 65536)
            );
        }
    }
    let states = |i: usize| -> Vec<CopyState> {
        bitlocker_info(&layout.volumes[i])
            .metadata_blocks
            .iter()
            .map(|m| m.state.clone())
            .collect()
    };
    assert!(states(0).iter().all(|s| *s == CopyState::Ok));
    assert!(matches!(&states(1)[2], CopyState::Damaged(w) if w.contains("signature")));
    assert!(
        matches!(&states(2)[1], CopyState::Mismatch(_)),
        "{:?}",
        states(2)
    );
    assert_eq!(layout.volumes[2].volume_size, Some(len));
    assert_eq!(layout.problems.len(), 2, "{:?}", layout.problems);
    assert_eq!(
        layout.ciphertext_ranges(),
        vec![
            starts[0] + 8192..starts[0] + len,
            starts[1] + 8192..starts[1] + len - MIB,
            starts[2] + 8192..starts[2] + len - MIB
        ]
    );
    let text = layout.render();
    for needle in [
        "BitLocker (Vista) AES-128-CBC-diffuser",
        "To Go",
        "XTS-AES-128",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
}

#[test]
fn bitlocker_on_a_whole_disk_is_not_an_mbr() {
    // No tool involved: a volume header at byte 0 of an unpartitioned disk. Its `55 AA` and
    // boot-code bytes must not be taken for a partition table.
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "whole.img", 8 * MIB);
    write_bitlocker(
        &img,
        0,
        8 * MIB,
        BitLockerVariant::Win7,
        0x8005,
        BITLOCKER_ID,
    );
    // Boot code that happens to look like an active NTFS partition entry.
    put(
        &img,
        446,
        &[
            0x80, 1, 1, 0, 0x07, 0xfe, 0xff, 0xff, 0x3f, 0, 0, 0, 0, 0, 1, 0,
        ],
    );
    let layout = scan_file(&img);
    assert_eq!(layout.table, PartitionTable::None);
    let v = only_volume(&layout);
    assert_eq!(v.location, Location::Disk);
    assert_eq!(bitlocker_info(v).method, "XTS-AES-256");
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
}

#[test]
fn garbage_and_tiny_disks() {
    for size in [0u64, 1, 511, 512, 4096, 70_000] {
        let data = common::random_data(size, size as usize);
        let read = |off: u64, buf: &mut [u8]| -> blockvault::Result<()> {
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let layout = layout::scan(&read, size).unwrap();
        assert_eq!(layout.table, PartitionTable::None, "{size}");
        assert!(layout.volumes.is_empty());
    }
    let read = |_: u64, _: &mut [u8]| -> blockvault::Result<()> { Ok(()) };
    let e = layout::scan_with(
        &read,
        1 << 20,
        &ScanOptions {
            mbr_sector_size: Some(520),
        },
    )
    .unwrap_err();
    assert_eq!(e.kind(), blockvault::ErrorKind::Usage);
}
