//! The one place blockvault runs `qemu-img`: adding and removing a qcow2 image's persistent
//! dirty bitmaps for `--bitmap auto`.
//!
//! Writing a qcow2 bitmap directory by hand would mean writing refcounts, clusters and the
//! header extension: QEMU's own tool does it under QEMU's locks, and refuses an image another
//! process holds for writing. `qemu-img bitmap` (QEMU 5.0 on) takes the same arguments in
//! 7.2 (Debian 12) and 10.0. It is run from `PATH`, only while blockvault's own reader has
//! the image closed (the reader holds QEMU's shared locks, which `qemu-img bitmap` needs
//! to be free).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::{Error, ErrorKind, Result};

/// `qemu-img bitmap -f qcow2 --add --enable IMAGE NAME`: a bitmap recording every write from
/// now on, at QEMU's default granularity for the image.
pub fn add(image: &Path, name: &str) -> Result<()> {
    bitmap(image, name, &["--add", "--enable"])
}

/// `qemu-img bitmap -f qcow2 --remove IMAGE NAME`.
pub fn remove(image: &Path, name: &str) -> Result<()> {
    bitmap(image, name, &["--remove"])
}

fn bitmap(image: &Path, name: &str, ops: &[&str]) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("bitmap")
        .args(ops)
        .args(["-f", "qcow2"])
        .arg(image)
        .arg(name)
        .stdin(Stdio::null());
    let what = format!(
        "qemu-img bitmap {} -f qcow2 {} {name}",
        ops.join(" "),
        image.display()
    );
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "--bitmap auto runs qemu-img, which is not on PATH (Debian: apt-get \
                     install qemu-utils): cannot run {what}"
                ),
            )
            .with_source(e)
        } else {
            Error::io(format!("cannot run {what}"), e)
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(Error::new(
        ErrorKind::Io,
        format!("{what} failed ({}): {}", out.status, said.trim()),
    ))
}
