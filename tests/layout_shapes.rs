//! Layout detection on the shapes real tools and real volumes take, beyond `tests/layout.rs`:
//! LUKS headers in every `cryptsetup` variant that runs without device-mapper (sector sizes,
//! metadata and keyslot area sizes, data offsets, key management, tokens, a reencryption
//! initialised and one killed half-way), checked against `cryptsetup luksDump`; LUKS inside
//! partitions made by `parted` and `sgdisk` and on a loop device; BitLocker headers built
//! from libbde's format document in the states a conversion leaves (see
//! `common::layout_tools::Bde`); partition tables by `sgdisk` (256 entries, hybrid MBR,
//! a damaged primary), `sfdisk` (4 entries), `parted` (20 logical partitions; a 3 TiB disk).
//!
//! Not here, because they need device-mapper, which this machine's kernel lacks: LUKS2 with
//! `--integrity` (cryptsetup formats the dm-integrity superblock through dm), and serpent or
//! twofish (cryptsetup checks a cipher the kernel crypto API lacks through dm-crypt).
//!
//! A missing tool prints "SKIP <test>: <why>" and the test returns; under CI=true it fails.

mod common;

use blockvault::layout::VolumeFormat;
use blockvault::layout::{BitLockerVariant, CopyState, GptCopy, Layout, Location, PartitionTable};
use common::layout_tools::*;
use common::tools::tools;
use common::{Bv, MIB};
use serde_json::Value;
use std::ops::Range;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// sgdisk, for [`tools`].
const SGDISK: (&str, &str) = ("sgdisk", "gdisk");
/// parted, for [`tools`].
const PARTED: (&str, &str) = ("parted", "parted");

// ---------------------------------------------------------------------------------------------
// What cryptsetup says
// ---------------------------------------------------------------------------------------------

/// `cryptsetup luksDump --dump-json-metadata` (LUKS2 only).
fn luks2_json(path: &Path) -> Value {
    let out = run(
        "cryptsetup",
        &["luksDump", "--dump-json-metadata", path.to_str().unwrap()],
        "",
    );
    serde_json::from_str(&out).unwrap()
}

/// The payload `cryptsetup luksDump` (text) states, as bytes relative to the volume start:
/// LUKS1 "Payload offset" (512-byte sectors) to the end; LUKS2 the one data segment's
/// "offset: N [bytes]" and "length: N [bytes]" or "(whole device)".
fn dumped_payload(path: &Path, volume_len: u64) -> Range<u64> {
    let dump = run("cryptsetup", &["luksDump", path.to_str().unwrap()], "");
    if dump_field(&dump, "Version:") == "1" {
        let sectors: u64 = dump_field(&dump, "Payload offset:").parse().unwrap();
        return sectors * 512..volume_len;
    }
    let segments = dump.split("Data segments:").nth(1).unwrap();
    let bytes = |name: &str| -> Option<u64> {
        let v = dump_field(segments, name);
        v.strip_suffix(" [bytes]").map(|n| n.parse().unwrap())
    };
    let offset = bytes("\toffset:").unwrap();
    match bytes("\tlength:") {
        Some(len) => offset..offset + len,
        None => {
            assert_eq!(dump_field(segments, "\tlength:"), "(whole device)");
            offset..volume_len
        }
    }
}

