//! `nk3-agent render`: one node's configuration.nix to stdout, or every node's into a folder.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::hash_map::{Entry, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use nk3_common::identity::{self, MatchedBy};
use nk3_common::inventory::Node;
use nk3_common::render::{HostFacts, Options, Source, Template};

use crate::cli::{RenderArgs, TOKEN_FILE_NAME};
use crate::machine;

/// Renders as asked. Nothing is written unless every requested node renders.
pub fn run(args: &RenderArgs) -> anyhow::Result<ExitCode> {
    let Some(inv) = super::load_inventory(&args.inventory)? else {
        return Ok(ExitCode::FAILURE);
    };
    let mut opts = Options {
        source: Source {
            repository: args
                .repository
                .clone()
                .unwrap_or_else(|| args.inventory.display().to_string()),
            commit: args.commit.clone(),
        },
        token_file: args.state_dir.join(TOKEN_FILE_NAME).display().to_string(),
        facts: HostFacts {
            interface: args.interface.clone(),
            default_gateway: args.default_gateway,
            state_version: args.state_version.clone(),
        },
    };
    let repo_root = args.inventory.parent().unwrap_or(Path::new("."));
    let nodes: Vec<&Node> = if args.all {
        inv.nodes.iter().collect()
    } else {
        let facts = machine::facts(args.node.clone(), &args.machine.product_uuid_file);
        let (n, by) = identity::identify(&inv, &facts)?;
        if by != MatchedBy::Setting {
            // On a node: say which one, and take what the inventory leaves out from its
            // default route.
            eprintln!(
                "{}: this machine is node {} ({}), recognised {}",
                args.inventory.display(),
                n.key,
                n.hostname,
                by.describe()
            );
            let route =
                machine::default_route(n.ip, &args.machine.route_table, &args.machine.route6_table);
            if let Some(route) = route {
                opts.facts.interface = opts.facts.interface.or(Some(route.interface));
                opts.facts.default_gateway = opts.facts.default_gateway.or(Some(route.gateway));
            }
            // And the release it was installed with, from the file a switch would replace.
            if opts.facts.state_version.is_none() {
                opts.facts.state_version =
                    std::fs::read_to_string(args.nixos_dir.join("configuration.nix"))
                        .ok()
                        .and_then(|t| nk3_common::render::state_version_in(&t));
            }
        }
        vec![n]
    };
    // Nodes share templates: each is read and compiled once.
    let mut templates: HashMap<Option<&str>, Template> = HashMap::new();
    let mut rendered = Vec::with_capacity(nodes.len());
    for n in nodes {
        let template = match templates.entry(n.template.as_deref()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(load_template(n, repo_root)?),
        };
        rendered.push((n, template.render(&inv, n, &opts)?));
    }
    match &args.out {
        Some(dir) if args.all => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            for (n, text) in &rendered {
                let path: PathBuf = dir.join(format!("{}.nix", n.hostname));
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("{}  {}", n.key, path.display());
            }
        }
        _ => {
            for (_, text) in &rendered {
                print!("{text}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The template `n` uses: the built-in one, or the repository's, read relative to the
/// inventory's folder.
fn load_template(n: &Node, repo_root: &Path) -> anyhow::Result<Template> {
    Ok(match &n.template {
        None => Template::builtin(),
        Some(rel) => {
            let path = repo_root.join(rel);
            let text = super::read_bounded(&path, nk3_common::render::MAX_TEMPLATE).with_context(
                || format!("node {}: cannot read template {}", n.key, path.display()),
            )?;
            Template::custom(rel, &text)?
        }
    })
}
