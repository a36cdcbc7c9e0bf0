//! Rendering a node's `configuration.nix` with Handlebars.
//!
//! Safe by construction: `{{value}}` writes the value as a quoted Nix string (the registry's
//! escape function is [`nix::string`]), `{{nix value}}` writes any value as a Nix expression,
//! and templates may not insert raw text (`{{{…}}}`, `{{&…}}`, however spelt: judged from the
//! parsed template) nor use partials or decorators (which could recurse). So no inventory
//! value, whatever it contains, can become Nix code, and a rendering is bounded in size. Strict mode makes a missing
//! value an error instead of an empty string. The join token is not in the context at all:
//! the configuration names the token file the agent writes.

mod context;
pub mod nix;

use std::net::IpAddr;

use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderErrorReason,
};
use serde::Serialize;

use crate::inventory::{BootLoader, Inventory, Node, Role, Vars};

/// Where the agent writes the join token on the node (under its state directory).
pub const DEFAULT_TOKEN_FILE: &str = "/var/lib/nk3-agent/join-token";

/// The built-in template.
pub const DEFAULT_TEMPLATE: &str = include_str!("default.nix.hbs");

/// The largest configuration.nix a rendering may produce.
pub const MAX_OUTPUT: usize = 4 << 20;

/// The largest template accepted.
pub const MAX_TEMPLATE: usize = 1 << 20;

/// Why a configuration could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A value the template needs is neither in the inventory nor known about the machine.
    #[error("node {node}: no `{what}` in the inventory and none detected on the machine; set `{what}:` for this node (or pass --{flag} to render it elsewhere)")]
    MissingFact {
        /// The node's key.
        node: String,
        /// The inventory key that is missing.
        what: &'static str,
        /// The `render` flag that supplies it.
        flag: &'static str,
    },
    /// Neither the inventory nor the machine says which NixOS release the machine was
    /// installed with; rendering without would let `system.stateVersion` move with every
    /// upgrade, and stateful services migrate their data on it.
    #[error("node {node}: no `state_version` in the inventory and none in the configuration.nix being replaced; set `state_version:` to the NixOS release the machines were installed with (the installer's `system.stateVersion`), or pass --state-version to render elsewhere")]
    StateVersion {
        /// The node's key.
        node: String,
    },
    /// The template inserts raw text somewhere.
    #[error("{template}:{line}: this expression inserts a value unquoted (`{{{{{{…}}}}}}` or `{{{{&…}}}}`), which could turn inventory text into Nix code; use `{{{{value}}}}` (a Nix string) or `{{{{nix value}}}}` (any value)")]
    Unsafe {
        /// Template name.
        template: String,
        /// 1-based line.
        line: usize,
    },
    /// The template uses a partial or a decorator (`{{> …}}`, `{{#> …}}`, `{{#*inline …}}`,
    /// `{{* …}}`): a template is one file, and partials can recurse without end.
    #[error("{template}:{line}: partials and decorators (`{{{{> …}}}}`, `{{{{#*inline …}}}}`) are not supported: write the template as one file")]
    Partial {
        /// Template name.
        template: String,
        /// 1-based line.
        line: usize,
    },
    /// Loops nested this deep over values this long would run for too long.
    #[error("{template}: `{{{{#each}}}}` blocks nested {depth} deep over values of up to {longest} items could take more than {MAX_ITERATIONS} iterations; nest fewer loops or loop over shorter values")]
    TooMuchWork {
        /// Template name.
        template: String,
        /// How deep the loops nest.
        depth: u32,
        /// The longest list or map of the context.
        longest: u64,
    },
    /// The rendering grew past [`MAX_OUTPUT`].
    #[error("{template}: the rendered configuration is over {MAX_OUTPUT} bytes; a node's configuration.nix is never that large (a loop over a large value?)")]
    TooLarge {
        /// Template name.
        template: String,
    },
    /// The template does not compile.
    #[error("{template}: {message}")]
    Template {
        /// Template name.
        template: String,
        /// The template engine's message, with its line.
        message: String,
    },
    /// Rendering failed: in strict mode, usually a value the template names does not exist.
    #[error("{template}: {message}")]
    Render {
        /// Template name.
        template: String,
        /// The template engine's message, with its line.
        message: String,
    },
}

/// Where a rendering comes from, named in the file's first lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The repository (URL or path). Credentials in a URL are never written out.
    pub repository: String,
    /// The commit the inventory was read at.
    pub commit: String,
}

/// Facts about the machine that fill values the inventory leaves out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The interface of the default route.
    pub interface: Option<String>,
    /// The default route's gateway.
    pub default_gateway: Option<IpAddr>,
    /// The `system.stateVersion` the machine was installed with (read from the
    /// configuration.nix being replaced, or remembered from it).
    pub state_version: Option<String>,
}

