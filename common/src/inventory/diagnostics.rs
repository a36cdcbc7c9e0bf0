//! Problems found in an inventory, each with its file, line and key.

use std::fmt;

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line, where it could be found.
    pub line: Option<usize>,
    /// The key it is about, as a dotted path (`cluster.nodes.10.0.0.5.interface`); empty for
    /// the file as a whole.
    pub key: String,
    /// What is wrong and what would be right.
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics {
    /// The file's name as the user gave it.
    pub file: String,
    /// The problems, ordered by line; at most [`MAX_REPORTED`].
    pub items: Vec<Diagnostic>,
    /// Problems found beyond [`MAX_REPORTED`], counted but not located: finding a line is
    /// linear in the file, so locating every one of 50,000 problems would be quadratic.
    pub dropped: usize,
}

/// How many problems one run reports in full.
pub const MAX_REPORTED: usize = 200;

impl Diagnostics {
    /// An empty list for `file`.
    pub fn new(file: &str) -> Self {
        Diagnostics {
            file: file.to_string(),
            items: Vec::new(),
            dropped: 0,
        }
    }

    /// Adds one problem (counts it only, once [`Self::full`]).
    pub fn push(&mut self, d: Diagnostic) {
        if self.full() {
            self.dropped += 1;
        } else {
            self.items.push(d);
        }
    }

    /// Adds a problem about the key at `at` in `text`, finding its line only while problems
    /// are still reported in full (finding one is linear in the file).
    pub fn at(&mut self, text: &str, at: &crate::yaml::Path, message: String) {
        if self.full() {
            self.dropped += 1;
            return;
        }
        self.items.push(Diagnostic {
            line: crate::yaml::locate(text, &at.0),
            key: at.to_string(),
            message,
        });
    }

    /// Whether further problems are only counted: callers skip locating them.
    pub fn full(&self) -> bool {
        self.items.len() >= MAX_REPORTED
    }

    /// Whether nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.dropped == 0
    }

    /// How many problems were found in all.
    pub fn count(&self) -> usize {
        self.items.len() + self.dropped
    }

    /// The problems as `file:line: key: message` lines, sorted by line.
    pub fn lines(&self) -> Vec<String> {
        let mut items: Vec<&Diagnostic> = self.items.iter().collect();
        items.sort_by_key(|d| d.line.unwrap_or(0));
        items
            .into_iter()
            .map(|d| {
                let mut s = self.file.clone();
                if let Some(l) = d.line {
                    s.push_str(&format!(":{l}"));
                }
                s.push_str(": ");
                if !d.key.is_empty() {
                    s.push_str(&d.key);
                    s.push_str(": ");
                }
                s.push_str(&d.message);
                s
            })
            .chain((self.dropped > 0).then(|| {
                format!(
                    "{}: … and {} more problems (the first {MAX_REPORTED} are shown)",
                    self.file, self.dropped
                )
            }))
            .collect()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}
