//! Server-sent events as a client reads them: a sans-IO parser, and what an event of a completion
//! stream means. [`client::Sse`](super::client::Sse) feeds it from a hyper body; tests feed it
//! bytes directly.
//!
//! The parser buffers bytes and decodes an event only once it is complete (up to the blank line
//! that ends it). A body arrives in arbitrary pieces and a piece may end inside a multibyte UTF-8
//! character; decoding piece by piece would mangle that character, and a soak would report two
//! copies of one answer as different. The line breaks are ASCII and every byte of a multibyte
//! UTF-8 character is 0x80 or above, so cutting at line breaks never cuts a character: an event
//! decodes exactly as the server wrote it, however the transport split it. Lines end in LF or
//! CRLF (the server writes LF).
//!
//! A completion stream (OpenAI's convention, which lockstep follows): every event's data is one
//! JSON chunk, `[DONE]` ends the stream, and a chunk `{"error": {...}}` says the request failed
//! midway. [`StreamEvent::from_data`] turns that chunk into [`SseError::Server`], so no reader can
//! absorb a failed request's partial text as an answer.

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum SseError {
    #[error("an event is not valid UTF-8 (byte {valid_up_to} starts an invalid sequence)")]
    NotUtf8 { valid_up_to: usize },
    #[error("the stream ended inside an event")]
    EndedInsideEvent,
    #[error("the stream ended without [DONE]")]
    EndedWithoutDone,
    #[error("an event is not JSON ({reason}): {data:?}")]
    NotJson { data: String, reason: String },
    #[error("the server reported an error midway: {message}")]
    Server {
        message: String,
        /// The event's whole `error` object.
        error: Value,
    },
}