/// Everything besides the inventory that a rendering depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Named in the header.
    pub source: Source,
    /// The path `services.k3s.tokenFile` points at.
    pub token_file: String,
    /// Values detected on the machine, used where the inventory is silent.
    pub facts: HostFacts,
}

/// A compiled template.
#[derive(Debug)]
pub struct Template {
    name: String,
    registry: Handlebars<'static>,
    /// How deep `{{#each}}` blocks nest: with the longest list or map of the context, it
    /// bounds the work of a rendering (the output bound does not: an empty body costs
    /// nothing to write).
    each_depth: u32,
}

/// The most loop iterations a rendering may take (the longest value's length to the power
/// of the `{{#each}}` nesting).
pub const MAX_ITERATIONS: u64 = 10_000_000;

impl Template {
    /// The built-in template.
    pub fn builtin() -> Template {
        Template::custom("built-in template", DEFAULT_TEMPLATE)
            .expect("the built-in template compiles")
    }

    /// A template brought by the repository. `name` is used in messages.
    pub fn custom(name: &str, text: &str) -> Result<Template, RenderError> {
        if text.len() > MAX_TEMPLATE {
            return Err(RenderError::Template {
                template: name.to_string(),
                message: format!("templates larger than {MAX_TEMPLATE} bytes are refused"),
            });
        }
        // The parser recurses into each block: bound the nesting before it sees the text.
        if let Some(line) = too_deep(text) {
            return Err(RenderError::Template {
                template: name.to_string(),
                message: format!("line {line}: blocks nest deeper than {MAX_NESTING}"),
            });
        }
        let parsed = handlebars::Template::compile(text).map_err(|e| RenderError::Template {
            template: name.to_string(),
            message: e.to_string(),
        })?;
        match unsafe_element(&parsed, 1) {
            Some(Unsafe::Raw(line)) => {
                return Err(RenderError::Unsafe {
                    template: name.to_string(),
                    line,
                })
            }
            Some(Unsafe::Partial(line)) => {
                return Err(RenderError::Partial {
                    template: name.to_string(),
                    line,
                })
            }
            None => {}
        }
        let mut registry = Handlebars::new();
        registry.set_strict_mode(true);
        registry.register_escape_fn(nix::string);
        registry.register_helper("nix", Box::new(NixHelper));
        registry
            .register_template_string(name, text)
            .map_err(|e| RenderError::Template {
                template: name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Template {
            name: name.to_string(),
            registry,
            each_depth: each_depth(&parsed),
        })
    }

    /// Renders `node`'s configuration.
    pub fn render(
        &self,
        inv: &Inventory,
        node: &Node,
        opts: &Options,
    ) -> Result<String, RenderError> {
        let ctx = context::context(inv, node, opts)?;
        if self.each_depth > 0 {
            let longest = serde_json::to_value(&ctx)
                .map(|v| longest(&v))
                .unwrap_or(0)
                .max(1) as u64;
            if longest.saturating_pow(self.each_depth) > MAX_ITERATIONS {
                return Err(RenderError::TooMuchWork {
                    template: self.name.clone(),
                    depth: self.each_depth,
                    longest,
                });
            }
        }
        let mut out = Bounded(Vec::new());
        if let Err(e) = self.registry.render_to_write(&self.name, &ctx, &mut out) {
            if out.0.len() >= MAX_OUTPUT {
                return Err(RenderError::TooLarge {
                    template: self.name.clone(),
                });
            }
            return Err(RenderError::Render {
                template: self.name.clone(),
                message: e.to_string(),
            });
        }
        let body = String::from_utf8(out.0).map_err(|_| RenderError::Render {
            template: self.name.clone(),
            message: "the rendering is not UTF-8".into(),
        })?;
        Ok(format!("{}{body}", header(node, &opts.source)))
    }
}

/// The first lines of every rendered file: where it came from, and not to edit it.
fn header(node: &Node, source: &Source) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    format!(
        "# Generated by nk3 for {} ({}) from {} at commit {}.\n# Do not edit: nk3-agent replaces this file. Change the inventory instead.\n",
        node.hostname,
        node.key,
        clean(&redact_url(&source.repository)),
        clean(&source.commit),
    )
}

/// A rendered file without its header, the part that decides what gets built: two
/// renderings of different commits that differ only in the header build the same system.
/// Text that has no nk3 header (a hand-written file) is returned whole.
pub fn body(text: &str) -> &str {
    let mut rest = text;
    if !rest.starts_with("# Generated by nk3 ") {
        return text;
    }
    for _ in 0..2 {
        match rest.split_once('\n') {
            Some((line, tail)) if line.starts_with('#') => rest = tail,
            _ => break,
        }
    }
    rest
}

