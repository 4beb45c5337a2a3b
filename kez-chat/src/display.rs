//! Peer-controlled text made safe to show a person: nothing a peer sends (a message body, a
//! file name, a claim, an address, a server's message) can move the cursor, recolour or retitle
//! the terminal, reorder what is shown, or start a line that looks like another message.
//!
//! Control characters (C0, DEL, C1: ESC, CR, BEL, …), bidirectional overrides and isolates, and
//! the Unicode line and paragraph separators are shown as visible escapes (`\u{1b}`). A backslash
//! is doubled, so an escape in the text cannot pass for one made here. In a message body a line
//! break is kept but every continuation line starts with [`CONTINUATION`], which no message line
//! starts with; elsewhere (names, addresses) a line break is escaped too. `--json` output is not
//! filtered: JSON escapes every control character itself, and programs get the exact text.

use std::fmt::Write as _;

/// What a message body's continuation lines start with: a message line starts with `[` (its
/// time), so a continuation line can never be mistaken for the start of another message.
pub const CONTINUATION: &str = "  | ";

/// Whether `c` is shown as an escape rather than as itself.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // Bidirectional formatting: embeddings, overrides, isolates, marks.
            '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{061c}'
                // Line and paragraph separators (line breaks in some terminals and UIs).
                | '\u{2028}'
                | '\u{2029}'
        )
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        c if hidden(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// `text` on one line: every hidden character and line break escaped.
pub fn inline(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        push_escaped(&mut out, c);
    }
    out
}

/// A message body: hidden characters escaped, line breaks kept with each following line
/// starting with [`CONTINUATION`]. A `\r\n` is one line break.
pub fn body(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        let line = match lines.peek() {
            Some(_) => line.strip_suffix('\r').unwrap_or(line),
            None => line,
        };
        out.push_str(&inline(line));
        if lines.peek().is_some() {
            out.push('\n');
            out.push_str(CONTINUATION);
        }
    }
    out
}

/// How many terminal columns `text` takes (wide characters take two).
fn width(text: &str) -> usize {
    unicode_width::UnicodeWidthStr::width(text)
}

/// `text` cut to at most `max` terminal columns, ending in `…` when cut. Cuts only between
/// characters of already [`inline`]d text.
pub fn truncate(text: &str, max: usize) -> String {
    if width(text) <= max {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w + 1 > max {
            break;
        }
        out.push(c);
        used += w;
    }
    out.push('…');
    out
}

/// Rows of already [`inline`]d cells as lines, every column but the last padded to its widest
/// cell, two spaces apart.
pub fn columns<const N: usize>(rows: &[[String; N]]) -> Vec<String> {
    let mut widths = [0; N];
    for row in rows {
        for (widest, cell) in widths.iter_mut().zip(row) {
            *widest = (*widest).max(width(cell));
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < N {
                    line.push_str(&" ".repeat(widths[i] - width(cell) + 2));
                }
            }
            line.trim_end().to_owned()
        })
        .collect()
}

/// `text` as one word for a POSIX shell, to copy into a command: as it is when it has only
/// characters no shell treats specially, otherwise in single quotes (a `'` inside written
/// `'\''`). Hidden characters are escaped visibly first ([`inline`]).
pub fn shell_word(text: &str) -> String {
    let shown = inline(text);
    let plain = !shown.is_empty()
        && shown
            .chars()
            .all(|c| c.is_alphanumeric() || "@%+=:,./-_".contains(c));
    if plain {
        shown
    } else {
        format!("'{}'", shown.replace('\'', "'\\''"))
    }
}

/// `1 file`, `2 files`.
pub fn plural(count: usize, what: &str) -> String {
    if count == 1 {
        format!("1 {what}")
    } else {
        format!("{count} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_second_line_is_a_continuation() {
        let forged = "hi\n[18:31:00] @bob@kez.localhost: send me your key";
        let shown = body(forged);
        assert_eq!(
            shown,
            "hi\n  | [18:31:00] @bob@kez.localhost: send me your key"
        );
        for line in shown.lines().skip(1) {
            assert!(line.starts_with(CONTINUATION), "{line:?}");
        }
        assert_eq!(body("one\r\ntwo"), "one\n  | two");
        assert_eq!(body("trailing\n"), "trailing\n  | ");
    }

    #[test]
    fn columns_line_up_and_long_text_is_cut() {
        let rows = [
            [
                "a.txt".to_owned(),
                "1.0 KiB".to_owned(),
                "public".to_owned(),
            ],
            [
                "ünïcödé 文件.bin".to_owned(),
                "12.5 MiB".to_owned(),
                "to @bob".to_owned(),
            ],
        ];
        assert_eq!(
            columns(&rows),
            [
                "a.txt             1.0 KiB   public",
                "ünïcödé 文件.bin  12.5 MiB  to @bob",
            ]
        );
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("0123456789abc", 10), "012345678…");
        assert_eq!(truncate("文件文件文件", 5), "文件…");
        assert_eq!(
            (plural(1, "file"), plural(2, "file")),
            ("1 file".into(), "2 files".into())
        );
    }

    #[test]
    fn shell_words_copy_as_one_argument() {
        assert_eq!(
            shell_word("@alice@kez.lat/report-v2.pdf"),
            "@alice@kez.lat/report-v2.pdf"
        );
        assert_eq!(shell_word("@alice/big file.bin"), "'@alice/big file.bin'");
        assert_eq!(shell_word("it's $HOME;rm"), "'it'\\''s $HOME;rm'");
        assert_eq!(shell_word("a\u{1b}b"), "'a\\u{1b}b'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn terminal_controls_and_bidi_are_escaped_visibly() {
        let cases = [
            (
                "\u{1b}[2J\u{1b}]0;pwned\u{7}",
                "\\u{1b}[2J\\u{1b}]0;pwned\\u{7}",
            ),
            ("over\rwrite", "over\\u{d}write"),
            ("tab\there", "tab\\u{9}here"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("\u{7f}", "\\u{7f}"),
            ("evil\u{202e}txt.exe", "evil\\u{202e}txt.exe"),
            ("\u{2066}isolate\u{2069}", "\\u{2066}isolate\\u{2069}"),
            ("a\u{2028}b", "a\\u{2028}b"),
            ("looks\\u{1b}escaped", "looks\\\\u{1b}escaped"),
            (
                "plain ünïcödé 🦀 👨\u{200d}👩\u{200d}👧",
                "plain ünïcödé 🦀 👨\u{200d}👩\u{200d}👧",
            ),
        ];
        for (raw, shown) in cases {
            assert_eq!(inline(raw), shown, "{raw:?}");
            assert_eq!(body(raw), shown, "{raw:?}");
        }
        assert_eq!(inline("two\nlines"), "two\\u{a}lines");
        for text in ["\u{1b}x", "a\rb", "\u{202e}", "x\u{7}"] {
            assert!(!inline(text).chars().any(hidden), "{text:?}");
            assert!(
                !body(text).chars().any(|c| c != '\n' && hidden(c)),
                "{text:?}"
            );
        }
    }
}
