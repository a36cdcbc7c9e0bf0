//! One pass of the agent on its node: fetch, identify, render, compare, build, and switch
//! (DESIGN section 6, steps 1–5, and the direct switch of a node that is not coordinated by
//! the cluster). Every step that changes something is preceded by writing the phase to
//! `state.json`, so that a pass interrupted anywhere resumes correctly.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::effects::GitSource;
use anyhow::{anyhow, Context as _};
use nk3_common::identity::{self, MatchedBy};
use nk3_common::inventory::{self, Inventory, Node, Rollout};
use nk3_common::render::{self, HostFacts, Options, Source as RenderSource, Template};
use tracing::{debug, error, info, warn};

use crate::cli::{AgentArgs, TOKEN_FILE_NAME};
use crate::git::{Access, Signers, Source};
use crate::machine;
use crate::redact::{diff, secrets};
use crate::state::{self, Phase, Rejected, State};
use crate::system::Nixos;

/// Where the previous configuration.nix is kept when a new one lands.
pub const PREVIOUS_CONFIG: &str = "configuration.nix.previous";

/// A copy of the configuration.nix the running system was built from.
pub const APPLIED_CONFIG: &str = "configuration.nix.applied";

/// The agent on one node: its settings, its repository and its remembered state.
#[derive(Debug)]
pub struct Agent {
    settings: AgentArgs,
    source: Source,
    signers: Signers,
    /// What a pass's side effects go through (fakes in tests).
    pub(crate) effects: crate::effects::Effects,
    /// Log "No action needed" on every pass (`run --once`), not only the first for a commit.
    pub report_idle: bool,
    /// The last pass ended waiting for the rollout lease itself (held by another node), not
    /// stopped by the gate or a budget: the daemon then also wakes when it is released.
    pub(crate) waiting_for_lease: bool,
    /// The credentials and rollout shape the API last said may run a whole rollout.
    pub(crate) access_checked: Option<String>,
    /// What the agent remembers; saved before every side effect.
    pub state: State,
}

/// What a pass would do with a commit, decided without side effects (shared by `run` and
/// `plan`).
#[derive(Debug)]
pub enum Decision {
    /// The inventory at this commit is invalid.
    BadInventory {
        /// Every problem, `file:line: key: message`.
        problems: Vec<String>,
    },
    /// This machine is not (exactly one) node of the inventory.
    NotANode(String),
    /// Nix refused this commit before; only a new commit is tried.
    AlreadyRejected(Rejected),
    /// The node runs what the commit declares.
    UpToDate(Target),
    /// The configuration must be built (and switched to, if the system differs).
    Apply {
        /// The node and its new file.
        target: Target,
        /// Unified diff from the file on disk (secrets redacted); `None` when the file is
        /// unchanged and the build is for a channel upgrade or to confirm what runs.
        diff: Option<String>,
        /// Why.
        why: &'static str,
        /// Whether to build with `--upgrade`.
        upgrade: bool,
    },
}

/// The node a commit declares for this machine.
#[derive(Debug)]
pub struct Target {
    /// The commit.
    pub commit: String,
    /// The node's key in the inventory.
    pub node: String,
    /// The node's hostname.
    pub host: String,
    /// How the machine was recognised.
    pub matched_by: MatchedBy,
    /// The rendered configuration.nix.
    pub rendered: String,
    /// The inventory's rollout settings.
    pub rollout: Rollout,
    /// Namespaces whose workloads must be healthy before a node is disrupted.
    pub watch_namespaces: Vec<String>,
    /// The hostnames of every node of the inventory.
    pub members: Vec<String>,
    /// The channel to follow, if any.
    pub channel: Option<String>,
    /// The token to write for k3s, if the inventory has one (redacted from every output).
    secrets: Vec<String>,
    token: Option<TokenSource>,
}

