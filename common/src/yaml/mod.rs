//! The one place nk3 touches YAML.
//!
//! `serde_yaml` is archived upstream; everything it does for nk3 is kept behind this module so
//! that replacing it touches one file. It parses text into [`Yaml`], nk3's own tree, and
//! [`locate`] finds the line of a key path in the text, so validation errors can name a line
//! even though the tree carries no positions.

use std::fmt;

/// The largest inventory nk3 reads. A 5,000-node inventory is well under 2 MiB.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// A parsed YAML value. Mapping keys are kept in file order as their scalar text.
#[derive(Debug, Clone, PartialEq)]
pub enum Yaml {
    /// `~`, `null` or an empty value.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer that fits in `i64`.
    Int(i64),
    /// Any other number, as serde_yaml prints it (`24.10` reads as `24.1`, which is why
    /// string fields refuse numbers instead of converting them).
    Float(String),
    /// A string scalar.
    Str(String),
    /// A sequence.
    Seq(Vec<Yaml>),
    /// A mapping with scalar keys, in file order.
    Map(Vec<(String, Yaml)>),
}

impl Yaml {
    /// What kind of value this is, for messages ("expected a string, found a mapping").
    pub fn kind(&self) -> &'static str {
        match self {
            Yaml::Null => "nothing (null)",
            Yaml::Bool(_) => "a boolean",
            Yaml::Int(_) | Yaml::Float(_) => "a number",
            Yaml::Str(_) => "a string",
            Yaml::Seq(_) => "a list",
            Yaml::Map(_) => "a mapping",
        }
    }
}

/// One step of a path into a YAML document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A position in a sequence, from 0.
    Index(usize),
}

/// A path into a YAML document, printed the way people write it: `cluster.nodes.10.0.0.5.interface`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path(pub Vec<Seg>);

impl Path {
    /// This path with one more key.
    pub fn key(&self, k: &str) -> Path {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        Path(v)
    }

    /// This path with one more sequence position.
    pub fn index(&self, i: usize) -> Path {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Path(v)
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// Why a document could not be parsed at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// 1-based line, where known.
    pub line: Option<usize>,
    /// What is wrong, for a person.
    pub message: String,
}

/// Parses one YAML document into a [`Yaml`] tree.
///
/// Refuses documents over [`MAX_BYTES`], duplicate keys, tags, non-scalar keys, and alias
/// expansions that would blow up (a "billion laughs" document).
pub fn parse(text: &str) -> Result<Yaml, ParseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.len() > MAX_BYTES {
        return Err(ParseError {
            line: None,
            message: format!(
                "file is {} bytes; inventories larger than {} bytes are refused",
                text.len(),
                MAX_BYTES
            ),
        });
    }
    let scan = scan_tokens(text);
    if let Some(line) = scan.too_deep {
        return Err(ParseError {
            line: Some(line),
            message: format!("values nest deeper than nk3 reads (lists and mappings within each other, over {MAX_FLOW} levels)"),
        });
    }
    if let Some((line, tag)) = scan.tag {
        return Err(ParseError {
            line: Some(line),
            message: format!("YAML tags such as `{tag}` are not supported: they change how a value is read; write the value plainly (quoted, if it is text)"),
        });
    }
    // Each alias stands for a copy of its anchored value, at most the whole text: bound the
    // expansion by size before serde_yaml builds it (its own limit counts uses, not bytes).
    if scan.aliases.saturating_mul(text.len()) > MAX_EXPANDED {
        return Err(ParseError {
            line: None,
            message: format!("YAML anchors and aliases ({} aliases in {} bytes) could expand beyond a sane size ({MAX_EXPANDED} bytes); write the values out", scan.aliases, text.len()),
        });
    }
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| from_serde(text, &e))?;
    convert(text, value, &Path::default())
}

/// The most an inventory's aliases may stand for, in bytes of text.
pub const MAX_EXPANDED: usize = 64 * 1024 * 1024;

