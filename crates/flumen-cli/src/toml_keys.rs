//! Every unknown key of a TOML file at once, each with its line. Sections reject
//! unknown keys (`deny_unknown_fields`), and a deserialiser stops at the first, naming
//! it at its section's header; here each one found is cut from a copy of the text
//! (its line blanked, so the lines keep their numbers) and the file read again, until
//! it reads or fails for another reason.

use serde::de::DeserializeOwned;

/// How many unknown keys are reported at most.
const MOST: usize = 100;

/// Parses `text` (shown as `shown` in messages), or lists every unknown key with its
/// line, and the first other problem.
pub fn parse<T: DeserializeOwned>(shown: &str, text: &str) -> Result<T, Vec<String>> {
    let mut text = text.to_owned();
    let mut problems = Vec::new();
    for _ in 0..MOST {
        let e = match toml::from_str::<T>(&text) {
            Ok(value) if problems.is_empty() => return Ok(value),
            Ok(_) => return Err(problems),
            Err(e) => e,
        };
        let found = unknown_key(e.message()).and_then(|key| {
            let from = e.span().map_or(0, |s| s.start);
            find_key(&text, from, key).map(|line| (key.to_owned(), line))
        });
        let Some((key, line)) = found else {
            problems.push(format!("{shown}: {}", e.to_string().trim_end()));
            return Err(problems);
        };
        let expected = e
            .message()
            .split_once(", expected ")
            .map(|(_, x)| format!(" (expected {})", x.trim_end()))
            .unwrap_or_default();
        let section = section_of(&text, line);
        problems.push(format!(
            "{shown}: line {}: unknown key `{key}`{}{expected}",
            line + 1,
            section.map(|s| format!(" in [{s}]")).unwrap_or_default()
        ));
        text = blank_line(&text, line);
    }
    Err(problems)
}

/// `key` from serde's "unknown field `key`, expected …".
fn unknown_key(message: &str) -> Option<&str> {
    let rest = message.split("unknown field `").nth(1)?;
    rest.split('`').next()
}

/// The line (from 0) at or after byte `from` whose key is `key`, within the table
/// that starts there (before the next `[header]`, unless `from` is in the top level).
fn find_key(text: &str, from: usize, key: &str) -> Option<usize> {
    let first = text[..from.min(text.len())].matches('\n').count();
    for (n, line) in text.lines().enumerate().skip(first) {
        let t = line.trim_start();
        if n > first && t.starts_with('[') {
            break;
        }
        let k = t.trim_start_matches('"');
        if let Some(after) = k.strip_prefix(key) {
            let after = after.trim_start_matches('"').trim_start();
            if after.starts_with('=') || after.starts_with('.') {
                return Some(n);
            }
        }
    }
    None
}

/// The `[header]` above line `line`, if any.
fn section_of(text: &str, line: usize) -> Option<String> {
    text.lines()
        .take(line)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last()
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
}

/// `text` with line `line` replaced by nothing (its newline kept).
fn blank_line(text: &str, line: usize) -> String {
    text.split_inclusive('\n')
        .enumerate()
        .map(|(n, l)| {
            if n == line {
                if l.ends_with('\n') {
                    "\n"
                } else {
                    ""
                }
            } else {
                l
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        a: Inner,
        #[serde(default)]
        b: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        x: u32,
    }

    #[test]
    fn every_unknown_key_is_named_with_its_line() {
        let text = "[a]\nx = 1\ncolour = 2\nsize = 3\n\n[b]\nx = 1\nshape = 4\n";
        let problems = parse::<Doc>("p.toml", text).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            problems[0].starts_with("p.toml: line 3: unknown key `colour` in [a]"),
            "{problems:#?}"
        );
        assert!(
            problems[1].starts_with("p.toml: line 4: unknown key `size` in [a]"),
            "{problems:#?}"
        );
        assert!(
            problems[2].starts_with("p.toml: line 8: unknown key `shape` in [b]"),
            "{problems:#?}"
        );
        assert!(problems[0].contains("expected `x`"), "{problems:#?}");
    }

    #[test]
    fn other_problems_are_reported_after_the_unknown_keys() {
        // Keys are read in sorted order: `w` (unknown) before `x` (mistyped).
        let text = "[a]\nx = \"one\"\nw = 1\n";
        let problems = parse::<Doc>("p.toml", text).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[0].contains("line 3: unknown key `w`"),
            "{problems:#?}"
        );
        assert!(problems[1].contains("invalid type"), "{problems:#?}");
        assert!(parse::<Doc>("p.toml", "[a]\nx = 1\n").is_ok());
    }
}
