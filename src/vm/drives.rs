//! The VM's drives as QEMU describes them: which block node a `--disk-map` name is, its
//! format, size and dirty bitmaps (`query-named-block-nodes`, `query-block`).

use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};
use crate::qmp::Qmp;
use crate::source::BitmapInfo;

/// A dirty bitmap of a block node, as `query-named-block-nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBitmap {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Recording writes (enabled).
    pub recording: bool,
    /// In use by an operation (an export, a job): cannot be changed now.
    pub busy: bool,
    /// Stored in the qcow2 image when QEMU closes it.
    pub persistent: bool,
    /// Loaded from an image a QEMU did not close cleanly: it may miss writes.
    pub inconsistent: bool,
    /// Bytes marked dirty (QEMU counts whole granules).
    pub count: u64,
}

impl From<&QemuBitmap> for BitmapInfo {
    fn from(b: &QemuBitmap) -> Self {
        BitmapInfo {
            name: b.name.clone(),
            granularity: Some(b.granularity),
            enabled: Some(b.recording),
            in_use: b.inconsistent,
            dirty_bytes: Some(b.count),
        }
    }
}

/// A drive to back up.
#[derive(Debug, Clone)]
pub struct Drive {
    /// The name given in `--disk-map`.
    pub given: String,
    /// Its block node's name (the device's root node when a device id was given).
    pub node: String,
    /// The node's driver (`qcow2`, `raw`, ...): only qcow2 stores persistent bitmaps.
    pub driver: String,
    /// Its virtual size.
    pub size: u64,
    /// Its named dirty bitmaps.
    pub bitmaps: Vec<QemuBitmap>,
}

impl Drive {
    /// The bitmap called `name`.
    pub fn bitmap(&self, name: &str) -> Option<&QemuBitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// Every block node (`query-named-block-nodes` with `flat`: QEMU 5.0 on).
pub fn nodes(qmp: &mut Qmp) -> Result<Vec<Value>> {
    match qmp.execute("query-named-block-nodes", json!({"flat": true}))? {
        Value::Array(nodes) => Ok(nodes),
        other => Err(Error::integrity(format!(
            "QEMU's QMP socket {}: query-named-block-nodes returned {other}",
            qmp.path().display()
        ))),
    }
}

/// The drives named in `given` (node names or device ids), in that order. A name QEMU does
/// not know is [`ErrorKind::NotFound`], listing the node names and devices it has.
pub fn resolve(qmp: &mut Qmp, given: &[String]) -> Result<Vec<Drive>> {
    let nodes = nodes(qmp)?;
    let devices = match qmp.execute("query-block", json!({}))? {
        Value::Array(d) => d,
        _ => Vec::new(),
    };
    given
        .iter()
        .map(|name| {
            let node_name = if nodes.iter().any(|n| n["node-name"] == name.as_str()) {
                name.clone()
            } else {
                devices
                    .iter()
                    .find(|d| d["device"] == name.as_str() || d["qdev"] == name.as_str())
                    .and_then(|d| d["inserted"]["node-name"].as_str())
                    .map(String::from)
                    .ok_or_else(|| unknown(qmp, name, &nodes, &devices))?
            };
            let node = nodes
                .iter()
                .find(|n| n["node-name"] == node_name.as_str())
                .ok_or_else(|| unknown(qmp, name, &nodes, &devices))?;
            Ok(Drive {
                given: name.clone(),
                driver: node["drv"].as_str().unwrap_or_default().to_owned(),
                size: node["image"]["virtual-size"].as_u64().unwrap_or(0),
                bitmaps: bitmaps_of(node),
                node: node_name,
            })
        })
        .collect()
}

/// The named bitmaps of the node called `node` among `nodes`.
pub fn bitmaps_in(nodes: &[Value], node: &str) -> Vec<QemuBitmap> {
    nodes
        .iter()
        .find(|n| n["node-name"] == node)
        .map(bitmaps_of)
        .unwrap_or_default()
}

fn bitmaps_of(node: &Value) -> Vec<QemuBitmap> {
    let Some(list) = node["dirty-bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|b| {
            Some(QemuBitmap {
                name: b["name"].as_str()?.to_owned(),
                granularity: b["granularity"].as_u64().unwrap_or(0),
                recording: b["recording"].as_bool().unwrap_or(false),
                busy: b["busy"].as_bool().unwrap_or(false),
                persistent: b["persistent"].as_bool().unwrap_or(false),
                inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                count: b["count"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

fn unknown(qmp: &Qmp, name: &str, nodes: &[Value], devices: &[Value]) -> Error {
    let mut known: Vec<String> = nodes
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        // Auto-generated names (`#block123`) and blockvault's own nodes are nobody's choice.
        .filter(|n| !n.starts_with('#') && !n.starts_with(crate::engine::auto_bitmap::PREFIX))
        .map(|n| format!("node {n}"))
        .collect();
    known.extend(
        devices
            .iter()
            .filter_map(|d| d["device"].as_str().filter(|d| !d.is_empty()))
            .map(|d| format!("device {d}")),
    );
    known.sort();
    let offers = if known.is_empty() {
        "it has no named block nodes or devices".to_owned()
    } else {
        format!("it has: {}", known.join(", "))
    };
    Error::new(
        ErrorKind::NotFound,
        format!(
            "QEMU's QMP socket {} has no block node or device {name}; {offers}",
            qmp.path().display()
        ),
    )
}