/// What a pass over the text finds outside quotes, comments and block scalars.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scan {
    /// The first tag (`!!str`, `!local`), with its line.
    tag: Option<(usize, String)>,
    /// How many aliases (`*name`).
    aliases: usize,
    /// The first line where `[`/`{` nest deeper than [`MAX_FLOW`] (libyaml's scanner is
    /// quadratic in that depth: 100,000 brackets take minutes).
    too_deep: Option<usize>,
}

/// How deep flow collections may nest.
const MAX_FLOW: usize = 100;

fn scan_tokens(text: &str) -> Scan {
    let mut out = Scan::default();
    // Inside a block scalar (`|`, `>`): lines indented more than this are its text.
    let mut block: Option<usize> = None;
    let mut flow = 0usize;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if let Some(b) = block {
            if line.trim().is_empty() || indent > b {
                continue;
            }
            block = None;
        }
        let mut quote: Option<char> = None;
        let mut prev: Option<char> = None;
        let mut last_token = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match quote {
                Some('\'') if c == '\'' => quote = None,
                Some('"') if c == '\\' => i += 1,
                Some('"') if c == '"' => quote = None,
                Some(_) => {}
                None => {
                    let starts = prev.is_none_or(|p| p.is_whitespace() || "[{,".contains(p));
                    match c {
                        '#' if prev.is_none_or(char::is_whitespace) => break,
                        '\'' | '"' if starts => quote = Some(c),
                        '!' if starts && out.tag.is_none() => {
                            let tag: String = chars[i..]
                                .iter()
                                .take_while(|c| !c.is_whitespace() && !",]}".contains(**c))
                                .take(40)
                                .collect();
                            out.tag = Some((n + 1, tag));
                        }
                        '*' if starts => out.aliases += 1,
                        '[' | '{' => {
                            flow += 1;
                            if flow > MAX_FLOW && out.too_deep.is_none() {
                                out.too_deep = Some(n + 1);
                            }
                        }
                        ']' | '}' => flow = flow.saturating_sub(1),
                        _ => {}
                    }
                    if c.is_whitespace() {
                        if !last_token.is_empty() {
                            last_token.clear();
                        }
                    } else {
                        last_token.push(c);
                    }
                }
            }
            prev = Some(c);
            i += 1;
        }
        // `key: |`, `- >-`…: the lines after it, indented more, are text.
        let t = last_token.trim_start_matches(['|', '>']);
        if quote.is_none()
            && last_token.starts_with(['|', '>'])
            && t.chars()
                .all(|c| c == '+' || c == '-' || c.is_ascii_digit())
        {
            block = Some(indent);
        }
    }
    out
}

/// Whether the scalar at `path` is written as `digits` (and not, say, `0x1F` for 31): the
/// value on its line is that token, standing alone.
pub fn written_as(text: &str, path: &[Seg], digits: &str) -> bool {
    let Some(line) = locate(text, path) else {
        return false;
    };
    let Some(l) = text.lines().nth(line - 1) else {
        return false;
    };
    let b = l.as_bytes();
    l.match_indices(digits).any(|(at, _)| {
        let before = at.checked_sub(1).map(|j| b[j]);
        let after = b.get(at + digits.len()).copied();
        before.is_none_or(|c| matches!(c, b' ' | b'[' | b',' | b':' | b'{'))
            && after.is_none_or(|c| matches!(c, b' ' | b']' | b',' | b'}' | b'#'))
    })
}

fn from_serde(text: &str, e: &serde_yaml::Error) -> ParseError {
    let raw = e.to_string();
    if raw.contains("repetition limit exceeded") {
        return ParseError {
            line: None,
            message: "YAML anchors and aliases expand beyond a sane size; write the values out"
                .into(),
        };
    }
    if raw.contains("recursion limit exceeded") {
        return ParseError {
            line: e.location().map(|l| l.line()),
            message: "values nest deeper than nk3 reads (lists and mappings within each other, over a hundred levels)".into(),
        };
    }
    const DUP: &str = "duplicate entry with key \"";
    if let Some(key) = raw
        .find(DUP)
        .and_then(|i| raw[i + DUP.len()..].split('"').next())
    {
        return ParseError {
            line: second_occurrence_of_key(text, key),
            message: format!("duplicate key `{key}`: a key may appear only once in a mapping"),
        };
    }
    // serde_yaml appends " at line L column C"; the line goes into our own field instead.
    let message = match raw.find(" at line ") {
        Some(i) => raw[..i].to_string(),
        None => raw.clone(),
    };
    ParseError {
        line: e.location().map(|l| l.line()),
        message: format!("not valid YAML: {message}"),
    }
}

