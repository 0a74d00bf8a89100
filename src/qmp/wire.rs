//! QMP and guest-agent messages on the wire: a byte stream cut into JSON objects, and each
//! object classified. Pure functions over bytes, fuzzed by `fuzz/fuzz_targets/qmp_reply.rs`.
//!
//! **Framing.** QEMU ends every QMP message with CRLF, but a monitor configured `pretty=on`
//! spreads one message over many lines; the guest agent ends replies with LF and sends a
//! 0xFF byte before its reply to `guest-sync-delimited` (the byte that resets its parser).
//! So messages are cut by their JSON structure, not by lines: between messages whitespace
//! and 0xFF are skipped, anything else is an error; a message is a top-level object, cut
//! where its braces close (strings and their escapes honoured, so a `}` inside a string
//! does not end it). Nothing is buffered beyond [`MAX_MESSAGE`]: a runaway or hostile peer
//! cannot make the client grow without bound. `serde_json` then parses each cut object
//! (it limits nesting to 128 levels and returns an error past it, never overflowing a stack).
//!
//! **Messages** (docs/interop/qmp-spec.rst): the greeting `{"QMP": {"version", "capabilities"}}`,
//! a success `{"return": V, "id": ID}`, an error `{"error": {"class", "desc"}, "id": ID}`
//! and an event `{"event": NAME, "data": D, "timestamp": {"seconds", "microseconds"}}`.
//! Members QEMU may add later are ignored; a message that is none of these is an error.

use serde_json::{Map, Value};

/// The largest message accepted: `query-named-block-nodes` of a VM with hundreds of nodes is
/// a few MiB; anything near this is not QEMU talking.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Cuts a byte stream into top-level JSON objects (module doc).
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned (all inside the current message, if one started).
    scanned: usize,
    /// Where the current message starts in `buf`, once its `{` was seen.
    start: Option<usize>,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Framer {
    /// A framer with nothing buffered.
    pub fn new() -> Framer {
        Framer::default()
    }

    /// Add bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet returned as a message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, if the bytes so far hold one. Errors (the stream cannot be
    /// trusted after one): a byte other than whitespace or 0xFF between messages, a message
    /// that is not an object, or one longer than [`MAX_MESSAGE`].
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, String> {
        let mut i = self.scanned;
        while i < self.buf.len() {
            let b = self.buf[i];
            match self.start {
                None => match b {
                    b' ' | b'\t' | b'\r' | b'\n' | 0xff => {}
                    b'{' => {
                        self.start = Some(i);
                        self.depth = 1;
                    }
                    other => {
                        return Err(format!(
                            "byte {other:#04x} between messages, where a JSON object should start"
                        ))
                    }
                },
                Some(start) => {
                    if self.in_string {
                        match (self.escaped, b) {
                            (true, _) => self.escaped = false,
                            (false, b'\\') => self.escaped = true,
                            (false, b'"') => self.in_string = false,
                            _ => {}
                        }
                    } else {
                        match b {
                            b'"' => self.in_string = true,
                            b'{' | b'[' => self.depth += 1,
                            b'}' | b']' => self.depth -= 1,
                            _ => {}
                        }
                    }
                    if self.depth == 0 {
                        let message = self.buf[start..=i].to_vec();
                        self.buf.drain(..=i);
                        self.scanned = 0;
                        self.start = None;
                        return Ok(Some(message));
                    }
                    if i + 1 - start > MAX_MESSAGE {
                        return Err(format!("a message longer than {MAX_MESSAGE} bytes"));
                    }
                }
            }
            i += 1;
        }
        // Only whitespace so far: forget it rather than keep it.
        if self.start.is_none() {
            self.buf.clear();
            self.scanned = 0;
        } else {
            self.scanned = i;
        }
        Ok(None)
    }
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major, minor, micro.
    pub numbers: (u64, u64, u64),
    /// The distribution's package string (`Debian 1:7.2+dfsg-7`), possibly empty.
    pub package: String,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b, c) = self.numbers;
        write!(f, "{a}.{b}.{c}")
    }
}

/// One message from QEMU or the guest agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting QEMU sends on connect.
    Greeting {
        /// QEMU's version.
        version: Version,
        /// Capabilities offered (`oob`).
        capabilities: Vec<String>,
    },
    /// A command succeeded.
    Return {
        /// The id the command carried, if any.
        id: Option<Value>,
        /// What it returned.
        value: Value,
    },
    /// A command failed.
    Error {
        /// The id the command carried, if any.
        id: Option<Value>,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// Its name (`JOB_STATUS_CHANGE`, `BLOCK_EXPORT_DELETED`, ...).
        name: String,
        /// Its data (`null` when absent).
        data: Value,
    },
}

