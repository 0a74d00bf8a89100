//! Compressed clusters: raw deflate (QEMU's default, no zlib header) or one zstd frame,
//! as the header's compression type says. Either way the output is exactly one cluster;
//! the input may run on past the data (its last sector can hold the next cluster's start),
//! so decompression stops when the cluster is full.

use super::header::Compression;
use flate2::{Decompress, FlushDecompress};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

/// Largest zstd window accepted: 8 MiB, four times QEMU's largest cluster, so a damaged frame
/// cannot make a reader allocate the library's default 128 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Fill `out` (one cluster) from the compressed bytes `input`; the error is the problem.
pub(super) fn inflate(method: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let want = out.len();
    let got = match method {
        Compression::Zlib => {
            let mut d = Decompress::new(false);
            d.decompress(input, out, FlushDecompress::Finish)
                .map_err(|e| format!("invalid deflate data: {e}"))?;
            d.total_out() as usize
        }
        Compression::Zstd => zstd_frame(input, out)?,
    };
    if got != want {
        return Err(format!(
            "the compressed data yields {got} bytes, not a cluster of {want}"
        ));
    }
    Ok(())
}

/// Decode the zstd frame at the start of `input` into `out` until `out` is full or the
/// decoder stops making progress; returns the bytes produced.
fn zstd_frame(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let invalid = |e: std::io::Error| format!("invalid zstd data: {e}");
    let mut d = Decoder::new().map_err(invalid)?;
    d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(invalid)?;
    let want = out.len();
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    loop {
        let before = (src.pos(), dst.pos());
        let remaining_hint = d.run(&mut src, &mut dst).map_err(invalid)?;
        // Done when the cluster is full, or when the frame ended (hint 0) or no progress
        // was made: `inflate` then reports the short output.
        if dst.pos() == want || remaining_hint == 0 || (src.pos(), dst.pos()) == before {
            return Ok(dst.pos());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i * 7 / 300) as u8).collect()
    }

    #[test]
    fn raw_deflate_with_trailing_bytes() {
        let data = cluster();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data).expect("deflate");
        let mut c = e.finish().expect("finish");
        c.extend_from_slice(&[0xEE; 300]);
        let mut out = vec![0; data.len()];
        inflate(Compression::Zlib, &c, &mut out).expect("inflate");
        assert_eq!(out, data);
        let err = inflate(Compression::Zlib, &c[..c.len() / 3], &mut out).unwrap_err();
        assert!(err.contains("not a cluster"), "{err}");
        let mut small = vec![0; 100];
        inflate(Compression::Zlib, &c, &mut small).expect("stops when the output is full");
        assert!(inflate(Compression::Zlib, &[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn zstd_frame_with_trailing_bytes() {
        let data = cluster();
        let mut c = zstd::bulk::compress(&data, 1).expect("zstd");
        c.extend_from_slice(&[0; 300]);
        let mut out = vec![0; data.len()];
        inflate(Compression::Zstd, &c, &mut out).expect("inflate");
        assert_eq!(out, data);
        let err = inflate(Compression::Zstd, &c[..c.len() / 2], &mut out).unwrap_err();
        assert!(err.contains("not a cluster"), "{err}");
        let mut big = vec![0; 2 * data.len()];
        let err = inflate(Compression::Zstd, &c, &mut big).unwrap_err();
        assert!(
            err.contains("not a cluster") || err.contains("invalid"),
            "{err}"
        );
        assert!(inflate(Compression::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
