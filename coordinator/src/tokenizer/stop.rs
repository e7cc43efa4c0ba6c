//! Stop strings in streamed text. Text that might be the start of a stop string is held back
//! until it is clear, so a client never sees half a stop string.

/// What [`StopStringMatcher::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// No stop string yet: emit `text` (possibly empty while a partial match is held back).
    Continue { text: String },
    /// Stop string number `stop_index` was found: emit `text` (everything before it) and end the
    /// sequence. The stop string itself is not emitted.
    Stopped { text: String, stop_index: usize },
}

/// Finds stop strings in streamed text.
///
/// Text that could be the beginning of a stop string is held back until the next push decides
/// it, so what is emitted never contains any part of a stop string that ends up matching. When
/// several stop strings match, the one that starts earliest wins (ties: the shortest; then the
/// first listed). After a stop, everything pushed is discarded.
#[derive(Debug, Clone)]
pub struct StopStringMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopStringMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        let stops = stops.into_iter().map(Into::into).filter(|s: &String| !s.is_empty()).collect();
        StopStringMatcher { stops, held: String::new(), stopped: false }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Text held back as a possible partial match.
    pub fn held(&self) -> &str {
        &self.held
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stopped {
            return StopCheck::Continue { text: String::new() };
        }
        self.held.push_str(text);
        if let Some((start, stop_index)) = find_earliest_stop(&self.held, &self.stops) {
            let text = self.held[..start].to_string();
            self.held.clear();
            self.stopped = true;
            return StopCheck::Stopped { text, stop_index };
        }
        let keep = partial_stop_suffix_len(&self.held, &self.stops);
        let emit_len = self.held.len() - keep;
        let text = self.held[..emit_len].to_string();
        self.held.drain(..emit_len);
        StopCheck::Continue { text }
    }

    /// Generation ended without a stop: the held-back text is not a stop string after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The earliest occurrence of any stop string in `text`: (byte offset, index of the stop).
pub fn find_earliest_stop(text: &str, stops: &[String]) -> Option<(usize, usize)> {
    stops
        .iter()
        .enumerate()
        .filter(|(_, stop)| !stop.is_empty())
        .filter_map(|(i, stop)| text.find(stop.as_str()).map(|at| (at, stop.len(), i)))
        .min()
        .map(|(at, _, i)| (at, i))
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of some stop string
/// (text that must be held back because the next characters could complete a stop).
pub fn partial_stop_suffix_len(text: &str, stops: &[String]) -> usize {
    text.char_indices()
        .map(|(i, _)| i)
        .find(|&i| {
            let suffix = &text[i..];
            stops.iter().any(|stop| stop.len() > suffix.len() && stop.starts_with(suffix))
        })
        .map_or(0, |i| text.len() - i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emitted(checks: &[StopCheck]) -> String {
        checks
            .iter()
            .map(|c| match c {
                StopCheck::Continue { text } | StopCheck::Stopped { text, .. } => text.as_str(),
            })
            .collect()
    }

    #[test]
    fn stop_strings_split_across_pushes_are_found_and_never_emitted() {
        let mut m = StopStringMatcher::new(["END", "\n\n"]);
        let checks: Vec<StopCheck> = ["Hello E", "N", "D? no, ", "EN", "D!"].iter().map(|t| m.push(t)).collect();
        assert_eq!(checks[0], StopCheck::Continue { text: "Hello ".into() });
        assert_eq!(m.held(), "", "after a stop nothing is held");
        assert_eq!(checks[1], StopCheck::Continue { text: String::new() });
        assert_eq!(checks[2], StopCheck::Stopped { text: String::new(), stop_index: 0 });
        assert_eq!(emitted(&checks), "Hello ");
        assert!(m.is_stopped());

        // A partial match that turns out not to be one is released.
        let mut m = StopStringMatcher::new(["END"]);
        assert_eq!(m.push("the EN"), StopCheck::Continue { text: "the ".into() });
        assert_eq!(m.held(), "EN");
        assert_eq!(m.push("TRY"), StopCheck::Continue { text: "ENTRY".into() });
        assert_eq!(m.push("...E"), StopCheck::Continue { text: "...".into() });
        assert_eq!(m.finish(), "E");

        // Earliest start wins, whichever stop is listed first.
        let mut m = StopStringMatcher::new(["world", "lo w", "", "o"]);
        assert_eq!(m.push("hello world"), StopCheck::Stopped { text: "hel".into(), stop_index: 1 });
    }

    #[test]
    fn stop_matcher_handles_multibyte_text() {
        let mut m = StopStringMatcher::new(["🦀!", "日本"]);
        assert_eq!(m.push("crab 🦀"), StopCheck::Continue { text: "crab ".into() });
        assert_eq!(m.push("? 日"), StopCheck::Continue { text: "🦀? ".into() });
        assert_eq!(m.push("本語"), StopCheck::Stopped { text: String::new(), stop_index: 1 });
        assert_eq!(partial_stop_suffix_len("ab🦀", &["🦀x".to_string()]), "🦀".len());
        assert_eq!(find_earliest_stop("abc", &["x".to_string()]), None);
        assert!(StopStringMatcher::new(Vec::<String>::new()).is_empty());
    }
}
