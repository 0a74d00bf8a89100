//! What `backup qmp:///PATH --disk-map NODE=DISK[,…]` names: the QMP socket and which block
//! node goes to which vault disk.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The scheme of a running QEMU's QMP socket.
pub const SCHEME: &str = "qmp://";

/// Whether `source` names a running QEMU (`qmp://…`) rather than an image, device or export.
pub fn is_qmp_url(source: &str) -> bool {
    source.starts_with(SCHEME)
}

/// The QMP socket of `qmp:///PATH`: an absolute path (three slashes).
pub fn socket_path(url: &str) -> Result<PathBuf> {
    let path = url.strip_prefix(SCHEME).unwrap_or(url);
    if !path.starts_with('/') || path.len() < 2 {
        return Err(Error::usage(format!(
            "{url}: a running QEMU is qmp:///PATH/TO/QMP.sock, the absolute path of its QMP \
             socket (QEMU's -qmp unix:PATH,server=on,wait=off)"
        )));
    }
    Ok(PathBuf::from(path))
}

/// One disk of the VM: the QEMU block node (or device) and the vault disk it is backed up as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// A node name (`-blockdev node-name=`) or device id (`-drive id=`, a qdev id).
    pub node: String,
    /// The vault disk.
    pub disk: String,
}

/// Parse `NODE=DISK[,NODE=DISK…]`: at least one pair, no node and no disk twice.
pub fn parse_disk_map(s: &str) -> Result<Vec<Mapping>> {
    let usage = |why: String| {
        Error::usage(format!(
            "--disk-map {s:?}: {why} (expected NODE=DISK[,NODE=DISK...])"
        ))
    };
    let mut map: Vec<Mapping> = Vec::new();
    for pair in s.split(',') {
        let (node, disk) = pair
            .split_once('=')
            .ok_or_else(|| usage(format!("{pair:?} has no '='")))?;
        let (node, disk) = (node.trim(), disk.trim());
        if node.is_empty() || disk.is_empty() {
            return Err(usage(format!("{pair:?} lacks a node or a disk name")));
        }
        if map.iter().any(|m| m.node == node) {
            return Err(usage(format!("node {node} is mapped twice")));
        }
        if map.iter().any(|m| m.disk == disk) {
            return Err(usage(format!(
                "disk {disk} is given to two nodes (one vault disk per drive)"
            )));
        }
        map.push(Mapping {
            node: node.to_owned(),
            disk: disk.to_owned(),
        });
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_maps() {
        assert!(is_qmp_url("qmp:///run/vm1.qmp") && !is_qmp_url("/run/vm1.qmp"));
        assert_eq!(
            socket_path("qmp:///run/vm1.qmp").unwrap(),
            PathBuf::from("/run/vm1.qmp")
        );
        for bad in ["qmp://run/vm1.qmp", "qmp://", "qmp:///"] {
            let e = socket_path(bad).unwrap_err();
            assert!(e.to_string().contains("qmp:///PATH/TO/QMP.sock"), "{e}");
        }
        assert_eq!(
            parse_disk_map("drive0=vm1-root, drive1=vm1-data").unwrap(),
            vec![
                Mapping {
                    node: "drive0".into(),
                    disk: "vm1-root".into()
                },
                Mapping {
                    node: "drive1".into(),
                    disk: "vm1-data".into()
                }
            ]
        );
        for (bad, why) in [
            ("", "has no '='"),
            ("a", "has no '='"),
            ("a=", "lacks"),
            ("a=x,a=y", "node a is mapped twice"),
            ("a=x,b=x", "disk x is given to two nodes"),
        ] {
            let e = parse_disk_map(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }
}
