//! The shapes and scalar values the reader takes: mappings, lists, strings, numbers,
//! durations, addresses, choices.

use std::net::IpAddr;
use std::time::Duration;

use super::super::{BootLoader, Role, Secret, Vars};
use super::*;

impl Reader<'_> {
    pub(super) fn mapping<'y>(&mut self, v: &'y Yaml, at: &Path) -> Option<&'y [(String, Yaml)]> {
        match v {
            Yaml::Map(m) => Some(m),
            other => {
                self.err(
                    at,
                    format!("expected a mapping of keys, found {}", other.kind()),
                );
                None
            }
        }
    }

    /// Splits a mapping into its known keys and, where `extra_ok`, the others. Unknown keys
    /// are errors, with the nearest known key suggested.
    pub(super) fn fields<'y>(
        &mut self,
        entries: &'y [(String, Yaml)],
        at: &Path,
        known: &[&str],
        extra_ok: bool,
    ) -> (Entries<'y>, Vec<(&'y str, &'y Yaml)>) {
        let mut f = Entries::new();
        let mut extra = Vec::new();
        for (k, v) in entries {
            if known.contains(&k.as_str()) {
                f.insert(k.as_str(), v);
                continue;
            }
            let near = nearest(k, known);
            match (extra_ok, near) {
                (true, Some(n)) => self.err(&at.key(k), format!("`{k}` looks like a misspelling of `{n}`; if it is meant as a host variable for a custom template, put it under `vars:`")),
                (true, None) => match check::var_name(k) {
                    Ok(()) => extra.push((k.as_str(), v)),
                    Err(m) => self.err(&at.key(k), m),
                },
                (false, Some(n)) => self.err(&at.key(k), format!("unknown key `{k}`; did you mean `{n}`?")),
                (false, None) => self.err(&at.key(k), format!("unknown key `{k}`; known keys here: {}", known.join(", "))),
            }
        }
        (f, extra)
    }

    pub(super) fn list<T>(
        &mut self,
        v: &Yaml,
        at: &Path,
        mut each: impl FnMut(&mut Self, &Yaml, &Path) -> Option<T>,
    ) -> Vec<T> {
        match v {
            Yaml::Seq(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, x)| each(self, x, &at.index(i)))
                .collect(),
            Yaml::Null => Vec::new(),
            other => {
                self.err(at, format!("expected a list, found {}", other.kind()));
                Vec::new()
            }
        }
    }

    // ---- scalars ----

    /// A string value. Integers are taken as their digits (the original tool read YAML the
    /// same way); other numbers and booleans must be quoted, since their text is not kept.
    /// An integer where text is expected is taken as its digits only when it is written
    /// that way: YAML reads `0x1F`, `0o17` and `+12` as numbers, and their digits would not
    /// be what was written.
    pub(super) fn digits(&mut self, i: i64, at: &Path, secret: bool) -> Option<String> {
        if crate::yaml::written_as(self.text, &at.0, &i.to_string()) {
            return Some(i.to_string());
        }
        let number = if secret {
            String::new()
        } else {
            format!(" {i}")
        };
        self.err(at, format!("YAML reads this as the number{number}, not as the text written (`0x…`, `0o…`, `+…`); quote it so it is read as written"));
        None
    }

    pub(super) fn string(&mut self, v: &Yaml, at: &Path) -> Option<String> {
        let s = match v {
            Yaml::Str(s) => s.clone(),
            Yaml::Int(i) => self.digits(*i, at, false)?,
            Yaml::Float(f) => {
                self.err(at, format!("expected text, found the number {f}; quote it (\"{f}\") so it is read as written"));
                return None;
            }
            other => {
                self.err(at, format!("expected text, found {}", other.kind()));
                return None;
            }
        };
        match check::text(&s) {
            Ok(()) => Some(s),
            Err(m) => {
                self.err(at, m);
                None
            }
        }
    }

    /// A string that must also pass `rule`.
    pub(super) fn checked(
        &mut self,
        v: &Yaml,
        at: &Path,
        rule: fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        let s = self.string(v, at)?;
        match rule(&s) {
            Ok(()) => Some(s),
            Err(m) => {
                self.err(at, m);
                None
            }
        }
    }

    pub(super) fn join_token(&mut self, v: &Yaml, at: &Path) -> Option<Secret> {
        // The token itself is never quoted back in a message.
        let s = match v {
            Yaml::Str(s) => s.clone(),
            Yaml::Int(i) => self.digits(*i, at, true)?,
            other => {
                self.err(
                    at,
                    format!("expected the token as text, found {}", other.kind()),
                );
                return None;
            }
        };
        if s.is_empty() {
            self.err(at, "the join token is empty");
            return None;
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.err(
                at,
                "the join token contains white space or control characters; k3s tokens never do",
            );
            return None;
        }
        Some(Secret::new(s))
    }

    pub(super) fn ip(&mut self, v: &Yaml, at: &Path) -> Option<IpAddr> {
        let s = self.string(v, at)?;
        match s.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.err(at, format!("`{s}` is not an IPv4 or IPv6 address"));
                None
            }
        }
    }

    /// A boolean. YAML 1.1 spellings (`yes`, `on`, …) are accepted as the original tool's
    /// YAML reader did.
    pub(super) fn bool(&mut self, v: &Yaml, at: &Path) -> Option<bool> {
        match v {
            Yaml::Bool(b) => Some(*b),
            Yaml::Str(s) => match s.as_str() {
                "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "y" | "Y" => Some(true),
                "no" | "No" | "NO" | "off" | "Off" | "OFF" | "n" | "N" => Some(false),
                _ => {
                    self.err(at, format!("expected true or false, found `{s}`"));
                    None
                }
            },
            other => {
                self.err(
                    at,
                    format!("expected true or false, found {}", other.kind()),
                );
                None
            }
        }
    }

    pub(super) fn uint(&mut self, v: &Yaml, at: &Path, min: i64, max: i64) -> Option<i64> {
        match v {
            Yaml::Int(i) if (min..=max).contains(i) => Some(*i),
            Yaml::Int(i) => {
                self.err(
                    at,
                    format!("{i} is out of range; expected a whole number from {min} to {max}"),
                );
                None
            }
            other => {
                self.err(
                    at,
                    format!(
                        "expected a whole number from {min} to {max}, found {}",
                        other.kind()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn duration(&mut self, v: &Yaml, at: &Path) -> Option<Duration> {
        let d = match v {
            Yaml::Int(i) if *i > 0 => Duration::from_secs(*i as u64),
            Yaml::Str(s) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.err(
                        at,
                        format!("`{s}` is not a duration ({e}); write e.g. `90s`, `10m` or `1h`"),
                    );
                    return None;
                }
            },
            other => {
                self.err(
                    at,
                    format!("expected a duration such as `10m`, found {}", other.kind()),
                );
                return None;
            }
        };
        if d.is_zero() {
            self.err(at, "the duration must be longer than zero");
            return None;
        }
        if d > MAX_DURATION {
            self.err(
                at,
                format!(
                    "{} is longer than nk3 waits for anything; at most {} days",
                    humantime::format_duration(d),
                    MAX_DURATION.as_secs() / 86_400
                ),
            );
            return None;
        }
        Some(d)
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        v: &Yaml,
        at: &Path,
        options: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(v, at)?;
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == s) {
            return Some(*t);
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let hint = nearest(&s, &names).map_or(String::new(), |n| format!(" (did you mean `{n}`?)"));
        self.err(
            at,
            format!("`{s}` is not one of {}{hint}", names.join(", ")),
        );
        None
    }

    pub(super) fn role(&mut self, v: &Yaml, at: &Path) -> Option<Role> {
        self.choice(v, at, &[("server", Role::Server), ("agent", Role::Agent)])
    }

    pub(super) fn boot_loader(&mut self, v: &Yaml, at: &Path) -> Option<BootLoader> {
        self.choice(
            v,
            at,
            &[
                ("grub", BootLoader::Grub),
                ("grub-efi", BootLoader::GrubEfi),
                ("systemd-boot", BootLoader::SystemdBoot),
            ],
        )
    }

    /// k3s flags: one string or a list of them, each starting with `-`.
    pub(super) fn flags(&mut self, v: &Yaml, at: &Path) -> Vec<String> {
        match v {
            Yaml::Str(_) => self.checked(v, at, check::k3s_flag).into_iter().collect(),
            _ => self.list(v, at, |r, v, at| r.checked(v, at, check::k3s_flag)),
        }
    }

    pub(super) fn vars(&mut self, v: &Yaml, at: &Path) -> Vars {
        let Some(entries) = self.mapping(v, at) else {
            return Vars::new();
        };
        let mut out = Vars::new();
        for (k, v) in entries {
            if let Err(m) = check::var_name(k) {
                self.err(&at.key(k), m);
                continue;
            }
            if let Some(j) = self.json(v, &at.key(k)) {
                out.insert(k.clone(), j);
            }
        }
        out
    }

    /// A free value for templates, with every string checked like any other.
    pub(super) fn json(&mut self, v: &Yaml, at: &Path) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        Some(match v {
            Yaml::Null => J::Null,
            Yaml::Bool(b) => J::Bool(*b),
            Yaml::Int(i) => J::from(*i),
            Yaml::Float(f) => f.parse::<f64>().ok().map_or(J::Null, J::from),
            Yaml::Str(_) => J::String(self.string(v, at)?),
            Yaml::Seq(items) => J::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.json(x, &at.index(i)))
                    .collect::<Option<_>>()?,
            ),
            Yaml::Map(entries) => {
                let mut m = serde_json::Map::new();
                for (k, x) in entries {
                    if let Err(e) = check::text(k) {
                        self.err(&at.key(k), e);
                        return None;
                    }
                    m.insert(k.clone(), self.json(x, &at.key(k))?);
                }
                J::Object(m)
            }
        })
    }
}
