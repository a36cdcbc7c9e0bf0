//! One pass of the agent on its node: fetch, identify, render, compare, build, and switch
//! (DESIGN section 6, steps 1–5, and the direct switch of a node that is not coordinated by
//! the cluster). Every step that changes something is preceded by writing the phase to
//! `state.json`, so that a pass interrupted anywhere resumes correctly.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context as _};
use git2::Repository;
use nk3_common::identity::{self, MatchedBy};
use nk3_common::inventory::{self, Inventory, Node, RebootPolicy, Rollout};
use nk3_common::render::{self, HostFacts, Options, Source as RenderSource, Template};
use tracing::{debug, error, info, warn};

use crate::cli::{AgentArgs, TOKEN_FILE_NAME};
use crate::git::{Access, Signers, Source};
use crate::machine;
use crate::rollout::Coordination;
use crate::state::{self, Hold, LastResult, Outcome, Phase, Rejected, State};
use crate::system::{self, Nixos};

/// Where the previous configuration.nix is kept when a new one lands.
pub const PREVIOUS_CONFIG: &str = "configuration.nix.previous";

/// A copy of the configuration.nix the running system was built from.
pub const APPLIED_CONFIG: &str = "configuration.nix.applied";

/// The agent on one node: its settings, its repository and its remembered state.
#[derive(Debug)]
pub struct Agent {
    settings: AgentArgs,
    source: Source,
    nixos: Nixos,
    signers: Signers,
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
    /// The inventory's reboot policy.
    pub reboot: RebootPolicy,
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
            nixos,
            signers,
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

    /// Who may sign commits.
    pub fn signers(&self) -> &Signers {
        &self.signers
    }

    /// The NixOS side.
    pub(crate) fn nixos(&self) -> &Nixos {
        &self.nixos
    }

    pub(crate) fn save(&self) -> anyhow::Result<()> {
        crate::progress::beat();
        state::save(&self.settings.state_dir, &self.state)
    }

    fn host(&self) -> String {
        self.state
            .host
            .clone()
            .unwrap_or_else(|| "this machine".to_string())
    }

    pub(crate) fn finish(
        &mut self,
        outcome: Outcome,
        commit: Option<&str>,
        message: String,
    ) -> anyhow::Result<Outcome> {
        self.state.last = Some(LastResult {
            outcome,
            commit: commit.map(str::to_string),
            message,
            at: state::now(),
        });
        self.save()?;
        Ok(outcome)
    }

    /// Reports a problem once: again only when it changes.
    pub(crate) fn problem(&mut self, commit: Option<&str>, message: &str) {
        if self.state.last.as_ref().map(|l| l.message.as_str()) != Some(message) {
            warn!(host = %self.host(), commit = %short(commit), "{message}");
        }
    }

