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
    /// Print one node's configuration.nix, or write every node's with --all.
    Render(Box<RenderArgs>),
    /// Check an inventory; print every problem as file:line: key: message.
    Validate(ValidateArgs),
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
    /// How this machine is recognised and what its default route is.
    #[command(flatten)]
    pub machine: MachineArgs,
}

/// Where the agent reads facts about the machine it runs on.
#[derive(Debug, Args)]
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

/// `nk3-agent validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The inventory file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}
