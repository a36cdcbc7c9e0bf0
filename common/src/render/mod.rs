//! Rendering a node's `configuration.nix` with Handlebars.
//!
//! Safe by construction: `{{value}}` writes the value as a quoted Nix string (the registry's
//! escape function is [`nix::string`]), `{{nix value}}` writes any value as a Nix expression,
//! and templates may not insert raw text (`{{{…}}}`, `{{&…}}`, however spelt: judged from the
//! parsed template) nor use partials or decorators (which could recurse). So no inventory
//! value, whatever it contains, can become Nix code, and a rendering is bounded in size. Strict mode makes a missing
//! value an error instead of an empty string. The join token is not in the context at all:
//! the configuration names the token file the agent writes.

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
        let ctx = context(inv, node, opts)?;
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

#[derive(Serialize)]
struct Ctx<'a> {
    source: SourceView<'a>,
    cluster: ClusterView<'a>,
    node: NodeView<'a>,
}

#[derive(Serialize)]
struct SourceView<'a> {
    repository: String,
    commit: &'a str,
}

#[derive(Serialize)]
struct ClusterView<'a> {
    join_address: String,
    server_url: String,
    token_file: &'a str,
    nameservers: Vec<String>,
    ssh_authorized_keys: &'a [String],
    state_version: &'a str,
    nix_channel: Option<&'a str>,
    watch_namespaces: &'a [String],
    node_count: usize,
}

#[derive(Serialize)]
struct NodeView<'a> {
    ip: String,
    ipv6: bool,
    hostname: &'a str,
    role: &'static str,
    initiator: bool,
    interface: String,
    default_gateway: String,
    prefix_length: u8,
    boot_loader: BootLoader,
    systemd_boot: bool,
    boot_device: Option<&'a str>,
    uuid: Option<String>,
    grub_efi: bool,
    k3s_flags: Vec<String>,
    firewall: Firewall,
    secondary: Option<SecondaryView>,
    vars: &'a Vars,
}

#[derive(Serialize)]
struct SecondaryView {
    ip: String,
    ipv6: bool,
    prefix_length: u8,
    gateway: Option<String>,
}

#[derive(Serialize)]
struct Firewall {
    tcp: Vec<u16>,
    udp: Vec<u16>,
}

/// The value of k3s flag `name` in `flags` (the last one given), if any.
fn flag_value<'f>(flags: &'f [String], name: &str) -> Option<&'f str> {
    flags.iter().rev().find_map(|f| {
        let rest = f.strip_prefix(name)?;
        match rest.strip_prefix('=') {
            Some(v) => Some(v),
            None if rest.is_empty() => Some("true"),
            None => None,
        }
    })
}

/// The ports a node must open for k3s (docs.k3s.io, "Inbound Rules for K3s Nodes"): the
/// API server and embedded etcd on servers, the kubelet everywhere, and what the cluster's
/// flannel backend (`--flannel-backend` on the servers), embedded registry and etcd metrics
/// need.
fn firewall(inv: &Inventory, node: &Node) -> Firewall {
    let server_flags: &[String] = inv
        .nodes
        .iter()
        .find(|n| n.role == Role::Server)
        .map_or(&[], |n| n.k3s_extra_flags.as_slice());
    let (mut tcp, mut udp) = match node.role {
        // API server (and supervisor), embedded etcd (client and peer), kubelet.
        Role::Server => (vec![6443, 2379, 2380, 10250], vec![]),
        Role::Agent => (vec![10250], vec![]),
    };
    let v4 = node.ip.is_ipv4() || node.secondary.is_some_and(|s| s.ip.is_ipv4());
    let v6 = node.ip.is_ipv6() || node.secondary.is_some_and(|s| s.ip.is_ipv6());
    match flag_value(server_flags, "--flannel-backend").unwrap_or("vxlan") {
        "vxlan" => udp.push(8472),
        "wireguard-native" => {
            if v4 {
                udp.push(51820);
            }
            if v6 {
                udp.push(51821);
            }
        }
        // host-gw routes pod traffic unencapsulated; none: another CNI says what it needs.
        _ => {}
    }
    if flag_value(server_flags, "--embedded-registry").is_some_and(|v| v != "false") {
        // Spegel's peer-to-peer registry.
        tcp.push(5001);
    }
    if node.role == Role::Server
        && flag_value(server_flags, "--etcd-expose-metrics").is_some_and(|v| v != "false")
    {
        tcp.push(2381);
    }
    Firewall { tcp, udp }
}

