//! Every option path a rendered configuration sets is declared in NixOS with a compatible type,
//! checked against option declarations exported from nixpkgs (tests/data/nixos-options.json).

use serde_json::Value;

use crate::support::{config_expr, nix_eval_json, render_all, root, EXAMPLES};

pub struct Options {
    prefixes: Vec<String>,
    not_covered: Vec<String>,
    options: serde_json::Map<String, Value>,
}

impl Options {
    pub fn load() -> Options {
        let text = std::fs::read_to_string(root().join("tests/data/nixos-options.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let list = |k: &str| -> Vec<String> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    s.as_str()
                        .unwrap()
                        .replace(".*.", ".<name>.")
                        .replace(".*", ".<name>")
                })
                .collect()
        };
        Options {
            prefixes: list("prefixes"),
            not_covered: list("notCovered"),
            options: v["options"].as_object().unwrap().clone(),
        }
    }

    fn under(path: &str, prefix: &str) -> bool {
        path == prefix || path.starts_with(&format!("{prefix}."))
    }

    fn covered(&self, path: &str) -> bool {
        self.prefixes.iter().any(|p| Self::under(path, p))
            && !self.not_covered.iter().any(|p| Self::under(path, p))
    }

    fn is_prefix_of_an_option(&self, path: &str) -> bool {
        let p = format!("{path}.");
        self.options.keys().any(|k| k.starts_with(&p))
    }

    /// Checks `value` set at `path` (generalised: `<name>`, `*`); pushes problems.
    fn check(&self, path: &str, value: &Value, problems: &mut Vec<String>) {
        if let Some(decl) = self.options.get(path) {
            if decl.get("alias").and_then(Value::as_str) == Some("removed") {
                problems.push(format!("{path} was removed from NixOS"));
                return;
            }
            let ty = decl["type"].as_str().unwrap();
            match compatible(ty, value) {
                Ok(true) => {}
                Ok(false) => {
                    problems.push(format!("{path} = {value} does not fit its type `{ty}`"))
                }
                Err(e) => problems.push(format!("{path}: {e}")),
            }
            // Submodules are checked option by option below them.
            match value {
                Value::Object(m) if self.is_prefix_of_an_option(path) => {
                    for (k, v) in m {
                        self.child(path, k, v, problems);
                    }
                }
                Value::Array(items)
                    if self.is_prefix_of_an_option(&format!("{path}.*"))
                        || self
                            .options
                            .keys()
                            .any(|k| k.starts_with(&format!("{path}.*."))) =>
                {
                    for item in items {
                        if let Value::Object(m) = item {
                            for (k, v) in m {
                                self.check(&format!("{path}.*.{k}"), v, problems);
                            }
                        }
                    }
                }
                _ => {}
            }
            return;
        }
        if let Some(free) = self.freeform_parent(path) {
            let _ = free; // keys of a freeform attribute set are the user's to choose
            return;
        }
        match value {
            Value::Object(m) if self.is_prefix_of_an_option(path) || !self.covered(path) => {
                for (k, v) in m {
                    self.child(path, k, v, problems);
                }
            }
            _ if !self.covered(path) => {}
            _ => problems.push(format!("{path} is not a NixOS option")),
        }
    }

    pub fn child(&self, path: &str, k: &str, v: &Value, problems: &mut Vec<String>) {
        let literal = if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        };
        let named = format!("{path}.<name>");
        let known = |p: &str| self.options.contains_key(p) || self.is_prefix_of_an_option(p);
        if !known(&literal) && known(&named) {
            self.check(&named, v, problems);
        } else {
            self.check(&literal, v, problems);
        }
    }

    fn freeform_parent(&self, path: &str) -> Option<&Value> {
        let (parent, _) = path.rsplit_once('.')?;
        self.options.get(parent).and_then(|d| d.get("freeformType"))
    }
}