/// The ciphertext cryptsetup's metadata describes, absolute: the `crypt` segments that map
/// data (not the `backup-*` ones describing a reencryption), merged.
fn dumped_ciphertext(meta: &Value, volume: Range<u64>) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = meta["segments"]
        .as_object()
        .unwrap()
        .values()
        .filter(|s| s["type"] == "crypt")
        .filter(|s| {
            !s["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f.as_str().unwrap().starts_with("backup-")))
        })
        .map(|s| {
            let start = volume.start + s["offset"].as_str().unwrap().parse::<u64>().unwrap();
            match s["size"].as_str().unwrap() {
                "dynamic" => start..volume.end,
                n => start..start + n.parse::<u64>().unwrap(),
            }
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = vec![];
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// The LUKS2 key size in bits of the keyslot `--key-slot N` made.
fn keyslot_bits(meta: &Value, slot: &str) -> u32 {
    meta["keyslots"][slot]["key_size"].as_u64().unwrap() as u32 * 8
}

fn json_seqid(path: &Path) -> u64 {
    let dump = run("cryptsetup", &["luksDump", path.to_str().unwrap()], "");
    dump_field(&dump, "Epoch:").parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// LUKS
// ---------------------------------------------------------------------------------------------

#[test]
fn luks_header_variants_match_luksdump() {
    let test = "luks_header_variants_match_luksdump";
    if !tools(test, &[CRYPTSETUP]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], u32); 9] = [
        (
            "l1-align",
            &["--type", "luks1", "--align-payload", "8192"],
            512,
        ),
        (
            "l1-essiv",
            &[
                "--type",
                "luks1",
                "--cipher",
                "aes-cbc-essiv:sha256",
                "--key-size",
                "256",
            ],
            256,
        ),
        ("l1-xts256", &["--type", "luks1", "--key-size", "256"], 256),
        ("l2-512", &["--type", "luks2", "--sector-size", "512"], 512),
        (
            "l2-4096",
            &["--type", "luks2", "--sector-size", "4096"],
            512,
        ),
        (
            "l2-areas",
            &[
                "--type",
                "luks2",
                "--luks2-metadata-size",
                "256k",
                "--luks2-keyslots-size",
                "2m",
            ],
            512,
        ),
        ("l2-offset", &["--type", "luks2", "--offset", "24576"], 512),
        (
            "l2-align",
            &["--type", "luks2", "--align-payload", "4096"],
            512,
        ),
        (
            "l2-cbc",
            &[
                "--type",
                "luks2",
                "--cipher",
                "aes-cbc-essiv:sha256",
                "--key-size",
                "256",
            ],
            256,
        ),
    ];
    let len = 24 * MIB;
    for (name, args, bits) in cases {
        let img = luks_format(dir.path(), name, len, args);
        let layout = scan_file(&img);
        let v = only_volume(&layout);
        assert_eq!(v.location, Location::Disk, "{name}");
        let payload = dumped_payload(&img, len);
        assert_eq!(v.payload, Some(payload.clone()), "{name}");
        assert_eq!(layout.ciphertext_ranges(), vec![payload], "{name}");
        assert_eq!(v.key_bits, Some(bits), "{name}");
        assert!(v.plaintext.is_empty(), "{name}");
        assert!(layout.problems.is_empty(), "{name}: {:?}", layout.problems);
        if let VolumeFormat::Luks2(h) = &v.format {
            let meta = luks2_json(&img);
            let json_size: u64 = meta["config"]["json_size"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(h.header_size, json_size + 4096, "{name}");
            assert_eq!(h.secondary.offset, h.header_size, "{name}");
            assert_eq!(
                (&h.primary.state, &h.secondary.state),
                (&CopyState::Ok, &CopyState::Ok),
                "{name}"
            );
        }
    }
}

#[test]
fn luks2_after_key_management_and_tokens() {
    let test = "luks2_after_key_management_and_tokens";
    if !tools(test, &[CRYPTSETUP]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = luks_format(dir.path(), "keys.img", 24 * MIB, &["--type", "luks2"]);
    let path = img.to_str().unwrap();
    let key = dir.path().join("key");
    let key2 = dir.path().join("key2");
    std::fs::write(&key2, b"a second key file, also 32+ bytes long").unwrap();
    let fast = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
    let mut add = vec!["luksAddKey", "-q", "--key-file", key.to_str().unwrap()];
    add.extend_from_slice(&fast);
    add.extend_from_slice(&["--key-slot", "7", path, key2.to_str().unwrap()]);
    run("cryptsetup", &add, "");
    let mut convert = vec!["luksConvertKey", "-q", "--key-file", key2.to_str().unwrap()];
    convert.extend_from_slice(&[
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "2000",
        path,
    ]);
    run("cryptsetup", &convert, "");
    run(
        "cryptsetup",
        &["token", "import", path],
        r#"{"type":"blockvault-test","keyslots":["7"],"note":"x"}"#,
    );
    run("cryptsetup", &["luksKillSlot", "-q", path, "0"], "");

    let layout = scan_file(&img);
    let v = only_volume(&layout);
    let meta = luks2_json(&img);
    assert_eq!(meta["keyslots"].as_object().unwrap().len(), 1, "{meta}");
    assert_eq!(v.key_bits, Some(keyslot_bits(&meta, "7")));
    assert_eq!(v.payload, Some(dumped_payload(&img, 24 * MIB)));
    let VolumeFormat::Luks2(h) = &v.format else {
        panic!("{v:?}")
    };
    // Four metadata updates later both copies carry the same, newest sequence id.
    let epoch = json_seqid(&img);
    assert_eq!(
        (h.primary.seqid, h.secondary.seqid),
        (Some(epoch), Some(epoch))
    );
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
}

/// `cryptsetup reencrypt` with the fast key derivation, offline on a file.
fn reencrypt(args: &[&str], key: &Path, img: &Path) -> Command {
    let mut c = Command::new("cryptsetup");
    c.args(["reencrypt", "-q", "--key-file", key.to_str().unwrap()])
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .args(args)
        .arg(img);
    c
}

#[test]
fn luks2_reencryption_initialised() {
    let test = "luks2_reencryption_initialised";
    if !tools(test, &[CRYPTSETUP]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let len = 40 * MIB;

    // Re-keying: the data segment (old key, keyslot 5, 512 bits) and backup segments for the
    // old and new (256-bit) keys; the new keyslot 0 sorts first but is not the data's key.
    let rekey = luks_format(
        dir.path(),
        "rekey.img",
        len,
        &["--type", "luks2", "--key-slot", "5"],
    );
    std::fs::write(&key, common::layout_tools::KEY).unwrap();
    let out = reencrypt(&["--init-only", "--key-size", "256"], &key, &rekey)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = luks2_json(&rekey);
    assert_eq!(meta["segments"].as_object().unwrap().len(), 3, "{meta}");
    let layout = scan_file(&rekey);
    let v = only_volume(&layout);
    assert_eq!(v.key_bits, Some(keyslot_bits(&meta, "5")));
    assert_ne!(keyslot_bits(&meta, "0"), keyslot_bits(&meta, "5"));
    assert_eq!(layout.ciphertext_ranges(), dumped_ciphertext(&meta, 0..len));
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);

    // Encrypting a plaintext disk in place: after --init-only every data segment is
    // `linear` and the `crypt` one is only the backup-final layout to come. Nothing is
    // ciphertext yet. Keyslot 3 holds the new key; the 1-byte reencrypt keyslot is 0.
    let plain = image(dir.path(), "plain.img", len);
    put(&plain, 0, &common::text_data(1, 4 * MIB as usize));
    let out = reencrypt(
        &[
            "--encrypt",
            "--init-only",
            "--type",
            "luks2",
            "--reduce-device-size",
            "8M",
            "--key-slot",
            "3",
        ],
        &key,
        &plain,
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = luks2_json(&plain);
    assert_eq!(meta["keyslots"]["0"]["type"], "reencrypt", "{meta}");
    let layout = scan_file(&plain);
    let v = only_volume(&layout);
    assert_eq!(dumped_ciphertext(&meta, 0..len), vec![]);
    assert_eq!(layout.ciphertext_ranges(), vec![]);
    assert!(v.payload.as_ref().is_some_and(|p| p.is_empty()), "{v:?}");
    let text = layout.render();
    assert!(
        text.contains("payload none (nothing is encrypted)"),
        "{text}"
    );
    assert_eq!(v.key_bits, Some(keyslot_bits(&meta, "3")));
    assert_eq!(
        (v.cipher.as_deref(), v.mode.as_deref()),
        (Some("aes"), Some("xts-plain64"))
    );
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
}

#[test]
fn luks2_encryption_killed_half_way() {
    let test = "luks2_encryption_killed_half_way";
    if !tools(test, &[CRYPTSETUP]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, common::layout_tools::KEY).unwrap();
    // Offline encryption runs from the end to the front in 1 MiB hot zones, writing the
    // metadata after each. As soon as some data is encrypted and some is not, SIGKILL.
    let mut caught = None;
    for len in [512 * MIB, 2048 * MIB] {
        let img = image(dir.path(), "half.img", len);
        let out = reencrypt(
            &[
                "--encrypt",
                "--init-only",
                "--type",
                "luks2",
                "--reduce-device-size",
                "16M",
            ],
            &key,
            &img,
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = reencrypt(
            &[
                "--resume-only",
                "--force-offline-reencrypt",
                "--hotzone-size",
                "1M",
            ],
            &key,
            &img,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            let layout = scan_file(&img);
            let started = layout.volumes.first().and_then(|v| v.payload.clone());
            if started.is_some_and(|p| !p.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let running = child.try_wait().unwrap().is_none();
        child.kill().unwrap_or(()); // SIGKILL, by its pid
        child.wait().unwrap();
        let meta = luks2_json(&img);
        let in_progress = meta["config"]["requirements"]["mandatory"]
            .as_array()
            .is_some_and(|r| !r.is_empty());
        if running && in_progress {
            caught = Some((img, len, meta));
            break;
        }
    }
    let Some((img, len, meta)) = caught else {
        panic!("cryptsetup finished every encryption before it could be killed")
    };
    let layout = scan_file(&img);
    let v = only_volume(&layout);
    let want = dumped_ciphertext(&meta, 0..len);
    assert!(!want.is_empty(), "{meta}");
    assert_eq!(layout.ciphertext_ranges(), want, "{meta}");
    // The front of the data is still plaintext (encryption runs from the end), and none of
    // it is in the ciphertext: the data starts where the final crypt segment will.
    let data_start: u64 = meta["segments"]
        .as_object()
        .unwrap()
        .values()
        .find(|s| {
            s["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "backup-final"))
        })
        .map(|s| s["offset"].as_str().unwrap().parse().unwrap())
        .unwrap();
    assert!(want[0].start > data_start, "{meta}");
    assert_eq!(v.payload.as_ref().map(|p| p.start), Some(want[0].start));
    // A kill between cryptsetup's writes of the two header copies leaves one older (or torn):
    // reported, and the newer valid copy used, as cryptsetup itself does.
    assert!(
        layout
            .problems
            .iter()
            .all(|p| p.structure.starts_with("LUKS2 ") && p.structure.ends_with(" header")),
        "{:?}",
        layout.problems
    );
}

#[test]
fn luks_in_parted_and_sgdisk_partitions_and_on_a_loop_device() {
    let test = "luks_in_parted_and_sgdisk_partitions_and_on_a_loop_device";
    if !tools(test, &[CRYPTSETUP, SGDISK, PARTED, SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let l1 = luks_format(dir.path(), "l1.img", 10 * MIB, &["--type", "luks1"]);
    let l2 = luks_format(dir.path(), "l2.img", 20 * MIB, &["--type", "luks2"]);

    // parted: MBR, LUKS1 in logical partition 6, LUKS2 in primary 1.
    let mbr = image(dir.path(), "mbr.img", 64 * MIB);
    let p = mbr.to_str().unwrap();
    run(
        "parted",
        &[
            "-s", p, "mklabel", "msdos", "mkpart", "primary", "1MiB", "21MiB",
        ],
        "",
    );
    run(
        "parted",
        &["-s", p, "mkpart", "extended", "21MiB", "63MiB"],
        "",
    );
    run(
        "parted",
        &["-s", p, "mkpart", "logical", "22MiB", "30MiB"],
        "",
    );
    run(
        "parted",
        &["-s", p, "mkpart", "logical", "31MiB", "41MiB"],
        "",
    );
    // sgdisk: GPT, LUKS2 in partition 2.
    let gpt = image(dir.path(), "gpt.img", 64 * MIB);
    let g = gpt.to_str().unwrap();
    run(
        "sgdisk",
        &["-o", "-n1:2048:+8M", "-n2:0:+20M", "-t2:8309", g],
        "",
    );
    for (disk, placements) in [
        (&mbr, vec![(1u32, &l2, 20 * MIB), (6, &l1, 10 * MIB)]),
        (&gpt, vec![(2, &l2, 20 * MIB)]),
    ] {
        let sf = sfdisk_json(disk);
        for (index, luks, _) in &placements {
            dd(luks, disk, partition_start(&sf, *index));
        }
        let layout = scan_file(disk);
        assert_same_partitions(&layout, &sf);
        assert_eq!(
            layout.volumes.len(),
            placements.len(),
            "{}",
            layout.render()
        );
        for (v, (index, luks, len)) in layout.volumes.iter().zip(&placements) {
            let start = partition_start(&sf, *index);
            assert_eq!(v.location, Location::Partition { index: *index });
            let payload = dumped_payload(luks, *len);
            assert_eq!(v.payload, Some(start + payload.start..start + payload.end));
        }
        assert!(layout.problems.is_empty(), "{:?}", layout.problems);
    }

    // The GPT disk as a block device with 4096-byte sectors is another disk: put the LUKS2
    // volume at the start of a raw loop device instead and inspect the device itself.
    let raw = image(dir.path(), "raw.img", 32 * MIB);
    dd(&l2, &raw, 0);
    let Some(dev) = loop_4k(&raw, test) else {
        return;
    };
    let doc = Bv::new().json(&["inspect", "--json", dev.path.to_str().unwrap()]);
    let layout: Layout = serde_json::from_value(doc["layout"].clone()).unwrap();
    let v = only_volume(&layout);
    assert_eq!(v.volume, 0..32 * MIB);
    let payload = dumped_payload(&l2, 20 * MIB);
    assert_eq!(v.payload, Some(payload.start..32 * MIB));
}

/// Absolute first byte of partition `index` in `sfdisk --json` output.
fn partition_start(sf: &Value, index: u32) -> u64 {
    let ss = sf["sectorsize"].as_u64().unwrap();
    sf["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"].as_str().unwrap().ends_with(&index.to_string()))
        .map(|p| p["start"].as_u64().unwrap() * ss)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// BitLocker, from libbde's format document (fields: `common::layout_tools::Bde`)
// ---------------------------------------------------------------------------------------------

#[test]
fn bitlocker_conversion_states_and_header_variants() {
    let test = "bitlocker_conversion_states_and_header_variants";
    if !tools(test, &[SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "bde.img", 48 * MIB);
    let len = 8 * MIB;
    sfdisk(
        &img,
        "label: dos\nstart=2048, size=16384, type=7\nstart=18432, size=16384, type=7\n\
         start=34816, size=16384, type=c\nstart=51200, size=16384, type=7\n",
    );
    let sf = sfdisk_json(&img);
    let start = |i: u32| partition_start(&sf, i);
    // 1: Windows 7+, conversion in progress (dislocker: state 2), 3 MiB encrypted so far;
    //    the 16 relocated boot sectors lie past that, so they are plaintext too.
    let converting = Bde {
        state: 2,
        encrypted_size: 3 * MIB,
        ..Bde::new(BitLockerVariant::Win7, len)
    };
    // 2: Windows 7+, decryption finished but the metadata still there (state 1, size 0):
    //    nothing is ciphertext.
    let decrypted = Bde {
        state: 1,
        encrypted_size: 0,
        method: 0x8005,
        ..Bde::new(BitLockerVariant::Win7, len)
    };
    // 3: To Go whose volume header names another OEM than "MSWIN4.1" (libbde decides by the
    //    identifier at 424 alone), used-space-only, fully encrypted, with a 5 MiB discovery
    //    volume in front (libbde: the To Go volume header block is 5365760 bytes).
    let to_go = Bde {
        oem_name: *b"MSDOS5.0",
        identifier: USED_SPACE_ONLY_ID,
        header_sectors: 5_365_760 / 512,
        blocks: [7 * MIB, 7 * MIB + 65536, 7 * MIB + 131072],
        header_offset: MIB,
        method: 0x8002,
        ..Bde::new(BitLockerVariant::ToGo, len)
    };
    // 4: Windows 7+ whose relocated boot sectors would run past the volume end.
    let bad = Bde {
        header_offset: len - 4096,
        ..Bde::new(BitLockerVariant::Win7, len)
    };
    for (i, bde) in [&converting, &decrypted, &to_go, &bad]
        .into_iter()
        .enumerate()
    {
        bde.write(&img, start(i as u32 + 1));
    }

    let layout = scan_file(&img);
    assert_same_partitions(&layout, &sf);
    assert_eq!(layout.volumes.len(), 4, "{}", layout.render());
    let v: Vec<_> = layout.volumes.iter().collect();
    let (s1, s3, s4) = (start(1), start(3), start(4));

    assert_eq!(bitlocker_info(v[0]).state, "converting");
    assert_eq!(bitlocker_info(v[0]).encrypted_size, Some(3 * MIB));
    assert_eq!(v[0].payload, Some(s1 + 8192..s1 + 3 * MIB));
    assert_eq!(
        bitlocker_info(v[0]).volume_header_offset,
        Some(s1 + converting.header_offset)
    );

    assert_eq!(bitlocker_info(v[1]).state, "decrypted");
    assert!(
        v[1].payload.as_ref().is_some_and(|p| p.is_empty()),
        "{:?}",
        v[1]
    );
    assert_eq!(bitlocker_info(v[1]).method, "XTS-AES-256");

    let b = bitlocker_info(v[2]);
    assert_eq!(
        (b.variant, b.used_space_only),
        (BitLockerVariant::ToGo, true)
    );
    assert_eq!(b.volume_header_size, Some(5_365_760));
    assert_eq!(v[2].payload, Some(s3 + 5_365_760..s3 + len));
    assert_eq!(v[2].volume_size, Some(len));
    assert_eq!(
        (v[2].mode.as_deref(), v[2].key_bits),
        (Some("cbc"), Some(128))
    );

    assert_eq!(v[3].payload, Some(s4 + 8192..s4 + len));
    assert_eq!(layout.problems.len(), 1, "{:?}", layout.problems);
    assert!(
        layout.problems[0]
            .message
            .contains("relocated boot sectors"),
        "{:?}",
        layout.problems
    );
    assert_eq!(
        layout.ciphertext_ranges(),
        vec![
            s1 + 8192..s1 + 3 * MIB,
            s3 + 5_365_760..s3 + len,
            s4 + 8192..s4 + len
        ]
    );
    let text = layout.render();
    for needle in ["state: converting", "used space only", "relocated to byte"] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
}

#[test]
fn bitlocker_on_4096_byte_sectors_in_a_gpt() {
    let test = "bitlocker_on_4096_byte_sectors_in_a_gpt";
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
        "label: gpt\nsize=16MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n\
         size=16MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
    );
    let sf = sfdisk_json(&dev.path);
    drop(dev);
    let len = 16 * MIB;
    // Windows 7+ with 4096-byte sectors: 2 volume header sectors are 8 KiB.
    let win7 = Bde {
        bytes_per_sector: 4096,
        sectors_per_cluster: 1,
        header_sectors: 2,
        ..Bde::new(BitLockerVariant::Win7, len)
    };
    // Vista with 4096-byte sectors and 1 sector per cluster: block 1 at cluster 136 is
    // 136 x 4096 bytes in, and the 16 plaintext sectors are 64 KiB.
    let vista = Bde {
        bytes_per_sector: 4096,
        sectors_per_cluster: 1,
        total_sectors: len / 4096,
        method: 0x8001,
        ..Bde::new(BitLockerVariant::Vista, len)
    };
    let (s1, s2) = (partition_start(&sf, 1), partition_start(&sf, 2));
    win7.write(&img, s1);
    vista.write(&img, s2);

    let layout = scan_file(&img);
    let PartitionTable::Gpt(t) = &layout.table else {
        panic!("{}", layout.render())
    };
    assert_eq!(t.sector_size, 4096);
    assert_same_partitions(&layout, &sf);
    assert_eq!(layout.volumes.len(), 2, "{}", layout.render());
    let (w, v) = (&layout.volumes[0], &layout.volumes[1]);
    assert_eq!(bitlocker_info(w).bytes_per_sector, 4096);
    assert_eq!(bitlocker_info(w).volume_header_size, Some(8192));
    assert_eq!(w.payload, Some(s1 + 8192..s1 + len));
    let offsets: Vec<u64> = bitlocker_info(v)
        .metadata_blocks
        .iter()
        .map(|b| b.offset)
        .collect();
    assert_eq!(offsets, vista.blocks.map(|o| s2 + o));
    assert!(bitlocker_info(v)
        .metadata_blocks
        .iter()
        .all(|b| b.state == CopyState::Ok));
    assert_eq!(v.payload, Some(s2 + 16 * 4096..s2 + len));
    assert_eq!(v.volume_size, Some(len));
    assert_eq!(bitlocker_info(v).method, "AES-256-CBC-diffuser");
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
}

// ---------------------------------------------------------------------------------------------
// Partition tables
// ---------------------------------------------------------------------------------------------

#[test]
fn gpt_shapes_from_sgdisk_and_sfdisk() {
    let test = "gpt_shapes_from_sgdisk_and_sfdisk";
    if !tools(test, &[SGDISK, SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 256 entries (a 64 KiB array), a name, a LUKS type.
    let big = image(dir.path(), "256.img", 64 * MIB);
    let b = big.to_str().unwrap();
    run(
        "sgdisk",
        &[
            "-o",
            "--resize-table=256",
            "-n1:2048:+4M",
            "-c1:first one",
            "-n2:0:+8M",
            "-t2:8309",
            b,
        ],
        "",
    );
    // 4 entries: the array is one sector.
    let small = image(dir.path(), "4.img", 64 * MIB);
    sfdisk(
        &small,
        "label: gpt\ntable-length: 4\nsize=4MiB\nsize=4MiB\n",
    );
    // A hybrid MBR: partition 1 also in the MBR, next to the 0xEE entry.
    let hybrid = image(dir.path(), "hybrid.img", 64 * MIB);
    let h = hybrid.to_str().unwrap();
    run(
        "sgdisk",
        &["-o", "-n1:2048:+4M", "-t1:0700", "-n2:0:+8M", h],
        "",
    );
    run("sgdisk", &["-h", "1:EE", h], "");
    for (img, entries) in [(&big, 256), (&small, 4), (&hybrid, 128)] {
        let sf = sfdisk_json(img);
        let layout = scan_file(img);
        let PartitionTable::Gpt(t) = &layout.table else {
            panic!("{}", layout.render())
        };
        assert_eq!(
            (&t.primary, &t.backup, t.used),
            (&CopyState::Ok, &CopyState::Ok, GptCopy::Primary)
        );
        assert_same_partitions(&layout, &sf);
        let print = run("sgdisk", &["-p", img.to_str().unwrap()], "");
        assert!(
            print.contains(&format!("holds up to {entries} entries")),
            "{print}"
        );
        assert!(layout.problems.is_empty(), "{:?}", layout.problems);
    }
    let mbr = common::read_at(&hybrid, 446, 32);
    assert_eq!(
        (mbr[4], mbr[16 + 4]),
        (0x07, 0xee),
        "sgdisk wrote no hybrid MBR"
    );

    // Damaged primary header: the backup is used, and the damage reported.
    common::flip_byte(&big, 512 + 16);
    let layout = scan_file(&big);
    let PartitionTable::Gpt(t) = &layout.table else {
        panic!("{}", layout.render())
    };
    assert_eq!(t.used, GptCopy::Backup);
    assert!(matches!(&t.primary, CopyState::Damaged(w) if w.contains("header CRC32")));
    assert_same_partitions(&layout, &sfdisk_json(&big));
    assert_eq!(layout.problems.len(), 1, "{:?}", layout.problems);
    assert_eq!(layout.problems[0].structure, "GPT primary header");
}

#[test]
fn parted_tables_many_logicals_and_a_3_tib_disk() {
    let test = "parted_tables_many_logicals_and_a_3_tib_disk";
    if !tools(test, &[PARTED, SFDISK]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let msdos = image(dir.path(), "msdos.img", 256 * MIB);
    let m = msdos.to_str().unwrap();
    let mut args: Vec<String> = [
        "-s", m, "mklabel", "msdos", "mkpart", "primary", "1MiB", "10MiB",
    ]
    .map(String::from)
    .to_vec();
    args.extend(["mkpart", "extended", "10MiB", "250MiB"].map(String::from));
    for i in 0..20 {
        let first = 11 + 11 * i;
        args.extend([
            "mkpart".into(),
            "logical".into(),
            format!("{first}MiB"),
            format!("{}MiB", first + 10),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("parted", &args, "");
    let sf = sfdisk_json(&msdos);
    let layout = scan_file(&msdos);
    assert_same_partitions(&layout, &sf);
    assert_eq!(layout.table.partitions().len(), 22);
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);

    // 3 TiB, sparse: the protective entry is capped at 0xFFFFFFFF sectors; the GPT is not.
    let big = image(dir.path(), "3t.img", 3 << 40);
    let b = big.to_str().unwrap();
    run(
        "parted",
        &[
            "-s", b, "mklabel", "gpt", "mkpart", "a", "1MiB", "1GiB", "mkpart", "b", "2100GiB",
            "100%",
        ],
        "",
    );
    let mbr = common::read_at(&big, 446, 16);
    assert_eq!(mbr[4], 0xee);
    assert_eq!(
        u32::from_le_bytes(mbr[12..16].try_into().unwrap()),
        u32::MAX
    );
    let sf = sfdisk_json(&big);
    let layout = scan_file(&big);
    assert_same_partitions(&layout, &sf);
    assert!(layout.table.partitions()[1].last_byte > 1 << 41);
    assert!(layout.problems.is_empty(), "{:?}", layout.problems);
}
