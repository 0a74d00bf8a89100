//! `qmp_reply`: what QEMU's QMP monitor and the guest agent send (`qmp::wire`).
//!
//! The first input byte sets how the rest is cut into chunks (1 + byte % 64 bytes each), as
//! reads from a socket cut it. Beyond "no panic":
//! - framing does not depend on the chunks: the messages (and whether an error ends the
//!   stream) are those of the same bytes pushed at once;
//! - every message starts with `{`, ends with `}` or `]`, and is at most `MAX_MESSAGE` bytes;
//! - where the input is JSON objects separated by whitespace only, the framer cuts exactly
//!   where serde_json's own stream parser does (an independent parse agrees);
//! - `parse` of a message serde_json reads as an object with a `return` member gives that
//!   member, and an `event` string gives that name.
#![no_main]

use blockvault::qmp::wire::{parse, Framer, Message, MAX_MESSAGE};
use blockvault_fuzz::write_seeds;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn seeds() -> Vec<Vec<u8>> {
    let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;
    let mut all = vec![7u8];
    all.extend_from_slice(greeting);
    all.extend_from_slice(b"\r\n{\"return\": {}, \"id\": \"blockvault-1\"}\r\n");
    all.extend_from_slice(b"{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"running\", \"id\": \"j\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n");
    all.extend_from_slice(b"{\"id\": \"blockvault-2\", \"error\": {\"class\": \"GenericError\", \"desc\": \"Bitmap already exists: x\"}}\r\n");
    let pretty = b"\x03{\n    \"return\": [\n        {\n            \"id\": \"e\\\"}\",\n            \"type\": \"nbd\"\n        }\n    ]\n}\n".to_vec();
    let agent = b"\x01\xff{\"return\": 12345}\n{\"return\": 2}\n".to_vec();
    vec![all, pretty, agent]
}

/// Every message framed from `chunks`, and whether framing ended in an error.
fn frame<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> (Vec<Vec<u8>>, bool) {
    let mut f = Framer::new();
    let mut out = Vec::new();
    for c in chunks {
        f.push(c);
        loop {
            match f.next_message() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(
    init: { write_seeds(seeds) },
    |data: &[u8]| {
        let Some((&cut, stream)) = data.split_first() else {
            return;
        };
        let chunk = 1 + usize::from(cut % 64);
        let (messages, failed) = frame(stream.chunks(chunk));
        assert_eq!(
            (messages.clone(), failed),
            frame(std::iter::once(stream)),
            "framing depends on how the bytes arrive"
        );
        for m in &messages {
            assert_eq!(m.first(), Some(&b'{'));
            assert!(matches!(m.last(), Some(b'}' | b']')));
            assert!(m.len() <= MAX_MESSAGE);
            let parsed = parse(m);
            if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(m) {
                if !o.contains_key("QMP") {
                    if let Some(v) = o.get("return") {
                        assert!(
                            matches!(&parsed, Ok(Message::Return { value, .. }) if value == v),
                            "{parsed:?}"
                        );
                    } else if let (false, Some(Value::String(name))) =
                        (o.contains_key("error"), o.get("event"))
                    {
                        assert!(
                            matches!(&parsed, Ok(Message::Event { name: n, .. }) if n == name),
                            "{parsed:?}"
                        );
                    }
                }
            }
        }
        // An independent parse: serde_json's stream parser over whitespace-separated objects.
        if stream.iter().all(|&b| b != 0xff) {
            let mut expect = Vec::new();
            let mut it = serde_json::Deserializer::from_slice(stream).into_iter::<Value>();
            let mut start = 0;
            let all_objects = loop {
                match it.next() {
                    None => break true,
                    Some(Ok(Value::Object(_))) => {
                        let end = it.byte_offset();
                        let text = &stream[start..end];
                        let skip = text.iter().take_while(|b| b.is_ascii_whitespace()).count();
                        expect.push(text[skip..].to_vec());
                        start = end;
                    }
                    Some(_) => break false,
                }
            };
            if all_objects {
                assert!(!failed, "valid objects refused");
                assert_eq!(messages, expect, "framing disagrees with serde_json");
            }
        }
    }
);
