//! The command line, as clap parses it. Values are checked further by each command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::env_vars;

/// Default state directory; matches the NixOS module.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nk3-agent";

/// Name of the join token file inside the state directory.
pub const TOKEN_FILE_NAME: &str = "join-token";

/// nk3-agent keeps this NixOS k3s node in the state its git repository declares.
#[derive(Debug, Parser)]
#[command(name = "nk3-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: poll the repository, reconcile this node, repeat.
    Run(Box<RunArgs>),
    /// Show this node's identity, commits, phase and last result.
    Status(Box<StatusArgs>),
    /// Show what `run --once` would do now, with the diff, without doing it.
    Plan(Box<AgentArgs>),
    /// Make every agent of the cluster fetch now, instead of at its next poll.
    Nudge(NudgeArgs),
    /// On a server: make an agent-role node's least-privilege credentials for the k3s API
    /// and write them as a kubeconfig to copy to that node.
    Credentials(CredentialsArgs),
    /// Print one node's configuration.nix, or write every node's with --all.
    Render(Box<RenderArgs>),
    /// Check an inventory; print every problem as file:line: key: message.
    Validate(ValidateArgs),
    /// Print a shell completion script (for packagers).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (for packagers).
    #[command(hide = true)]
    Man,
}

/// `nk3-agent render`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The inventory file.
    #[arg(long, value_name = "FILE")]
    pub inventory: PathBuf,
    /// The node to render: its IP address as written in the inventory, or its hostname.
    /// Without --node or --all, the machine this runs on is found in the inventory.
    #[arg(long, value_name = "IP", env = env_vars::NK3_NODE, conflicts_with = "all")]
    pub node: Option<String>,
    /// Render every node, writing <hostname>.nix files into --out.
    #[arg(long, requires = "out")]
    pub all: bool,
    /// Directory for --all.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Repository named in the file's header.
    #[arg(long, value_name = "URL")]
    pub repository: Option<String>,
    /// Commit named in the file's header.
    #[arg(long, value_name = "SHA", default_value = "uncommitted")]
    pub commit: String,
    /// State directory on the node; the token file k3s reads is <state-dir>/join-token.
    #[arg(long, value_name = "DIR", env = env_vars::NK3_STATE_DIR, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Interface for nodes whose entry has none (on a node, the agent detects it).
    #[arg(long, value_name = "NAME")]
    pub interface: Option<String>,
    /// Default gateway for nodes whose entry has none (on a node, the agent detects it).
    #[arg(long, value_name = "IP")]
    pub default_gateway: Option<std::net::IpAddr>,
    /// `system.stateVersion` for an inventory without `state_version` (on a node, read from
    /// the configuration.nix in --nixos-dir, as the agent does).
    #[arg(long, value_name = "RELEASE", env = env_vars::NK3_STATE_VERSION, value_parser = state_version)]
    pub state_version: Option<String>,
    /// Where the node's configuration.nix is (for its stateVersion, on a node).
    #[arg(long, value_name = "DIR", env = env_vars::NK3_NIXOS_DIR, default_value = "/etc/nixos")]
    pub nixos_dir: PathBuf,
    /// How this machine is recognised and what its default route is.
    #[command(flatten)]
    pub machine: MachineArgs,
}

/// A duration of at most a year (anything longer would overflow the clock it is added to).
fn bounded_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > std::time::Duration::from_secs(366 * 86_400) {
        return Err("give a duration longer than zero and at most a year".into());
    }
    Ok(d)
}

fn state_version(s: &str) -> Result<String, String> {
    nk3_common::check::state_version(s).map(|()| s.to_string())
}