    /// One pass. Errors are for what the pass could not get past (the state is saved first).
    pub fn pass(&mut self) -> anyhow::Result<Outcome> {
        self.waiting_for_lease = false;
        if let Some(outcome) = self.resume()? {
            return Ok(outcome);
        }
        let (repo, replaced) = self.source.open(true)?;
        if let Some(why) = replaced {
            warn!(host = %self.host(), commit = %short(self.state.fetched.as_deref()), "the clone in {} was broken ({why}); cloned it again", self.source.dir().display());
        }
        if let Some(outcome) = self.resume_held(&repo)? {
            return Ok(outcome);
        }
        let commit = match self.fetch(&repo)? {
            Some(c) => c,
            None => {
                let msg = match &self.state.source_problem {
                    Some(p) => format!("no commit fetched yet: {p}"),
                    None => "no commit fetched yet".to_string(),
                };
                return self.finish(Outcome::Failed, None, msg);
            }
        };
        if let Some(reason) = crate::rollout::still_frozen(&self.state.phase, &commit) {
            return self.finish(Outcome::Frozen, Some(&commit), reason);
        }
        match self.decide(&repo, &commit)? {
            Decision::BadInventory { problems } => {
                let msg = format!(
                    "the inventory at commit {} has {} problem{}; nothing was applied, the node keeps running commit {}",
                    short(Some(&commit)),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" },
                    short(self.state.applied.as_deref()),
                );
                if self.state.last.as_ref().map(|l| &l.message) != Some(&msg) {
                    for p in &problems {
                        error!(host = %self.host(), commit = %short(Some(&commit)), "{p}");
                    }
                }
                self.problem(Some(&commit), &msg);
                self.finish(Outcome::Refused, Some(&commit), msg)
            }
            Decision::NotANode(why) => {
                let msg = format!("{why}; idle until the inventory names this machine");
                self.problem(Some(&commit), &msg);
                self.finish(Outcome::NotANode, Some(&commit), msg)
            }
            Decision::AlreadyRejected(r) => {
                let msg = format!(
                    "commit {} was rejected at {}; waiting for a new commit: {}",
                    short(Some(&r.commit)),
                    r.at,
                    r.error
                );
                self.finish(Outcome::Rejected, Some(&commit), msg)
            }
            Decision::UpToDate(t) => {
                self.identified(&t);
                self.write_token(&t)?;
                let first = self.state.applied.as_deref() != Some(&t.commit)
                    || self.state.last.as_ref().map(|l| l.outcome) != Some(Outcome::NoChange);
                if first || self.report_idle {
                    info!(host = %t.host, commit = %short(Some(&t.commit)), "No action needed on {}", t.host);
                } else {
                    debug!(host = %t.host, commit = %short(Some(&t.commit)), "No action needed on {}", t.host);
                }
                self.state.applied = Some(t.commit.clone());
                self.finish(
                    Outcome::NoChange,
                    Some(&t.commit),
                    format!("No action needed on {}", t.host),
                )
            }
            Decision::Apply {
                target,
                diff,
                why,
                upgrade,
            } => {
                self.identified(&target);
                self.apply(target, diff, why, upgrade)
            }
        }
    }

    fn identified(&mut self, t: &Target) {
        // Before the file is replaced: the release the machine was installed with.
        if self.state.state_version.is_none() {
            self.state.state_version = self.machine_state_version();
        }
        self.state.lease_slots = Some(t.rollout.max_unavailable);
        self.state.node = Some(t.node.clone());
        self.state.host = Some(t.host.clone());
    }

    /// Finishes what an interrupted pass left. `Some` ends this pass.
    fn resume(&mut self) -> anyhow::Result<Option<Outcome>> {
        match self.state.phase.clone() {
            Phase::Idle | Phase::Built { .. } | Phase::Switching { .. } => Ok(None),
            Phase::Building {
                commit,
                had_previous,
                ..
            } => {
                // The new file may or may not have landed, and its build did not finish: put the
                // previous file back and start the pass over.
                self.restore(had_previous)?;
                warn!(host = %self.host(), commit = %short(Some(&commit)), "a build of commit {} was interrupted; restored the previous configuration.nix and starting over", short(Some(&commit)));
                self.state.phase = Phase::Idle;
                self.save()?;
                Ok(None)
            }
            Phase::Draining { .. }
            | Phase::Verifying { .. }
            | Phase::Frozen { .. }
            | Phase::Rebooting { hold: Some(_), .. } => Ok(None),
            Phase::Rebooting {
                commit,
                system,
                boot_id,
                hold: None,
                ..
            } => {
                let now = self.nixos.boot_id()?;
                if now == boot_id {
                    // The reboot asked for has not happened (the agent was stopped before it):
                    // ask again.
                    info!(host = %self.host(), commit = %short(Some(&commit)), "Rebooting {} (asked again: the machine has not rebooted yet)", self.host());
                    self.nixos.reboot()?;
                    return Ok(Some(Outcome::Rebooting));
                }
                if self.nixos.current().as_deref() == Some(system.as_str()) {
                    self.record_applied(&commit, system)?;
                    info!(host = %self.host(), commit = %short(Some(&commit)), "{} is up on commit {}", self.host(), short(Some(&commit)));
                    let msg = format!("applied commit {} (after a reboot)", short(Some(&commit)));
                    self.finish(Outcome::Applied, Some(&commit), msg)?;
                    Ok(None)
                } else {
                    let msg = format!(
                        "{} rebooted but runs {}, not the system commit {} built ({system})",
                        self.host(),
                        self.nixos
                            .current()
                            .unwrap_or_else(|| "an unknown system".into()),
                        short(Some(&commit))
                    );
                    // The machine came back on another generation (the boot loader did not
                    // take the new one, or someone chose another at boot). Put the previous
                    // file back so the disk matches what runs, and do not try this commit
                    // again: a reboot loop is worse than a stale node.
                    let had_previous = self.previous_path().exists();
                    self.restore(had_previous)?;
                    error!(host = %self.host(), commit = %short(Some(&commit)), "{msg}");
                    self.mark_rejected(commit.clone(), msg.clone());
                    self.finish(Outcome::Rejected, Some(&commit), msg)?;
                    Ok(None)
                }
            }
        }
    }

