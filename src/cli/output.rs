//! Human or JSON output, errors, and the progress bar.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use blockvault::engine::Progress;

/// How results are printed.
pub struct Output {
    json: bool,
}

impl Output {
    /// `json`: one JSON document on stdout, nothing else there.
    pub fn new(json: bool) -> Self {
        Output { json }
    }

    /// Print the command's result: `doc` as JSON, or `human` as text.
    pub fn result(&self, doc: Value, human: impl FnOnce() -> String) {
        let text = if self.json {
            serde_json::to_string_pretty(&doc).expect("JSON values serialise") + "\n"
        } else {
            human()
        };
        print(text.as_bytes());
    }

    /// Print one event of a long-running command: a compact JSON line on stdout, flushed at
    /// once, with --json; nothing otherwise (its text goes to stderr).
    pub fn event(&self, doc: Value) {
        if self.json {
            print(format!("{doc}\n").as_bytes());
        }
    }

    /// Report a failure: the error and its causes, on stderr (and as JSON on stdout with --json).
    pub fn error(&self, e: &anyhow::Error) {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        if self.json {
            let kind = e
                .downcast_ref::<blockvault::Error>()
                .map(|e| format!("{:?}", e.kind()));
            println!(
                "{}",
                serde_json::json!({ "error": chain.join(": "), "kind": kind })
            );
        }
        eprintln!("error: {}", chain.join(": "));
    }

    /// A progress bar on a terminal (never with --json or when stderr is not a terminal). Its
    /// total is the work the library announces (bytes to read, or to write), not the disk
    /// size, so its rate and ETA are those of the real work; sizes and rate are in binary
    /// units (MiB, MiB/s), as everywhere in the text output.
    pub fn progress(&self, what: &'static str) -> Bar {
        // Hidden until the work starts: a bar of unknown length would show as complete.
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what);
        Bar {
            bar,
            show: !self.json && std::io::stderr().is_terminal(),
        }
    }
}

/// A progress bar fed by the library.
pub struct Bar {
    bar: ProgressBar,
    show: bool,
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.bar.set_length(total);
        // The clock starts with the work: opening and planning are not part of its rate.
        self.bar.reset();
        if self.show {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.tick();
        }
    }
    fn advance(&self, bytes: u64) {
        // Nothing done (a zero slot left as a hole) is no reason to redraw.
        if bytes > 0 {
            self.bar.inc(bytes);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Seconds since the epoch as RFC 3339 UTC (`2026-12-06T20:01:51Z`): the one timestamp format
/// of every output, text and JSON.
pub fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// Write `bytes` to stdout. A closed pipe (`blockvault snapshots | head`) is the reader's
/// choice, not an error.
pub fn print(bytes: &[u8]) {
    let _ = std::io::stdout().lock().write_all(bytes);
}

/// Megabytes (10^6 bytes) per second, one decimal: the JSON `mb_per_s` of the bytes a
/// command read (backup) or wrote (restore).
pub fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    per_second(bytes as f64 / 1e6, seconds)
}

/// Mebibytes (2^20 bytes) per second, one decimal: the rate in the text output, whose sizes
/// are MiB too.
pub fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    per_second(bytes as f64 / (1u64 << 20) as f64, seconds)
}

fn per_second(amount: f64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        0.0
    } else {
        (amount / seconds * 10.0).round() / 10.0
    }
}

/// A duration in seconds as every JSON document gives it: to the millisecond.
pub fn seconds(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}