/// A Kubernetes name: lower-case letters, digits and `-` (and `.` where `dots`), starting
/// and ending with a letter or digit, at most `max` long.
fn kube_name(s: &str, max: usize, dots: bool) -> Result<String, String> {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || dots && c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if s.is_empty()
        || s.len() > max
        || !s.chars().all(ok_char)
        || !edge(s.chars().next())
        || !edge(s.chars().last())
    {
        return Err(format!(
            "not a Kubernetes name: at most {max} lower-case letters, digits{} and '-', starting and ending with a letter or digit",
            if dots { ", '.'" } else { "" }
        ));
    }
    Ok(s.to_string())
}

fn namespace(s: &str) -> Result<String, String> {
    kube_name(s, 63, false)
}

/// Room is left for the slots' `-<n>`.
fn lease_name(s: &str) -> Result<String, String> {
    kube_name(s, 240, true)
}

/// Where the rollout Leases are (DESIGN section 7): every node of a cluster must agree.
#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    /// The namespace of the rollout Leases.
    #[arg(long, value_name = "NAMESPACE", env = env_vars::NK3_LEASE_NAMESPACE, default_value = "kube-system", value_parser = namespace)]
    pub lease_namespace: String,
    /// The name of the first rollout Lease (it carries the halt); with `max_unavailable: N`
    /// the slots are NAME-0…NAME-(N-1).
    #[arg(long, value_name = "NAME", env = env_vars::NK3_LEASE_NAME, default_value = "nk3-rollout", value_parser = lease_name)]
    pub lease_name: String,
}

impl LeaseArgs {
    /// The place these name.
    pub fn rollout_lease(&self) -> crate::cluster::RolloutLease {
        crate::cluster::RolloutLease {
            namespace: self.lease_namespace.clone(),
            name: self.lease_name.clone(),
        }
    }
}

/// Where the agent reads facts about the machine it runs on.
#[derive(Debug, Clone, Args)]
pub struct MachineArgs {
    /// The machine's SMBIOS product UUID, matched against nodes' `uuid`.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_PRODUCT_UUID_FILE, default_value = "/sys/class/dmi/id/product_uuid")]
    pub product_uuid_file: PathBuf,
    /// The kernel's IPv4 routing table, for the default route.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_ROUTE_TABLE, default_value = "/proc/net/route")]
    pub route_table: PathBuf,
    /// The kernel's IPv6 routing table, for the default route.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_ROUTE6_TABLE, default_value = "/proc/net/ipv6_route")]
    pub route6_table: PathBuf,
}

