//! Human or JSON output, errors, and the progress bar.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};
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
        // A closed pipe (`blockvault snapshots | head`) is the reader's choice, not an error.
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
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

    /// A progress bar on a terminal (never with --json or when stderr is not a terminal).
    pub fn progress(&self, what: &'static str) -> Bar {
        let show = !self.json && std::io::stderr().is_terminal();
        let bar = if show {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what);
        Bar(bar)
    }
}

/// A progress bar fed by the library.
pub struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// Megabytes (10^6) per second.
pub fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        0.0
    } else {
        (bytes as f64 / 1e6 / seconds * 10.0).round() / 10.0
    }
}
