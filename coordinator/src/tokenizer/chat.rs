//! Chat templates: the Jinja template of a model directory, rendered with `minijinja` configured
//! like Hugging Face's renderer (`trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! `strftime_now`, and the Python string/dict methods templates call, such as `.strip()` and
//! `.items()`). A model without a template gets [`FALLBACK_CHAT_TEMPLATE`].
//!
//! The render's time is an input ([`ChatTemplate::render`] takes it), never read from the clock
//! inside the template, so a date-dependent prompt can be replayed.

use std::sync::Arc;

use minijinja::value::{from_args, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, State};
use serde::{Deserialize, Serialize};

use super::{Result, TokenizerError};

/// The template used when the model directory has none: one `role: content` paragraph per
/// message, preceded by the BOS token (Hugging Face templates emit BOS themselves, so chat
/// prompts are always encoded without adding special tokens; see [`Tokenizer::encode_chat`]).
/// With `add_generation_prompt`, it ends with `assistant:` for the model to continue.
pub const FALLBACK_CHAT_TEMPLATE: &str = "{{ bos_token }}\
{% for message in messages %}{{ message.role }}: {{ message.content }}\n\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template, or why it would not compile (reported when it is used, so a model
/// with an exotic template can still serve plain completions).
#[derive(Clone)]
pub(super) struct ChatTemplate {
    /// Where the template came from, for error messages.
    pub(super) origin: String,
    env: Result<Arc<Environment<'static>>, String>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    pub(super) fn compile(origin: String, source: String) -> Self {
        let mut env = Environment::new();
        // Hugging Face renders chat templates with these Jinja settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_unknown_method_callback(python_method);
        let env = env.add_template_owned(TEMPLATE_NAME, source).map(|()| Arc::new(env));
        ChatTemplate { origin, env: env.map_err(|e| describe_jinja_error(&e)) }
    }

    /// Renders `messages` as if the time were `unix_secs` (UTC, for `strftime_now`).
    pub(super) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
        unix_secs: i64,
    ) -> Result<String> {
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            __lockstep_now_unix_secs => unix_secs,
        };
        let error = |message| TokenizerError::ChatTemplate { origin: self.origin.clone(), message };
        let env = self.env.as_ref().map_err(|m| error(m.clone()))?;
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| error(describe_jinja_error(&e)))?;
        template.render(context).map_err(|e| error(describe_jinja_error(&e)))
    }
}

/// The context variable holding the render's time for `strftime_now`: the time is an input of the
/// render, not something the template reads from the clock behind the caller's back.
const NOW_VARIABLE: &str = "__lockstep_now_unix_secs";

fn strftime_now(state: &State, format: String) -> Result<String, JinjaError> {
    let now = state
        .lookup(NOW_VARIABLE)
        .and_then(|v| v.as_i64())
        .ok_or_else(|| JinjaError::new(JinjaErrorKind::InvalidOperation, "strftime_now: render time not set"))?;
    Ok(strftime(&format, now))
}

fn describe_jinja_error(e: &JinjaError) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(JinjaErrorKind::InvalidOperation, message))
}

