//! The objects a backup of a running VM creates in QEMU, and their removal: a fleecing view
//! of each drive (the drive as it was at the point in time, while the guest keeps writing),
//! QEMU's NBD server on a Unix socket, and an NBD export of each view.
//!
//! ```text
//! before the transaction: qemu-img create SCRATCH/<qmp>.blockvault-<run>-<i>.qcow2 (empty)
//!                         blockdev-add qcow2 node blockvault-<run>-f<i>, backing = the drive
//! in the transaction:     blockdev-backup sync=none drive → view  (job blockvault-<run>-j<i>:
//!                         QEMU copies a cluster into the view before the guest overwrites it)
//! after it:               nbd-server-start unix SCRATCH/<qmp>.blockvault-nbd
//!                         block-export-add blockvault-<run>-e<i> of the view (read-only, with
//!                         the bitmap to read as {node, name}: QEMU 7.1 on)
//! teardown (always):      block-export-del, nbd-server-stop, block-job-cancel, blockdev-del,
//!                         the view's file removed
//! ```
//!
//! `blockdev-backup sync=none` into a qcow2 whose backing is the drive is the fleecing QEMU has
//! had since 2.x and the one that works on Debian 12's 7.2: the `copy-before-write` filter
//! with a `snapshot-access` node (QEMU 7.1 on) needs the filter inserted above a drive a
//! device is using, which only `blockdev-replace` (QEMU 10.1 on) can do to a running VM; the
//! backup job inserts the same filter itself. The view's file holds only the clusters the
//! guest overwrote during the backup.
//!
//! Everything is named `blockvault-…`, so a run killed before its teardown leaves objects the
//! next run recognises and removes ([`clean_leftovers`]): exports, the NBD server (ours if it
//! listens on our socket path), jobs, nodes and their files. A VM has one NBD server; if
//! someone else runs one (a libvirt backup job), the backup fails saying so.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::drives::{self, Drive};
use crate::changes::qemu_img;
use crate::engine::auto_bitmap::PREFIX;
use crate::error::{Error, ErrorKind, Result};
use crate::qmp::Qmp;

/// The longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// One drive's fleecing view.
#[derive(Debug)]
struct View {
    drive: String,
    node: String,
    job: String,
    export: String,
    file: PathBuf,
    /// How far its set-up went, so teardown undoes exactly that.
    file_made: bool,
    node_added: bool,
    job_started: bool,
    exported: bool,
}

/// The fleecing views of one run and QEMU's NBD server serving them.
#[derive(Debug)]
pub struct Fleece {
    views: Vec<View>,
    socket: PathBuf,
    server: bool,
    timeout: Duration,
}

/// Where the NBD server of the VM at QMP socket `qmp` listens: `SCRATCH/<qmp file>.blockvault-nbd`
/// (fixed, so a later run can tell a server a killed run left from someone else's).
pub fn nbd_socket(qmp: &Path, scratch: &Path) -> Result<PathBuf> {
    let socket = scratch.join(format!("{}.blockvault-nbd", stem(qmp)));
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::usage(format!(
            "{} is longer than a Unix socket path can be ({MAX_SOCKET_PATH} bytes): give a \
             shorter --scratch folder",
            socket.display()
        )));
    }
    Ok(socket)
}

impl Fleece {
    /// The views of `drives` for run `run` (8 hex digits), their files in `scratch`, the
    /// server on `socket`; nothing is created yet.
    pub fn plan(
        drives: &[Drive],
        run: &str,
        qmp: &Path,
        scratch: &Path,
        socket: PathBuf,
        timeout: Duration,
    ) -> Fleece {
        let stem = stem(qmp);
        let views = drives
            .iter()
            .enumerate()
            .map(|(i, d)| View {
                drive: d.node.clone(),
                node: format!("{PREFIX}{run}-f{i}"),
                job: format!("{PREFIX}{run}-j{i}"),
                export: format!("{PREFIX}{run}-e{i}"),
                file: scratch.join(format!("{stem}.{PREFIX}{run}-{i}.qcow2")),
                file_made: false,
                node_added: false,
                job_started: false,
                exported: false,
            })
            .collect();
        Fleece {
            views,
            socket,
            server: false,
            timeout,
        }
    }

    /// Create each view's empty image and open it in QEMU over its drive (not attached to
    /// anything until the transaction starts the backup job).
    pub fn add_nodes(&mut self, qmp: &mut Qmp, drives: &[Drive]) -> Result<()> {
        for (v, d) in self.views.iter_mut().zip(drives) {
            qemu_img::create_qcow2(&v.file, d.size)?;
            v.file_made = true;
            qmp.execute(
                "blockdev-add",
                json!({
                    "driver": "qcow2",
                    "node-name": v.node,
                    "file": {"driver": "file", "filename": v.file},
                    "backing": v.drive,
                }),
            )?;
            v.node_added = true;
        }
        Ok(())
    }

