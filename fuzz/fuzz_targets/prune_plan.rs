//! `prune_plan`: a prune's deletion plan (`retention::plan`), which backups on any host read.
//!
//! Each input is used two ways:
//! 1. as a stored plan: `decode` must not panic, and a plan that decodes re-encodes to exactly
//!    the input (one encoding: ids strictly increasing, no trailing bytes);
//! 2. as a set of pack ids built from the bytes: `decode(encode(set)) == set`, and every strict
//!    prefix of the encoding is refused.
#![no_main]

use std::collections::BTreeSet;

use blockvault::retention::plan;
use blockvault::vault::pack::PackId;
use blockvault_fuzz::{outcome, write_seeds, Unstructured};
use libfuzzer_sys::fuzz_target;

fn seeds() -> Vec<Vec<u8>> {
    let packs: BTreeSet<PackId> = [PackId([1; 32]), PackId([7; 32])].into();
    vec![plan::encode(&packs), plan::encode(&BTreeSet::new())]
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let decoded = plan::decode(data, "prune/fuzz");
        outcome("decode", &decoded);
        if let Ok(p) = &decoded {
            assert_eq!(plan::encode(p), data, "a decoded plan re-encodes to its bytes");
        }
        let mut u = Unstructured::new(data);
        if let Ok(ids) = u.arbitrary::<Vec<[u8; 32]>>() {
            let set: BTreeSet<PackId> = ids.into_iter().map(PackId).collect();
            let bytes = plan::encode(&set);
            assert_eq!(plan::decode(&bytes, "prune/fuzz").expect("own encoding"), set);
            for cut in 0..bytes.len() {
                assert!(plan::decode(&bytes[..cut], "prune/fuzz").is_err());
            }
        }
    }
);