fn convert(text: &str, v: serde_yaml::Value, at: &Path) -> Result<Yaml, ParseError> {
    use serde_yaml::Value as V;
    Ok(match v {
        V::Null => Yaml::Null,
        V::Bool(b) => Yaml::Bool(b),
        V::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Int(i),
            None => Yaml::Float(n.to_string()),
        },
        V::String(s) => Yaml::Str(s),
        V::Sequence(items) => Yaml::Seq(
            items
                .into_iter()
                .enumerate()
                .map(|(i, x)| convert(text, x, &at.index(i)))
                .collect::<Result<_, _>>()?,
        ),
        V::Mapping(m) => {
            let mut out = Vec::with_capacity(m.len());
            for (k, x) in m {
                let key = match k {
                    V::String(s) => s,
                    V::Bool(b) => b.to_string(),
                    V::Number(n) => n.to_string(),
                    other => {
                        let kind = match other {
                            V::Sequence(_) => "a list",
                            V::Mapping(_) => "a mapping",
                            V::Tagged(_) => "a tag",
                            _ => "nothing (null)",
                        };
                        return Err(ParseError {
                            line: locate(text, &at.0),
                            message: format!(
                                "{}mapping keys must be plain text, found {kind}",
                                prefix(at)
                            ),
                        });
                    }
                };
                let child = convert(text, x, &at.key(&key))?;
                out.push((key, child));
            }
            Yaml::Map(out)
        }
        V::Tagged(t) => {
            return Err(ParseError {
                line: locate(text, &at.0),
                message: format!(
                    "{}YAML tags such as `{}` are not supported",
                    prefix(at),
                    t.tag
                ),
            })
        }
    })
}

/// `key: ` in front of a message about `at`, or nothing at the document's top.
fn prefix(at: &Path) -> String {
    if at.0.is_empty() {
        String::new()
    } else {
        format!("{at}: ")
    }
}

/// A line of the document as the locator sees it.
struct Line<'a> {
    indent: usize,
    /// The text after the indentation.
    body: &'a str,
}

fn lines(text: &str) -> Vec<Option<Line<'_>>> {
    text.lines()
        .map(|l| {
            let body = l.trim_start_matches(' ');
            if body.is_empty() || body.starts_with('#') || body == "---" || body == "..." {
                None
            } else {
                Some(Line {
                    indent: l.len() - body.len(),
                    body,
                })
            }
        })
        .collect()
}

/// The key a line defines, if it starts with `key:` (quoted or plain), and the column its key
/// starts at (after any `- ` sequence markers).
fn line_key<'a>(line: &Line<'a>) -> Option<(usize, &'a str)> {
    let mut body = line.body;
    let mut col = line.indent;
    while let Some(rest) = body.strip_prefix("- ") {
        let trimmed = rest.trim_start_matches(' ');
        col += body.len() - trimmed.len();
        body = trimmed;
    }
    key_at_start(body).map(|k| (col, k))
}

fn key_at_start(body: &str) -> Option<&str> {
    for q in ['"', '\''] {
        if let Some(rest) = body.strip_prefix(q) {
            let end = rest.find(q)?;
            return rest[end + 1..]
                .trim_start()
                .starts_with(':')
                .then_some(&rest[..end]);
        }
    }
    let colon = body
        .find(": ")
        .or_else(|| body.strip_suffix(':').map(|k| k.len()))?;
    let key = body[..colon].trim_end();
    (!key.is_empty() && !key.starts_with(['{', '[', '-', '&', '*', '!'])).then_some(key)
}

/// Whether an inline (flow) mapping in `body` contains `key:`.
fn flow_has_key(body: &str, key: &str) -> bool {
    let Some(open) = body.find('{') else {
        return false;
    };
    body[open + 1..]
        .split(',')
        .any(|part| key_at_start(part.trim_start()) == Some(key))
}