    /// The transaction actions that start the views: one `blockdev-backup sync=none` each.
    pub fn actions(&self) -> Vec<Value> {
        self.views
            .iter()
            .map(|v| {
                json!({"type": "blockdev-backup", "data": {
                    "job-id": v.job, "device": v.drive, "target": v.node, "sync": "none",
                }})
            })
            .collect()
    }

    /// The transaction was applied: the jobs run.
    pub fn started(&mut self) {
        for v in &mut self.views {
            v.job_started = true;
        }
    }

    /// Start QEMU's NBD server and export every view, with `bitmaps[i]` (the dirty bitmap
    /// of drive i to offer, if any) as `qemu:dirty-bitmap:NAME`.
    pub fn export(&mut self, qmp: &mut Qmp, bitmaps: &[Option<String>]) -> Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let started = qmp.call(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": self.socket}}}),
        )?;
        if let Err(e) = started {
            let hint = if e.desc.contains("already running") {
                " (QEMU runs one NBD server, and someone else's is running: a libvirt \
                 backup job, another tool; back up when it has finished)"
            } else {
                ""
            };
            return Err(Error::new(
                ErrorKind::Io,
                format!("QEMU's QMP socket {}: {e}{hint}", qmp.path().display()),
            ));
        }
        self.server = true;
        for (v, bitmap) in self.views.iter_mut().zip(bitmaps) {
            let mut export = json!({
                "type": "nbd", "id": v.export, "node-name": v.node, "name": v.export,
                "writable": false,
            });
            if let Some(b) = bitmap {
                export["bitmaps"] = json!([{"node": v.drive, "name": b}]);
            }
            qmp.execute("block-export-add", export)?;
            v.exported = true;
        }
        Ok(())
    }

    /// The NBD URL of view `i`.
    pub fn url(&self, i: usize) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.views[i].export,
            percent(&self.socket.to_string_lossy())
        )
    }

    /// Undo whatever was set up, in reverse; every step is tried. Returns the failures (QEMU
    /// gone, a refusal), each naming what was left.
    pub fn teardown(&mut self, qmp: &mut Qmp) -> Vec<String> {
        let mut failed = Vec::new();
        let mut note = |what: String, r: Result<()>| {
            if let Err(e) = r {
                failed.push(format!("{what}: {e}"));
            }
        };
        for v in self.views.iter_mut().filter(|v| v.exported) {
            note(
                format!("export {}", v.export),
                delete_export(qmp, &v.export, self.timeout),
            );
            v.exported = false;
        }
        if self.server {
            note(
                "the NBD server".into(),
                qmp.execute("nbd-server-stop", json!({})).map(drop),
            );
            self.server = false;
            let _ = std::fs::remove_file(&self.socket);
        }
        for v in self.views.iter_mut().filter(|v| v.job_started) {
            note(
                format!("job {}", v.job),
                cancel_job(qmp, &v.job, self.timeout),
            );
            v.job_started = false;
        }
        for v in self.views.iter_mut().filter(|v| v.node_added) {
            note(
                format!("node {}", v.node),
                qmp.execute("blockdev-del", json!({"node-name": v.node}))
                    .map(drop),
            );
            v.node_added = false;
        }
        for v in self.views.iter_mut().filter(|v| v.file_made) {
            note(format!("file {}", v.file.display()), remove_file(&v.file));
            v.file_made = false;
        }
        failed
    }
}

/// Remove what killed runs left in QEMU (module doc), and their view files in `scratch`;
/// returns a line per object removed.
pub fn clean_leftovers(
    qmp: &mut Qmp,
    scratch: &Path,
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Value::Array(exports) = qmp.execute("query-block-exports", json!({}))? {
        for id in exports.iter().filter_map(|e| ours(&e["id"])) {
            delete_export(qmp, id, timeout)?;
            removed.push(format!("export {id}"));
        }
    }
    // Our server listens on our socket path: a connection there proves it is ours.
    if UnixStream::connect(socket).is_ok() {
        qmp.execute("nbd-server-stop", json!({}))?;
        removed.push(format!("the NBD server on {}", socket.display()));
    }
    let _ = std::fs::remove_file(socket);
    if let Value::Array(jobs) = qmp.execute("query-jobs", json!({}))? {
        for id in jobs.iter().filter_map(|j| ours(&j["id"])) {
            cancel_job(qmp, id, timeout)?;
            removed.push(format!("job {id}"));
        }
    }
    for node in drives::nodes(qmp)? {
        if let Some(name) = ours(&node["node-name"]) {
            qmp.execute("blockdev-del", json!({"node-name": name}))?;
            removed.push(format!("node {name}"));
        }
    }
    // No view of this VM is open now (its QMP monitor is ours alone): every view file of it
    // in the scratch folder is a leftover.
    let prefix = format!("{}.{PREFIX}", stem(qmp.path()));
    let files = std::fs::read_dir(scratch)
        .map_err(|e| Error::io(format!("listing --scratch folder {}", scratch.display()), e))?;
    for f in files.flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && is_view_file(&f.path()) {
            remove_file(&f.path())?;
            removed.push(format!("file {}", f.path().display()));
        }
    }
    Ok(removed)
}

