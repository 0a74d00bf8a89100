//! The one place blockvault runs `qemu-img`: adding and removing a qcow2 image's persistent
//! dirty bitmaps for `--bitmap auto`, and creating the empty qcow2 images a running VM's
//! backup fleeces into (`crate::vm`).
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

/// `qemu-img create -q -f qcow2 IMAGE SIZE`: an empty image, for QEMU to open as the
/// fleecing target of a drive of `size` bytes (its backing node is given when QEMU opens it).
pub fn create_qcow2(image: &Path, size: u64) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(image)
        .arg(size.to_string());
    let what = format!("qemu-img create -q -f qcow2 {} {size}", image.display());
    run(cmd, &what, "a running VM's backup")
}

fn bitmap(image: &Path, name: &str, ops: &[&str]) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("bitmap")
        .args(ops)
        .args(["-f", "qcow2"])
        .arg(image)
        .arg(name);
    let what = format!(
        "qemu-img bitmap {} -f qcow2 {} {name}",
        ops.join(" "),
        image.display()
    );
    run(cmd, &what, "--bitmap auto")
}

/// Run `cmd` (`what` for messages; `needed_by` says which feature needs qemu-img).
fn run(mut cmd: Command, what: &str, needed_by: &str) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "{needed_by} runs qemu-img, which is not on PATH (Debian: apt-get \
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
