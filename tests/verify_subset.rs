//! `verify --read-data-subset`: slices N/M read disjoint sets of packs whose union is every
//! pack, a damaged pack is found by exactly its slice (the one its id, as a big-endian
//! number, falls in modulo M) and by `100%`, and bad subsets are refused.

mod common;

use std::collections::BTreeSet;

use common::*;

/// Pack id (hex) as a big-endian number modulo `m`.
fn slice_of(hex_id: &str, m: u128) -> u128 {
    hex::decode(hex_id)
        .unwrap()
        .iter()
        .fold(0u128, |acc, b| (acc * 256 + u128::from(*b)) % m)
}

#[test]
fn slices_cover_every_pack_once_and_find_damage_in_theirs() {
    let bv = Bv::new();
    let img = bv.path("d.img");
    for i in 0..10u64 {
        write_file(&img, &random_data(i, 300_000));
        bv.backup(&img, "d", &["--parent", "none"]);
    }
    let packs: Vec<String> = bv
        .objects("packs")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(packs.len(), 10);
    let damaged = &packs[3];
    flip_byte(
        &bv.vault.join("packs").join(&damaged[..2]).join(damaged),
        100,
    );
    let mut read = 0;
    for n in 1..=4u128 {
        let spec = format!("{n}/4");
        let r = bv.run(&["--json", "verify", "--read-data-subset", &spec]);
        let doc = r.json();
        assert_eq!(doc["read_data_subset"], spec.as_str());
        let expect: BTreeSet<&String> = packs.iter().filter(|p| slice_of(p, 4) == n - 1).collect();
        assert_eq!(num(&doc, "packs_read"), expect.len() as u64, "{doc}");
        read += num(&doc, "packs_read");
        if expect.contains(damaged) {
            r.code(3);
            assert!(
                doc["problems"].to_string().contains(damaged.as_str()),
                "{doc}"
            );
        } else {
            r.ok();
            assert_eq!(doc["ok"], true, "{doc}");
        }
    }
    assert_eq!(read, 10);
    let r = bv.run(&["--json", "verify", "--read-data-subset", "100%"]);
    r.code(3);
    assert_eq!(num(&r.json(), "packs_read"), 10);
    let r = bv.run(&["verify", "--read-data-subset", "10%"]);
    assert!(
        r.stdout.contains("in 1 packs read (subset 10%)"),
        "{}",
        r.stdout
    );
    for bad in ["0/4", "5/4", "x", "0%", "150%"] {
        bv.run(&["verify", "--read-data-subset", bad])
            .code(2)
            .stderr_has(&["--read-data-subset", bad]);
    }
    bv.run(&["verify", "--read-data", "--read-data-subset", "1/2"])
        .code(2);
}
