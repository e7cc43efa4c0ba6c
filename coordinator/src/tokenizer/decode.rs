//! Streaming detokenization: generated ids in, the text each one completes out.
//!
//! Decoding ids one by one and concatenating is wrong for SentencePiece-style tokenizers
//! (leading-space rules) and for byte fallback (one character split over several byte tokens),
//! so [`DecodeStream`] decodes a small window of ids and emits only the text that grew, holding
//! back while the window ends in an incomplete character.

use super::{Result, Tokenizer};

/// How many prompt ids [`Tokenizer::decode_stream_after`] keeps as decoding context: enough for
/// the leading-space rules and for a character split over up to 4 byte tokens.
const PROMPT_CONTEXT_IDS: usize = 6;

/// Incremental detokenizer: push generated ids, get the text each one completes.
///
/// It keeps a window of ids: `ids[..read_offset]` has already been turned into text, and
/// `ids[prefix_offset..read_offset]` is the context decoded again with each new id. The new text
/// is `decode(ids[prefix_offset..]) - decode(ids[prefix_offset..read_offset])`, emitted only when
/// it does not end in U+FFFD (an incomplete UTF-8 character, e.g. the first bytes of a
/// byte-fallback sequence). Each emission slides the window, so the work per id is constant.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream {
    pub(super) fn new(tokenizer: Tokenizer, prompt_ids: &[u32], skip_special: bool) -> Self {
        let context = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT_IDS)..];
        DecodeStream { tokenizer, skip_special, ids: context.to_vec(), prefix_offset: 0, read_offset: context.len() }
    }

    /// Adds one generated id; returns the text it completes (often empty while a character or
    /// word is still incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix_text = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full_text = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full_text.len() <= prefix_text.len() || full_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new_text = text_after(&full_text, &prefix_text).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Ids before the window will never be decoded again.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        Ok(new_text)
    }

    /// Returns the text still held back (an incomplete character at the end of generation is
    /// emitted as U+FFFD) and marks it emitted.
    pub fn flush(&mut self) -> Result<String> {
        let prefix_text = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full_text = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let rest = text_after(&full_text, &prefix_text).to_string();
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(rest)
    }
}

/// The part of `full` after `prefix`. Normally `full` starts with `prefix`; when a decoder
/// rewrites earlier text (it should not, but it must not panic), the part after the longest
/// common prefix, cut at a character boundary.
fn text_after<'a>(full: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let mut common = full.bytes().zip(prefix.bytes()).take_while(|(a, b)| a == b).count();
    while !full.is_char_boundary(common) {
        common -= 1;
    }
    &full[common..]
}