#[derive(Debug)]
enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl Agent {
    /// An agent for these settings, with the state read from its directory.
    pub fn new(settings: AgentArgs, state: State) -> anyhow::Result<Agent> {
        let repo = settings
            .repo
            .clone()
            .ok_or_else(|| anyhow!("no repository: pass --repo URL or set NK3_REPO"))?;
        let mut source = Source::new(
            &repo,
            &settings.branch,
            &settings.state_dir.join("repo"),
            Access {
                ssh_key_file: settings.ssh_key_file.clone(),
                known_hosts: settings.known_hosts.clone(),
                token_file: settings.repo_token_file.clone(),
                url_password: None,
            },
        );
        source.whole_fetch = settings.git_timeout.saturating_mul(10);
        source.timeout = settings.git_timeout;
        source.ssh = settings.ssh.clone();
        let nixos = Nixos {
            nixos_rebuild: settings.nixos_rebuild.clone(),
            systemctl: settings.systemctl.clone(),
            nix_channel: settings.nix_channel.clone(),
            config: settings.nixos_dir.join("configuration.nix"),
            work_dir: settings.state_dir.clone(),
            current_system: settings.current_system.clone(),
            booted_system: settings.booted_system.clone(),
            boot_id_file: settings.boot_id_file.clone(),
            build_timeout: settings.build_timeout,
            switch_timeout: settings.switch_timeout,
        };
        let signers = Signers {
            allowed_signers: settings.allowed_signers.clone(),
            gpg_home: settings.gpg_home.clone(),
            git: settings.git.clone(),
        };
        let mut state = state;
        state.repository = Some(source.display_url());
        Ok(Agent {
            settings,
            source,
            signers,
            effects: crate::effects::Effects::of(nixos),
            report_idle: false,
            waiting_for_lease: false,
            access_checked: None,
            state,
        })
    }

    /// The settings.
    pub fn settings(&self) -> &AgentArgs {
        &self.settings
    }

    /// The git source.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Opens the clone as the pass's git source; the second value says why a broken clone
    /// was replaced. Only the agent holding the state lock `repair`s.
    pub fn open_source(
        &self,
        repair: bool,
    ) -> anyhow::Result<(Box<dyn GitSource>, Option<String>)> {
        if let Some(open) = &self.effects.git {
            return Ok((open()?, None));
        }
        let (clone, replaced) = crate::git::OpenClone::open(&self.source, &self.signers, repair)?;
        Ok((Box::new(clone), replaced))
    }

    /// The NixOS side.
    pub(crate) fn nixos(&self) -> &dyn crate::effects::NixosSystem {
        self.effects.nixos.as_ref()
    }

    /// The configuration.nix the agent writes.
    pub(crate) fn config_file(&self) -> PathBuf {
        self.settings.nixos_dir.join("configuration.nix")
    }

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        crate::progress::beat();
        state::save(&self.settings.state_dir, &self.state)
    }

    pub(crate) fn identified(&mut self, t: &Target) {
        // Before the file is replaced: the release the machine was installed with.
        if self.state.state_version.is_none() {
            self.state.state_version = self.machine_state_version();
        }
        self.state.lease_slots = Some(t.rollout.max_unavailable);
        self.state.node = Some(t.node.clone());
        self.state.host = Some(t.host.clone());
    }

    /// Step 1: the commit to work on. `None` when there is none yet.
    pub(crate) fn fetch(&mut self, git: &dyn GitSource) -> anyhow::Result<Option<String>> {
        let head = match git.poll() {
            Ok(h) => h,
            Err(e) => {
                let msg = format!(
                    "{e:#}; keeping commit {}",
                    short(self.state.applied.as_deref())
                );
                if self.state.source_problem.as_deref() != Some(msg.as_str()) {
                    warn!("{msg}");
                    self.state.source_problem = Some(msg);
                    self.save()?;
                }
                return Ok(self.state.fetched.clone());
            }
        };
        if self.state.source_problem.take().is_some() {
            info!("{} answers again", git.display_url());
        }
        if head.fetched {
            debug!("fetched {}", head.commit);
        }
        let refusal = git.refusal(
            self.state.fetched.as_deref(),
            &head.commit,
            self.settings.allow_force_push,
        );
        if let Some(r) = refusal {
            let msg = format!(
                "{r}; keeping commit {}",
                short(self.state.applied.as_deref())
            );
            if self.state.refused_head.as_deref() != Some(msg.as_str()) {
                error!("{msg}");
                self.state.refused_head = Some(msg);
            }
            self.save()?;
            return Ok(self.state.fetched.clone());
        }
        self.state.refused_head = None;
        self.state.fetched = Some(head.commit.clone());
        Ok(Some(head.commit))
    }

    /// Steps 2 and 3 without side effects: identify the machine in the commit's inventory,
    /// render its file, and compare with what is on disk and what runs.
    pub fn decide(&self, git: &dyn GitSource, commit: &str) -> anyhow::Result<Decision> {
        let path = &self.settings.inventory_path;
        let label = format!("{path}@{}", short(Some(commit)));
        let Some(bytes) = git.read(commit, path)? else {
            return Ok(Decision::BadInventory {
                problems: vec![format!(
                    "{label}: no such file in the repository (--inventory-path is {path})"
                )],
            });
        };
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                return Ok(Decision::BadInventory {
                    problems: vec![format!("{label}: not UTF-8 text")],
                })
            }
        };
        let inv = match inventory::load(&label, &text) {
            Ok(inv) => inv,
            Err(d) => {
                return Ok(Decision::BadInventory {
                    problems: d.lines(),
                })
            }
        };
        let facts = machine::facts(
            self.settings.node.clone(),
            &self.settings.machine.product_uuid_file,
        );
        let (node, matched_by) = match identity::identify(&inv, &facts) {
            Ok(x) => x,
            Err(e) => return Ok(Decision::NotANode(e.to_string())),
        };
        if let Some(r) = &self.state.rejected {
            if r.commit == commit {
                return Ok(Decision::AlreadyRejected(r.clone()));
            }
        }
        // The join address itself, fresh, with nobody to start the cluster: its k3s would
        // wait to join itself forever. (A fresh node joining a running cluster that an
        // inventory without an initiator adopted is fine: that cluster answers.)
        if !inv.nodes.iter().any(|n| n.initiator)
            && node.ip == inv.join_address
            && !self.settings.kubeconfig.exists()
            && machine::k3s_joined(&self.settings.k3s_data_dir).is_none()
        {
            return Ok(Decision::BadInventory {
                problems: vec![format!(
                    "{label}: no node is `initiator: true`, and k3s has not joined a cluster on {} yet, the join address {}: there is no cluster for it to join, so it would wait for itself forever; mark the node that starts a new cluster `initiator: true` (an inventory adopting a running cluster needs none)",
                    node.key, inv.join_address
                )],
            });
        }
        let rendered = self.render(git, commit, &inv, node)?;
        let target = Target {
            commit: commit.to_string(),
            node: node.key.clone(),
            host: node.hostname.clone(),
            matched_by,
            rendered,
            rollout: inv.rollout.clone(),
            watch_namespaces: inv.watch_namespaces.clone(),
            members: inv.nodes.iter().map(|n| n.hostname.clone()).collect(),
            channel: inv.nix_channel.clone(),
            secrets: secrets(&inv),
            token: match (&inv.join_token_file, &inv.join_token) {
                (Some(f), _) => Some(TokenSource::File(f.into())),
                (None, Some(t)) => Some(TokenSource::Inline(t.expose().to_string())),
                (None, None) => None,
            },
        };
        let on_disk = std::fs::read_to_string(self.config_file()).ok();
        let same_file =
            on_disk.as_deref().map(render::body) == Some(render::body(&target.rendered));
        let upgrade = self.upgrade_due(&inv);
        let running = self.nixos().current();
        // What runs is what the file declares only if the last pass finished (an interrupted
        // one may have landed the file without switching) and nothing changed the system
        // since (a rollback by hand, a reboot into another generation).
        let applied_file = std::fs::read_to_string(self.applied_path()).ok();
        let confirmed = self.state.phase == Phase::Idle
            && self.state.applied_system.is_some()
            && running == self.state.applied_system
            && applied_file.as_deref().map(render::body) == on_disk.as_deref().map(render::body);
        if same_file && !upgrade && confirmed {
            return Ok(Decision::UpToDate(target));
        }
        let (diff, why) = if same_file {
            let why = if upgrade {
                "channel upgrade"
            } else {
                "confirming the running system"
            };
            (None, why)
        } else {
            let d = diff(
                on_disk.as_deref().unwrap_or(""),
                &target.rendered,
                &target.secrets,
            );
            let why = if self.state.applied.as_deref() == Some(commit) {
                "configuration.nix was changed by hand"
            } else {
                "new commit"
            };
            (Some(d), why)
        };
        Ok(Decision::Apply {
            target,
            diff,
            why,
            upgrade,
        })
    }

    fn render(
        &self,
        git: &dyn GitSource,
        commit: &str,
        inv: &Inventory,
        node: &Node,
    ) -> anyhow::Result<String> {
        let template = match &node.template {
            None => Template::builtin(),
            Some(rel) => {
                let base = Path::new(&self.settings.inventory_path)
                    .parent()
                    .unwrap_or(Path::new(""));
                let path = base.join(rel).display().to_string();
                let bytes = git.read(commit, &path)?.ok_or_else(|| {
                    anyhow!(
                        "node {}: template {path} is not in the repository at commit {}",
                        node.key,
                        short(Some(commit))
                    )
                })?;
                Template::custom(rel, &String::from_utf8_lossy(&bytes))?
            }
        };
        let mut facts = HostFacts {
            state_version: self.machine_state_version(),
            ..HostFacts::default()
        };
        if node.interface.is_none()
            || node.default_gateway.is_none() && inv.default_gateway.is_none()
        {
            if let Some(route) = machine::default_route(
                node.ip,
                &self.settings.machine.route_table,
                &self.settings.machine.route6_table,
            ) {
                facts.interface = Some(route.interface);
                facts.default_gateway = Some(route.gateway);
            }
        }
        let opts = Options {
            source: RenderSource {
                repository: self.source.display_url(),
                commit: commit.to_string(),
            },
            token_file: self
                .settings
                .state_dir
                .join(TOKEN_FILE_NAME)
                .display()
                .to_string(),
            facts,
        };
        Ok(template.render(inv, node, &opts)?)
    }

    /// The `system.stateVersion` this machine was installed with: remembered, else read from
    /// the configuration.nix on disk (the installer's, before the first pass replaces it).
    fn machine_state_version(&self) -> Option<String> {
        self.state.state_version.clone().or_else(|| {
            std::fs::read_to_string(self.config_file())
                .ok()
                .and_then(|t| render::state_version_in(&t))
        })
    }

    /// Whether this pass builds with `--upgrade`: the channel changed, or `upgrade_every`
    /// has passed since the last upgrade.
    fn upgrade_due(&self, inv: &Inventory) -> bool {
        let Some(channel) = &inv.nix_channel else {
            return false;
        };
        if self.state.channel.as_deref() != Some(channel.as_str()) {
            return true;
        }
        let Some(every) = inv.rollout.upgrade_every else {
            return false;
        };
        let last = self
            .state
            .last_upgrade
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok());
        match last {
            None => true,
            Some(t) => {
                SystemTime::now()
                    .duration_since(t)
                    .unwrap_or(Duration::ZERO)
                    >= every
            }
        }
    }

    /// Keeps a copy of the configuration.nix the running system was built from: later
    /// passes compare the file on disk with it to notice hand edits and files landed by an
    /// interrupted pass.
    pub(crate) fn keep_applied_copy(&self) -> anyhow::Result<()> {
        if let Ok(text) = std::fs::read(self.config_file()) {
            state::write_atomic(&self.applied_path(), &text, 0o600)?;
        }
        Ok(())
    }

    fn applied_path(&self) -> PathBuf {
        self.settings.state_dir.join(APPLIED_CONFIG)
    }

    pub(crate) fn previous_path(&self) -> PathBuf {
        self.settings.state_dir.join(PREVIOUS_CONFIG)
    }

    /// Puts the previous configuration.nix back (or removes the new one if there was none).
    pub(crate) fn restore(&self, had_previous: bool) -> anyhow::Result<()> {
        let config = &self.config_file();
        if had_previous {
            let previous = std::fs::read(self.previous_path()).with_context(|| {
                format!("cannot read the saved {}", self.previous_path().display())
            })?;
            state::write_atomic(config, &previous, self.state.previous_mode.unwrap_or(0o644))
        } else {
            match std::fs::remove_file(config) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", config.display())),
            }
        }
    }

    /// Writes the token file k3s reads (mode 0600), when its content changes.
    pub(crate) fn write_token(&self, t: &Target) -> anyhow::Result<()> {
        let token = match &t.token {
            None => return Ok(()),
            Some(TokenSource::Inline(s)) => s.clone(),
            Some(TokenSource::File(f)) => crate::token::from_file(f)?,
        };
        let path = self.settings.state_dir.join(TOKEN_FILE_NAME);
        let wanted = format!("{token}\n");
        if std::fs::read_to_string(&path).ok().as_deref() == Some(wanted.as_str()) {
            return Ok(());
        }
        state::write_atomic(&path, wanted.as_bytes(), 0o600)
    }
}

pub use nk3_common::rollout::short;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_commits() {
        assert_eq!(short(Some("0123456789abcdef")), "0123456789ab");
        assert_eq!(short(None), "none");
    }
}
