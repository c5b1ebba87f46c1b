//! Token estimates without a tokenizer: about four characters per token for
//! English with OpenAI's tokenizers. Estimates drive the token budget of a batch,
//! the tokens-per-minute limit and the context-overflow policy; the server remains
//! the judge (a context error from it fails the record as invalid input).

use crate::OverflowPolicy;

/// Characters per estimated token.
const CHARS_PER_TOKEN: usize = 4;

/// The estimated tokens of `text` (at least 1).
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count().div_ceil(CHARS_PER_TOKEN)).max(1) as u64
}

/// A record made to fit the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fitted<'a> {
    /// It fits as it is, or was cut to fit.
    Text(std::borrow::Cow<'a, str>),
    /// The policy says skip it.
    Skipped {
        /// Its estimated tokens.
        tokens: u64,
    },
}

/// Applies `policy` to `text` for a context of `max_tokens` estimated tokens.
pub fn fit_context(text: &str, max_tokens: Option<u64>, policy: OverflowPolicy) -> Fitted<'_> {
    let tokens = estimate_tokens(text);
    let Some(max) = max_tokens.filter(|m| tokens > *m) else {
        return Fitted::Text(text.into());
    };
    let keep = (max as usize) * CHARS_PER_TOKEN;
    let chars = text.chars().count();
    match policy {
        OverflowPolicy::Skip => Fitted::Skipped { tokens },
        OverflowPolicy::TruncateTail => Fitted::Text(text.chars().take(keep).collect()),
        OverflowPolicy::TruncateHead => Fitted::Text(text.chars().skip(chars - keep).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_are_a_quarter_of_the_characters() {
        assert_eq!(estimate_tokens(""), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("ééééé"), 2, "characters, not bytes");
    }

    #[test]
    fn overflow_truncates_either_end_or_skips() {
        let text = "0123456789abcdefghij"; // 20 chars = 5 tokens
        assert_eq!(
            fit_context(text, Some(10), OverflowPolicy::Skip),
            Fitted::Text(text.into())
        );
        assert_eq!(
            fit_context(text, Some(2), OverflowPolicy::TruncateTail),
            Fitted::Text("01234567".into())
        );
        assert_eq!(
            fit_context(text, Some(2), OverflowPolicy::TruncateHead),
            Fitted::Text("cdefghij".into())
        );
        assert_eq!(
            fit_context(text, Some(2), OverflowPolicy::Skip),
            Fitted::Skipped { tokens: 5 }
        );
        // Never splits a character.
        assert_eq!(
            fit_context("ééééééééé", Some(1), OverflowPolicy::TruncateTail),
            Fitted::Text("éééé".into())
        );
    }
}
