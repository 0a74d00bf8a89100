//! Which source a backup reads, checked before anything is written.
//!
//! Raw images in use (src/source/lock.rs): an image a writable `qemu-nbd` serves is refused
//! (exit 2) as a qcow2 one is, a read-only server's is not; while blockvault reads an image
//! no QEMU process can open it for writing; a block device in use is backed up (the
//! crash-consistent case).
//!
//! Without qemu-nbd the tests print SKIP (under CI=true they fail).

mod common;

use std::path::Path;
use std::process::Command;

use common::qemu::{Listen, QemuNbd, QEMU_NBD};
use common::tools::tools;
use common::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A qemu-nbd serving the raw image `img` (writable or `-r`) on a Unix socket in `bv`'s folder.
fn serve_raw(bv: &Bv, img: &Path, writable: bool) -> QemuNbd {
    let sock = bv.path(&format!("nbd-{}.sock", unique()));
    let serve = QemuNbd::serve(img, "raw");
    let serve = if writable { serve.writable() } else { serve };
    serve.start(bv.dir.path(), Listen::Unix(&sock))
}

#[test]
fn a_raw_image_held_writable_is_refused_as_a_qcow2_one_is() {
    if !tools(
        "a_raw_image_held_writable_is_refused_as_a_qcow2_one_is",
        QEMU_NBD,
    ) {
        return;
    }
    let bv = Bv::new();
    let img = bv.path("live.raw");
    let data = mixed_data(6, 8 * MIB as usize);
    write_file(&img, &data);
    let mut server = serve_raw(&bv, &img, true);
    for args in [
        vec!["backup", s(&img), "--disk", "live"],
        vec!["inspect", s(&img)],
    ] {
        bv.run(&args).code(2).stderr_has(&[
            &format!(
                "raw image {} is open for writing by another process",
                s(&img)
            ),
            "QEMU's write lock",
            "torn",
            "nbd://",
        ]);
    }
    assert!(bv.snapshots().is_empty());
    server.stop("-TERM");

    // A read-only server takes no write lock: the image backs up.
    let mut reader = serve_raw(&bv, &img, false);
    let doc = bv.backup(&img, "live", &[]);
    reader.stop("-TERM");
    bv.restore_and_compare(&format!("live@{}", text(&doc, "short_id")), &data);

    // While blockvault has the image open, no QEMU process may open it for writing; once
    // it is closed, one may.
    let open = blockvault::source::RawFile::open(s(&img)).expect("open");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", s(&img)])
        .output()
        .expect("qemu-io");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("lock"),
        "qemu-io wrote an image blockvault holds: {}\n{said}",
        out.status
    );
    drop(open);
    common::qemu::qemu_io("raw", s(&img), &["write -P 0x5a 0 512"]);
}

#[test]
fn a_block_device_in_use_is_backed_up() {
    let test = "a_block_device_in_use_is_backed_up";
    if !tools(test, QEMU_NBD) {
        return;
    }
    let bv = Bv::new();
    let file = bv.path("backing.img");
    let data = random_data(7, 4 * MIB as usize);
    write_file(&file, &data);
    let Some(dev) = LoopDev::attach(&file, test) else {
        return;
    };
    // qemu-nbd holds QEMU's write lock on the device node: not a reason to refuse a device.
    let server = serve_raw(&bv, &dev.path, true);
    let doc = bv.backup(&dev.path, "dev", &[]);
    drop(server);
    bv.restore_and_compare(&format!("dev@{}", text(&doc, "short_id")), &data);
}