/// The QMP socket's file name, which the NBD socket's and the view files' names start with.
fn stem(qmp: &Path) -> String {
    qmp.file_name()
        .map_or_else(|| "qmp".into(), |n| n.to_string_lossy().into_owned())
}

/// A node, job or export id of ours: `blockvault-<run>-…` (bitmaps have their own names).
fn ours(id: &Value) -> Option<&str> {
    id.as_str().filter(|s| s.starts_with(PREFIX))
}

fn is_view_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains(&format!(".{PREFIX}")) && n.ends_with(".qcow2"))
}

/// `block-export-del` (hard: drop any client), then wait until QEMU lists it no more.
fn delete_export(qmp: &mut Qmp, id: &str, timeout: Duration) -> Result<()> {
    qmp.execute("block-export-del", json!({"id": id, "mode": "hard"}))?;
    wait_until(qmp, timeout, &format!("export {id} still listed"), |qmp| {
        let exports = qmp.execute("query-block-exports", json!({}))?;
        Ok(!exports
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["id"] == id)))
    })
}

/// `block-job-cancel` (force), then wait until the job is gone (dismissing it if it stays
/// concluded).
fn cancel_job(qmp: &mut Qmp, id: &str, timeout: Duration) -> Result<()> {
    if let Err(e) = qmp.call("block-job-cancel", json!({"device": id, "force": true}))? {
        // A job that already concluded cannot be cancelled; dismiss it below.
        tracing::debug!(job = id, error = %e, "block-job-cancel");
    }
    wait_until(qmp, timeout, &format!("job {id} still exists"), |qmp| {
        let jobs = qmp.execute("query-jobs", json!({}))?;
        let Some(job) = jobs
            .as_array()
            .and_then(|j| j.iter().find(|j| j["id"] == id))
        else {
            return Ok(true);
        };
        if job["status"] == "concluded" {
            qmp.execute("job-dismiss", json!({"id": id}))?;
        }
        Ok(false)
    })
}

/// Ask `done` every 5 ms until it says so; after `timeout`, an error saying `still` (what
/// is still there) `timeout` after its removal was asked for.
fn wait_until(
    qmp: &mut Qmp,
    timeout: Duration,
    still: &str,
    mut done: impl FnMut(&mut Qmp) -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done(qmp)? {
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "QEMU's QMP socket {}: {still} {} s after its removal",
                    qmp.path().display(),
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Percent-encode everything but unreserved characters and `/` (an NBD URL's socket path).
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::nbd::url::{parse, Endpoint};

    #[test]
    fn view_urls_reach_the_socket_whatever_its_path() {
        let drive = Drive {
            given: "d".into(),
            node: "d".into(),
            driver: "qcow2".into(),
            size: 1 << 20,
            bitmaps: Vec::new(),
        };
        let qmp = Path::new("/run/vm 1?.qmp");
        let scratch = Path::new("/tmp/a&b%");
        let socket = nbd_socket(qmp, scratch).unwrap();
        assert_eq!(socket, Path::new("/tmp/a&b%/vm 1?.qmp.blockvault-nbd"));
        let f = Fleece::plan(
            &[drive],
            "0123abcd",
            qmp,
            scratch,
            socket.clone(),
            Duration::ZERO,
        );
        let url = parse(&f.url(0)).unwrap();
        assert_eq!(url.endpoint, Endpoint::Unix(socket));
        assert_eq!(url.export, "blockvault-0123abcd-e0");
        assert!(is_view_file(&f.views[0].file), "{:?}", f.views[0].file);
        assert!(!is_view_file(Path::new("/var/lib/vm1.qcow2")));
        let long = "x".repeat(100);
        assert!(nbd_socket(qmp, Path::new(&long)).is_err());
    }
}
