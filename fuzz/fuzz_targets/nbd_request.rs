//! `nbd_request`: what an NBD client sends the server (`serve::wire`).
//!
//! The first byte picks a mode:
//! 0. a request header (the next 28 bytes) checked against an export whose size and
//!    writability come from the following 9 bytes. Beyond "no panic": an accepted read,
//!    write or zeroing lies within the export, a read or write within `MAX_REQUEST`, a write
//!    or zeroing only on a writable export, block status starts inside the export; and the
//!    header re-encoded parses back to itself;
//! 1. GO/INFO option data: what parses re-encodes to the same bytes, names within the limit;
//! 2. LIST/SET_META_CONTEXT option data: as 1, queries within `MAX_QUERIES`.
#![no_main]

use blockvault::serve::wire::{
    check_request, parse_export_query, parse_meta_query, parse_request, Op, MAX_QUERIES,
    MAX_REQUEST, MAX_STRING,
};
use blockvault::source::nbd::proto::{encode_request, REQUEST_LEN};
use blockvault_fuzz::write_seeds;
use libfuzzer_sys::fuzz_target;

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u32).to_be_bytes());
    b.extend(s.as_bytes());
}

fn seeds() -> Vec<Vec<u8>> {
    let mut read = vec![0u8];
    read.extend(encode_request(0, 1, 4096, 512));
    read.extend((1u64 << 20).to_be_bytes());
    read.push(0);
    let mut go = vec![1u8];
    string(&mut go, "vm@0123abcd");
    go.extend(1u16.to_be_bytes());
    go.extend(3u16.to_be_bytes());
    let mut meta = vec![2u8];
    string(&mut meta, "vm@0123abcd");
    meta.extend(1u32.to_be_bytes());
    string(&mut meta, "base:allocation");
    vec![read, go, meta]
}

fuzz_target!(
    init: write_seeds(seeds),
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else { return };
        match mode % 3 {
            0 => {
                if rest.len() < REQUEST_LEN + 9 {
                    return;
                }
                let h: [u8; REQUEST_LEN] = rest[..REQUEST_LEN].try_into().unwrap();
                let size = u64::from_be_bytes(rest[REQUEST_LEN..REQUEST_LEN + 8].try_into().unwrap());
                let writable = rest[REQUEST_LEN + 8] & 1 != 0;
                let Some(r) = parse_request(&h) else { return };
                let mut again = encode_request(r.kind, r.cookie, r.offset, r.length);
                again[4..6].copy_from_slice(&r.flags.to_be_bytes());
                assert_eq!(again, h, "request header round trip");
                let end = r.offset.checked_add(u64::from(r.length));
                match check_request(&r, size, writable) {
                    Ok(Op::Read | Op::Write | Op::Zero) => {
                        assert!(end.is_some_and(|e| e <= size), "{r:?} on {size}");
                        if r.kind != 6 && r.kind != 4 {
                            assert!(r.length <= MAX_REQUEST);
                        }
                        if r.kind != 0 {
                            assert!(writable, "a write on a read-only export");
                        }
                    }
                    Ok(Op::BlockStatus) => assert!(r.offset < size && r.length > 0),
                    Ok(_) => {}
                    Err(e) => assert!(!e.message.is_empty()),
                }
            }
            1 => {
                if let Ok(q) = parse_export_query(rest) {
                    assert!(q.name.len() <= MAX_STRING);
                    let mut b = Vec::new();
                    string(&mut b, &q.name);
                    b.extend((q.infos.len() as u16).to_be_bytes());
                    for i in &q.infos {
                        b.extend(i.to_be_bytes());
                    }
                    assert_eq!(b, rest, "GO data round trip");
                }
            }
            _ => {
                if let Ok(q) = parse_meta_query(rest) {
                    assert!(q.queries.len() <= MAX_QUERIES);
                    let mut b = Vec::new();
                    string(&mut b, &q.name);
                    b.extend((q.queries.len() as u32).to_be_bytes());
                    for c in &q.queries {
                        string(&mut b, c);
                    }
                    assert_eq!(b, rest, "meta query round trip");
                }
            }
        }
    }
);