/// Classify one framed message (module doc). Errors say what is wrong with it.
pub fn parse(bytes: &[u8]) -> Result<Message, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(mut m) = value else {
        return Err("not a JSON object".into());
    };
    let id = m.remove("id");
    if let Some(greeting) = m.remove("QMP") {
        return greeting_of(greeting);
    }
    if let Some(value) = m.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = m.remove("error") {
        let Value::Object(mut e) = error else {
            return Err("\"error\" is not an object".into());
        };
        return Ok(Message::Error {
            id,
            class: string(&mut e, "class", "error")?,
            desc: string(&mut e, "desc", "error")?,
        });
    }
    if let Some(name) = m.remove("event") {
        let Value::String(name) = name else {
            return Err("\"event\" is not a string".into());
        };
        return Ok(Message::Event {
            name,
            data: m.remove("data").unwrap_or(Value::Null),
        });
    }
    Err("neither a greeting, a return, an error nor an event".into())
}

fn greeting_of(greeting: Value) -> Result<Message, String> {
    let Value::Object(mut g) = greeting else {
        return Err("\"QMP\" is not an object".into());
    };
    let Some(Value::Object(mut v)) = g.remove("version") else {
        return Err("the greeting has no version object".into());
    };
    let Some(Value::Object(q)) = v.remove("qemu") else {
        return Err("the greeting's version has no qemu object".into());
    };
    let num = |k: &str| {
        q.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("the greeting's version has no number {k}"))
    };
    let numbers = (num("major")?, num("minor")?, num("micro")?);
    let package = match v.remove("package") {
        Some(Value::String(p)) => p,
        _ => String::new(),
    };
    let capabilities = match g.remove("capabilities") {
        Some(Value::Array(caps)) => caps
            .into_iter()
            .filter_map(|c| c.as_str().map(String::from))
            .collect(),
        _ => return Err("the greeting has no capabilities array".into()),
    };
    Ok(Message::Greeting {
        version: Version { numbers, package },
        capabilities,
    })
}

fn string(m: &mut Map<String, Value>, key: &str, what: &str) -> Result<String, String> {
    match m.remove(key) {
        Some(Value::String(s)) => Ok(s),
        _ => Err(format!("{what} has no string {key:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, String> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            f.push(piece);
            while let Some(m) = f.next_message()? {
                out.push(m);
            }
        }
        Ok(out)
    }

    #[test]
    fn messages_are_cut_by_structure_whatever_the_chunks() {
        let input = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian\"}, \"capabilities\": [\"oob\"]}}\r\n\
            {\"return\": {}, \"id\": 1}\r\n\xff{\"event\": \"X\", \"data\": {\"s\": \"}{\\\"\"}}\n{\n  \"return\": [\n    1\n  ]\n}\r\n";
        let whole = frames(input, input.len()).unwrap();
        assert_eq!(whole.len(), 4);
        for chunk in 1..8 {
            assert_eq!(frames(input, chunk).unwrap(), whole, "chunks of {chunk}");
        }
        assert_eq!(
            parse(&whole[0]).unwrap(),
            Message::Greeting {
                version: Version {
                    numbers: (7, 2, 22),
                    package: "Debian".into()
                },
                capabilities: vec!["oob".into()],
            }
        );
        assert_eq!(
            parse(&whole[1]).unwrap(),
            Message::Return {
                id: Some(Value::from(1)),
                value: serde_json::json!({})
            }
        );
        assert_eq!(
            parse(&whole[2]).unwrap(),
            Message::Event {
                name: "X".into(),
                data: serde_json::json!({"s": "}{\""})
            }
        );
        assert_eq!(
            parse(&whole[3]).unwrap(),
            Message::Return {
                id: None,
                value: serde_json::json!([1])
            }
        );
    }

    #[test]
    fn errors_keep_class_and_description() {
        let m = parse(br#"{"id": "bv-3", "error": {"class": "GenericError", "desc": "Bitmap already exists: x"}}"#)
            .unwrap();
        assert_eq!(
            m,
            Message::Error {
                id: Some(Value::from("bv-3")),
                class: "GenericError".into(),
                desc: "Bitmap already exists: x".into()
            }
        );
    }

    #[test]
    fn garbage_is_refused_and_nothing_grows_without_bound() {
        let mut f = Framer::new();
        f.push(b"  \r\n[1]");
        assert!(f.next_message().unwrap_err().contains("0x5b"));
        let mut f = Framer::new();
        f.push(b" \n \n");
        assert_eq!(f.next_message().unwrap(), None);
        assert_eq!(f.pending(), 0, "whitespace is not kept");
        for bad in [
            &b"{}"[..],
            br#"{"return": 1"#,
            br#"{"error": "x"}"#,
            br#"{"error": {"class": "A"}}"#,
            br#"{"event": 3}"#,
            br#"{"QMP": {"version": {"qemu": {"major": 1}}, "capabilities": []}}"#,
            b"[1]",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut f = Framer::new();
        f.push(b"{\"return\": \"");
        f.push(&vec![b'a'; MAX_MESSAGE]);
        assert!(f.next_message().unwrap_err().contains("longer than"));
    }
}