/// `nk3-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// One pass, then exit: 0 when the node is in the declared state (or waiting on a reboot
    /// it asked for), 1 when the pass failed.
    #[arg(long)]
    pub once: bool,
    /// Check the settings and print them as JSON, then exit without doing anything: what a
    /// service with this command line would run with.
    #[arg(long, conflicts_with = "once")]
    pub check: bool,
    /// Serve Prometheus metrics (phase, applied commit, last result, passes) on this address
    /// at /metrics. Unset: no endpoint.
    #[arg(long, value_name = "ADDR:PORT", env = env_vars::NK3_METRICS_ADDRESS)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Everything else.
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// `nk3-agent status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also list every node's applied commit and phase, and the lease holders, from the
    /// k3s API.
    #[arg(long)]
    pub cluster: bool,
    /// Everything else.
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// The agent's settings, shared by `run`, `status` and `plan`. Defaults match the NixOS
/// module; every path and command is a setting so that tests run the real binary against a
/// temporary root.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The git repository holding the inventory (https://, ssh://, git://, or a path).
    #[arg(long, value_name = "URL", env = env_vars::NK3_REPO)]
    pub repo: Option<String>,
    /// The branch to follow.
    #[arg(long, value_name = "NAME", env = env_vars::NK3_BRANCH, default_value = "main")]
    pub branch: String,
    /// The inventory's path inside the repository.
    #[arg(long, value_name = "PATH", env = env_vars::NK3_INVENTORY_PATH, default_value = "inventory.yaml")]
    pub inventory_path: String,
    /// Time between polls (a random tenth is added so nodes do not poll in step).
    #[arg(long, value_name = "DURATION", env = env_vars::NK3_POLL_INTERVAL, default_value = "60s", value_parser = bounded_duration)]
    pub poll_interval: std::time::Duration,
    /// The agent's own directory: git clone, state.json, lock, token file, backups.
    #[arg(long, value_name = "DIR", env = env_vars::NK3_STATE_DIR, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Where configuration.nix is written.
    #[arg(long, value_name = "DIR", env = env_vars::NK3_NIXOS_DIR, default_value = "/etc/nixos")]
    pub nixos_dir: PathBuf,
    /// This machine's node: its IP address as written in the inventory, or its hostname.
    /// Detected when not given.
    #[arg(long, value_name = "IP-or-name", env = env_vars::NK3_NODE)]
    pub node: Option<String>,
    /// Credentials for the k3s API: on servers the file k3s writes, on agent-role nodes the
    /// one `nk3-agent credentials NODE` makes on a server.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_KUBECONFIG, default_value = "/etc/rancher/k3s/k3s.yaml")]
    pub kubeconfig: PathBuf,
    /// k3s's data directory (its `--data-dir`). The certificates k3s keeps there once it has
    /// joined a cluster are how the agent knows this machine is a member, whose switches wait
    /// for the rollout lease, and not a fresh machine that applies at once.
    #[arg(long, value_name = "DIR", env = env_vars::NK3_K3S_DATA_DIR, default_value = "/var/lib/rancher/k3s")]
    pub k3s_data_dir: PathBuf,
    #[command(flatten)]
    pub lease: LeaseArgs,
    /// The nixos-rebuild program.
    #[arg(long, value_name = "CMD", env = env_vars::NK3_NIXOS_REBUILD, default_value = "nixos-rebuild")]
    pub nixos_rebuild: PathBuf,
    /// The longest `nixos-rebuild build` may take; beyond it the build is stopped and the
    /// pass fails (the node keeps what it runs, and the next pass builds again).
    #[arg(long, value_name = "DURATION", env = env_vars::NK3_BUILD_TIMEOUT, default_value = "2h", value_parser = bounded_duration)]
    pub build_timeout: std::time::Duration,
    /// The longest `nixos-rebuild switch`, `boot` or `switch --rollback` may take.
    #[arg(long, value_name = "DURATION", env = env_vars::NK3_SWITCH_TIMEOUT, default_value = "30m", value_parser = bounded_duration)]
    pub switch_timeout: std::time::Duration,
    /// The systemctl program.
    #[arg(long, value_name = "CMD", env = env_vars::NK3_SYSTEMCTL, default_value = "systemctl")]
    pub systemctl: PathBuf,
    /// The nix-channel program.
    #[arg(long, value_name = "CMD", env = env_vars::NK3_NIX_CHANNEL, default_value = "nix-channel")]
    pub nix_channel: PathBuf,
    /// The kubectl program, used only for the optional Ceph check (`ceph status` in the
    /// rook-ceph tools pod).
    #[arg(long, value_name = "CMD", env = env_vars::NK3_KUBECTL, default_value = "kubectl")]
    pub kubectl: PathBuf,
    /// The ssh program, for ssh:// and host:path repositories (OpenSSH).
    #[arg(long, value_name = "CMD", env = env_vars::NK3_SSH, default_value = "ssh")]
    pub ssh: PathBuf,
    /// The git program, used only to verify commit signatures.
    #[arg(long, value_name = "CMD", env = env_vars::NK3_GIT, default_value = "git")]
    pub git: PathBuf,
    /// The running system.
    #[arg(long, value_name = "PATH", env = env_vars::NK3_CURRENT_SYSTEM, default_value = "/run/current-system")]
    pub current_system: PathBuf,
    /// The system the machine booted.
    #[arg(long, value_name = "PATH", env = env_vars::NK3_BOOTED_SYSTEM, default_value = "/run/booted-system")]
    pub booted_system: PathBuf,
    /// This boot's id; a new one means the machine rebooted.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_BOOT_ID_FILE, default_value = "/proc/sys/kernel/random/boot_id")]
    pub boot_id_file: PathBuf,
    /// How long git may wait to connect to the repository, and for each answer while
    /// fetching, before the poll is given up (and retried at the next one).
    #[arg(long, value_name = "DURATION", env = env_vars::NK3_GIT_TIMEOUT, default_value = "60s", value_parser = bounded_duration)]
    pub git_timeout: std::time::Duration,
    /// SSH private key for an ssh:// repository.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_SSH_KEY_FILE)]
    pub ssh_key_file: Option<PathBuf>,
    /// known_hosts for an ssh:// repository; the server's key must be listed. Without it,
    /// ssh's own known_hosts files are used; an unknown host is always refused.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_KNOWN_HOSTS)]
    pub known_hosts: Option<PathBuf>,
    /// File holding a token for an https:// repository (the user name comes from the URL).
    #[arg(long, value_name = "FILE", env = env_vars::NK3_REPO_TOKEN_FILE)]
    pub repo_token_file: Option<PathBuf>,
    /// SSH allowed-signers file (as for `git verify-commit`): only commits signed by one of
    /// these keys are applied.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_ALLOWED_SIGNERS)]
    pub allowed_signers: Option<PathBuf>,
    /// GnuPG home whose keyring holds the keys allowed to sign commits.
    #[arg(long, value_name = "DIR", env = env_vars::NK3_GPG_HOME)]
    pub gpg_home: Option<PathBuf>,
    /// Follow the branch even when it is rewritten to a commit that does not descend from
    /// the one applied (force-push). Off: such a head is refused and reported.
    #[arg(long, env = env_vars::NK3_ALLOW_FORCE_PUSH)]
    pub allow_force_push: bool,
    /// Log level: error, warn, info or debug.
    #[arg(long, value_name = "LEVEL", env = env_vars::NK3_LOG_LEVEL, default_value = "info")]
    pub log_level: tracing::Level,
    /// How this machine is recognised and what its default route is.
    #[command(flatten)]
    pub machine: MachineArgs,
}