/// The `system.stateVersion` a configuration.nix sets plainly (`system.stateVersion =
/// "24.05";`, as the NixOS installer writes it, and as nk3 renders it), if it sets one.
pub fn state_version_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let rest = l.strip_prefix("system.stateVersion")?.trim_start();
            let rest = rest.strip_prefix('=')?.trim_start().strip_prefix('"')?;
            let (v, _) = rest.split_once('"')?;
            crate::check::state_version(v).ok().map(|()| v.to_string())
        })
}

/// A repository URL without any `user:password@` part.
///
/// Over HTTP(S) any user part goes (a token is often written as the user name); over SSH
/// the user name is kept (`ssh://git@host/…` names an account, not a secret) unless it
/// carries a password.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some((user, host)) = authority.rsplit_once('@') {
            if scheme.eq_ignore_ascii_case("ssh") && !user.contains(':') {
                return url.to_string();
            }
            return format!("{scheme}://{host}{path}");
        }
    }
    url.to_string()
}

/// The deepest nesting of blocks (`{{#…}}` in `{{#…}}`) a template may have.
pub const MAX_NESTING: usize = 64;

/// The line where blocks first nest deeper than [`MAX_NESTING`], counting every `{{#`
/// (and `{{~#`, with spaces) as an opening and `{{/` as a close: an over-count, never less.
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut line = 1;
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'{' if b.get(i + 1) == Some(&b'{') => {
                let mut j = i + 2;
                while j < b.len() && (b[j] == b'~' || b[j] == b'{' || b[j].is_ascii_whitespace()) {
                    if b[j] == b'\n' {
                        line += 1;
                    }
                    j += 1;
                }
                match b.get(j) {
                    Some(b'#') => {
                        depth += 1;
                        if depth > MAX_NESTING {
                            return Some(line);
                        }
                    }
                    Some(b'/') => depth = depth.saturating_sub(1),
                    _ => {}
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// How deep `{{#each}}` blocks nest in `t`.
fn each_depth(t: &handlebars::Template) -> u32 {
    use handlebars::template::TemplateElement as E;
    t.elements
        .iter()
        .map(|e| match e {
            E::HelperBlock(h) => {
                let here = u32::from(h.name.as_name() == Some("each"));
                let inner = [&h.template, &h.inverse]
                    .into_iter()
                    .flatten()
                    .map(each_depth)
                    .max()
                    .unwrap_or(0);
                here + inner
            }
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// The length of the longest list or map anywhere in `v`.
fn longest(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => a.iter().map(longest).max().unwrap_or(0).max(a.len()),
        serde_json::Value::Object(m) => m.values().map(longest).max().unwrap_or(0).max(m.len()),
        _ => 0,
    }
}

/// A writer that refuses to grow past [`MAX_OUTPUT`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            self.0.resize(MAX_OUTPUT, 0);
            return Err(std::io::Error::other("the rendering is too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a template may not contain.
#[derive(Debug, PartialEq, Eq)]
enum Unsafe {
    /// An unescaped insertion, at this line.
    Raw(usize),
    /// A partial or decorator, at this line.
    Partial(usize),
}

/// The first element of the parsed template `t`, at any depth, that inserts a value
/// unescaped or is a partial or decorator. Judged from the parse, so no spelling (`{{ &x}}`,
/// `{{~{x}~}}`, a line break after `{{`) gets past it. `line` is where `t` starts.
fn unsafe_element(t: &handlebars::Template, line: usize) -> Option<Unsafe> {
    use handlebars::template::TemplateElement as E;
    for (i, e) in t.elements.iter().enumerate() {
        let at = t.mapping.get(i).map_or(line, |m| m.0.max(1));
        match e {
            E::HtmlExpression(_) => return Some(Unsafe::Raw(at)),
            E::PartialExpression(_)
            | E::PartialBlock(_)
            | E::DecoratorExpression(_)
            | E::DecoratorBlock(_) => return Some(Unsafe::Partial(at)),
            E::HelperBlock(h) => {
                for sub in [&h.template, &h.inverse].into_iter().flatten() {
                    if let Some(u) = unsafe_element(sub, at) {
                        return Some(u);
                    }
                }
            }
            E::RawString(_) | E::Expression(_) | E::Comment(_) => {}
            // Whatever a later handlebars adds is refused until judged.
            _ => return Some(Unsafe::Partial(at)),
        }
    }
    None
}

struct NixHelper;

impl HelperDef for NixHelper {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let param = h
            .param(0)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex("nix", 0))?;
        if param.is_value_missing() {
            return Err(RenderErrorReason::MissingVariable(param.relative_path().cloned()).into());
        }
        out.write(&nix::value(param.value()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