/// Whether a JSON value fits a NixOS type description. Err for a description this checker
/// does not know, so that a new kind of option is looked at rather than passed.
fn compatible(ty: &str, v: &Value) -> Result<bool, String> {
    let ty = ty.trim();
    if let Some(inner) = ty.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        if balanced(inner) {
            return compatible(inner, v);
        }
    }
    let alts = split_top(ty, " or ");
    if alts.len() > 1 {
        for a in alts {
            if compatible(a, v)? {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    if ty == "null" {
        return Ok(v.is_null());
    }
    if let Some(elem) = ty.strip_prefix("list of ") {
        let Value::Array(items) = v else {
            return Ok(false);
        };
        for i in items {
            if !compatible(elem, i)? {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    if let Some(elem) = ty.strip_prefix("attribute set of ") {
        let Value::Object(m) = v else {
            return Ok(false);
        };
        for i in m.values() {
            if !compatible(elem, i)? {
                return Ok(false);
            }
        }
        return Ok(true);
    }
    if let Some(list) = ty.strip_prefix("one of ") {
        let choices: Vec<&str> = list.split(", ").map(|c| c.trim_matches('"')).collect();
        return Ok(v.as_str().is_some_and(|s| choices.contains(&s)));
    }
    if let Some(pattern) = ty.strip_prefix("string matching the pattern ") {
        let re = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
        return Ok(v.as_str().is_some_and(|s| re.is_match(s)));
    }
    if let Some(from) = ty.strip_suffix(" convertible to it") {
        return compatible(from, v);
    }
    let head = ty.split(';').next().unwrap_or(ty).trim();
    if head.ends_with("integer") && !head.contains(" of ") {
        let Some(n) = v.as_i64() else {
            return Ok(false);
        };
        if let Some((lo, hi)) = ty
            .split_once("between ")
            .and_then(|(_, r)| r.split_once(" and "))
        {
            let hi: String = hi.chars().take_while(char::is_ascii_digit).collect();
            return Ok(lo.trim().parse::<i64>().map_or(true, |lo| n >= lo)
                && hi.parse::<i64>().map_or(true, |hi| n <= hi));
        }
        return Ok(if ty.contains("unsigned") || ty.contains("positive") {
            n >= 0
        } else {
            true
        });
    }
    Ok(match ty {
        "boolean" => v.is_boolean(),
        "string"
        | "non-empty string"
        | "single-line string"
        | "(optionally newline-terminated) single-line string" => v.is_string(),
        "string without spaces" => v.as_str().is_some_and(|s| !s.contains(' ')),
        t if t.starts_with("strings concatenated with")
            || t.starts_with("string, not containing") =>
        {
            v.is_string()
        }
        "absolute path" | "path" => v.as_str().is_some_and(|s| s.starts_with('/')),
        // Packages are stand-ins here (pkgs is an empty set in these evaluations).
        "package" => v.is_string(),
        // NixOS's unit option values: an atom, or a list of atoms.
        "systemd option" => match v {
            Value::Array(items) => items
                .iter()
                .all(|i| i.is_string() || i.is_number() || i.is_boolean()),
            _ => v.is_string() || v.is_number() || v.is_boolean(),
        },
        "submodule" | "attribute set" => v.is_object(),
        t if t.starts_with("open submodule") => v.is_object(),
        other => return Err(format!("the checker does not know the type `{other}`")),
    })
}

fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

fn split_top<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < s.len() {
        match bytes[i] {
            b'(' if !quoted => depth += 1,
            b')' if !quoted => depth -= 1,
            b'"' => quoted = !quoted,
            _ => {}
        }
        if depth == 0 && !quoted && s[i..].starts_with(sep) {
            parts.push(&s[start..i]);
            i += sep.len();
            start = i;
            continue;
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
}

#[test]
fn every_option_the_rendered_examples_set_is_declared_with_a_compatible_type() {
    let opts = Options::load();
    let mut problems = Vec::new();
    let mut checked = 0;
    for ex in EXAMPLES {
        let (dir, files) = render_all(ex);
        for (name, _) in &files {
            let config = nix_eval_json(&config_expr(&dir.path().join(name)));
            let before = problems.len();
            for (k, v) in config.as_object().unwrap() {
                opts.child("", k, v, &mut problems);
            }
            for p in &mut problems[before..] {
                *p = format!("{}/{name}: {p}", ex.name);
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} files checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_catches_what_nixos_would_refuse() {
    let opts = Options::load();
    let bad = serde_json::json!({
        "services": { "k3s": { "role": "master", "clusterInit": "yes", "tokne": "x" } },
        "networking": { "hostName": "a.b", "firewall": { "allowedTCPPorts": [70000] } },
    });
    let mut problems = Vec::new();
    for (k, v) in bad.as_object().unwrap() {
        opts.child("", k, v, &mut problems);
    }
    let all = problems.join("\n");
    for want in [
        "services.k3s.role",
        "services.k3s.clusterInit",
        "services.k3s.tokne is not a NixOS option",
        "networking.hostName",
        "allowedTCPPorts",
    ] {
        assert!(
            all.contains(want),
            "expected a problem about {want}:\n{all}"
        );
    }
}