fn second_occurrence_of_key(text: &str, key: &str) -> Option<usize> {
    let ls = lines(text);
    let mut seen = std::collections::HashMap::new();
    for (i, l) in ls.iter().enumerate() {
        let Some(l) = l else { continue };
        if let Some((col, k)) = line_key(l) {
            if k == key {
                // Same key at the same column under the same parent: count per (column, parent).
                let parent = ls[..i]
                    .iter()
                    .rposition(|p| p.as_ref().is_some_and(|p| p.indent < col));
                let n = seen.entry((col, parent)).or_insert(0);
                *n += 1;
                if *n == 2 {
                    return Some(i + 1);
                }
            }
        }
        if flow_has_key(l.body, key) {
            // Inline duplicates sit on one line.
            let count = l.body.matches(&format!("{key}:")).count();
            if count > 1 {
                return Some(i + 1);
            }
        }
    }
    None
}

/// Finds the 1-based line where `path` is written in `text`, or the line of its closest
/// ancestor that can be found. Works on the block and flow styles inventories are written in;
/// it is a locator for messages, never used to read values.
pub fn locate(text: &str, path: &[Seg]) -> Option<usize> {
    let ls = lines(text);
    // The container being searched: the line of its key (None for the document) and the
    // column its own key sits at; its children are indented further.
    let mut parent: Option<usize> = None;
    let mut parent_col: isize = -1;
    // Set when the container is a sequence item written `- key: value`: its first key sits on
    // the dash line, at this column.
    let mut item_first: Option<(usize, usize)> = None;
    let mut found: Option<usize> = None;
    for seg in path {
        if let (Some(p), None) = (parent, item_first) {
            // An inline container on the parent's line: the rest of the path is on that line.
            let body = ls[p].as_ref().map_or("", |l| l.body);
            let after = body.rsplit_once(": ").map_or("", |(_, v)| v).trim_start();
            if after.starts_with('{') || after.starts_with('[') {
                break;
            }
        }
        let hit = match (seg, item_first) {
            (Seg::Key(k), Some((line, col))) => {
                let first = ls[line].as_ref().and_then(line_key);
                if first.map(|(_, key)| key) == Some(k.as_str()) {
                    Some((line, col))
                } else {
                    scan(&ls, line + 1, col as isize - 1, seg)
                }
            }
            _ => scan(&ls, parent.map_or(0, |p| p + 1), parent_col, seg),
        };
        let Some((i, col)) = hit else { break };
        found = Some(i);
        parent = Some(i);
        parent_col = col as isize;
        item_first = None;
        if let (Seg::Index(_), Some(l)) = (seg, &ls[i]) {
            if let Some((kc, _)) = line_key(l) {
                item_first = Some((i, kc));
            }
        }
    }
    found.map(|f| f + 1)
}

/// Searches the children of a container (lines after `start` indented past `parent_col`) for
/// one path step; returns its line and the column its children are indented past.
fn scan(
    ls: &[Option<Line<'_>>],
    start: usize,
    parent_col: isize,
    seg: &Seg,
) -> Option<(usize, usize)> {
    let mut child_col: Option<usize> = None;
    let mut item = 0usize;
    for (i, l) in ls.iter().enumerate().skip(start) {
        let Some(l) = l else { continue };
        let is_dash = l.body.starts_with("- ") || l.body == "-";
        let indent = l.indent as isize;
        // YAML lets a sequence sit at its key's own indentation.
        if indent < parent_col
            || (indent == parent_col && !(is_dash && matches!(seg, Seg::Index(_))))
        {
            return None;
        }
        match seg {
            Seg::Key(k) => {
                if let Some((col, key)) = line_key(l) {
                    let cc = *child_col.get_or_insert(col);
                    if col == cc && key == k {
                        return Some((i, col));
                    }
                } else if flow_has_key(l.body, k) {
                    return Some((i, l.indent));
                }
            }
            Seg::Index(n) if is_dash => {
                let cc = *child_col.get_or_insert(l.indent);
                if l.indent == cc {
                    if item == *n {
                        return Some((i, l.indent));
                    }
                    item += 1;
                }
            }
            Seg::Index(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests;
