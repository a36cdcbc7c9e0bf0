//! End-to-end tests: the real `nk3-agent` binary, real Nix (`nix-instantiate` from Debian's
//! nix-bin), real files in temporary directories.

mod agent;
mod agent_role;
mod bad_inventories;
mod cli;
mod confirm;
mod fixtures;
mod git_servers;
mod golden;
mod hostile;
mod injection;
mod module;
mod nix_eval;
mod options;
mod rollout;
mod signing;
mod support;
mod transports;