fn context<'a>(
    inv: &'a Inventory,
    node: &'a Node,
    opts: &'a Options,
) -> Result<Ctx<'a>, RenderError> {
    let interface = node
        .interface
        .clone()
        .or_else(|| opts.facts.interface.clone())
        .ok_or(RenderError::MissingFact {
            node: node.key.clone(),
            what: "interface",
            flag: "interface",
        })?;
    let gateway =
        node.default_gateway
            .or(opts.facts.default_gateway)
            .ok_or(RenderError::MissingFact {
                node: node.key.clone(),
                what: "default_gateway",
                flag: "default-gateway",
            })?;
    let join = inv.join_address;
    let server_url = match join {
        IpAddr::V4(a) => format!("https://{a}:6443"),
        IpAddr::V6(a) => format!("https://[{a}]:6443"),
    };
    let node_ip = match node.secondary {
        Some(sec) => format!("--node-ip={},{}", node.ip, sec.ip),
        None => format!("--node-ip={}", node.ip),
    };
    let mut k3s_flags = vec![node_ip];
    k3s_flags.extend(node.k3s_extra_flags.iter().cloned());
    let state_version = inv
        .state_version
        .as_deref()
        .or(opts.facts.state_version.as_deref())
        .ok_or(RenderError::StateVersion {
            node: node.key.clone(),
        })?;
    Ok(Ctx {
        source: SourceView {
            repository: redact_url(&opts.source.repository),
            commit: &opts.source.commit,
        },
        cluster: ClusterView {
            join_address: join.to_string(),
            server_url,
            token_file: &opts.token_file,
            nameservers: inv.nameservers.iter().map(ToString::to_string).collect(),
            ssh_authorized_keys: &inv.ssh_authorized_keys,
            state_version,
            nix_channel: inv.nix_channel.as_deref(),
            watch_namespaces: &inv.watch_namespaces,
            node_count: inv.nodes.len(),
        },
        node: NodeView {
            ip: node.ip.to_string(),
            ipv6: node.ip.is_ipv6(),
            hostname: &node.hostname,
            role: node.role.as_str(),
            initiator: node.initiator,
            interface,
            default_gateway: gateway.to_string(),
            prefix_length: node.prefix_length,
            boot_loader: node.boot_loader,
            systemd_boot: node.boot_loader == BootLoader::SystemdBoot,
            boot_device: node.boot_device.as_deref(),
            uuid: node.uuid.map(|u| u.to_string()),
            grub_efi: node.boot_loader == BootLoader::GrubEfi,
            k3s_flags,
            firewall: firewall(inv, node),
            secondary: node.secondary.map(|s| SecondaryView {
                ip: s.ip.to_string(),
                ipv6: s.ip.is_ipv6(),
                prefix_length: s.prefix_length,
                gateway: s.gateway.map(|g| g.to_string()),
            }),
            vars: &node.vars,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(commit: &str, state_version: Option<&str>) -> Options {
        Options {
            source: Source {
                repository: "r".into(),
                commit: commit.into(),
            },
            token_file: DEFAULT_TOKEN_FILE.into(),
            facts: HostFacts {
                state_version: state_version.map(String::from),
                ..HostFacts::default()
            },
        }
    }

    #[test]
    fn raw_insertions_are_found_however_they_are_spelt() {
        let raw = |t: &str| unsafe_element(&handlebars::Template::compile(t).unwrap(), 1);
        assert_eq!(raw("a\n  x = {{{node.ip}}};"), Some(Unsafe::Raw(2)));
        for spelling in [
            "{{~& x}}",
            "{{ &node.vars.v}}",
            "{{~ {node.vars.v} ~}}",
            "{{\n&node.vars.v}}",
            "{{#if a}}\n{{#each b}}{{ & this}}{{/each}}{{/if}}",
            "{{#if a}}{{else}}{{{x}}}{{/if}}",
        ] {
            assert!(
                matches!(raw(spelling), Some(Unsafe::Raw(_))),
                "{spelling:?}"
            );
        }
        assert_eq!(
            raw("{{#if a}}\n\n{{&x}}{{/if}}"),
            Some(Unsafe::Raw(3)),
            "lines count from the file's start"
        );
        for partial in [
            "{{#*inline \"p\"}}{{> p}}{{/inline}}{{> p}}",
            "{{> other}}",
            "{{#> layout}}x{{/layout}}",
            "{{* deco}}",
        ] {
            assert!(
                matches!(raw(partial), Some(Unsafe::Partial(_))),
                "{partial:?}"
            );
        }
        assert_eq!(
            raw("x = {{node.ip}}; y = {{nix node.vars}}; {{!-- {{&x}} --}}"),
            None
        );
        assert_eq!(raw(DEFAULT_TEMPLATE), None);
    }

    #[test]
    fn deep_nesting_and_huge_output_are_refused_not_run() {
        let deep = "{{#if a}}".repeat(10_000) + &"{{/if}}".repeat(10_000);
        let e = Template::custom("t", &deep).unwrap_err();
        assert!(e.to_string().contains("nest deeper than 64"), "{e}");
        let inv = crate::inventory::load(
            "i",
            &format!("join_address: 10.0.0.3\njoin_token: t\nstate_version: \"24.05\"\nnodes:\n  10.0.0.3: {{ interface: eth0, default_gateway: 10.0.0.1, boot_device: /dev/sda, vars: {{ a: [{}] }} }}\n", vec!["1"; 200].join(", ")),
        )
        .unwrap();
        let t = Template::custom(
            "t",
            "{{#each node.vars.a}}{{#each ../node.vars.a}}{{#each ../../node.vars.a}}xxxxxxxxxxxxxxxx{{/each}}{{/each}}{{/each}}",
        )
        .unwrap();
        let o = options("c", None);
        let e = t.render(&inv, &inv.nodes[0], &o).unwrap_err();
        assert!(matches!(e, RenderError::TooLarge { .. }), "{e}");
        // Empty bodies write nothing, and would still loop 200^4 times: refused before.
        let idle = Template::custom(
            "t",
            "{{#each node.vars.a}}{{#each ../node.vars.a}}{{#each ../../node.vars.a}}{{#each ../../../node.vars.a}}{{/each}}{{/each}}{{/each}}{{/each}}",
        )
        .unwrap();
        let e = idle.render(&inv, &inv.nodes[0], &o).unwrap_err();
        assert!(
            matches!(
                e,
                RenderError::TooMuchWork {
                    depth: 4,
                    longest: 200,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_recursive_partial_is_refused_not_run() {
        let t = Template::custom("t", "{{#*inline \"p\"}}{{> p}}{{/inline}}{{> p}}");
        assert!(
            matches!(t, Err(RenderError::Partial { line: 1, .. })),
            "{t:?}"
        );
    }

    #[test]
    fn absent_optional_values_are_null_so_templates_can_test_them() {
        let inv = crate::inventory::load(
            "i",
            "join_address: 10.0.0.3\njoin_token: t\nnodes:\n  10.0.0.3: { interface: eth0, default_gateway: 10.0.0.1, boot_loader: systemd-boot }\n",
        )
        .unwrap();
        let t = Template::custom(
            "t",
            "{{#if node.uuid}}uuid{{else}}no uuid{{/if}}, {{nix node.boot_device}}, {{nix node.secondary}}",
        )
        .unwrap();
        let opts = options("c", Some("23.11"));
        let out = t.render(&inv, &inv.nodes[0], &opts).unwrap();
        assert!(out.ends_with("no uuid, null, null"), "{out}");
    }

    #[test]
    fn the_body_leaves_out_only_the_header() {
        let inv = crate::inventory::load(
            "i",
            "join_address: 10.0.0.3\njoin_token: t\nnodes:\n  10.0.0.3: { interface: eth0, default_gateway: 10.0.0.1, boot_device: /dev/sda }\n",
        )
        .unwrap();
        let n = &inv.nodes[0];
        let mut o = options("one", Some("23.11"));
        let a = Template::builtin().render(&inv, n, &o).unwrap();
        o.source.commit = "another".into();
        let b = Template::builtin().render(&inv, n, &o).unwrap();
        assert_ne!(a, b);
        assert_eq!(body(&a), body(&b));
        assert!(body(&a).starts_with("{ config, lib, pkgs, ... }:"));
        let hand = "# my own notes\n{ }\n";
        assert_eq!(body(hand), hand);
    }

    fn ports(inv: &str, node: usize) -> (Vec<u16>, Vec<u16>) {
        let inv = crate::inventory::load("i", inv).unwrap();
        let f = firewall(&inv, &inv.nodes[node]);
        (f.tcp, f.udp)
    }

    fn cluster(flags: &str, second: &str) -> String {
        format!("join_address: 10.0.0.3\njoin_token: t\nk3s_server_flags: [{flags}]\nnodes:\n  10.0.0.3: {{ initiator: true, boot_device: /dev/sda{second} }}\n  10.0.0.4: {{ role: agent, boot_device: /dev/sda{second} }}\n")
    }

    #[test]
    fn the_firewall_follows_the_flannel_backend_and_the_flags() {
        assert_eq!(
            ports(&cluster("", ""), 0),
            (vec![6443, 2379, 2380, 10250], vec![8472])
        );
        assert_eq!(ports(&cluster("", ""), 1), (vec![10250], vec![8472]));
        let wg = cluster("--flannel-backend=wireguard-native", "");
        assert_eq!(
            ports(&wg, 1),
            (vec![10250], vec![51820]),
            "agents follow the servers' backend"
        );
        let dual = cluster(
            "--flannel-backend=wireguard-native, \"--cluster-cidr=10.42.0.0/16,fd00:42::/56\", \"--service-cidr=10.43.0.0/16,fd00:43::/112\"",
            ", secondary_ip: \"fd00::3\"",
        );
        assert_eq!(ports(&dual, 0).1, vec![51820, 51821]);
        assert_eq!(
            ports(&cluster("--flannel-backend=host-gw", ""), 0).1,
            Vec::<u16>::new()
        );
        assert_eq!(
            ports(&cluster("--flannel-backend=none", ""), 1).1,
            Vec::<u16>::new()
        );
        let extras = cluster("--embedded-registry, --etcd-expose-metrics", "");
        assert_eq!(
            ports(&extras, 0).0,
            vec![6443, 2379, 2380, 10250, 5001, 2381]
        );
        assert_eq!(ports(&extras, 1).0, vec![10250, 5001]);
        assert_eq!(
            ports(&cluster("--embedded-registry=false", ""), 1).0,
            vec![10250]
        );
    }

    #[test]
    fn the_installers_state_version_is_found() {
        let installer = "{ config, ... }:\n{\n  # system.stateVersion = \"20.03\";\n  system.stateVersion = \"23.11\"; # Did you read the comment?\n}\n";
        assert_eq!(state_version_in(installer).as_deref(), Some("23.11"));
        assert_eq!(state_version_in("{ }: { }"), None);
        assert_eq!(state_version_in("system.stateVersion = \"latest\";"), None);
    }

    #[test]
    fn no_node_is_rendered_without_a_state_version() {
        let inv = crate::inventory::load(
            "i",
            "join_address: 10.0.0.3\njoin_token: t\nnodes:\n  10.0.0.3: { interface: eth0, default_gateway: 10.0.0.1, boot_device: /dev/sda }\n",
        )
        .unwrap();
        let mut o = options("c", None);
        let t = Template::builtin();
        let e = t.render(&inv, &inv.nodes[0], &o).unwrap_err();
        assert!(e.to_string().contains("no `state_version`"), "{e}");
        o.facts.state_version = Some("22.11".into());
        let out = t.render(&inv, &inv.nodes[0], &o).unwrap();
        assert!(out.contains("system.stateVersion = \"22.11\";"), "{out}");
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("https://user:tok@git.example/x.git"),
            "https://git.example/x.git"
        );
        assert_eq!(redact_url("ssh://git@host/x"), "ssh://git@host/x");
        assert_eq!(redact_url("ssh://git:pw@host/x"), "ssh://host/x");
        assert_eq!(redact_url("https://ghp_token@host/x"), "https://host/x");
        assert_eq!(redact_url("/srv/git/infra"), "/srv/git/infra");
    }
}