/// `nk3-agent nudge`.
#[derive(Debug, Args)]
pub struct NudgeArgs {
    /// The commit just pushed (recorded on the Lease as nk3.io/desired-commit); any value
    /// that differs from the last one wakes the agents.
    #[arg(long, value_name = "SHA")]
    pub commit: Option<String>,
    /// Credentials for the k3s API.
    #[arg(long, value_name = "FILE", env = env_vars::NK3_KUBECONFIG, default_value = "/etc/rancher/k3s/k3s.yaml")]
    pub kubeconfig: PathBuf,
    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// `nk3-agent credentials`.
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// The node: its hostname, or with --inventory its address as written there.
    #[arg(value_name = "NODE")]
    pub node: String,
    /// The inventory: its max_unavailable and Ceph check decide what the roles grant, its
    /// join address is the API address written for the node.
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// How many rollout Leases the roles grant (default: the inventory's max_unavailable,
    /// else 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_unavailable: Option<u32>,
    /// The API address the node reaches (default: https://<join_address>:6443 with
    /// --inventory, else the admin kubeconfig's server unless it is this machine itself).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Where to write the node's kubeconfig, mode 0600 (default: nk3-<hostname>.kubeconfig).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Make a new token; the old one stops working at once.
    #[arg(long)]
    pub rotate: bool,
    /// Admin credentials for the k3s API (on a server, the file k3s writes).
    #[arg(long, value_name = "FILE", env = env_vars::NK3_KUBECONFIG, default_value = "/etc/rancher/k3s/k3s.yaml")]
    pub kubeconfig: PathBuf,
    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// `nk3-agent validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The inventory file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}