/// The Python `str` and `dict` methods that chat templates call, for values minijinja has no
/// such method on.
fn python_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let () = from_args(args)?;
                state.apply_filter("items", std::slice::from_ref(value))
            }
            "keys" => {
                let () = from_args(args)?;
                Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
            }
            "values" => {
                let () = from_args(args)?;
                let values: Result<Vec<Value>, JinjaError> =
                    value.try_iter()?.map(|key| value.get_item(&key)).collect();
                Ok(Value::from(values?))
            }
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let found = value.get_item(&key)?;
                Ok(if found.is_undefined() { default.unwrap_or(Value::from(())) } else { found })
            }
            _ => Err(JinjaError::from(JinjaErrorKind::UnknownMethod)),
        };
    }
    Err(JinjaError::from(JinjaErrorKind::UnknownMethod))
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let strip_set = |chars: Option<String>| {
        move |c: char| match &chars {
            Some(set) => set.contains(c),
            None => c.is_whitespace(),
        }
    };
    // Python's startswith/endswith accept one string or a tuple of them.
    let any_of = |arg: &Value, test: &dyn Fn(&str) -> bool| -> Result<bool, JinjaError> {
        if let Some(one) = arg.as_str() {
            return Ok(test(one));
        }
        for item in arg.try_iter()? {
            if item.as_str().is_some_and(test) {
                return Ok(true);
            }
        }
        Ok(false)
    };
    Ok(match method {
        "strip" => {
            let (chars,): (Option<String>,) = from_args(args)?;
            Value::from(s.trim_matches(strip_set(chars)))
        }
        "lstrip" => {
            let (chars,): (Option<String>,) = from_args(args)?;
            Value::from(s.trim_start_matches(strip_set(chars)))
        }
        "rstrip" => {
            let (chars,): (Option<String>,) = from_args(args)?;
            Value::from(s.trim_end_matches(strip_set(chars)))
        }
        "startswith" => {
            let (prefix,): (Value,) = from_args(args)?;
            Value::from(any_of(&prefix, &|p| s.starts_with(p))?)
        }
        "endswith" => {
            let (suffix,): (Value,) = from_args(args)?;
            Value::from(any_of(&suffix, &|p| s.ends_with(p))?)
        }
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "capitalize" => {
            let mut chars = s.chars();
            let first = chars.next().map(|c| c.to_uppercase().collect::<String>()).unwrap_or_default();
            Value::from(first + &chars.as_str().to_lowercase())
        }
        "title" => {
            let mut out = String::with_capacity(s.len());
            let mut at_word_start = true;
            for c in s.chars() {
                if at_word_start {
                    out.extend(c.to_uppercase());
                } else {
                    out.extend(c.to_lowercase());
                }
                at_word_start = !c.is_alphanumeric();
            }
            Value::from(out)
        }
        "split" => {
            let (sep, maxsplit): (Option<String>, Option<i64>) = from_args(args)?;
            let limit = maxsplit.filter(|&n| n >= 0).map(|n| n as usize + 1);
            let parts: Vec<String> = match (sep, limit) {
                (Some(sep), Some(n)) => s.splitn(n, sep.as_str()).map(String::from).collect(),
                (Some(sep), None) => s.split(sep.as_str()).map(String::from).collect(),
                (None, _) => {
                    // Whitespace split drops empty parts; honour maxsplit by re-joining the tail.
                    let words: Vec<&str> = s.split_whitespace().collect();
                    match limit {
                        Some(n) if words.len() > n => {
                            let mut head: Vec<String> = words[..n - 1].iter().map(|w| w.to_string()).collect();
                            let tail_start = words[n - 1].as_ptr() as usize - s.as_ptr() as usize;
                            head.push(s[tail_start..].trim_end().to_string());
                            head
                        }
                        _ => words.into_iter().map(String::from).collect(),
                    }
                }
            };
            Value::from(parts)
        }
        "replace" => {
            let (old, new, count): (String, String, Option<i64>) = from_args(args)?;
            match count.filter(|&n| n >= 0) {
                Some(n) => Value::from(s.replacen(old.as_str(), &new, n as usize)),
                None => Value::from(s.replace(old.as_str(), &new)),
            }
        }
        "find" => {
            let (needle,): (String,) = from_args(args)?;
            Value::from(s.find(needle.as_str()).map_or(-1, |i| s[..i].chars().count() as i64))
        }
        "count" => {
            let (needle,): (String,) = from_args(args)?;
            Value::from(s.matches(needle.as_str()).count())
        }
        "join" => {
            let (items,): (Value,) = from_args(args)?;
            let parts: Vec<String> = items.try_iter()?.map(|v| v.to_string()).collect();
            Value::from(parts.join(s))
        }
        "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
        "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
        _ => return Err(JinjaError::from(JinjaErrorKind::UnknownMethod)),
    })
}

/// Formats a Unix time (UTC) with the strftime directives chat templates use: `%Y %y %m %d %e
/// %j %H %I %M %S %p %a %A %b %B %%`. Other directives are left as written.
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    // 1970-01-01 was a Thursday.
    let weekday = (days + 4).rem_euclid(7) as usize;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match directive {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'j' => format!("{day_of_year:03}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{hour12:02}"),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'b' => MONTHS[month as usize - 1][..3].to_string(),
            'B' => MONTHS[month as usize - 1].to_string(),
            '%' => "%".to_string(),
            other => format!("%{other}"),
        };
        out.push_str(&piece);
    }
    out
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_handles_leap_days_and_times_before_1970() {
        assert_eq!(strftime("%Y-%m-%d %j %a", 951_782_400), "2000-02-29 060 Tue");
        assert_eq!(strftime("%Y-%m-%d %j %a %%", -86_400 * 365), "1969-01-01 001 Wed %");
    }
}
