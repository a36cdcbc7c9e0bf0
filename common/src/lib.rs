//! nk3-common: what every part of nk3 agrees on.
//!
//! The inventory model and its validation, node naming, and rendering of a node's
//! `configuration.nix`. No I/O beyond reading what it is given.

pub mod check;
pub mod identity;
pub mod inventory;
pub mod naming;
pub mod render;
pub mod yaml;
