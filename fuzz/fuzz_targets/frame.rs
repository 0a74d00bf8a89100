//! `frame`: extent frames (`vault::frame::check`, `vault::frame::open` and `Expect::open_into`, which
//! must agree), with generation
//! keys and identity keys derived from fixed DEKs (`GenerationKeys::derive`,
//! `IdentityKeys::derive`).
//!
//! Each input is used three ways:
//! 1. as the raw frame: `check`, then `open` expecting the id its header names;
//! 2. with its length and CRC fields fixed up, so `check`'s flag and length rules are reached
//!    (then `open` fails unless the input was a genuinely sealed frame);
//! 3. as a frame sealed from the input with `frame::seal`: either honest (payload, optionally
//!    zstd-compressed by us, true plaintext length and id: `open` must give the payload back
//!    and refuse another binding), or dishonest (arbitrary bytes flagged as zstd or not, an
//!    arbitrary plaintext length and id: `open` sees attacker-shaped data behind a valid tag
//!    and must not panic, and must only succeed with plaintext that matches the header).
#![no_main]

use blockvault::crypto::ExtentId;
use blockvault::vault::frame::{self, HEADER_LEN, MAX_PLAIN, OVERHEAD};
use blockvault::ErrorKind;
use blockvault_fuzz::{
    binding, generation_keys, identity, other_binding, outcome, short_bytes, write_seeds,
    Unstructured,
};
use libfuzzer_sys::fuzz_target;

fn what() -> String {
    "extent fuzz in packs/fuzz".to_string()
}

/// `open`, checked against `open_into` (restore's path, into a buffer of the header's
/// plaintext length): both give the same plaintext, or both fail with the same kind.
fn open(frame: Vec<u8>, expect: &ExtentId) -> blockvault::Result<Vec<u8>> {
    let claimed = frame
        .get(12..16)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
        .min(MAX_PLAIN);
    let mut out = vec![0u8; claimed];
    let into = frame::Expect {
        binding: &binding(),
        generation_keys: &generation_keys,
        identity: identity(),
        id: expect,
        what: &what,
    }
    .open_into(frame.clone(), &mut out);
    let r = frame::open(
        frame,
        &binding(),
        &generation_keys,
        identity(),
        expect,
        &what,
    );
    match (&r, &into) {
        (Ok(p), Ok(())) => assert_eq!(p, &out, "open_into gives what open gives"),
        (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind(), "{a} / {b}"),
        _ => panic!("open {:?} but open_into {:?}", r.as_ref().map(Vec::len), into),
    }
    r
}

fn header_id(b: &[u8]) -> ExtentId {
    let mut id = [0u8; 32];
    if b.len() >= 52 {
        id.copy_from_slice(&b[20..52]);
    }
    ExtentId(id)
}

fn sealed(payload: &[u8], compressed_by_us: bool, generation: u32) -> Vec<u8> {
    let body = if compressed_by_us {
        zstd::bulk::compress(payload, 1).unwrap()
    } else {
        payload.to_vec()
    };
    let mut buf = vec![0u8; HEADER_LEN];
    buf.extend_from_slice(&body);
    let id = identity().extent_id.id(payload);
    frame::seal(
        buf,
        &binding(),
        &generation_keys(generation.min(1)).unwrap(),
        generation,
        &id,
        payload.len() as u32,
        compressed_by_us,
    )
    .unwrap()
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        sealed(b"", false, 0),
        sealed(b"hello, frame", false, 0),
        sealed(&[7u8; 4096], true, 0),
        sealed(b"generation one", true, 1),
    ]
}

fn sealed_from_input(u: &mut Unstructured) -> Option<()> {
    let honest: bool = u.arbitrary().ok()?;
    let compressed: bool = u.arbitrary().ok()?;
    let generation = u.int_in_range(0..=2u32).ok()?;
    let keys = generation_keys(generation.min(1)).unwrap();
    if honest {
        let payload = short_bytes(u, 8192).ok()?;
        let f = sealed(payload, compressed, generation);
        let h = frame::check(&f, &what).expect("a sealed frame passes check");
        assert_eq!(h.plain_len, payload.len());
        assert_eq!(h.generation, generation);
        assert_eq!(h.compressed, compressed);
        let id = identity().extent_id.id(payload);
        assert!(frame::open(
            f.clone(),
            &other_binding(),
            &generation_keys,
            identity(),
            &id,
            &what
        )
        .is_err());
        match open(f, &id) {
            Ok(p) => assert_eq!(p, payload),
            Err(e) => assert!(
                generation == 2 && e.kind() == ErrorKind::Key,
                "honest frame does not open: {e}"
            ),
        }
    } else {
        let plain_len = u.int_in_range(0..=MAX_PLAIN as u32 + 1).ok()?;
        let id = ExtentId(u.arbitrary().ok()?);
        let body = u.bytes(u.len()).ok()?;
        let mut buf = vec![0u8; HEADER_LEN];
        buf.extend_from_slice(body);
        let f = frame::seal(
            buf,
            &binding(),
            &keys,
            generation,
            &id,
            plain_len,
            compressed,
        )
        .unwrap();
        let r = open(f, &id);
        outcome("open(dishonest)", &r);
        if let Ok(p) = r {
            assert_eq!(p.len(), plain_len as usize);
            assert_eq!(identity().extent_id.id(&p), id);
        }
    }
    Some(())
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        // 1. Raw.
        if let Ok(h) = frame::check(data, &what) {
            assert!(h.plain_len <= MAX_PLAIN);
        }
        let _ = open(data.to_vec(), &header_id(data));

        // 2. Length and CRC fixed up.
        if data.len() >= OVERHEAD && data.len() <= u32::MAX as usize {
            let mut f = data.to_vec();
            let n = f.len() as u32;
            f[0..4].copy_from_slice(&n.to_le_bytes());
            let crc = crc32fast::hash(&f[8..]);
            f[4..8].copy_from_slice(&crc.to_le_bytes());
            let flags_ok = f[8] & !1 == 0 && f[9..12] == [0; 3];
            let len_ok = u32::from_le_bytes(f[12..16].try_into().unwrap()) as usize <= MAX_PLAIN;
            let r = frame::check(&f, &what);
            outcome("check(crc fixed)", &r);
            assert_eq!(r.is_ok(), flags_ok && len_ok);
            let id = header_id(&f);
            let plain_len = u32::from_le_bytes(f[12..16].try_into().unwrap()) as usize;
            // Only a genuinely sealed frame (a seed, say) can open, and then it is consistent.
            if let Ok(p) = open(f, &id) {
                assert_eq!(p.len(), plain_len);
                assert_eq!(identity().extent_id.id(&p), id);
            }
        }

        // 3. Sealed from the input.
        sealed_from_input(&mut Unstructured::new(data));
    }
);