/// Splits a byte stream into events and yields each event's data.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Where the line being scanned starts, and the next byte to look at: bytes before `scan`
    /// hold no blank line, so a push resumes there instead of rescanning the buffer.
    line_start: usize,
    scan: usize,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The data of the next complete event (its `data:` lines joined by `\n`), skipping events
    /// without data (comments, keep-alives); `None` until more bytes complete one.
    pub fn next_data(&mut self) -> Result<Option<String>, SseError> {
        while let Some(end) = self.next_event_end() {
            let event: Vec<u8> = self.buf.drain(..end).collect();
            let text = String::from_utf8(event)
                .map_err(|e| SseError::NotUtf8 { valid_up_to: e.utf8_error().valid_up_to() })?;
            if let Some(data) = event_data(&text) {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    /// Called at the end of the body: anything but whitespace left over is an event cut short.
    pub fn finish(&self) -> Result<(), SseError> {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            Ok(())
        } else {
            Err(SseError::EndedInsideEvent)
        }
    }

    /// The bytes not yet returned as an event (for reading a body that turned out not to be a
    /// stream, such as an error answer).
    pub fn into_unparsed(self) -> Vec<u8> {
        self.buf
    }

    /// The length of the first complete event (through its blank line), if one is buffered.
    fn next_event_end(&mut self) -> Option<usize> {
        while self.scan < self.buf.len() {
            let i = self.scan;
            self.scan += 1;
            if self.buf[i] != b'\n' {
                continue;
            }
            let line = &self.buf[self.line_start..i];
            let blank = line.is_empty() || line == b"\r";
            self.line_start = i + 1;
            if blank {
                let end = i + 1;
                self.line_start = 0;
                self.scan = 0;
                return Some(end);
            }
        }
        None
    }
}

/// The data of one event's text, `None` when it has no `data` field.
fn event_data(event: &str) -> Option<String> {
    let mut data: Option<String> = None;
    for line in event.lines() {
        if line.starts_with(':') {
            continue; // a comment
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field != "data" {
            continue;
        }
        // The format drops exactly one space after the colon.
        let value = value.strip_prefix(' ').unwrap_or(value);
        match &mut data {
            None => data = Some(value.to_string()),
            Some(d) => {
                d.push('\n');
                d.push_str(value);
            }
        }
    }
    data
}

/// One event of a completion stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Chunk(Value),
    Done,
}

impl StreamEvent {
    /// Reads an event's data; an `{"error": ...}` chunk is an error, not a chunk.
    pub fn from_data(data: &str) -> Result<Self, SseError> {
        if data == "[DONE]" {
            return Ok(StreamEvent::Done);
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| SseError::NotJson { data: data.to_string(), reason: e.to_string() })?;
        match v.get("error") {
            Some(error) => Err(SseError::Server {
                message: error["message"].as_str().map_or_else(|| error.to_string(), str::to_string),
                error: error.clone(),
            }),
            None => Ok(StreamEvent::Chunk(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_kernels::splitmix::SplitMix64;

    /// A stream as the server writes it, with multibyte characters (2, 3 and 4 bytes) inside and
    /// across tokens, a comment, a CRLF event and a multi-line data field.
    fn stream() -> Vec<u8> {
        let mut s = String::new();
        for piece in ["Caf", "é ", "日本", "語 ", "🦀", "!", "\u{1F469}\u{200D}\u{1F52C}"] {
            s += &format!("data: {}\n\n", serde_json::json!({"choices": [{"text": piece}]}));
        }
        s += ": keep-alive\n\ndata: {\"choices\":[{\"text\":\"ñ\"}]}\r\n\r\n";
        s += "data: a\ndata: b\n\n";
        s += "data: [DONE]\n\n";
        s.into_bytes()
    }

    fn parse_in_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&bytes.len()]) {
            p.push(&bytes[from..to]);
            from = to;
            while let Some(d) = p.next_data().unwrap() {
                out.push(d);
            }
        }
        p.finish().unwrap();
        out
    }

    #[test]
    fn multibyte_characters_split_across_reads_parse_identically() {
        let bytes = stream();
        let whole = parse_in_pieces(&bytes, &[]);
        assert_eq!(whole.len(), 10, "{whole:?}");
        let texts: String = whole
            .iter()
            .filter_map(|d| match StreamEvent::from_data(d) {
                Ok(StreamEvent::Chunk(v)) => v["choices"][0]["text"].as_str().map(str::to_string),
                _ => None,
            })
            .collect();
        assert_eq!(texts, "Café 日本語 🦀!\u{1F469}\u{200D}\u{1F52C}ñ");
        assert_eq!(whole[8], "a\nb");
        assert_eq!(whole[9], "[DONE]");

        let byte_by_byte: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(parse_in_pieces(&bytes, &byte_by_byte), whole, "byte by byte");
        for cut in 1..bytes.len() {
            assert_eq!(parse_in_pieces(&bytes, &[cut]), whole, "one cut at byte {cut}");
        }
        for trial in 0..500u64 {
            let mut cuts: Vec<usize> =
                (0..1 + trial % 12).map(|k| (SplitMix64::mix(trial << 8 | k) % bytes.len() as u64) as usize).collect();
            cuts.sort_unstable();
            assert_eq!(parse_in_pieces(&bytes, &cuts), whole, "cuts {cuts:?}");
        }
    }

    #[test]
    fn a_mid_stream_error_event_is_an_error() {
        let bytes = b"data: {\"choices\":[{\"text\":\"Once\"}]}\n\n\
                      data: {\"error\":{\"message\":\"the engine stopped\",\"type\":\"server_error\"}}\n\n\
                      data: [DONE]\n\n";
        let data = parse_in_pieces(bytes, &[7, 50]);
        assert!(matches!(StreamEvent::from_data(&data[0]), Ok(StreamEvent::Chunk(_))));
        match StreamEvent::from_data(&data[1]) {
            Err(SseError::Server { message, error }) => {
                assert_eq!(message, "the engine stopped");
                assert_eq!(error["type"], "server_error");
            }
            other => panic!("an error event read as {other:?}"),
        }
        assert_eq!(StreamEvent::from_data(&data[2]).unwrap(), StreamEvent::Done);
    }

    #[test]
    fn truncated_and_malformed_streams_are_errors() {
        let mut p = SseParser::default();
        p.push(b"data: {\"choices\":[]}\n\ndata: {\"cho");
        assert!(p.next_data().unwrap().is_some());
        assert!(p.next_data().unwrap().is_none());
        assert!(matches!(p.finish(), Err(SseError::EndedInsideEvent)));

        let mut p = SseParser::default();
        p.push(b"data: \xff\xfe\n\n");
        assert!(matches!(p.next_data(), Err(SseError::NotUtf8 { valid_up_to: 6 })));
        assert!(matches!(StreamEvent::from_data("{\"cho"), Err(SseError::NotJson { .. })));
    }
}