    /// Step 1: the commit to work on. `None` when there is none yet.
    fn fetch(&mut self, repo: &Repository) -> anyhow::Result<Option<String>> {
        let head = match self.source.poll(repo) {
            Ok(h) => h,
            Err(e) => {
                let msg = format!(
                    "{e:#}; keeping commit {}",
                    short(self.state.applied.as_deref())
                );
                if self.state.source_problem.as_deref() != Some(msg.as_str()) {
                    warn!(host = %self.host(), commit = %short(self.state.fetched.as_deref()), "{msg}");
                    self.state.source_problem = Some(msg);
                    self.save()?;
                }
                return Ok(self.state.fetched.clone());
            }
        };
        if self.state.source_problem.take().is_some() {
            info!(host = %self.host(), commit = %short(Some(&head.commit)), "{} answers again", self.source.display_url());
        }
        if head.fetched {
            debug!(host = %self.host(), commit = %short(Some(&head.commit)), "fetched {}", head.commit);
        }
        let refusal = match self.state.fetched.as_deref() {
            Some(old) if !self.settings.allow_force_push => self
                .source
                .check_fast_forward(repo, old, &head.commit)
                .err(),
            _ => None,
        }
        .or_else(|| {
            self.signers
                .required()
                .then(|| {
                    self.source
                        .check_signature(&self.signers, &head.commit)
                        .err()
                })
                .flatten()
        });
        if let Some(r) = refusal {
            let msg = format!(
                "{r}; keeping commit {}",
                short(self.state.applied.as_deref())
            );
            if self.state.refused_head.as_deref() != Some(msg.as_str()) {
                error!(host = %self.host(), commit = %short(Some(&head.commit)), "{msg}");
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
    pub fn decide(&self, repo: &Repository, commit: &str) -> anyhow::Result<Decision> {
        let path = &self.settings.inventory_path;
        let label = format!("{path}@{}", short(Some(commit)));
        let Some(bytes) = Source::read(repo, commit, path)? else {
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
        let rendered = self.render(repo, commit, &inv, node)?;
        let target = Target {
            commit: commit.to_string(),
            node: node.key.clone(),
            host: node.hostname.clone(),
            matched_by,
            rendered,
            reboot: inv.rollout.reboot,
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
        let on_disk = std::fs::read_to_string(&self.nixos.config).ok();
        let same_file =
            on_disk.as_deref().map(render::body) == Some(render::body(&target.rendered));
        let upgrade = self.upgrade_due(&inv);
        let running = self.nixos.current();
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
        repo: &Repository,
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
                let bytes = Source::read(repo, commit, &path)?.ok_or_else(|| {
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
            std::fs::read_to_string(&self.nixos.config)
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

    /// Steps 3 (land) to 5, and the switch.
    fn apply(
        &mut self,
        t: Target,
        diff: Option<String>,
        why: &str,
        upgrade: bool,
    ) -> anyhow::Result<Outcome> {
        let c = short(Some(&t.commit));
        // Built before and waiting for the cluster (the lease, the gate, a drain): the file
        // on disk is this commit's, so go on from the build instead of building again.
        if let Phase::Built { commit, system } = &self.state.phase {
            let on_disk = std::fs::read_to_string(&self.nixos.config).unwrap_or_default();
            if commit == &t.commit && render::body(&on_disk) == render::body(&t.rendered) {
                let system = system.clone();
                return self.after_build(&t, system, self.previous_path().exists());
            }
        }
        match &diff {
            Some(d) => {
                info!(host = %t.host, commit = %c, "{} modified: ({why})", t.host);
                for line in d.lines() {
                    info!(host = %t.host, commit = %c, "  {line}");
                }
            }
            None => {
                info!(host = %t.host, commit = %c, "{}: building the configuration again ({why})", t.host)
            }
        }
        self.write_token(&t)?;
        if upgrade {
            if let Some(channel) = &t.channel {
                info!(host = %t.host, commit = %c, "following channel {channel} on {}", t.host);
                if let Err(e) = self.nixos.set_channel(channel) {
                    let msg = e.to_string();
                    error!(host = %t.host, commit = %c, "{msg}");
                    return self.finish(Outcome::Failed, Some(&t.commit), msg);
                }
            }
        }
        // Land: keep the previous file, record the phase, then write the new one.
        let config = self.nixos.config.clone();
        let had_previous = config.exists();
        if had_previous {
            let previous = std::fs::read(&config)
                .with_context(|| format!("cannot read {}", config.display()))?;
            state::write_atomic(&self.previous_path(), &previous, 0o600)?;
            // Its mode goes back with it (a hand-made file may be 0600, holding secrets).
            self.state.previous_mode = std::fs::metadata(&config)
                .ok()
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
        }
        self.state.phase = Phase::Building {
            commit: t.commit.clone(),
            had_previous,
            upgrade,
        };
        self.save()?;
        if let Some(dir) = config.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        state::write_atomic(&config, t.rendered.as_bytes(), 0o644)?;
        info!(host = %t.host, commit = %c, "Rebuilding NixOS on {}", t.host);
        let system = match self.nixos.build(upgrade) {
            Ok(s) => s,
            // Nix refused the configuration: this commit is not tried again.
            Err(e) if e.failure == system::Failure::Exited => {
                return self.reject(&t, had_previous, e.tail)
            }
            // The build hung or could not start: nothing is known about the commit, so the
            // next pass tries it again (the node keeps what it runs meanwhile).
            Err(e) => {
                self.restore(had_previous)?;
                self.state.phase = Phase::Idle;
                let msg = format!("{e}; configuration.nix is back to what it was, and the next pass builds commit {c} again");
                error!(host = %t.host, commit = %c, "{msg}");
                return self.finish(Outcome::Failed, Some(&t.commit), msg);
            }
        };
        if upgrade {
            self.state.channel = t.channel.clone();
            self.state.last_upgrade = Some(state::now());
        }
        self.state.phase = Phase::Built {
            commit: t.commit.clone(),
            system: system.clone(),
        };
        self.save()?;
        self.after_build(&t, system, had_previous)
    }

    /// Step 5 on: refuse a system without the agent, stop if it is what runs, else switch —
    /// directly, or under the cluster's lease.
    fn after_build(
        &mut self,
        t: &Target,
        system: String,
        had_previous: bool,
    ) -> anyhow::Result<Outcome> {
        let c = short(Some(&t.commit));
        if !system::has_agent_unit(&system) {
            return self.reject(t, had_previous, format!("the new system {system} has no nk3-agent.service: it would stop nk3 from managing this node (does configuration.nix still import ./nk3.nix?)"));
        }
        if self.nixos.current().as_deref() == Some(system.as_str()) {
            self.let_go(&t.host, t.rollout.max_unavailable)?;
            self.record_applied(&t.commit, system)?;
            info!(host = %t.host, commit = %c, "No action needed on {}: it already runs this system", t.host);
            return self.finish(
                Outcome::NoChange,
                Some(&t.commit),
                format!("No action needed on {}", t.host),
            );
        }
        // A node of a running cluster takes the rollout lease, checks the cluster's health
        // and drains itself first (steps 6 to 8). Only a machine where k3s never joined a
        // cluster (bootstrap) switches directly.
        match self.coordination(&t.host)? {
            Coordination::Lease(cluster) => self.coordinated(t, system, cluster),
            Coordination::Bootstrap => {
                info!(host = %t.host, commit = %c, "k3s has not joined a cluster on {} yet: switching without the rollout lease (bootstrap)", t.host);
                self.switch(t, system, None)
            }
            Coordination::NoCredentials(msg) => {
                self.problem(Some(&t.commit), &msg);
                self.finish(Outcome::Waiting, Some(&t.commit), msg)
            }
        }
    }

    /// Step 9: switch, or boot and reboot; with `hold`, under the lease, then verify.
    pub(crate) fn switch(
        &mut self,
        t: &Target,
        system: String,
        hold: Option<Hold>,
    ) -> anyhow::Result<Outcome> {
        let c = short(Some(&t.commit));
        let reasons = self.nixos.reboot_reasons(&system);
        let reboot = t.reboot == RebootPolicy::Always || !reasons.is_empty();
        // The lease lost while the node was being drained: whoever holds it now may be
        // disrupting itself; this node does not switch.
        if let (Some(h), Some(why)) = (&hold, crate::cluster::lease_lost()) {
            if let Some(cluster) = self.cluster(&t.host)? {
                cluster.uncordon(h.was_unschedulable)?;
                let _ = cluster.annotate(None, "idle");
            }
            self.state.phase = Phase::Built {
                commit: t.commit.clone(),
                system,
            };
            let msg = format!("lost the rollout lease before switching ({why}); uncordoned {} without switching, will try again", t.host);
            warn!(host = %t.host, commit = %c, "{msg}");
            return self.finish(Outcome::Waiting, Some(&t.commit), msg);
        }
        self.state.phase = Phase::Switching {
            commit: t.commit.clone(),
            system: system.clone(),
            reboot,
            hold: hold.clone(),
            rollback: None,
        };
        if hold.is_some() {
            // Under the lease the cluster sees each step (kubectl describe node).
            if let Some(cluster) = self.cluster(&t.host)? {
                let (phase, what) = if reboot {
                    (
                        "rebooting",
                        format!("nk3 is rebooting the node into commit {c}"),
                    )
                } else {
                    (
                        "switching",
                        format!("nk3 is switching the node to commit {c}"),
                    )
                };
                let _ = cluster.annotate(None, phase);
                cluster.event(if reboot { "Rebooting" } else { "Switching" }, &what, false);
            }
        }
        self.save()?;
        if reboot {
            if let Err(e) = self.nixos.boot() {
                return self.switch_failed(t, e.to_string());
            }
            let boot_id = self.nixos.boot_id()?;
            self.state.phase = Phase::Rebooting {
                commit: t.commit.clone(),
                system,
                boot_id,
                hold,
                rollback: false,
            };
            self.save()?;
            let why = if reasons.is_empty() {
                "reboot: always".to_string()
            } else {
                format!("{} changed", reasons.join(", "))
            };
            info!(host = %t.host, commit = %c, "Rebooting {} ({why})", t.host);
            if let Err(e) = self.nixos.reboot() {
                // Stay in the rebooting phase: the next pass asks again.
                error!(host = %t.host, commit = %c, "{e}");
                return self.finish(Outcome::Failed, Some(&t.commit), e.to_string());
            }
            return self.finish(
                Outcome::Rebooting,
                Some(&t.commit),
                format!("rebooting into commit {c} ({why})"),
            );
        }
        if let Err(e) = self.nixos.switch() {
            if hold.is_none() {
                return self.switch_failed(t, e.to_string());
            }
            // Under the lease a failed activation is judged by the health checks, which
            // roll it back if the node is not healthy.
            error!(host = %t.host, commit = %c, "{e}");
        }
        if let Some(hold) = hold {
            let v = crate::rollout::Verify {
                commit: t.commit.clone(),
                host: t.host.clone(),
                system,
                hold,
                deadline: crate::clock::wall(t.rollout.health_timeout),
                rollback: None,
                watch: t.watch_namespaces.clone(),
                since: SystemTime::now(),
            };
            return self.verify(v, &t.rollout);
        }
        self.record_applied(&t.commit, system)?;
        info!(host = %t.host, commit = %c, "{} switched to commit {c}", t.host);
        self.finish(
            Outcome::Applied,
            Some(&t.commit),
            format!("applied commit {c}"),
        )
    }

    /// A switch (or boot) that failed: activation may have gone part of the way, so the file
    /// stays, and the commit is not tried again until a new one arrives.
    fn switch_failed(&mut self, t: &Target, msg: String) -> anyhow::Result<Outcome> {
        let c = short(Some(&t.commit));
        error!(host = %t.host, commit = %c, "switching {} to commit {c} failed; not trying this commit again: {msg}", t.host);
        self.mark_rejected(t.commit.clone(), msg.clone());
        self.finish(Outcome::Rejected, Some(&t.commit), msg)
    }

    /// Records that the node runs `commit`'s `system`, and keeps a copy of the file it was
    /// built from: later passes compare the file on disk with it to notice hand edits and
    /// files landed by an interrupted pass.
    pub(crate) fn record_applied(&mut self, commit: &str, system: String) -> anyhow::Result<()> {
        if let Ok(text) = std::fs::read(&self.nixos.config) {
            state::write_atomic(&self.applied_path(), &text, 0o600)?;
        }
        self.state.phase = Phase::Idle;
        self.state.applied = Some(commit.to_string());
        self.state.applied_system = Some(system);
        Ok(())
    }

    fn applied_path(&self) -> PathBuf {
        self.settings.state_dir.join(APPLIED_CONFIG)
    }

    /// A build Nix refused: the previous file goes back, byte for byte.
    fn reject(&mut self, t: &Target, had_previous: bool, error: String) -> anyhow::Result<Outcome> {
        self.restore(had_previous)?;
        let c = short(Some(&t.commit));
        error!(host = %t.host, commit = %c, "commit {c} rejected on {}: {error}", t.host);
        warn!(host = %t.host, commit = %c, "Changes reverted on {}: configuration.nix is back to what it was", t.host);
        self.mark_rejected(t.commit.clone(), error.clone());
        self.finish(
            Outcome::Rejected,
            Some(&t.commit),
            format!("commit {c} rejected: {error}"),
        )
    }

    /// Records `commit` as not to be tried again (until a new commit arrives) and ends
    /// whatever phase was under way.
    pub(crate) fn mark_rejected(&mut self, commit: impl Into<String>, error: impl Into<String>) {
        self.state.rejected = Some(Rejected {
            commit: commit.into(),
            error: error.into(),
            at: state::now(),
        });
        self.state.phase = Phase::Idle;
    }

    pub(crate) fn previous_path(&self) -> PathBuf {
        self.settings.state_dir.join(PREVIOUS_CONFIG)
    }

    /// Puts the previous configuration.nix back (or removes the new one if there was none).
    pub(crate) fn restore(&self, had_previous: bool) -> anyhow::Result<()> {
        let config = &self.nixos.config;
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
    fn write_token(&self, t: &Target) -> anyhow::Result<()> {
        let token = match &t.token {
            None => return Ok(()),
            Some(TokenSource::Inline(s)) => s.clone(),
            Some(TokenSource::File(f)) => token_from_file(f)?,
        };
        let path = self.settings.state_dir.join(TOKEN_FILE_NAME);
        let wanted = format!("{token}\n");
        if std::fs::read_to_string(&path).ok().as_deref() == Some(wanted.as_str()) {
            return Ok(());
        }
        state::write_atomic(&path, wanted.as_bytes(), 0o600)
    }
}

/// The join token in `path`, the inventory's `join_token_file`. Whoever can push to the
/// inventory chooses that path, and k3s sends the token to the join address: so only a
/// token-shaped file (one line of printable ASCII, at most 1 KiB, a regular file) is taken,
/// never `/etc/shadow` or a private key. The message never quotes the file.
fn token_from_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let refuse = |why: &str| {
        anyhow!(
            "join_token_file {}: {why}; it must hold only the k3s token (one line of printable ASCII, at most 1 KiB)",
            path.display()
        )
    };
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read join_token_file {}", path.display()))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("cannot read join_token_file {}", path.display()))?
        .take(1025)
        .read_to_end(&mut bytes)?;
    if bytes.len() > 1024 {
        return Err(refuse("it is larger than a token"));
    }
    let text = String::from_utf8(bytes).map_err(|_| refuse("it is not text"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(refuse("it is empty"));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(refuse(
            "it holds more than one line, spaces or other characters",
        ));
    }
    Ok(token.to_string())
}

/// Every secret value of the inventory, for redaction.
fn secrets(inv: &Inventory) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = &inv.join_token {
        out.push(t.expose().to_string());
    }
    if let Some(f) = &inv.join_token_file {
        if let Ok(t) = std::fs::read_to_string(f) {
            out.push(t.trim().to_string());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A unified diff from `old` to `new`, with every secret replaced by `<redacted>`, and
/// string values of keys that name a token, password or secret hidden too (a hand-edited
/// file may carry them).
pub fn diff(old: &str, new: &str, secrets: &[String]) -> String {
    let d = similar::TextDiff::from_lines(old, new);
    let text = d
        .unified_diff()
        .context_radius(3)
        .header(
            "configuration.nix (on disk)",
            "configuration.nix (rendered)",
        )
        .to_string();
    redact(&text, secrets)
}

/// Hides secrets in text for logs and status.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "<redacted>");
    }
    out.lines()
        .map(redact_assignment)
        .collect::<Vec<_>>()
        .join("\n")
        + if out.ends_with('\n') { "\n" } else { "" }
}

/// Words that mark a name as holding a secret (matched in lower case).
const SECRET_WORDS: &[&str] = &[
    "token",
    "passw",
    "secret",
    "credential",
    "privatekey",
    "private_key",
    "apikey",
    "api_key",
    "accesskey",
    "access_key",
    "psk",
    "auth",
];

fn secret_name(name: &str) -> bool {
    let n = name.trim().to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| n.contains(w))
        && !n.ends_with("file")
        && !n.contains("file\"")
        && !n.contains("authorizedkeys")
}

/// A line with what looks secret hidden: the string of an assignment whose name says secret
/// (`token = "…";`, `password`, `secretKey`… but not `tokenFile`), the value of a secret
/// flag (`"--etcd-s3-secret-key=…"`), and the password of a URL (`postgres://u:…@h`).
fn redact_assignment(line: &str) -> String {
    let mut out = line.to_string();
    if let Some(lhs) = line.split('=').next() {
        if secret_name(lhs) {
            if let (Some(a), Some(b)) = (line.find('"'), line.rfind('"')) {
                if b > a {
                    out = format!("{}\"<redacted>\"{}", &line[..a], &line[b + 1..]);
                }
            }
        }
    }
    // `--flag=value` where the flag's name says secret.
    let mut rebuilt = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("--") {
        rebuilt.push_str(&rest[..i]);
        let flag = &rest[i..];
        let end = flag
            .find(|c: char| c == '"' || c.is_whitespace())
            .unwrap_or(flag.len());
        let (whole, after) = flag.split_at(end);
        match whole.split_once('=') {
            Some((name, _)) if secret_name(name) => {
                rebuilt.push_str(name);
                rebuilt.push_str("=<redacted>");
            }
            _ => rebuilt.push_str(whole),
        }
        rest = after;
    }
    rebuilt.push_str(rest);
    // `scheme://user:password@host`.
    let mut out = String::with_capacity(rebuilt.len());
    let mut rest = rebuilt.as_str();
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        let auth = &rest[i + 3..];
        let end = auth
            .find(|c: char| c == '/' || c == '"' || c.is_whitespace())
            .unwrap_or(auth.len());
        match auth[..end].rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split(':').next().unwrap_or("");
                out.push_str(&format!("{user}:<redacted>@{host}"));
            }
            _ => out.push_str(&auth[..end]),
        }
        rest = &auth[end..];
    }
    out.push_str(rest);
    out
}

/// A commit for logs: its first 12 characters, or `none`.
pub fn short(commit: Option<&str>) -> &str {
    match commit {
        Some(c) => &c[..c.len().min(12)],
        None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_hide_the_token_and_token_like_assignments() {
        let old = "{\n  services.k3s.token = \"abc123\";\n  x = 1;\n}\n";
        let new = "{\n  services.k3s.tokenFile = \"/var/lib/nk3-agent/join-token\";\n  x = 2; # abc123\n}\n";
        let d = diff(old, new, &["abc123".to_string()]);
        assert!(!d.contains("abc123"), "{d}");
        assert!(d.contains("-  services.k3s.token = \"<redacted>\";"), "{d}");
        assert!(
            d.contains("+  services.k3s.tokenFile = \"/var/lib/nk3-agent/join-token\";"),
            "{d}"
        );
        assert!(d.contains("+  x = 2; # <redacted>"), "{d}");
    }

    #[test]
    fn only_a_token_shaped_file_is_taken_as_the_join_token() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("token");
        std::fs::write(&ok, "K10abc::server:s3cret\n").unwrap();
        assert_eq!(token_from_file(&ok).unwrap(), "K10abc::server:s3cret");
        let shadow = dir.path().join("shadow");
        std::fs::write(
            &shadow,
            "root:$6$s3cret:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
        )
        .unwrap();
        let key = dir.path().join("key");
        std::fs::write(
            &key,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(5000)).unwrap();
        for (p, why) in [
            (&shadow, "more than one line"),
            (&key, "more than one line"),
            (&big, "larger than a token"),
            (&dir.path().to_path_buf(), "not a regular file"),
        ] {
            let e = token_from_file(p).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("s3cret") && !e.contains("b3Blbn"), "{e}");
        }
    }

    #[test]
    fn hand_edits_with_other_secrets_are_hidden_too() {
        for (line, hidden) in [
            ("  services.foo.secretKey = \"AKIAS3CR3T\";", "AKIAS3CR3T"),
            (
                "  environment.variables.API_KEY = \"k-s3cr3t\";",
                "k-s3cr3t",
            ),
            (
                "  networking.wireless.networks.x.psk = \"wifi-s3cr3t\";",
                "wifi-s3cr3t",
            ),
            (
                "  users.users.ops.hashedPassword = \"$6$s3cr3t\";",
                "$6$s3cr3t",
            ),
            (
                "    extraFlags = [ \"--etcd-s3-secret-key=S3CR3T\" \"--disable=traefik\" ];",
                "S3CR3T",
            ),
            (
                "    extraFlags = [ \"--datastore-endpoint=postgres://k3s:pa55@db:5432/k3s\" ];",
                "pa55",
            ),
            (
                "    extraFlags = [ \"--vpn-auth=name=tailscale,joinKey=tskey-s3cr3t\" ];",
                "tskey-s3cr3t",
            ),
        ] {
            let r = redact(line, &[]);
            assert!(!r.contains(hidden), "{line} -> {r}");
        }
        let kept = "    extraFlags = [ \"--disable=traefik\" \"--node-ip=10.0.0.3\" ];\n  services.k3s.tokenFile = \"/run/t\";";
        assert_eq!(redact(kept, &[]), kept);
    }

    #[test]
    fn short_commits() {
        assert_eq!(short(Some("0123456789abcdef")), "0123456789ab");
        assert_eq!(short(None), "none");
    }
}
