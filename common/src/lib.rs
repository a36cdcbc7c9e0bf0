//! nk3-common: what every part of nk3 agrees on.
//!
//! The inventory model and its validation, node identity and naming, rendering of a node's
//! `configuration.nix`, and the agent's persisted state. No I/O beyond reading what it is
//! given.

pub mod check;
pub mod disruption;
pub mod identity;
pub mod inventory;
pub mod kubeconfig;
pub mod lease;
pub mod naming;
pub mod render;
pub mod rollout;
pub mod state;
pub mod yaml;
