//! `backup --changed FILE`: a JSON list of changed byte ranges, in the shapes the tools that
//! track changes produce, so their output can be passed on unedited:
//!
//! | shape | example | granularity |
//! |---|---|---|
//! | plain | `[{"offset":0,"length":4096}]` | 1 (exact) |
//! | AWS EBS `ListChangedBlocks` (one page, or an array of pages) | `{"BlockSize":524288,"ChangedBlocks":[{"BlockIndex":3}]}` | `BlockSize` |
//! | Azure `GetPageRangesDiff` (SDK JSON; `end` inclusive; cleared ranges count as changed) | `{"pageRange":[{"start":0,"end":511}],"clearRange":[]}` | 512 |
//! | VMware `QueryChangedDiskAreas` (`DiskChangeInfo`, or an array of them) | `{"startOffset":0,"length":N,"changedArea":[{"start":0,"length":65536}]}` | 1 |
//!
//! A list that says it is incomplete (an EBS page with `NextToken`) is refused: trusting part
//! of a list would silently miss changes.

use std::ops::Range;

use serde::Deserialize;
use serde_json::Value;

use super::ChangeList;
use crate::error::{Error, Result};

/// A loaded range list and what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The ranges.
    pub list: ChangeList,
    /// Which shape the file had: `plain`, `aws-ebs`, `azure-page-ranges`, `vmware-cbt`.
    pub format: &'static str,
    /// Bytes from 0 the list speaks for, when it says (VMware's `startOffset + length`); a
    /// disk larger than that is refused.
    pub covers: Option<u64>,
}

