//! `lease`: the lease record of a lock on object storage (`vault::store::lease::LeaseRecord`),
//! which any host sharing the bucket may have written.
//!
//! Each input is used two ways:
//! 1. as a stored record: `decode` must not panic, and a record that decodes re-encodes to
//!    exactly the input (the record has one encoding: no reserved bits, no padding);
//! 2. as a record built from the bytes: `decode(encode(r)) == r`, and every strict prefix of
//!    the encoding is refused.
#![no_main]

use blockvault::vault::store::lease::LeaseRecord;
use blockvault_fuzz::{outcome, short_string, write_seeds, Unstructured};
use libfuzzer_sys::fuzz_target;

fn seeds() -> Vec<Vec<u8>> {
    let r = LeaseRecord {
        holder: [7; 16],
        expires_ms: 1_800_000_000_000,
        ttl_ms: 60_000,
        boot_id: [1; 16],
        pid: 4242,
        start_ticks: 99,
        host: "backup-host-1".into(),
    };
    vec![r.encode()]
}

fn build(u: &mut Unstructured) -> libfuzzer_sys::arbitrary::Result<LeaseRecord> {
    Ok(LeaseRecord {
        holder: u.arbitrary()?,
        expires_ms: u.arbitrary()?,
        ttl_ms: u.arbitrary()?,
        boot_id: u.arbitrary()?,
        pid: u.arbitrary()?,
        start_ticks: u.arbitrary()?,
        host: short_string(u, 300)?,
    })
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let decoded = LeaseRecord::decode(data, "locks/fuzz");
        outcome("decode", &decoded);
        if let Ok(r) = &decoded {
            assert_eq!(r.encode(), data, "a decoded lease re-encodes to its bytes");
        }
        if let Ok(r) = build(&mut Unstructured::new(data)) {
            let bytes = r.encode();
            assert_eq!(LeaseRecord::decode(&bytes, "locks/fuzz").expect("own encoding"), r);
            for cut in 0..bytes.len() {
                assert!(LeaseRecord::decode(&bytes[..cut], "locks/fuzz").is_err());
            }
        }
    }
);