/// Read and parse `path`.
pub fn load(path: &str) -> Result<Loaded> {
    let text =
        std::fs::read(path).map_err(|e| Error::io(format!("reading change list {path}"), e))?;
    let value: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::usage(format!("change list {path} is not JSON: {e}")))?;
    parse(&value).map_err(|msg| Error::usage(format!("change list {path}: {msg}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain {
    offset: u64,
    length: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EbsPage {
    block_size: u64,
    changed_blocks: Vec<EbsBlock>,
    #[serde(default)]
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EbsBlock {
    block_index: u64,
}

#[derive(Deserialize)]
struct AzureDiff {
    #[serde(default, alias = "PageRange", alias = "page_ranges")]
    #[serde(rename = "pageRange")]
    page_range: Vec<AzureRange>,
    #[serde(default, alias = "ClearRange", alias = "clear_ranges")]
    #[serde(rename = "clearRange")]
    clear_range: Vec<AzureRange>,
}

#[derive(Deserialize)]
struct AzureRange {
    #[serde(alias = "Start")]
    start: u64,
    #[serde(alias = "End")]
    end: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmwareInfo {
    start_offset: u64,
    length: u64,
    #[serde(default)]
    changed_area: Vec<VmwareArea>,
}

#[derive(Deserialize)]
struct VmwareArea {
    start: u64,
    length: u64,
}

/// Recognise the shape by its keys and convert it.
fn parse(v: &Value) -> std::result::Result<Loaded, String> {
    let first = match v {
        Value::Array(items) => items.first(),
        other => Some(other),
    };
    let keys = |k: &str| first.and_then(|f| f.get(k)).is_some();
    if v.as_array().is_some_and(|a| a.is_empty()) || keys("offset") {
        let items: Vec<Plain> = from(v)?;
        let ranges = items
            .iter()
            .map(|p| span(p.offset, p.length))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        return Ok(loaded(1, ranges, "plain", None));
    }
    if keys("ChangedBlocks") {
        let pages: Vec<EbsPage> = one_or_many(v)?;
        let mut ranges = Vec::new();
        let mut block = None;
        for (i, p) in pages.iter().enumerate() {
            if !p.block_size.is_power_of_two() || block.is_some_and(|b| b != p.block_size) {
                return Err(format!(
                    "page {i}: BlockSize {} is not a power of two or differs between pages",
                    p.block_size
                ));
            }
            block = Some(p.block_size);
            if p.next_token.as_deref().is_some_and(|t| !t.is_empty()) && i + 1 == pages.len() {
                return Err("the last page has a NextToken, so the list is incomplete: fetch every page and pass them as a JSON array".into());
            }
            for b in &p.changed_blocks {
                let start = b
                    .block_index
                    .checked_mul(p.block_size)
                    .ok_or("BlockIndex overflows")?;
                ranges.push(span(start, p.block_size)?);
            }
        }
        return Ok(loaded(block.unwrap_or(1), ranges, "aws-ebs", None));
    }
    if [
        "pageRange",
        "clearRange",
        "PageRange",
        "ClearRange",
        "page_ranges",
    ]
    .iter()
    .any(|k| keys(k))
    {
        let d: AzureDiff = from(v)?;
        let ranges = d
            .page_range
            .iter()
            .chain(&d.clear_range)
            .map(|r| match r.end.checked_add(1) {
                Some(end) if end > r.start => Ok(r.start..end),
                _ => Err(format!("page range {}..={} is not a range", r.start, r.end)),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        return Ok(loaded(512, ranges, "azure-page-ranges", None));
    }
    if keys("changedArea") || keys("startOffset") {
        let infos: Vec<VmwareInfo> = one_or_many(v)?;
        let mut covers = 0u64;
        let mut ranges = Vec::new();
        for (i, info) in infos.iter().enumerate() {
            if info.start_offset != covers {
                return Err(format!("DiskChangeInfo {i} starts at {} but the previous ones end at {covers}: pass every call's result, in order", info.start_offset));
            }
            let area = span(info.start_offset, info.length)?;
            covers = area.end;
            for a in &info.changed_area {
                let r = span(a.start, a.length)?;
                if r.start < area.start || r.end > area.end {
                    return Err(format!(
                        "changed area {}+{} lies outside its DiskChangeInfo {}..{}",
                        a.start, a.length, area.start, area.end
                    ));
                }
                ranges.push(r);
            }
        }
        return Ok(loaded(1, ranges, "vmware-cbt", Some(covers)));
    }
    Err("not a recognised shape: expected [{\"offset\",\"length\"}], an AWS EBS ListChangedBlocks result, an Azure GetPageRangesDiff result or a VMware DiskChangeInfo".into())
}

fn loaded(
    granularity: u64,
    ranges: Vec<Range<u64>>,
    format: &'static str,
    covers: Option<u64>,
) -> Loaded {
    Loaded {
        list: ChangeList::new(granularity, ranges),
        format,
        covers,
    }
}

fn span(start: u64, len: u64) -> std::result::Result<Range<u64>, String> {
    let end = start
        .checked_add(len)
        .ok_or_else(|| format!("range {start}+{len} overflows"))?;
    Ok(start..end)
}

fn from<T: for<'de> Deserialize<'de>>(v: &Value) -> std::result::Result<T, String> {
    T::deserialize(v).map_err(|e| e.to_string())
}

fn one_or_many<T: for<'de> Deserialize<'de>>(v: &Value) -> std::result::Result<Vec<T>, String> {
    match v {
        Value::Array(_) => from(v),
        _ => Ok(vec![from(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ranges(v: Value) -> (Vec<Range<u64>>, u64, &'static str) {
        let l = parse(&v).unwrap();
        (l.list.ranges, l.list.granularity, l.format)
    }

    #[test]
    fn plain_list() {
        let (r, g, f) =
            ranges(json!([{"offset": 8192, "length": 4096}, {"offset": 0, "length": 10}]));
        assert_eq!((r, g, f), (vec![0..10, 8192..12288], 1, "plain"));
        assert_eq!(ranges(json!([])).0, vec![]);
        assert!(parse(&json!([{"offset": u64::MAX, "length": 2}])).is_err());
        assert!(parse(&json!([{"offset": 1, "length": 2, "extra": 1}])).is_err());
    }

    #[test]
    fn aws_ebs_pages() {
        let page = json!({"ChangedBlocks": [{"BlockIndex": 2, "FirstBlockToken": "a"}],
            "ExpiryTime": 1.0, "VolumeSize": 8, "BlockSize": 524288});
        assert_eq!(
            ranges(page.clone()),
            (
                std::iter::once(1 << 20..3 << 19).collect(),
                524288,
                "aws-ebs"
            )
        );
        let more =
            json!({"ChangedBlocks": [{"BlockIndex": 0}], "BlockSize": 524288, "NextToken": "x"});
        assert!(parse(&more).unwrap_err().contains("NextToken"));
        assert_eq!(
            ranges(json!([more, page])).0,
            vec![0..524288, 1 << 20..3 << 19]
        );
    }

    #[test]
    fn azure_page_ranges_are_inclusive_and_clears_count() {
        let v = json!({"pageRange": [{"start": 0, "end": 511}], "clearRange": [{"start": 4096, "end": 8191}]});
        assert_eq!(
            ranges(v),
            (vec![0..512, 4096..8192], 512, "azure-page-ranges")
        );
        assert!(parse(&json!({"pageRange": [{"start": 5, "end": 1}]})).is_err());
    }

    #[test]
    fn vmware_areas_must_be_contiguous_calls() {
        let a = json!({"startOffset": 0, "length": 1 << 20, "changedArea": [{"start": 65536, "length": 65536}]});
        let b = json!({"startOffset": 1 << 20, "length": 1 << 20, "changedArea": []});
        let l = parse(&json!([a.clone(), b])).unwrap();
        assert_eq!(
            (l.list.ranges, l.covers, l.format),
            (
                std::iter::once(65536..131072).collect(),
                Some(2 << 20),
                "vmware-cbt"
            )
        );
        let gap = json!({"startOffset": 4 << 20, "length": 1, "changedArea": []});
        assert!(parse(&json!([a, gap])).unwrap_err().contains("in order"));
    }

    #[test]
    fn unknown_shape_is_refused() {
        assert!(parse(&json!({"what": 1}))
            .unwrap_err()
            .contains("not a recognised shape"));
    }
}
